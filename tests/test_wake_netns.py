"""Wake-on-LAN across two network namespaces joined by a veth pair, with real daemons and a real UDP receiver.

The peer (namespace a) tells the desktop (namespace b) the MAC of the veth its link came in on and its subnet's
broadcast address; the desktop keeps them with the pairing. The peer then "sleeps": namespace a stops answering the
desktop (a blackhole route for its address: its pings and dials go unanswered, as a suspended machine's would) and the
daemon stops. Two requests that only the peer can hold arrive at once: the desktop broadcasts one magic packet per
port (captured in namespace a by a socket bound to 0.0.0.0:9 and :7, where the sleeping NIC would see it), holds
both requests, and forwards them once the peer is back and its link is up. `hybridd wake` sends one by hand.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from netns import NetnsPair, emit, netns_available

from hybridd.peer.wake import magic_packet
from tests.conftest import http, wait_for
from tests.nodes import node_config
from tests.test_peer_netns import LONG_CTX, RUN, SHORT_BODY, NetnsNode, nodes_in

LAN_PORT = 11436  # fixed, so the restarted peer answers where the desktop dials it (a fresh namespace: it is free)
WAKE_PORTS = (9, 7)


def capture_agent(ports: list[int]) -> None:
    """Receive UDP broadcasts on 0.0.0.0:port for each port; report each datagram as hex until stdin closes."""
    socks = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.bind(("0.0.0.0", port))
        socks.append(sock)

    def receive(sock: socket.socket) -> None:
        while True:
            try:
                data, (address, _) = sock.recvfrom(2048)
            except OSError:
                return
            emit({"event": "packet", "port": sock.getsockname()[1], "from": address, "hex": data.hex()})

    for sock in socks:
        threading.Thread(target=receive, args=(sock,), daemon=True).start()
    emit({"event": "ready"})
    sys.stdin.read()
    for sock in socks:
        sock.close()


def request_agent(url: str, body: dict[str, Any], timeout: float) -> None:
    """One request to the desktop's loopback API (this namespace's), its answer reported when it comes."""
    emit({"event": "sent"})
    started = time.monotonic()
    reply = http("POST", url + "/v1/completions", body, timeout=timeout)
    emit({"event": "answer", "status": reply.status, "headers": {k.lower(): v for k, v in reply.headers.items()},
          "body": reply.body.decode(errors="replace"), "seconds": time.monotonic() - started})


def _mac_of(net: NetnsPair, ns: Any) -> str:
    shown = net.run(ns, "ip", "-j", "link", "show", ns.iface)
    return str(json.loads(shown.stdout)[0]["address"])


def _sleep(net: NetnsPair) -> None:
    """Namespace a stops answering b (what b sends still arrives: a sleeping NIC still sees the magic packet)."""
    for key in ("all", "default", net.a.iface):  # what arrives from b must not be dropped for its return route
        done = net.run(net.a, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0")
        assert done.returncode == 0, done.stderr
    done = net.run(net.a, "ip", "route", "add", "blackhole", f"{net.b.address}/32")
    assert done.returncode == 0, done.stderr


def _wake(net: NetnsPair) -> None:
    done = net.run(net.a, "ip", "route", "del", "blackhole", f"{net.b.address}/32")
    assert done.returncode == 0, done.stderr


def _paired(desk: NetnsNode, name: str) -> dict[str, Any]:
    [peer] = [p for p in desk.get("/hybridd/v1/peers")["paired"] if p["name"] == name]
    return peer


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hybridd.demo.tiny_gguf import TinyLlama, write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("netns-wake") / "a.gguf", TinyLlama(n_ctx_train=262144))


@pytest.mark.timeout(150)
def test_a_request_for_a_sleeping_peer_wakes_it_once_and_is_forwarded_when_its_link_is_up(
        long_model: Path, tmp_path: Path) -> None:
    ok, why = netns_available()
    if not ok:
        pytest.skip(why)
    from tests.test_peer_netns import budgets as budgets_fixture

    peer_budget, desk_budget = budgets_fixture.__wrapped__(long_model)  # type: ignore[attr-defined]
    name = f"spark-{RUN}-wake"
    with NetnsPair() as net, nodes_in(net) as start:
        peer_config = node_config(long_model, name, "peer", peer_budget, lan_listen=f"{net.a.address}:{LAN_PORT}")
        peer = start(net.a, peer_config, tmp_path / "peer", "peer")
        desk = start(net.b, node_config(long_model, f"desk-{RUN}", "desktop", desk_budget,
                                        node_extra="peer_wake_s = 30\nwake_timeout_s = 60"),
                     tmp_path / "desk", "desktop")
        code = json.loads(peer.cli("pair", "--json")["stdout"])["code"]
        paired = desk.cli("pair", f"{net.a.address}:{LAN_PORT}", code)
        assert paired["rc"] == 0, paired["stderr"]

        # The peer's hello told the MAC of the veth the link came in on, and the veth subnet's broadcast address.
        mac = _mac_of(net, net.a)
        learned = wait_for(lambda: (p := _paired(desk, name))["link"] == "up" and p["models"] and p["mac"] and p,
                           timeout=20, interval=0.1, what="the desktop's link to the peer, with its MAC")
        assert (learned["mac"], learned["wake_broadcast"]) == (mac, "10.77.0.255"), learned
        stored = json.loads((tmp_path / "desk" / "state" / "hybridd" / "pairings.json").read_text())
        [entry] = stored["peers"]
        assert entry["mac"] == mac and entry["last_known"]["models"][0]["id"] == "a", entry

        # A peer that stops while its host still answers is awake, only its hybridd is not there: not woken.
        assert peer.stop() == 0
        down = wait_for(lambda: (p := _paired(desk, name))["link"] == "down" and p, timeout=15, interval=0.1,
                        what="the desktop to see the peer's link go down")
        assert not down["wakeable"], down
        _sleep(net)  # now its host answers nothing: it may sleep
        wait_for(lambda: _paired(desk, name)["wakeable"], timeout=20, interval=0.1,
                 what="the desktop's dial to go unanswered")
        capture = net.spawn(net.a, "test_wake_netns:capture_agent", list(WAKE_PORTS))
        capture.expect(lambda line: line.get("event") == "ready", 10, "the capture sockets")

        far = {**SHORT_BODY, "prompt": "wake up", "hybridd": {"min_ctx": LONG_CTX}}
        requests = [net.spawn(net.b, "test_wake_netns:request_agent", desk.url, far, 90.0) for _ in range(2)]
        for agent in requests:
            agent.expect(lambda line: line.get("event") == "sent", 10, "the request to go out")
        first = capture.expect(lambda line: line.get("event") == "packet", 15, "the magic packet")
        assert bytes.fromhex(first["hex"]) == magic_packet(mac) and first["from"] == net.b.address, first
        # held, not answered: the peer is still down
        assert not [line for agent in requests for line in agent.collect(1.0) if line.get("event") == "answer"]

        _wake(net)
        woken_peer = start(net.a, peer_config, tmp_path / "peer", "peer, woken")  # the same identity and pairing
        answers = [agent.expect(lambda line: line.get("event") == "answer", 60, "the held request's answer")
                   for agent in requests]
        for answer in answers:
            assert answer["status"] == 200, answer["body"]
            assert answer["headers"]["x-hybridd-placement"] == f"peer:{name}"
            assert f"waking {name} (~30 s)" in answer["headers"]["x-hybridd-reason"], answer["headers"]
            assert json.loads(answer["body"])["usage"]["completion_tokens"] >= 1
        # one wake for both requests: one packet on each port
        capture.collect(0.5)
        packets = [line for line in capture.seen if line.get("event") == "packet"]
        assert sorted(p["port"] for p in packets) == sorted(WAKE_PORTS), packets

        # by hand: `hybridd wake NAME` through the daemon, which reports where the packet went
        woken = desk.cli("wake", name, "--json")
        assert woken["rc"] == 0, woken["stderr"]
        assert json.loads(woken["stdout"]) | {"wake_timeout_s": None} == {
            "peer": name, "mac": mac, "broadcast": "10.77.0.255", "sent_to": ["10.77.0.255:9", "10.77.0.255:7"],
            "link": "up", "wake_timeout_s": None}
        unknown = desk.cli("wake", "nosuch")
        assert unknown["rc"] == 1 and "no paired peer is named 'nosuch' (see `hybridd peers`)" in unknown["stderr"]
        by_hand = wait_for(lambda: len(seen := [line for line in [*capture.seen, *capture.collect(0.2)]
                                                if line.get("event") == "packet"]) >= 4 and seen[2:],
                           timeout=10, interval=0, what="the packets `hybridd wake` sent")
        assert sorted(p["port"] for p in by_hand) == sorted(WAKE_PORTS), by_hand
        assert all(bytes.fromhex(p["hex"]) == magic_packet(mac) for p in by_hand)

        # The peer sleeps again and the desktop restarts (with a short wake timeout): its pairing still knows the
        # peer's MAC, hardware and models, so a request only the peer can hold still wakes it, and is refused with
        # the reason once the peer has not come up in time.
        _sleep(net)
        assert woken_peer.stop() == 0 and desk.stop() == 0
        desk = start(net.b, node_config(long_model, f"desk-{RUN}", "desktop", desk_budget,
                                        node_extra="peer_wake_s = 30\nwake_timeout_s = 3"),
                     tmp_path / "desk", "desktop, restarted")
        refused = desk.post("/v1/completions", far)
        assert refused["status"] == 503, refused
        message = json.loads(refused["body"])["error"]["message"]
        assert f"{name} did not wake within 3 s (node.wake_timeout_s) of its Wake-on-LAN packet ({mac} via " \
               "10.77.0.255); its link: " in message, message
        wait_for(lambda: len([line for line in [*capture.seen, *capture.collect(0.2)]
                              if line.get("event") == "packet"]) >= 6, timeout=5, interval=0,
                 what="the restarted desktop's magic packets")
