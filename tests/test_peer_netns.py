"""Two nodes in two network namespaces joined by a veth pair: real multicast discovery, real pairing with a one-time
code by name, a real mutual-TLS link, and a long-context request forwarded to the peer's own tiny-model engine.
Then an impostor that claims the peer's name and node id on mDNS (and, on loopback, its very address) with another
certificate: the pinned certificate stops it, and not one byte of a request reaches it.

Each daemon runs inside its namespace, started by a small agent process there (`node_agent`) that also makes the
loopback API and CLI calls for the test, because a node's API listens on the loopback of its own namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from netns import Agent, NetnsPair, emit, netns_available

from hybridd import __version__
from hybridd.demo.launch import start_node
from hybridd.demo.tiny_gguf import TinyLlama, write_tiny_llama
from hybridd.peer.discovery import SERVICE_TYPE
from hybridd.peer.identity import Identity, new_identity
from tests.conftest import http, stop_daemon, wait_for
from tests.nodes import node_config as shared_node_config

LONG_CTX = 131072
NO_EOS = {"2": -100}
# Unique per run: other hybridd nodes (other test sessions, a real daemon) may advertise on this host's loopback.
RUN = secrets.token_hex(3)
SHORT_BODY = {"model": "a", "prompt": "hi", "max_tokens": 3, "logit_bias": NO_EOS}
PROMPT_MARK = f"do-not-leak-{RUN}"  # the long request's prompt; the impostor must never see it


# -- agents: run inside a namespace ------------------------------------------------------------------------------


def node_agent(config_text: str, folder: str) -> None:
    """Start a daemon here (in this namespace), report its URLs and pid, then run the test's API and CLI calls.

    Requests are JSON lines {"id", "op": "http"|"cli"|"stop", ...}; each reply carries the same id. EOF on stdin
    stops the daemon and ends the agent.
    """
    node = start_node(config_text, Path(folder), timeout=60)
    emit({"event": "ready", "url": node.url, "lan_url": node.lan_url, "pid": node.proc.pid})
    try:
        for line in sys.stdin:
            request = json.loads(line)
            reply: dict[str, Any] = {"id": request["id"]}
            if request["op"] == "http":
                answer = http(request["method"], node.url + request["path"], request.get("body"), timeout=50)
                reply |= {"status": answer.status, "headers": {k.lower(): v for k, v in answer.headers.items()},
                          "body": answer.body.decode(errors="replace")}
            elif request["op"] == "cli":
                done = subprocess.run([sys.executable, "-m", "hybridd", *request["args"], "--url", node.url],
                                      capture_output=True, text=True, timeout=50, check=False)
                reply |= {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
            elif request["op"] == "stop":
                reply |= {"rc": node.stop()}
            emit(reply)
    finally:
        node.stop()


def impostor_agent(address: str, name: str, node_id: str, port: int) -> None:
    """Claim to be the peer: a TLS server with another self-signed certificate on address, then the peer's mDNS
    instance name and TXT (its node id included) pointing at it. Reports every connection, handshake and byte."""
    server = ImpostorServer(address, port, emit)
    asyncio.run(_advertise_until_eof(address, name, node_id, server))


async def _advertise_until_eof(address: str, name: str, node_id: str, server: ImpostorServer) -> None:
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    aiozc = AsyncZeroconf(interfaces=[address])
    properties = {"id": node_id, "role": "peer", "version": __version__, "port": str(server.port)}
    info = AsyncServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=server.port, properties=properties,
                            server=f"impostor-{name}.local.", parsed_addresses=[address])
    # No name change: the real peer is gone, so this is its very instance name; a conflict would be a test bug.
    await aiozc.async_register_service(info, allow_name_change=False)
    emit({"event": "advertising", "instance": info.name, "port": server.port})
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    await stdin.read()
    await aiozc.async_close()
    server.close()


class ImpostorServer:
    """A TLS server with a certificate nobody pinned; reports each TCP connection, handshake result and every byte
    of application data through `report` (a thread per connection, all daemon threads)."""

    def __init__(self, address: str, port: int, report: Callable[[dict[str, Any]], None]) -> None:
        self.identity: Identity = new_identity("impostor")
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.verify_mode = ssl.CERT_NONE  # take anyone: the point is what a client would send us
        with tempfile.TemporaryDirectory(prefix="hybt-impostor-") as folder:  # ssl loads a chain only from a path
            bundle = Path(folder) / "impostor.pem"
            bundle.write_bytes(self.identity.cert_pem + self.identity.key_pem)
            self.context.load_cert_chain(bundle)
        self._report = report
        self._lock = threading.Lock()
        self.sock = socket.create_server((address, port))  # SO_REUSEADDR: a dead peer's port in TIME_WAIT
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="impostor accept").start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, peer = self.sock.accept()
                threading.Thread(target=self._serve, args=(conn, peer), daemon=True, name="impostor conn").start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        self.report({"event": "tcp", "from": peer[0]})
        conn.settimeout(10)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            self.report({"event": "handshake_failed", "error": str(exc)})
            conn.close()
            return
        self.report({"event": "handshake_ok"})
        with contextlib.suppress(OSError), tls:
            while data := tls.recv(65536):
                self.report({"event": "data", "bytes": len(data), "text": data.decode(errors="replace")})

    def report(self, event: dict[str, Any]) -> None:
        with self._lock:  # one whole line at a time, from any connection's thread
            self._report(event)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- the test's side -------------------------------------------------------------------------------------------


class NetnsNode:
    """A daemon in a namespace, driven through its agent: `get`, `post`, `cli`, `stop`."""

    _ids = itertools.count()

    def __init__(self, agent: Agent, what: str) -> None:
        self.agent = agent
        self.what = what
        ready = agent.expect(lambda line: line.get("event") == "ready", 60, f"the {what} daemon to be ready")
        self.url: str = ready["url"]
        self.lan_url: str = ready["lan_url"]
        self.pid: int = ready["pid"]

    def call(self, op: str, timeout: float = 55.0, **fields: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        self.agent.send({"id": request_id, "op": op, **fields})
        return self.agent.expect(lambda line: line.get("id") == request_id, timeout, f"{self.what}: {op} {fields}")

    def get(self, path: str) -> Any:
        reply = self.call("http", method="GET", path=path)
        assert reply["status"] == 200, reply
        return json.loads(reply["body"])

    def post(self, path: str, body: Any) -> dict[str, Any]:
        return self.call("http", method="POST", path=path, body=body)

    def cli(self, *args: str) -> dict[str, Any]:
        return self.call("cli", args=list(args))

    def stop(self) -> int:
        return int(self.call("stop", timeout=40)["rc"])


@contextlib.contextmanager
def nodes_in(net: NetnsPair) -> Iterator[Callable[..., NetnsNode]]:
    """Start daemons in namespaces; at exit each is stopped and its whole process tree killed, also on failure."""
    started: list[NetnsNode] = []
    agents: list[Agent] = []

    def start(ns: Any, config_text: str, folder: Path, what: str) -> NetnsNode:
        folder.mkdir(parents=True, exist_ok=True)
        agent = net.spawn(ns, "test_peer_netns:node_agent", config_text, str(folder))
        agents.append(agent)
        node = NetnsNode(agent, what)
        started.append(node)
        return node

    try:
        yield start
    finally:
        trees = []
        for node in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                daemon = psutil.Process(node.pid)
                trees.append([daemon, *daemon.children(recursive=True)])
        for agent in agents:
            with contextlib.suppress(AssertionError):
                agent.stop(timeout=40)  # EOF: the agent stops its daemon (SIGTERM) and exits
        for proc in itertools.chain.from_iterable(trees):  # belt and braces: no daemon or engine may outlive us
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def _require_netns() -> None:
    ok, why = netns_available()
    if not ok:
        pytest.skip(why)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("netns-peer") / "a.gguf", TinyLlama(n_ctx_train=262144))


@pytest.fixture(scope="module")
def budgets(long_model: Path) -> tuple[int, int]:
    """(peer budget, desktop budget): the peer holds the model at 128k; the desktop at 4k but not at 128k."""
    from hybridd.model.memory import RunSettings, estimate_memory
    from hybridd.model.spec import model_spec
    from hybridd.probe.gguf_file import read_gguf_header

    header = read_gguf_header(long_model)
    spec = model_spec(header.metadata, header.tensors)
    short, long = (estimate_memory(spec, RunSettings(ctx=c, flash_attn=False)).total_bytes for c in (4096, LONG_CTX))
    return long * 4, (short + long) // 2


def node_config(model: Path, name: str, role: str, budget: int, lan_listen: str = "") -> str:
    return shared_node_config(model, name, role, budget, lan_listen=lan_listen)


def _linked(desk: Callable[[], Any], name: str) -> dict[str, Any] | None:
    peers = [p for p in desk()["paired"] if p["name"] == name]
    return peers[0] if peers and peers[0]["link"] == "up" and peers[0]["models"] else None


def _refused_by_pin(peers: Callable[[], Any], name: str) -> dict[str, Any] | None:
    """The paired peer's row once the desktop has recorded a failed pinned handshake as the reason it is down.

    The impostor sees its handshake fail when the desktop's TLS alert arrives; the desktop records why only when
    that error has come back up through its connector to the link, which may be a moment later."""
    [paired] = [p for p in peers()["paired"] if p["name"] == name]
    return paired if "CERTIFICATE_VERIFY_FAILED" in (paired["down_reason"] or "") else None


def _local_or_clear_refusal(status: int, headers: dict[str, str], body: str, hints: dict[str, Any]) -> None:
    """With the peer unreachable a request is served locally, or refused with an error that says why."""
    if status == 200:
        assert headers["x-hybridd-placement"] == "local", (headers, body)
        return
    assert 400 <= status < 600, (status, body)
    message = json.loads(body)["error"]["message"]
    assert "cannot place" in message, message
    if "min_ctx" in hints:
        assert str(LONG_CTX) in message, message


def _pair_in_netns(net: NetnsPair, start: Callable[..., NetnsNode], model: Path, budgets: tuple[int, int],
                   folder: Path, name: str) -> tuple[NetnsNode, NetnsNode, dict[str, Any]]:
    """Peer in a, desktop in b; the desktop finds the peer by mDNS and pairs with it by name; the link comes up."""
    peer_budget, desk_budget = budgets
    peer = start(net.a, node_config(model, name, "peer", peer_budget, f"{net.a.address}:0"), folder / "peer", "peer")
    desk = start(net.b, node_config(model, f"desk-{RUN}", "desktop", desk_budget), folder / "desk", "desktop")
    lan_port = int(peer.lan_url.rsplit(":", 1)[1])
    assert peer.lan_url == f"https://{net.a.address}:{lan_port}"

    def discovered() -> dict[str, Any] | None:
        return next((d for d in desk.get("/hybridd/v1/peers")["discovered"] if d["name"] == name), None)

    wait_for(discovered, timeout=15, interval=0.1, what="the desktop to discover the peer over mDNS")
    listed = desk.cli("peers", "--json")
    assert listed["rc"] == 0, listed["stderr"]
    found = [d for d in json.loads(listed["stdout"])["discovered"] if d["name"] == name]
    assert len(found) == 1, listed["stdout"]
    peer_id = peer.get("/hybridd/v1/peers")["node"]["node_id"]
    assert found[0] | {"version": None} == {"name": name, "node_id": peer_id, "role": "peer", "version": None,
                                            "addresses": [net.a.address], "port": lan_port, "paired": False}

    opened = peer.cli("pair", "--json")
    assert opened["rc"] == 0, opened["stderr"]
    code = json.loads(opened["stdout"])["code"]
    paired = desk.cli("pair", name, code)  # by name: resolved through discovery to the veth address
    assert paired["rc"] == 0, paired["stderr"]
    assert f"paired with {name} (peer) at {net.a.address}:{lan_port}" in paired["stdout"], paired["stdout"]

    # Up with the peer's models once its hello and inventory are in; the RTT comes with the first pong, which the
    # peer sends only after reading our ping, so it may be a moment behind: wait for that too.
    link = wait_for(lambda: (s := _linked(lambda: desk.get("/hybridd/v1/peers"), name)) and s["rtt_ms"] is not None
                    and s, timeout=20, interval=0.1, what="the desktop's link to the peer, with an RTT")
    assert link["address"] == net.a.address and link["port"] == lan_port and link["models"] == ["a"]
    return peer, desk, link


@pytest.mark.timeout(60)
def test_discover_pair_by_name_link_and_forward_across_namespaces(long_model: Path, budgets: tuple[int, int],
                                                                  tmp_path: Path) -> None:
    _require_netns()
    name = f"spark-{RUN}-1"
    with NetnsPair() as net, nodes_in(net) as start:
        peer, desk, link = _pair_in_netns(net, start, long_model, budgets, tmp_path, name)
        assert link["rtt_ms"] is not None and link["hardware"] == "dgx-spark"
        assert [p["name"] for p in peer.get("/hybridd/v1/peers")["paired"]] == [f"desk-{RUN}"]

        local = desk.post("/v1/completions", SHORT_BODY)
        assert local["status"] == 200, local["body"]
        assert local["headers"]["x-hybridd-placement"] == "local"

        far = desk.post("/v1/completions", {**SHORT_BODY, "prompt": PROMPT_MARK, "hybridd": {"min_ctx": LONG_CTX}})
        assert far["status"] == 200, far["body"]
        assert far["headers"]["x-hybridd-placement"] == f"peer:{name}"
        assert f"at {LONG_CTX} ctx" in far["headers"]["x-hybridd-reason"], far["headers"]["x-hybridd-reason"]
        assert json.loads(far["body"])["usage"]["completion_tokens"] >= 1  # the peer's real engine answered
        decisions = peer.get("/hybridd/v1/status")["decisions"]
        assert decisions and decisions[-1]["placement"] == "local" and decisions[-1]["ctx"] >= LONG_CTX


@pytest.mark.timeout(90)
def test_only_a_node_that_serves_others_announces_itself_and_only_where_told(long_model: Path,
                                                                             budgets: tuple[int, int],
                                                                             tmp_path: Path) -> None:
    """In namespace a: a desktop (by default announced nowhere), a peer announced on the veth by interface name, and
    a peer announced on lo only. A browser in b, across the veth, finds the first peer alone; one on a's lo finds the
    second, and it too never sees the desktop."""
    _require_netns()
    peer_budget, desk_budget = budgets
    desk_name, spark_name, local_name = f"desk-{RUN}-4", f"spark-{RUN}-4", f"local-{RUN}-4"
    with NetnsPair() as net, nodes_in(net) as start:
        start(net.a, node_config(long_model, desk_name, "desktop", desk_budget), tmp_path / "desk", "desktop")
        on_veth = f'advertise_interfaces = ["{net.a.iface}"]'  # by name: the veth's address
        spark = start(net.a, shared_node_config(long_model, spark_name, "peer", peer_budget,
                                                lan_listen=f"{net.a.address}:0", node_extra=on_veth),
                      tmp_path / "spark", "peer on the veth")
        start(net.a, shared_node_config(long_model, local_name, "peer", peer_budget, lan_listen="127.0.0.1:0",
                                        node_extra='advertise_interfaces = ["lo"]'), tmp_path / "local", "peer on lo")
        # Started once the nodes have announced themselves: each browser's first query is answered by all of them.
        across = net.spawn(net.b, "test_discovery:discovery_agent", net.b.address, f"{RUN}-across", f"across-{RUN}",
                           1, 0.5, 60.0)
        on_lo = net.spawn(net.a, "test_discovery:discovery_agent", "127.0.0.1", f"{RUN}-on-lo", f"on-lo-{RUN}", 1,
                          0.5, 60.0)

        def found(name: str) -> Callable[[dict[str, Any]], bool]:
            return lambda line: line.get("event") == "found" and line.get("name") == name

        seen = across.expect(found(spark_name), 15, "the browser across the veth to find the peer")
        lan_port = int(spark.lan_url.rsplit(":", 1)[1])
        assert (seen["role"], seen["port"], seen["addresses"]) == ("peer", lan_port, [net.a.address])
        on_lo.expect(found(local_name), 15, "the browser on a's loopback to find the peer announced there")
        across.collect(3.0)  # three more seconds of queries and answers
        assert {line["name"] for line in across.seen if line.get("event") == "found"} == {spark_name}, across.seen
        assert not [line for line in on_lo.seen if line.get("name") == desk_name], on_lo.seen


@pytest.mark.timeout(60)
def test_impostor_with_the_peers_name_and_id_on_mdns_gets_no_request_byte(long_model: Path, budgets: tuple[int, int],
                                                                           tmp_path: Path) -> None:
    _require_netns()
    name = f"spark-{RUN}-2"
    with NetnsPair() as net, nodes_in(net) as start:
        peer, desk, _ = _pair_in_netns(net, start, long_model, budgets, tmp_path, name)
        peer_id = peer.get("/hybridd/v1/peers")["node"]["node_id"]

        assert peer.stop() == 0

        def peer_gone() -> bool:
            view = desk.get("/hybridd/v1/peers")
            return (all(p["link"] == "down" for p in view["paired"] if p["name"] == name)
                    and not [d for d in view["discovered"] if d["node_id"] == peer_id])

        wait_for(peer_gone, timeout=15, interval=0.1, what="the desktop to see the peer's link and advert go")

        impostor = net.spawn(net.a, "test_peer_netns:impostor_agent", net.a.address, name, peer_id, 0)
        advert = impostor.expect(lambda line: line.get("event") == "advertising", 15, "the impostor's advert")
        assert advert["instance"] == f"{name}.{SERVICE_TYPE}"
        # The desktop follows the advert of its paired node id to the new port, dials, and the pinned handshake fails.
        impostor.expect(lambda line: line.get("event") == "handshake_failed", 20,
                        "the desktop to dial the impostor and refuse its certificate")
        paired = wait_for(lambda: _refused_by_pin(lambda: desk.get("/hybridd/v1/peers"), name), timeout=10,
                          interval=0.1, what="the desktop to record the impostor's refused certificate")
        assert paired["link"] == "down" and "CERTIFICATE_VERIFY_FAILED" in (paired["down_reason"] or ""), paired
        # An advert is only a hint: the stored address moves only once the pinned certificate answers there.
        assert paired["port"] != advert["port"], paired

        local = desk.post("/v1/completions", SHORT_BODY)
        assert local["status"] == 200 and local["headers"]["x-hybridd-placement"] == "local", local
        for hints in ({"min_ctx": LONG_CTX}, {"placement": "peer"}):
            refused = desk.post("/v1/completions", {**SHORT_BODY, "prompt": PROMPT_MARK, "hybridd": hints})
            _local_or_clear_refusal(refused["status"], refused["headers"], refused["body"], hints)
        # Let any redial in flight finish, then: TLS connections and failed handshakes only, never a byte of data.
        impostor.collect(1.0)
        said = impostor.seen
        assert not [line for line in said if line.get("event") in ("handshake_ok", "data")], said
        assert not any(PROMPT_MARK in line.get("text", "") for line in said)

        # The real peer comes back (same identity, a new port) while the impostor still advertises: the desktop
        # follows the real one's advert, the pinned handshake succeeds, and long requests go to the peer again.
        peer_budget, _ = budgets
        back = start(net.a, node_config(long_model, name, "peer", peer_budget, f"{net.a.address}:0"),
                     tmp_path / "peer", "restarted peer")
        assert back.get("/hybridd/v1/peers")["node"]["node_id"] == peer_id
        back_port = int(back.lan_url.rsplit(":", 1)[1])
        link = wait_for(lambda: _linked(lambda: desk.get("/hybridd/v1/peers"), name), timeout=20, interval=0.1,
                        what="the desktop to relink to the real peer")
        assert link["port"] == back_port, link
        far = desk.post("/v1/completions", {**SHORT_BODY, "hybridd": {"min_ctx": LONG_CTX}})
        assert far["status"] == 200 and far["headers"]["x-hybridd-placement"] == f"peer:{name}", far
        assert impostor.stop() == 0
        assert not [line for line in impostor.seen if line.get("event") in ("handshake_ok", "data")], impostor.seen


@pytest.mark.timeout(60)
def test_impostor_on_the_peers_own_loopback_port_gets_no_request_byte(daemon_factory,  # type: ignore[no-untyped-def]
                                                                      long_model: Path,
                                                                      budgets: tuple[int, int]) -> None:
    """Deterministic, no mDNS involved: the peer dies and an impostor takes its exact address and port; the desktop's
    link redials it there and the pinned certificate refuses it."""
    peer_budget, desk_budget = budgets
    name = f"spark-{RUN}-3"
    peer = daemon_factory(node_config(long_model, name, "peer", peer_budget, "127.0.0.1:0"))
    desk = daemon_factory(node_config(long_model, f"desk-{RUN}-3", "desktop", desk_budget))
    address = peer.lan_url.removeprefix("https://")
    opened = http("POST", peer.url + "/hybridd/v1/pair/open", {})
    assert opened.status == 200, opened.body
    paired = http("POST", desk.url + "/hybridd/v1/pair/connect", {"target": address, "code": opened.json()["code"]})
    assert paired.status == 200, paired.body

    def peers() -> Any:
        return http("GET", desk.url + "/hybridd/v1/peers").json()

    wait_for(lambda: _linked(peers, name), timeout=20, interval=0.1, what="the desktop's link to the peer")

    stop_daemon(peer)
    wait_for(lambda: [p for p in peers()["paired"] if p["name"] == name and p["link"] == "down"], timeout=15,
             interval=0.1, what="the desktop to see the link go down")
    events: list[dict[str, Any]] = []
    host, port = address.rsplit(":", 1)
    impostor = ImpostorServer(host, int(port), events.append)
    try:
        wait_for(lambda: [e for e in events if e["event"] == "handshake_failed"], timeout=25, interval=0.05,
                 what="the desktop's link to redial the impostor and refuse its certificate")
        view = wait_for(lambda: _refused_by_pin(peers, name), timeout=10, interval=0.1,
                        what="the desktop to record the impostor's refused certificate")
        assert view["link"] == "down" and "CERTIFICATE_VERIFY_FAILED" in (view["down_reason"] or ""), view

        local = http("POST", desk.url + "/v1/completions", SHORT_BODY)
        assert local.status == 200 and local.headers["x-hybridd-placement"] == "local"
        for hints in ({"min_ctx": LONG_CTX}, {"placement": "peer"}):
            reply = http("POST", desk.url + "/v1/completions", {**SHORT_BODY, "prompt": PROMPT_MARK, "hybridd": hints})
            _local_or_clear_refusal(reply.status, {k.lower(): v for k, v in reply.headers.items()},
                                    reply.body.decode(errors="replace"), hints)
        assert not [e for e in events if e["event"] in ("handshake_ok", "data")], events
    finally:
        impostor.close()
