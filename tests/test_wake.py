"""Wake-on-LAN parts: the magic packet, sending it to a real UDP socket, the hello fields that carry the MAC, the
pairing store that keeps it with the peer's last-known inventory, finding the NIC of an address, and the CLI."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import ssl
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import psutil
import pytest

from hybridd.cli import wake as wake_cli
from hybridd.peer.errors import StateFileError
from hybridd.peer.identity import new_identity
from hybridd.peer.link import LinkClient
from hybridd.peer.messages import Hello, LinkProtocolError, ModelOffer, decode, encode
from hybridd.peer.pairing import PairedPeer, PairingStore
from hybridd.peer.pairing.store import LastKnown
from hybridd.peer.wake import WakeError, WakeTarget, magic_packet, send_magic_packet
from hybridd.probe.interfaces import wake_address

MAC = "52:a0:ea:91:bc:83"


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    """A real UDP socket on 0.0.0.0 (a free port) that takes broadcasts, as a NIC's magic-packet filter would."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.bind(("0.0.0.0", 0))
        sock.settimeout(5)
        yield sock


def test_the_magic_packet_is_six_ff_then_the_mac_sixteen_times() -> None:
    packet = magic_packet(MAC)
    assert len(packet) == 102 and packet[:6] == b"\xff" * 6
    assert [packet[6 + 6 * i: 12 + 6 * i] for i in range(16)] == [bytes.fromhex("52a0ea91bc83")] * 16
    assert magic_packet(MAC.upper().replace(":", "-")) == packet
    for bad in ("52:a0:ea:91:bc", "52:a0:ea:91:bc:8g", "52a0ea91bc83", ""):
        with pytest.raises(ValueError):
            magic_packet(bad)


def test_the_packet_reaches_a_socket_listening_on_the_broadcast_address(receiver: socket.socket) -> None:
    port = receiver.getsockname()[1]
    sent = send_magic_packet(WakeTarget(MAC, "127.255.255.255"), ports=(port, port))
    assert sent == [f"127.255.255.255:{port}"] * 2
    assert [receiver.recvfrom(2048)[0] for _ in sent] == [magic_packet(MAC)] * 2


def test_a_packet_that_cannot_go_out_is_a_wake_error_naming_the_mac_and_address() -> None:
    with pytest.raises(WakeError, match=f"cannot send the Wake-on-LAN packet for {MAC} to 127.255.255.255: "):
        send_magic_packet(WakeTarget(MAC, "127.255.255.255"), ports=(0,))
    assert WakeError.status == 503


def test_hello_carries_the_mac_and_broadcast_and_older_nodes_still_say_hello() -> None:
    hello = Hello("n" * 64, "spark", "peer", "1.0", hardware="dgx-spark", mac=MAC, broadcast="10.0.0.255")
    assert decode(encode(hello)) == hello
    plain = Hello("n" * 64, "spark", "peer", "1.0")
    body = msgpack.unpackb(encode(plain))
    assert "mac" not in body and "broadcast" not in body  # a node that predates them reads what it always did
    assert decode(encode(plain)) == plain
    for key, value, problem in (("mac", "nonsense", 'expected a MAC address like "aa:bb:cc:dd:ee:ff"'),
                                ("broadcast", "10.0.0", 'expected an IPv4 address like "192.168.1.255"')):
        frame = msgpack.packb({**body, key: value})
        with pytest.raises(LinkProtocolError, match=f"hello.{key}: {problem}"):
            decode(frame)


def _peer(tmp: Path) -> PairedPeer:
    identity = new_identity("spark")
    return PairedPeer(identity.node_id, "spark", "peer", identity.cert_pem, 1.0, "10.0.0.2", 11436)


def test_the_store_keeps_the_mac_and_last_known_inventory_across_a_restart(tmp_path: Path) -> None:
    store = PairingStore.load(tmp_path)
    peer = _peer(tmp_path)
    store.add(peer)
    models = (ModelOffer("gpt-oss-120b", 131072, loaded_ctx=65536, trainable=True), ModelOffer("glm", 202752))
    known = LastKnown("dgx-spark", models, {"gb10": 110 * 2**30})
    store.remember(peer.node_id, mac=MAC, broadcast="10.0.0.255", last_known=known)
    written = (tmp_path / "pairings.json").stat().st_mtime_ns
    store.remember(peer.node_id, mac=None, broadcast=None, last_known=known)  # nothing new: not written again
    assert (tmp_path / "pairings.json").stat().st_mtime_ns == written

    again = PairingStore.load(tmp_path).get(peer.node_id)
    assert again is not None and (again.mac, again.wake_broadcast) == (MAC, "10.0.0.255")
    # what was loaded is not kept: a woken peer has nothing loaded
    assert again.last_known == LastKnown("dgx-spark", (ModelOffer("gpt-oss-120b", 131072, trainable=True),
                                                       ModelOffer("glm", 202752)), {"gb10": 110 * 2**30})


def test_a_pairings_file_from_before_wake_on_lan_still_loads(tmp_path: Path) -> None:
    store = PairingStore.load(tmp_path)
    store.add(_peer(tmp_path))
    doc = json.loads((tmp_path / "pairings.json").read_text())
    for entry in doc["peers"]:
        for key in ("mac", "wake_broadcast", "last_known"):
            del entry[key]
    (tmp_path / "pairings.json").write_text(json.dumps(doc))
    [old] = PairingStore.load(tmp_path).all()
    assert (old.mac, old.wake_broadcast, old.last_known) == (None, None, None)


def test_a_bad_mac_in_the_pairings_file_names_the_entry(tmp_path: Path) -> None:
    store = PairingStore.load(tmp_path)
    store.add(_peer(tmp_path))
    doc = json.loads((tmp_path / "pairings.json").read_text())
    doc["peers"][0]["mac"] = "52:a0"
    (tmp_path / "pairings.json").write_text(json.dumps(doc))
    with pytest.raises(StateFileError, match=r"peers\[0\]\.mac' expected a MAC address"):
        PairingStore.load(tmp_path)


class Address(NamedTuple):
    """One address of an interface, as psutil.net_if_addrs lists it (the fields wake_address reads)."""

    family: int
    address: str
    netmask: str | None


def _addresses(*entries: tuple[int, str, str | None]) -> list[Address]:
    return [Address(*entry) for entry in entries]


INTERFACES = {
    "lo": _addresses((socket.AF_INET, "127.0.0.1", "255.0.0.0"), (psutil.AF_LINK, "00:00:00:00:00:00", None)),
    "eth0": _addresses((socket.AF_INET, "192.168.1.20", "255.255.255.0"),
                       (socket.AF_INET6, "fe80::50a0:eaff:fe91:bc83%eth0", "ffff:ffff:ffff:ffff::"),
                       (psutil.AF_LINK, MAC.upper(), None)),
    "wg0": _addresses((socket.AF_INET, "10.9.0.2", "255.255.255.0")),  # a tunnel: no MAC
}


@pytest.mark.parametrize(("address", "found"), [
    ("192.168.1.20", (MAC, "192.168.1.255")),
    ("::ffff:192.168.1.20", (MAC, "192.168.1.255")),  # a dual-stack listener's view of an IPv4 link
    ("fe80::50a0:eaff:fe91:bc83%eth0", (MAC, "192.168.1.255")),  # IPv6 link: the same NIC's IPv4 broadcast
    ("127.0.0.1", None),
    ("10.9.0.2", None),
    ("192.168.1.99", None),
    ("not an address", None),
])
def test_the_nic_of_the_links_address_gives_the_mac_and_broadcast(address: str, found: Any) -> None:
    assert wake_address(address, INTERFACES) == found


def test_this_machines_own_interfaces_are_read_through_psutil() -> None:
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family == socket.AF_INET:
                result = wake_address(entry.address)
                assert result is None or (len(result[0]) == 17 and result[1].count(".") == 3)


def test_hybridd_wake_with_a_mac_sends_from_here_without_a_daemon(receiver: socket.socket) -> None:
    port = receiver.getsockname()[1]

    def send(target: WakeTarget) -> list[str]:
        return send_magic_packet(target, ports=(port,))  # the real ports 9 and 7 need root

    out = io.StringIO()

    def no_daemon(path: str, body: Any) -> Any:
        raise AssertionError(f"asked the daemon for {path}")

    args = Namespace(peer=None, mac=MAC.upper(), broadcast="127.255.255.255", wait=0.0, json=False)
    assert wake_cli.run(args, no_daemon, out, send=send) == 0
    assert out.getvalue() == f"magic packet for {MAC} sent to 127.255.255.255:{port}\n"
    assert receiver.recvfrom(2048)[0] == magic_packet(MAC)
    with pytest.raises(SystemExit, match='--mac: expected a MAC address like "aa:bb:cc:dd:ee:ff", got "52:a0"'):
        wake_cli.run(Namespace(peer=None, mac="52:a0", broadcast="127.255.255.255", wait=0.0, json=False),
                     no_daemon, out)


def test_hybridd_wake_peer_asks_the_daemon_and_waits_for_the_link() -> None:
    asked: list[str] = []
    links = iter(["down", "down", "up"])

    def daemon(path: str, body: Any) -> Any:
        asked.append(path)
        if path.endswith("/wake"):
            return {"peer": "spark", "mac": MAC, "broadcast": "10.0.0.255", "sent_to": ["10.0.0.255:9", "10.0.0.255:7"],
                    "link": "down"}
        return {"paired": [{"name": "spark", "link": next(links)}]}

    out = io.StringIO()
    clock = iter(range(100))
    args = Namespace(peer="spark", mac=None, broadcast="255.255.255.255", wait=50.0, json=False)
    assert wake_cli.run(args, daemon, out, clock=lambda: float(next(clock))) == 0
    assert asked == ["/hybridd/v1/peers/spark/wake", *["/hybridd/v1/peers"] * 3]
    assert out.getvalue() == f"magic packet for spark ({MAC}) sent to 10.0.0.255:9, 10.0.0.255:7\nspark is up\n"


async def test_a_dial_refused_by_the_peers_host_says_it_is_awake_so_it_is_not_woken() -> None:
    # a closed port on a running host: the kernel answers with a reset, Wake-on-LAN cannot help
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    hello = Hello("d" * 64, "desk", "desktop", "1.0")
    client = LinkClient(f"https://127.0.0.1:{port}/hybridd/v1/link", ssl.create_default_context(), hello,
                        backoff_s=(30.0, 30.0))
    assert not client.state.host_answered
    await client.start()
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while client.connects == 0 or client.state.down_reason in ("not connected yet", "awaiting hello"):
            assert asyncio.get_running_loop().time() < deadline, client.state
            await asyncio.sleep(0.01)
        assert client.state.host_answered and "Connect call failed" in (client.state.down_reason or "")
    finally:
        await client.close()
