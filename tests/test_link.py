"""The control link: the protocol core driven by a fake clock, then real mutual TLS WebSockets on loopback."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hybridd.peer.link import LINK_PATH, LinkClient, LinkHub, LinkSession, PeerLinkState, add_link_route
from hybridd.peer.messages import (
    Capacity,
    Hello,
    Inventory,
    LinkProtocolError,
    Message,
    ModelOffer,
    Ping,
    Pong,
    encode,
)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# -- the protocol core, no I/O, time as an argument -------------------------------------------------------------

DESK = Hello("id-desk", "desk", "desktop", "0.1.0", (1,))
SPARK = Hello("id-spark", "spark-1", "spark", "0.1.0", (1, 2))


def test_session_handshake_rtt_and_state() -> None:
    state = PeerLinkState()
    session = LinkSession(DESK, state, now=100.0, interval_s=2.0, expected_node_id="id-spark")
    assert session.opening(Inventory()) == [DESK, Inventory()]
    assert not state.up

    session.receive(encode(SPARK), 100.1)
    assert state.up and state.hello == SPARK and session.protocol == 1 and state.down_reason is None
    offers = Inventory((ModelOffer("gpt-oss-120b", 131072, None),))
    session.receive(encode(offers), 100.2)
    session.receive(encode(Capacity({"gb10": 1 << 36}, 2, {"gpt-oss-120b": 41.0})), 100.3)
    assert state.inventory == offers and state.capacity is not None and state.capacity.queue_depth == 2

    frames = session.tick(102.0, Capacity({"cuda:0": 1}, 0, {}))
    assert frames == [Capacity({"cuda:0": 1}, 0, {}), Ping(102.0)]
    session.receive(encode(Pong(55.0, 102.0)), 102.04)
    assert state.rtt_s == pytest.approx(0.04)
    session.receive(encode(Pong(55.0, 77.0)), 102.5)  # an echo of a ping we never sent says nothing about RTT
    assert state.rtt_s == pytest.approx(0.04) and state.last_seen == 102.5

    msg, replies = session.receive(encode(Ping(9.0)), 103.0)
    assert msg == Ping(9.0) and replies == [Pong(103.0, 9.0)]


def test_session_declares_a_silent_peer_dead_after_three_intervals() -> None:
    session = LinkSession(DESK, PeerLinkState(), now=0.0, interval_s=2.0, miss_limit=3)
    assert session.silence(6.0) is None
    assert session.silence(6.1) == "no hello for 6.1 s (3 intervals of 2 s)"
    session.receive(encode(SPARK), 6.0)
    assert session.silence(12.0) is None
    assert session.silence(12.5) == "peer silent for 6.5 s (3 intervals of 2 s)"


@pytest.mark.parametrize(("frames", "reason", "code"), [
    ([Ping(1.0)], "expected hello first, got ping", 1003),
    ([SPARK, SPARK], "second hello", 1003),
    ([Hello("id-mallory", "spark-1", "spark", "0.1.0", (1,))], "but the certificate is 'id-spark'", 1008),
    ([Hello("id-spark", "spark-1", "spark", "9.0", (7, 8))], "no common link protocol", 1008),
])
def test_session_refuses(frames: list[Message], reason: str, code: int) -> None:
    session = LinkSession(DESK, PeerLinkState(), now=0.0, expected_node_id="id-spark")
    with pytest.raises(LinkProtocolError, match=reason) as caught:
        for frame in frames:
            session.receive(encode(frame), 1.0)
    assert caught.value.close_code == code


# -- throwaway self-signed identities and pinned mutual TLS ------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """A throwaway identity: certificate and key files, and the node id (the certificate's SHA-256)."""

    name: str
    cert_path: Path
    key_path: Path
    cert_pem: bytes
    node_id: str


def make_node(folder: Path, name: str) -> Node:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    der = cert.public_bytes(serialization.Encoding.DER)
    return Node(name, cert_path, key_path, cert_pem, hashlib.sha256(der).hexdigest())


def server_context(me: Node, trusted: list[Node]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(me.cert_path, me.key_path)
    context.verify_mode = ssl.CERT_OPTIONAL  # like the LAN listener: no cert may only pair; a cert must be pinned
    context.load_verify_locations(cadata="".join(n.cert_pem.decode() for n in trusted))
    return context


def client_context(me: Node | None, peer: Node) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the pinned certificate is the identity, not the address
    context.load_verify_locations(cadata=peer.cert_pem.decode())
    if me is not None:
        context.load_cert_chain(me.cert_path, me.key_path)
    return context


def authorize_by_fingerprint(paired: set[str]) -> Callable[[web.Request], str | None]:
    """The peer's node id if its TLS certificate is a paired one, else None."""
    def authorize(request: web.Request) -> str | None:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        node_id = hashlib.sha256(der).hexdigest() if der else None
        return node_id if node_id in paired else None
    return authorize


def hello_of(node: Node, role: str) -> Hello:
    return Hello(node.node_id, node.name, role, "0.1.0", (1,))


@pytest.fixture
def nodes(tmp_path: Path) -> tuple[Node, Node]:
    return make_node(tmp_path, "spark"), make_node(tmp_path, "desk")


async def until(predicate: Callable[[], object], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(0.02)


SPARK_CAPACITY = Capacity({"gb10": 96 << 30}, 1, {"gpt-oss-120b": 41.5})
SPARK_INVENTORY = Inventory((ModelOffer("gpt-oss-120b", 131072, 65536),))
DESK_CAPACITY = Capacity({"cuda:0": 20 << 30, "cuda:1": 12 << 30}, 0, {"glm-4.7-flash": 118.0})


@dataclass
class Served:
    """A LinkHub behind a real TLS listener on loopback."""

    hub: LinkHub
    url: str
    received: list[tuple[str, Message]]


@pytest.fixture
async def spark_hub(nodes: tuple[Node, Node]) -> AsyncIterator[Served]:
    spark, desk = nodes
    received: list[tuple[str, Message]] = []
    hub = LinkHub(local_hello=hello_of(spark, "spark"), authorize=authorize_by_fingerprint({desk.node_id}),
                  snapshot=lambda: SPARK_CAPACITY, inventory=lambda: SPARK_INVENTORY,
                  on_message=lambda peer, msg: received.append((peer, msg)), interval_s=0.1)
    app = web.Application()
    add_link_route(app, hub)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(spark, [desk]))
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Served(hub, f"https://127.0.0.1:{port}{LINK_PATH}", received)
    finally:
        await runner.cleanup()


@pytest.fixture
async def clients() -> AsyncIterator[list[LinkClient]]:
    """LinkClients to close at teardown."""
    made: list[LinkClient] = []
    yield made
    for client in made:
        await client.close()


# A link on the tests' 0.1 s interval (3 misses: 0.3 s of silence) must be down well within the 6 s the default
# 2 s interval would take; the rest is room for a loaded CI machine.
DOWN_WITHIN_S = 3.0


def desk_client(url: str, nodes: tuple[Node, Node], clients: list[LinkClient], **kwargs) -> LinkClient:  # type: ignore[no-untyped-def]
    spark, desk = nodes
    received: list[tuple[str, Message]] = kwargs.pop("received", [])
    client = LinkClient(url, kwargs.pop("ssl_context", client_context(desk, spark)), hello_of(desk, "desktop"),
                        lambda peer, msg: received.append((peer, msg)), interval_s=kwargs.pop("interval_s", 0.1),
                        snapshot=lambda: DESK_CAPACITY, expected_node_id=kwargs.pop("expected_node_id", spark.node_id),
                        backoff_s=kwargs.pop("backoff_s", (0.05, 0.2)), **kwargs)
    clients.append(client)
    return client


# -- real links on loopback --------------------------------------------------------------------------------------


async def test_hello_inventory_capacity_and_rtt_flow_both_ways(spark_hub: Served, nodes: tuple[Node, Node],
                                                               clients: list[LinkClient]) -> None:
    spark, desk = nodes
    received: list[tuple[str, Message]] = []
    client = desk_client(spark_hub.url, nodes, clients, received=received)
    await client.start()
    await until(lambda: client.state.up and client.state.capacity and client.state.rtt_s is not None, 5,
                "the desk to see the spark's capacity and an RTT")
    assert client.state.hello == hello_of(spark, "spark")
    assert client.state.inventory == SPARK_INVENTORY and client.state.capacity == SPARK_CAPACITY
    assert client.state.rtt_s is not None and 0 <= client.state.rtt_s < 1.0 and client.state.down_reason is None
    assert [type(m).__name__ for _, m in received[:3]] == ["Hello", "Inventory", "Capacity"]
    assert {peer for peer, _ in received} == {spark.node_id}

    await until(lambda: (s := spark_hub.hub.states.get(desk.node_id)) and s.capacity and s.rtt_s is not None, 5,
                "the spark to see the desk's capacity and an RTT")
    seen_by_spark = spark_hub.hub.states[desk.node_id]
    assert seen_by_spark.up and seen_by_spark.hello == hello_of(desk, "desktop")
    assert seen_by_spark.capacity == DESK_CAPACITY and seen_by_spark.inventory == Inventory()
    # Capacity keeps flowing every interval, not just once.
    count = sum(isinstance(m, Capacity) for _, m in received)
    await until(lambda: sum(isinstance(m, Capacity) for _, m in received) >= count + 3, 2, "more capacity frames")


async def test_an_unpaired_client_gets_403(spark_hub: Served, nodes: tuple[Node, Node],
                                           clients: list[LinkClient], tmp_path: Path) -> None:
    spark, _ = nodes
    stranger = make_node(tmp_path, "stranger")
    no_cert = desk_client(spark_hub.url, nodes, clients, ssl_context=client_context(None, spark))
    await no_cert.start()
    await until(lambda: no_cert.state.down_reason == "handshake refused: HTTP 403", 5, "a 403 without a cert")
    unknown = desk_client(spark_hub.url, nodes, clients, ssl_context=client_context(stranger, spark))
    await unknown.start()
    # A certificate that is not pinned fails the TLS handshake itself.
    await until(lambda: (unknown.state.down_reason or "").startswith("connect failed"), 5, "a refused handshake")
    assert not spark_hub.hub.states


async def test_hello_claiming_another_node_is_refused(spark_hub: Served, nodes: tuple[Node, Node]) -> None:
    spark, desk = nodes
    async with aiohttp.ClientSession() as http, http.ws_connect(spark_hub.url, ssl=client_context(desk, spark)) as ws:
        await ws.send_bytes(encode(Hello("id-someone-else", "desk", "desktop", "0.1.0", (1,))))
        while (msg := await ws.receive(timeout=5)).type is aiohttp.WSMsgType.BINARY:
            pass  # its own hello, inventory, capacity, ping
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1008
    await until(lambda: (s := spark_hub.hub.states.get(desk.node_id)) and s.down_reason
                and "certificate" in s.down_reason, 5, "the hub to record why")


@pytest.mark.parametrize(("frame", "code", "reason"), [
    (b"\xc1\x00garbage", 1003, "not msgpack"),
    (encode(Ping(1.0))[:-1] + b"\xff" * 70_000, 1009, "frame too large"),
    ("a text frame", 1003, "text frame"),
])
async def test_a_bad_frame_from_the_client_closes_its_link_and_the_hub_lives_on(
        spark_hub: Served, nodes: tuple[Node, Node], clients: list[LinkClient], frame: bytes | str, code: int,
        reason: str) -> None:
    spark, desk = nodes
    async with aiohttp.ClientSession() as http, http.ws_connect(spark_hub.url, ssl=client_context(desk, spark)) as ws:
        await ws.send_bytes(encode(hello_of(desk, "desktop")))
        await until(lambda: (s := spark_hub.hub.states.get(desk.node_id)) and s.up, 5, "the link to be up")
        await (ws.send_str(frame) if isinstance(frame, str) else ws.send_bytes(frame))
        while (msg := await ws.receive(timeout=5)).type is aiohttp.WSMsgType.BINARY:
            pass
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == code
    state = spark_hub.hub.states[desk.node_id]
    assert not state.up and state.down_reason is not None and reason in state.down_reason

    client = desk_client(spark_hub.url, nodes, clients)
    await client.start()
    await until(lambda: client.state.up and spark_hub.hub.states[desk.node_id].up, 5, "a good link afterwards")


@pytest.mark.parametrize(("frame", "code", "reason"), [
    (b"\x93\x01\x02", 1003, "not msgpack"),
    (b"\x00" * 70_000, 1009, "frame too large"),
    (encode(Capacity()), 1003, "expected hello first"),
])
async def test_a_bad_frame_from_the_server_closes_the_link_and_the_client_redials(
        nodes: tuple[Node, Node], clients: list[LinkClient], frame: bytes, code: int, reason: str) -> None:
    spark, desk = nodes
    closes: list[int | None] = []

    async def rogue(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0, autoclose=False)
        await ws.prepare(request)
        await ws.send_bytes(frame)
        while (msg := await ws.receive()).type is aiohttp.WSMsgType.BINARY:
            pass
        # The code the client sent; aiohttp's own close_code would say 1006 when it cannot answer a closed socket.
        closes.append(msg.data if msg.type is aiohttp.WSMsgType.CLOSE else None)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get(LINK_PATH, rogue)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(spark, [desk]))
    await site.start()
    try:
        client = desk_client(f"https://127.0.0.1:{runner.addresses[0][1]}{LINK_PATH}", nodes, clients)
        await client.start()
        await until(lambda: len(closes) >= 2, 5, "the client to close and redial")
        assert closes[0] == code
        assert client.state.down_reason is not None and reason in client.state.down_reason
        assert not client.state.up and client.connects >= 2
    finally:
        await clients.pop().close()
        await runner.cleanup()


async def test_a_silent_server_is_marked_down_within_a_few_intervals(nodes: tuple[Node, Node],
                                                                     clients: list[LinkClient]) -> None:
    spark, desk = nodes
    up_at: list[float] = []

    async def mute(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(encode(hello_of(spark, "spark")))  # then never another word, and no pongs
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get(LINK_PATH, mute)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(spark, [desk]))
    await site.start()
    try:
        client = desk_client(f"https://127.0.0.1:{runner.addresses[0][1]}{LINK_PATH}", nodes, clients,
                             on_state=lambda peer, state: up_at.append(time.monotonic()) if state.up else None,
                             backoff_s=(5.0, 5.0))
        await client.start()
        await until(lambda: up_at, 5, "the link to come up")
        await until(lambda: not client.state.up, DOWN_WITHIN_S, "the silent server to be marked down")
        assert time.monotonic() - up_at[0] < DOWN_WITHIN_S
        assert (client.state.down_reason or "").startswith("peer silent for")
    finally:
        await clients.pop().close()
        await runner.cleanup()


# -- a peer process killed and restarted --------------------------------------------------------------------------


def serve_hub(cert_path: str, key_path: str, trusted_pem: str, paired_id: str, port: int) -> None:
    """Run a spark-side LinkHub on port until killed; prints one JSON line when it listens."""
    spark = Node("spark", Path(cert_path), Path(key_path), Path(cert_path).read_bytes(), "")

    async def main() -> None:
        hub = LinkHub(local_hello=Hello("spark-process", "spark", "spark", "0.1.0", (1,)),
                      authorize=authorize_by_fingerprint({paired_id}), snapshot=lambda: SPARK_CAPACITY,
                      inventory=lambda: SPARK_INVENTORY, interval_s=0.1)
        app = web.Application()
        add_link_route(app, hub)
        runner = web.AppRunner(app)
        await runner.setup()
        desk = Node("desk", Path(), Path(), trusted_pem.encode(), paired_id)
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context(spark, [desk])).start()
        print(json.dumps({"listening": port}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


@pytest.fixture
def hub_process(nodes: tuple[Node, Node]) -> Iterator[Callable[[int], subprocess.Popen[str]]]:
    """Start serve_hub in a subprocess on a port; every one started is killed at teardown."""
    spark, desk = nodes
    started: list[subprocess.Popen[str]] = []

    def start(port: int) -> subprocess.Popen[str]:
        args = [str(spark.cert_path), str(spark.key_path), desk.cert_pem.decode(), desk.node_id, port]
        code = "import json, sys, test_link; test_link.serve_hub(*json.loads(sys.argv[1]))"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE, text=True,
                                env=env, cwd=REPO)
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks at most until the hub listens or dies
        assert line and json.loads(line) == {"listening": port}, f"hub process failed: exit {proc.wait(10)}"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(30)
async def test_a_killed_peer_is_marked_down_and_the_link_returns_with_it(
        nodes: tuple[Node, Node], clients: list[LinkClient],
        hub_process: Callable[[int], subprocess.Popen[str]]) -> None:
    port = free_port()
    peer = await asyncio.to_thread(hub_process, port)
    client = desk_client(f"https://127.0.0.1:{port}{LINK_PATH}", nodes, clients, expected_node_id=None)
    await client.start()
    await until(lambda: client.state.up and client.state.capacity == SPARK_CAPACITY, 10, "the link to the process")

    killed_at = time.monotonic()
    peer.kill()
    await until(lambda: not client.state.up, DOWN_WITHIN_S, "the killed peer to be marked down")
    assert time.monotonic() - killed_at < DOWN_WITHIN_S
    down_reason = client.state.down_reason
    assert down_reason is not None and down_reason != "awaiting hello"

    await asyncio.to_thread(peer.wait, 10)
    await asyncio.to_thread(hub_process, port)
    await until(lambda: client.state.up, 10, "the link to come back with the peer")
    assert client.state.hello is not None and client.state.hello.node_id == "spark-process"
