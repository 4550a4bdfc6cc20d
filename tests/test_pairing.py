"""Pairing over real TLS on loopback: SPAKE2 on the one-time code, key confirmation bound to the TLS certificates."""

from __future__ import annotations

import base64
import json
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from spake2 import SPAKE2_A

from hybridd.api.envelope import response_for
from hybridd.peer.errors import LinkError, PairingError, PairingThrottled, StateFileError, UntrustedPeer
from hybridd.peer.identity import Identity, new_identity
from hybridd.peer.pairing import (
    EXCHANGE_TTL_S,
    FINISH_PATH,
    ID_A,
    ID_B,
    MAX_EXCHANGES,
    MAX_FAILURES,
    SOURCE_BURST,
    SOURCE_BURST_S,
    SOURCE_STARTS,
    START_PATH,
    WINDOW_TTL_S,
    PairedPeer,
    PairingServer,
    PairingStore,
    PairingWindow,
    add_pairing_routes,
    normalize_code,
    open_window,
    pair_with,
    paired_peer_for,
    source_key,
)
from hybridd.peer.tls import client_context, peer_fingerprint, server_context
from tests.hardening import Ledger
from tests.tls_server import serve

T0 = 1_700_000_000.0


class Clock:
    """The injected clock: tests move time by hand, never sleep."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def whoami(request: web.Request) -> web.Response:
    return web.json_response({"client": peer_fingerprint(request.transport)})


@dataclass
class Node:
    identity: Identity
    store: PairingStore
    state_dir: Path


@dataclass
class Peer(Node):
    """The node that opens the window (a Spark), serving pairing on its real TLS listener."""

    url: str
    server: PairingServer
    clock: Clock


def make_node(tmp_path: Path, name: str) -> Node:
    state_dir = tmp_path / name
    return Node(new_identity(name), PairingStore.load(state_dir), state_dir)


@pytest.fixture
def desktop(tmp_path: Path) -> Node:
    return make_node(tmp_path, "desktop")


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    node = make_node(tmp_path, "spark-1")
    clock = Clock()
    context = server_context(node.identity, node.store.cert_pems())
    # A new pairing extends the live listener's trust store: no restart needed to accept the new desktop.
    server = PairingServer(node.identity, "spark-1", "peer", node.store, clock,
                           on_paired=lambda paired: context.load_verify_locations(cadata=paired.cert_pem.decode()))
    app = web.Application()
    add_pairing_routes(app, server)
    app.router.add_get("/whoami", whoami)
    async with serve(app, context) as url:
        yield Peer(node.identity, node.store, node.state_dir, url, server, clock)


async def pair(desktop: Node, url: str, code: str) -> PairedPeer:
    return await pair_with(url, code, desktop.identity, "desktop", "desktop", desktop.store)


# ---------------------------------------------------------------- the happy path


async def test_pairing_stores_both_sides_and_pinned_mutual_tls_works_both_ways(peer: Peer, desktop: Node) -> None:
    code = peer.server.open()
    assert len(code) == 8 and code.isdigit()

    paired = await pair(desktop, peer.url, code)

    assert (paired.node_id, paired.name, paired.role) == (peer.identity.node_id, "spark-1", "peer")
    assert paired.cert_pem == peer.identity.cert_pem
    assert (paired.address, paired.port) == ("127.0.0.1", int(peer.url.rsplit(":", 1)[1]))
    assert desktop.store.all() == [paired]
    on_peer = peer.store.get(desktop.identity.node_id)
    assert on_peer is not None
    assert (on_peer.name, on_peer.role, on_peer.cert_pem) == ("desktop", "desktop", desktop.identity.cert_pem)
    assert (on_peer.paired_at, on_peer.address) == (T0, "127.0.0.1")
    for node in (desktop, peer):
        path = node.state_dir / "pairings.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert PairingStore.load(node.state_dir).all() == node.store.all()
    assert not peer.server.is_open()  # one success closes the window

    async with aiohttp.ClientSession() as http:
        # Desktop → peer: pinned to the peer's certificate, presenting ours.
        async with http.get(peer.url + "/whoami", ssl=client_context(desktop.identity, paired.cert_pem)) as response:
            assert await response.json() == {"client": desktop.identity.node_id}
        # Peer → desktop: the desktop's listener trusts exactly its paired peers.
        desktop_app = web.Application()
        desktop_app.router.add_get("/whoami", whoami)
        async with serve(desktop_app, server_context(desktop.identity, desktop.store.cert_pems())) as desktop_url, \
                http.get(desktop_url + "/whoami", ssl=client_context(peer.identity, on_peer.cert_pem)) as response:
            assert await response.json() == {"client": peer.identity.node_id}


async def test_a_code_is_single_use(peer: Peer, desktop: Node, tmp_path: Path) -> None:
    code = peer.server.open()
    await pair(desktop, peer.url, code)
    second = make_node(tmp_path, "laptop")

    with pytest.raises(PairingError, match="pairing refused"):
        await pair(second, peer.url, code)

    assert second.store.all() == []
    assert [p.node_id for p in peer.store.all()] == [desktop.identity.node_id]


async def test_reopening_the_window_kills_the_old_code(peer: Peer, desktop: Node) -> None:
    old = peer.server.open(code="11111111")
    new = peer.server.open(code="22222222")
    with pytest.raises(PairingError):
        await pair(desktop, peer.url, old)
    await pair(desktop, peer.url, new)


async def test_only_a_currently_paired_client_gets_past_the_per_request_check(peer: Peer, desktop: Node) -> None:
    async def private(request: web.Request) -> web.Response:
        try:
            return web.json_response({"hello": paired_peer_for(request.transport, peer.store).name})
        except UntrustedPeer as exc:
            return response_for(exc)

    await pair(desktop, peer.url, peer.server.open())
    context = server_context(peer.identity, peer.store.cert_pems())
    app = web.Application()
    app.router.add_get("/private", private)
    async with serve(app, context) as url, aiohttp.ClientSession() as http:
        paired = client_context(desktop.identity, peer.identity.cert_pem)
        async with http.get(url + "/private", ssl=paired) as response:
            assert await response.json() == {"hello": "desktop"}
        async with http.get(url + "/private", ssl=client_context(None, peer.identity.cert_pem)) as response:
            assert response.status == 403  # a certless client may reach the listener, only to pair
            assert (await response.json())["error"]["code"] == "untrusted_peer"
        peer.store.remove(desktop.identity.node_id)  # unpaired while the listener runs with the old trust store
        async with http.get(url + "/private", ssl=client_context(desktop.identity, peer.identity.cert_pem)) as response:
            assert response.status == 403


# ---------------------------------------------------------------- the window's rules


async def test_three_wrong_codes_close_the_window(peer: Peer, desktop: Node) -> None:
    code = peer.server.open(code="12345678")
    for attempt in range(MAX_FAILURES):
        with pytest.raises(PairingError, match="pairing refused"):
            await pair(desktop, peer.url, f"8765432{attempt}")
    assert peer.server.window is not None and peer.server.window.failures == MAX_FAILURES

    with pytest.raises(PairingError, match="pairing refused"):
        await pair(desktop, peer.url, code)  # the right code, too late

    assert desktop.store.all() == [] and peer.store.all() == []
    assert not (desktop.state_dir / "pairings.json").exists()


@pytest.mark.parametrize(("elapsed", "works"), [(WINDOW_TTL_S - 1, True), (WINDOW_TTL_S, False), (-5.0, False)])
async def test_the_window_expires_by_the_clock(peer: Peer, desktop: Node, elapsed: float, works: bool) -> None:
    code = peer.server.open()
    peer.clock.now += elapsed
    if works:
        await pair(desktop, peer.url, code)
        assert len(peer.store.all()) == 1
    else:
        with pytest.raises(PairingError, match="pairing refused"):
            await pair(desktop, peer.url, code)
        assert peer.store.all() == [] and desktop.store.all() == []


def test_window_rules_are_pure() -> None:
    window = open_window(100.0, "00000042")
    assert window.accepts(100.0) and window.accepts(219.9)
    assert not window.accepts(220.0) and not window.accepts(99.0)
    window.record_failure()
    window.record_failure()
    assert window.accepts(150.0)
    window.record_failure()
    assert not window.accepts(150.0)
    done = PairingWindow(code="00000042", opened_at=100.0)
    done.record_success()
    assert not done.accepts(100.0)
    codes = {open_window(0.0).code for _ in range(50)}
    assert all(len(c) == 8 and c.isdigit() for c in codes) and len(codes) > 45


def test_codes_are_normalized_and_checked() -> None:
    assert normalize_code("1234 5678") == normalize_code("1234-5678") == "12345678"
    for bad in ("1234567", "123456789", "abcdefgh", "١٢٣٤٥٦٧٨", ""):
        with pytest.raises(PairingError, match="8 digits"):
            normalize_code(bad)


async def test_no_window_gets_the_same_403_as_a_wrong_code(peer: Peer, desktop: Node) -> None:
    async with aiohttp.ClientSession() as http:
        _, body = start_body(desktop.identity, "12345678")
        status, closed = await post(http, peer.url + START_PATH, body)
    assert status == 403
    assert closed["error"]["type"] == "permission_error" and closed["error"]["code"] == "pairing_refused"

    peer.server.open(code="12345678")
    with pytest.raises(PairingError) as wrong:
        await pair(desktop, peer.url, "00000000")
    assert closed["error"]["message"] in wrong.value.message


# ---------------------------------------------------------------- stalled starts, bounds and the record


def from_address(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from `address` (any 127.x.x.x is this host): another node on the LAN."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


def kinds(server: PairingServer, now: float) -> list[tuple[str, str]]:
    return [(event.source, event.kind) for event in server.report(now).events]


async def test_a_stalled_start_from_another_address_does_not_hold_the_window(peer: Peer, desktop: Node) -> None:
    code = peer.server.open()
    async with from_address("127.0.0.2") as stranger:
        _, guess = start_body(OTHER, "00000000")
        assert (await post(stranger, peer.url + START_PATH, guess))[0] == 200  # and it never finishes

        await pair(desktop, peer.url, code)  # at once, with the stranger's exchange still in flight

    assert len(peer.store.all()) == 1 and len(desktop.store.all()) == 1
    assert kinds(peer.server, peer.clock.now) == [("127.0.0.2", "started"), ("127.0.0.1", "started"),
                                                  ("127.0.0.1", "paired"), ("", "closed")]


async def test_stalled_starts_expire_quickly_and_never_close_the_window(peer: Peer, desktop: Node) -> None:
    """The attack of issue 12: three starts from a guess, 15 s apart, never finished; then the right code."""
    code = peer.server.open()
    async with from_address("127.0.0.2") as stranger:
        for _ in range(3):
            _, guess = start_body(OTHER, "00000000")
            assert (await post(stranger, peer.url + START_PATH, guess))[0] == 200
            peer.clock.now += 15

    await pair(desktop, peer.url, code)

    report = peer.server.report(peer.clock.now)
    assert report.failures == 0 and report.outcome == "paired"
    expired = [(e.source, e.at - T0) for e in report.events if e.kind == "expired"]
    assert expired == [("127.0.0.2", EXCHANGE_TTL_S), ("127.0.0.2", 15 + EXCHANGE_TTL_S),
                       ("127.0.0.2", 30 + EXCHANGE_TTL_S)]
    assert all("not counted" in e.detail for e in report.events if e.kind == "expired")


async def test_a_finish_after_its_exchange_expired_is_refused_and_not_counted(peer: Peer, desktop: Node) -> None:
    code = peer.server.open()
    async with aiohttp.ClientSession() as http:
        _, body = start_body(desktop.identity, code)
        status, started = await post(http, peer.url + START_PATH, body)
        assert status == 200
        peer.clock.now += EXCHANGE_TTL_S
        status, refused = await post(http, peer.url + FINISH_PATH, {
            "session": started["session"], "confirmation_a": base64.b64encode(bytes(32)).decode()})
    assert status == 403 and refused["error"]["code"] == "pairing_refused"
    assert kinds(peer.server, peer.clock.now)[-2:] == [("127.0.0.1", "expired"), ("127.0.0.1", "unknown_session")]
    assert peer.server.window is not None and peer.server.window.failures == 0
    await pair(desktop, peer.url, code)


async def test_a_throttled_start_gets_429_and_the_window_stays_open(peer: Peer, desktop: Node) -> None:
    code = peer.server.open()
    async with from_address("127.0.0.2") as stranger:
        for _ in range(SOURCE_BURST):
            assert (await post(stranger, peer.url + START_PATH, start_body(OTHER, "00000000")[1]))[0] == 200
        status, throttled = await post(stranger, peer.url + START_PATH, start_body(OTHER, "00000000")[1])
    assert status == 429 and throttled["error"]["code"] == "pairing_throttled"
    assert f"{SOURCE_BURST} starts from this address in the last {SOURCE_BURST_S:g} s" in throttled["error"]["message"]

    await pair(desktop, peer.url, code)  # another address is not affected
    assert ("127.0.0.2", "throttled") in kinds(peer.server, peer.clock.now)


def test_starts_are_bounded_per_address_in_rate_and_count(tmp_path: Path) -> None:
    node = make_node(tmp_path, "spark-1")
    server = PairingServer(node.identity, "spark-1", "peer", node.store)
    server.open(now=T0)

    def start(address: str, at: float) -> None:
        server.start(json.dumps(start_body(OTHER, "00000000")[1]).encode(), address, at)

    for i in range(SOURCE_BURST):
        start("10.0.0.66", T0 + i)
    with pytest.raises(PairingThrottled, match="in the last 10 s"):
        start("10.0.0.66", T0 + SOURCE_BURST)
    start("10.0.0.67", T0 + SOURCE_BURST)  # each address has its own bounds
    start("::ffff:10.0.0.68", T0 + SOURCE_BURST)
    # An IPv6 source is its /64: one host may hold all of it.
    for i in range(SOURCE_BURST):
        start(f"2001:db8::{i + 1}", T0 + i)
    with pytest.raises(PairingThrottled):
        start("2001:db8::ffff", T0 + SOURCE_BURST)
    start("2001:db8:0:1::1", T0 + SOURCE_BURST)

    # At the rate allowed, an address still gets SOURCE_STARTS starts a window, then none until the next window.
    at = T0 + SOURCE_BURST_S
    for _ in range(SOURCE_STARTS - SOURCE_BURST):
        at += SOURCE_BURST_S
        start("10.0.0.66", at)
    with pytest.raises(PairingThrottled, match=f"{SOURCE_STARTS} starts from this address in this window"):
        start("10.0.0.66", at + SOURCE_BURST_S)
    assert server.is_open(at) and server.window is not None and server.window.failures == 0
    server.open(now=at)
    start("10.0.0.66", at)
    assert (source_key("fe80::1%eth0"), source_key("::ffff:10.0.0.1"), source_key("")) == ("fe80::/64", "10.0.0.1", "")


def test_the_exchanges_in_flight_are_bounded_and_one_per_address(tmp_path: Path) -> None:
    node = make_node(tmp_path, "spark-1")
    server = PairingServer(node.identity, "spark-1", "peer", node.store)
    server.open(now=T0)
    frame = json.dumps(start_body(OTHER, "00000000")[1]).encode()
    server.start(frame, "10.0.0.1", T0)
    server.start(frame, "10.0.0.1", T0 + 1)  # the same address again: its first exchange goes
    for i in range(2, MAX_EXCHANGES + 2):
        server.start(frame, f"10.0.0.{i}", T0 + 1)
    events = server.report(T0 + 1).events
    dropped = [(e.source, e.detail) for e in events if e.kind == "dropped"]
    assert [source for source, _ in dropped] == ["10.0.0.1", "10.0.0.1"]
    assert "same address" in dropped[0][1] and f"{MAX_EXCHANGES} were in flight" in dropped[1][1]
    assert len([e for e in events if e.kind == "started"]) == MAX_EXCHANGES + 2


async def test_the_record_says_what_happened_by_address_until_the_window_closes(peer: Peer, desktop: Node,
                                                                                tmp_path: Path) -> None:
    code = peer.server.open()
    intruder = make_node(tmp_path, "intruder")
    async with from_address("127.0.0.3") as stranger:
        with pytest.raises(PairingError, match="pairing refused"):
            await pair_with(peer.url, "00000000" if code != "00000000" else "11111111", intruder.identity, "laptop",
                            "desktop", intruder.store, http=stranger)
        status, _ = await post(stranger, peer.url + START_PATH, None, raw=b"{not json")
        assert status == 400
    await pair(desktop, peer.url, code)
    async with from_address("127.0.0.3") as stranger:  # after the window closed: refused, and not in its record
        assert (await post(stranger, peer.url + START_PATH, start_body(OTHER, code)[1]))[0] == 403

    report = peer.server.report(peer.clock.now)
    assert [(e.source, e.kind) for e in report.events] == [
        ("127.0.0.3", "started"), ("127.0.0.3", "wrong_code"), ("127.0.0.3", "malformed"),
        ("127.0.0.1", "started"), ("127.0.0.1", "paired"), ("", "closed")]
    details = [e.detail for e in report.events]
    assert "calls itself 'laptop' (desktop)" in details[0]
    assert details[1].endswith(f"attempt 1 of {MAX_FAILURES}")
    assert "the body must be a JSON object" in details[2]
    assert details[4].startswith("paired with 'desktop' (desktop, node id ")
    assert (report.open, report.outcome, report.failures, report.expires_in_s) == (False, "paired", 1, 0.0)
    assert json.loads(json.dumps(report.as_json()))["events"][0]["source"] == "127.0.0.3"


@pytest.mark.parametrize(("failures", "elapsed", "outcome", "why"), [
    (MAX_FAILURES, 1.0, "failed", f"{MAX_FAILURES} wrong attempts"),
    (0, WINDOW_TTL_S + 30, "expired", f"its {WINDOW_TTL_S:g} s are up"),
])
async def test_the_record_says_why_a_window_closed(peer: Peer, desktop: Node, failures: int, elapsed: float,
                                                   outcome: str, why: str) -> None:
    code = peer.server.open()
    for _ in range(failures):
        with pytest.raises(PairingError):
            await pair(desktop, peer.url, "00000000" if code != "00000000" else "11111111")
    peer.clock.now += elapsed
    report = peer.server.report(peer.clock.now)
    assert (report.open, report.outcome) == (False, outcome)
    closed = report.events[-1]
    assert closed.kind == "closed" and why in closed.detail
    assert closed.at == (peer.clock.now - elapsed if failures else T0 + WINDOW_TTL_S)


async def test_a_finish_for_another_session_does_not_disturb_the_exchange(peer: Peer, desktop: Node) -> None:
    peer.server.open()
    async with aiohttp.ClientSession() as http:
        status, body = await post(http, peer.url + FINISH_PATH,
                                  {"session": "0" * 32, "confirmation_a": base64.b64encode(bytes(32)).decode()})
    assert status == 403 and body["error"]["code"] == "pairing_refused"
    assert peer.server.window is not None and peer.server.window.failures == 0


# ---------------------------------------------------------------- a machine in the middle


def relay_app(target: str, http: aiohttp.ClientSession) -> web.Application:
    """A proxy that terminates TLS with its own certificate and passes every body on to the real peer unchanged."""

    async def relay(request: web.Request) -> web.Response:
        async with http.post(target + request.path, data=await request.read(), ssl=client_context(None, None),
                             headers={"Content-Type": "application/json"}) as upstream:
            return web.Response(body=await upstream.read(), status=upstream.status, content_type="application/json")

    app = web.Application()
    app.router.add_post("/{path:.*}", relay)
    return app


async def test_a_machine_in_the_middle_makes_pairing_fail_on_both_sides(peer: Peer, desktop: Node) -> None:
    code = peer.server.open()
    impostor = new_identity("spark-1")  # same name; it even relays the peer's own node id and messages
    async with aiohttp.ClientSession() as http, serve(relay_app(peer.url, http), server_context(impostor, [])) as mitm:
        with pytest.raises(PairingError, match="in the middle"):
            await pair(desktop, mitm, code)

    assert desktop.store.all() == [] and peer.store.all() == []
    assert not (desktop.state_dir / "pairings.json").exists()
    assert not (peer.state_dir / "pairings.json").exists()
    assert peer.server.window is not None and peer.server.window.failures == 1  # the peer saw a failed attempt
    await pair(desktop, peer.url, code)  # the user, now connected directly, still gets in
    assert len(peer.store.all()) == len(desktop.store.all()) == 1


async def test_an_impostor_that_does_not_know_the_code_gets_nothing(desktop: Node, tmp_path: Path) -> None:
    """A node advertising the peer's name runs its own window: the desktop's code is not its code."""
    impostor = make_node(tmp_path, "spark-1-impostor")
    server = PairingServer(impostor.identity, "spark-1", "peer", impostor.store, Clock())
    server.open(code="99999999")
    app = web.Application()
    add_pairing_routes(app, server)
    async with serve(app, server_context(impostor.identity, [])) as url:
        with pytest.raises(PairingError):
            await pair(desktop, url, "12345678")
    assert desktop.store.all() == [] and impostor.store.all() == []


# ---------------------------------------------------------------- malformed input


def start_body(identity: Identity, code: str, **changes: Any) -> tuple[SPAKE2_A, dict[str, Any]]:
    spake = SPAKE2_A(code.encode(), idA=ID_A, idB=ID_B)
    body = {"msg_a": base64.b64encode(spake.start()).decode(), "name": "desktop", "role": "desktop",
            "node_id": identity.node_id, "cert_pem": identity.cert_pem.decode()}
    return spake, {**body, **changes}


async def post(http: aiohttp.ClientSession, url: str, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    async with http.post(url, data=data, ssl=client_context(None, None),
                         headers={"Content-Type": "application/json"}) as response:
        text = await response.text()
        assert "Traceback" not in text
        return response.status, json.loads(text)


OTHER = new_identity("other")
MALFORMED_STARTS: list[tuple[str, bytes | None, dict[str, Any]]] = [
    ("not JSON", b"{not json", {}),
    ("not UTF-8", b"\xff\xfe\x00", {}),
    ("a JSON array", b"[1, 2]", {}),
    ("empty object", b"{}", {}),
    ("msg_a missing", None, {"msg_a": None}),
    ("msg_a not base64", None, {"msg_a": "@@@@"}),
    ("msg_a wrong length", None, {"msg_a": base64.b64encode(b"A" + bytes(8)).decode()}),
    ("msg_a not a point", None, {"msg_a": base64.b64encode(b"A" + b"\xff" * 32).decode()}),
    ("msg_a from side B", None, {"msg_a": base64.b64encode(b"B" + bytes(32)).decode()}),
    ("name not text", None, {"name": 7}),
    ("name too long", None, {"name": "x" * 65}),
    ("name with control chars", None, {"name": "desk\ntop"}),
    ("unknown role", None, {"role": "admin"}),
    ("node_id not hex", None, {"node_id": "z" * 64}),
    ("node_id of another cert", None, {"node_id": OTHER.node_id}),
    ("cert_pem not a cert", None, {"cert_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}),
    ("cert_pem a list", None, {"cert_pem": ["x"]}),
    ("too big", b'{"name": "' + b"x" * 20000 + b'"}', {}),
]


@pytest.mark.parametrize(("raw", "changes"), [(raw, changes) for _, raw, changes in MALFORMED_STARTS],
                         ids=[why for why, _, _ in MALFORMED_STARTS])
async def test_malformed_start_bodies_get_400_envelopes(peer: Peer, desktop: Node, raw: bytes | None,
                                                        changes: dict[str, Any]) -> None:
    code = peer.server.open()
    _, body = start_body(desktop.identity, code, **changes)
    async with aiohttp.ClientSession() as http:
        status, answer = await post(http, peer.url + START_PATH, body, raw)
    assert status == 400
    assert set(answer["error"]) >= {"message", "type", "code"}
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["code"] == "invalid_pairing_message"
    assert peer.server.window is not None and peer.server.window.failures == 0  # garbage costs the user nothing
    await pair(desktop, peer.url, code)  # and the window still works


async def test_pairing_with_itself_is_refused(peer: Peer) -> None:
    code = peer.server.open()
    _, body = start_body(peer.identity, code)
    async with aiohttp.ClientSession() as http:
        status, answer = await post(http, peer.url + START_PATH, body)
    assert status == 400 and "itself" in answer["error"]["message"]


@pytest.mark.parametrize("body", [{}, {"session": "x" * 33, "confirmation_a": ""},
                                  {"session": "0" * 32, "confirmation_a": base64.b64encode(bytes(31)).decode()}])
async def test_malformed_finish_bodies_get_400_envelopes(peer: Peer, body: dict[str, Any]) -> None:
    peer.server.open()
    async with aiohttp.ClientSession() as http:
        status, answer = await post(http, peer.url + FINISH_PATH, body)
    assert status == 400 and answer["error"]["code"] == "invalid_pairing_message"


async def test_a_wrong_method_is_not_a_traceback(peer: Peer) -> None:
    async with aiohttp.ClientSession() as http, \
            http.get(peer.url + START_PATH, ssl=client_context(None, None)) as response:
        assert response.status == 405
        assert "Traceback" not in await response.text()


# ---------------------------------------------------------------- the joining side's own checks


async def test_an_unreachable_peer_is_a_link_error(desktop: Node) -> None:
    async with serve(web.Application(), server_context(new_identity("gone"), [])) as url:
        pass  # the port is closed again now
    with pytest.raises(LinkError, match="cannot reach the peer"):
        await pair(desktop, url, "12345678")


async def test_pair_with_refuses_plain_http_and_bad_codes_before_connecting(desktop: Node) -> None:
    with pytest.raises(PairingError, match="https://"):
        await pair(desktop, "http://127.0.0.1:1", "12345678")
    with pytest.raises(PairingError, match="8 digits"):
        await pair(desktop, "https://127.0.0.1:1", "1234")


async def test_pair_with_uses_a_given_session_and_leaves_it_open(peer: Peer, desktop: Node) -> None:
    code = peer.server.open()
    async with aiohttp.ClientSession() as http:
        paired = await pair_with(peer.url, code, desktop.identity, "desktop", "desktop", desktop.store, http=http)
        assert not http.closed
    assert paired.node_id == peer.identity.node_id


# ---------------------------------------------------------------- the store


def paired_peer(name: str, at: float = T0) -> PairedPeer:
    identity = new_identity(name)
    return PairedPeer(node_id=identity.node_id, name=name, role="peer", cert_pem=identity.cert_pem, paired_at=at)


def test_store_round_trip_and_queries(tmp_path: Path) -> None:
    store = PairingStore.load(tmp_path)
    assert store.all() == [] and store.cert_pems() == []
    a, b = paired_peer("spark-1", T0), paired_peer("spark-2", T0 + 1)
    store.add(b)
    store.add(a)
    store.update_address(a.node_id, "192.168.1.20", 11436)
    store.update_address("f" * 64, "10.0.0.1", 1)  # unknown: ignored

    again = PairingStore.load(tmp_path)
    moved = replace(a, address="192.168.1.20", port=11436)
    assert again.all() == [moved, b]
    assert again.get(a.node_id.upper()) == moved
    assert again.by_name("spark-2") == b and again.by_name("nope") is None
    assert again.cert_pems() == [a.cert_pem, b.cert_pem]
    assert again.remove(b.node_id) and not again.remove(b.node_id)
    assert PairingStore.load(tmp_path).all() == [moved]
    assert stat.S_IMODE((tmp_path / "pairings.json").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["pairings.json"]  # no temporary file left behind


def test_re_pairing_a_name_replaces_its_old_certificate(tmp_path: Path) -> None:
    store = PairingStore.load(tmp_path)
    old, reinstalled = paired_peer("spark-1"), paired_peer("spark-1", T0 + 60)
    store.add(old)
    store.add(reinstalled)
    assert store.all() == [reinstalled]


@pytest.mark.parametrize("text", ["{oops", "[]", '{"version": 2, "peers": []}', '{"version": 1, "peers": [7]}',
                                  '{"version": 1, "peers": [{"node_id": "ab"}]}'])
def test_a_corrupt_store_is_a_clear_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "pairings.json").write_text(text)
    with pytest.raises(StateFileError) as caught:
        PairingStore.load(tmp_path)
    assert str(tmp_path / "pairings.json") in caught.value.message and "corrupt" in caught.value.message


def test_a_tampered_certificate_in_the_store_is_caught(tmp_path: Path) -> None:
    store = PairingStore.load(tmp_path)
    store.add(paired_peer("spark-1"))
    doc = json.loads((tmp_path / "pairings.json").read_text())
    doc["peers"][0]["cert_pem"] = new_identity("evil").cert_pem.decode()
    (tmp_path / "pairings.json").write_text(json.dumps(doc))
    with pytest.raises(StateFileError, match=r"peers\[0\]"):
        PairingStore.load(tmp_path)


async def test_a_flood_of_starts_from_many_addresses_never_keeps_the_right_code_out(peer: Peer, desktop: Node,
                                                                                      hardening: Ledger) -> None:
    attack = hardening.attack("pairing flood", "strangers on the LAN flooding a peer's open pairing window with "
                              "starts from guessed codes, never finished, from many addresses",
                              "tests/test_pairing.py::"
                              "test_a_flood_of_starts_from_many_addresses_never_keeps_the_right_code_out")
    code = peer.server.open()
    answers: dict[int, int] = {}
    for host in range(2, 42):  # 40 addresses, each past its burst: 200 starts
        async with from_address(f"127.0.0.{host}") as stranger:
            for _ in range(SOURCE_BURST + 2):
                status = (await post(stranger, peer.url + START_PATH, start_body(OTHER, "00000000")[1]))[0]
                answers[status] = answers.get(status, 0) + 1
                attack.attempts += 1
    assert set(answers) == {200, 429} and answers[429] == 40 * 2  # each address throttled past its burst
    with attack.trial("the right code, right after the flood"):
        started = time.monotonic()
        await pair(desktop, peer.url, code)
        attack.recovery_s.append(time.monotonic() - started)
    assert len(desktop.store.all()) == 1 and peer.server.report(peer.clock.now).outcome == "paired"
