"""The control link to a paired peer: msgpack frames over a WebSocket over mutual TLS, one per peer.

`LinkSession` is the protocol (frames in, frames out, time as an argument, no I/O); `LinkHub` serves it at
`GET /hybridd/v1/link` and `LinkClient` dials it and redials with backoff. After the handshake both ends are the same:
each sends hello and inventory, then capacity and a ping every interval, and answers pings. A frame that fails
validation closes the link with 1003 (1009 when oversized) and a logged reason; a peer heard from for
`miss_limit` intervals is declared down. Nothing a peer sends can raise out of either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
from aiohttp import web

from hybridd.peer.messages import (
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED,
    MAX_FRAME_BYTES,
    Capacity,
    Hello,
    Inventory,
    LinkProtocolError,
    Message,
    Ping,
    Pong,
    decode,
    encode,
)

log = logging.getLogger("hybridd.peer")

LINK_PATH = "/hybridd/v1/link"
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008  # hello names another node than the certificate, or no common protocol
CLOSE_SILENT = 4000  # application code: the peer stopped talking
CLOSE_TIMEOUT_S = 1.0  # a silent peer will never answer our close frame; do not wait long for it

Clock = Callable[[], float]
OnMessage = Callable[[str, Message], None]
OnState = Callable[[str, "PeerLinkState"], None]
Snapshot = Callable[[], Capacity]
InventorySource = Callable[[], Inventory]


@dataclass
class PeerLinkState:
    """What we know about a peer through its link: whether it is up, RTT, its last hello, inventory and capacity."""

    up: bool = False
    rtt_s: float | None = None
    last_seen: float | None = None
    hello: Hello | None = None
    inventory: Inventory | None = None
    capacity: Capacity | None = None
    down_reason: str | None = "not connected yet"
    # The peer's host answered when the link ended or was last dialed (a close frame, a refused connection, a failed
    # handshake): it is awake, its hybridd is not there. False while up, and when nothing answered (it may sleep).
    host_answered: bool = False


class LinkSession:
    """One connected link's protocol state; every method takes `now` and returns the frames to send. No I/O."""

    def __init__(self, local_hello: Hello, state: PeerLinkState, now: float, *, interval_s: float = 2.0,
                 miss_limit: int = 3, expected_node_id: str | None = None) -> None:
        self.local_hello = local_hello
        self.state = state
        self.interval_s = interval_s
        self.miss_limit = miss_limit
        self.expected_node_id = expected_node_id
        self.protocol: int | None = None
        self._last_heard = now
        self._pings_sent: deque[float] = deque(maxlen=8)

    @property
    def established(self) -> bool:
        """True once the peer's hello has been accepted."""
        return self.protocol is not None

    def opening(self, inventory: Inventory) -> list[Message]:
        """Frames to send as soon as the socket is open."""
        return [self.local_hello, inventory]

    def receive(self, frame: bytes, now: float) -> tuple[Message, list[Message]]:
        """Apply one incoming frame: the message and the replies; raises LinkProtocolError to close the link."""
        msg = decode(frame)
        if not self.established and not isinstance(msg, Hello):
            raise LinkProtocolError(f"expected hello first, got {type(msg).__name__.lower()}")
        self._last_heard = now
        self.state.last_seen = now
        replies: list[Message] = []
        if isinstance(msg, Hello):
            self._accept_hello(msg)
        elif isinstance(msg, Inventory):
            self.state.inventory = msg
        elif isinstance(msg, Capacity):
            self.state.capacity = msg
        elif isinstance(msg, Ping):
            replies.append(Pong(now, msg.t))
        elif isinstance(msg, Pong) and msg.echo in self._pings_sent:  # only our own pings give an RTT
            self.state.rtt_s = max(0.0, now - msg.echo)
        return msg, replies  # the rest (job_changed) is for on_message

    def _accept_hello(self, hello: Hello) -> None:
        if self.established:
            raise LinkProtocolError("second hello on one link")
        if self.expected_node_id is not None and hello.node_id != self.expected_node_id:
            raise LinkProtocolError(f"hello from {hello.node_id[:16]!r} but the certificate is "
                                    f"{self.expected_node_id[:16]!r}", CLOSE_POLICY)
        common = set(hello.protocols) & set(self.local_hello.protocols)
        if not common:
            raise LinkProtocolError(f"no common link protocol: peer speaks {list(hello.protocols)}, "
                                    f"we speak {list(self.local_hello.protocols)}", CLOSE_POLICY)
        self.protocol = max(common)
        self.state.hello = hello
        self.state.up = True
        self.state.down_reason = None
        self.state.host_answered = False

    def silence(self, now: float) -> str | None:
        """Why the link is dead if the peer has been silent for miss_limit intervals, else None."""
        quiet = now - self._last_heard
        if quiet <= self.miss_limit * self.interval_s:
            return None
        waited_for = "peer silent" if self.established else "no hello"
        return f"{waited_for} for {quiet:.1f} s ({self.miss_limit} intervals of {self.interval_s:g} s)"

    def tick(self, now: float, capacity: Capacity | None) -> list[Message]:
        """The periodic frames: our capacity (if any) and a ping for RTT and liveness."""
        self._pings_sent.append(now)
        frames: list[Message] = [capacity] if capacity is not None else []
        return [*frames, Ping(now)]

    def down(self, reason: str) -> None:
        """Record that the link ended and why."""
        self.state.up = False
        self.state.down_reason = reason


@dataclass(frozen=True)
class _Callbacks:
    """What the link I/O needs from the daemon; each is guarded so our own bug cannot end a link silently."""

    snapshot: Snapshot
    inventory: InventorySource
    on_message: OnMessage | None
    clock: Clock


async def _run_link(ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, session: LinkSession,
                    peer: str, calls: _Callbacks, on_up: Callable[[], None]) -> str:
    """Drive one open socket until it ends; marks the session down and returns why. Never raises for the peer."""
    try:
        reason, close_code = await _exchange(ws, session, peer, calls, on_up)
    except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:  # send on a socket that died under us
        reason, close_code = f"connection lost: {type(exc).__name__}: {exc}", None
    session.down(reason)  # before the close handshake, which a broken peer may stall for CLOSE_TIMEOUT_S
    if close_code is not None:
        await _close(ws, close_code, reason)
    return reason


async def _exchange(ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, session: LinkSession,
                    peer: str, calls: _Callbacks, on_up: Callable[[], None]) -> tuple[str, int | None]:
    """Send, receive and tick until the link must end: (reason, close code to send, or None if already closed)."""
    for msg in session.opening(_guarded(calls.inventory, Inventory(), "inventory source")):
        await ws.send_bytes(encode(msg))
    next_tick = calls.clock()
    while True:
        now = calls.clock()
        if now >= next_tick:
            dead = session.silence(now)
            if dead is not None:
                return dead, CLOSE_SILENT
            for msg in session.tick(now, _guarded(calls.snapshot, None, "capacity snapshot")):
                await ws.send_bytes(encode(msg))
            next_tick = now + session.interval_s
        try:
            # aiohttp treats timeout=0 as "no timeout", hence the floor.
            frame = await ws.receive(timeout=max(0.001, next_tick - calls.clock()))
        except TimeoutError:
            continue
        if frame.type is aiohttp.WSMsgType.BINARY:
            was_established = session.established
            try:
                msg, replies = session.receive(frame.data, calls.clock())
            except LinkProtocolError as exc:
                return f"protocol error: {exc.reason}", exc.close_code
            if session.established and not was_established:
                on_up()
            for reply in replies:
                await ws.send_bytes(encode(reply))
            if calls.on_message is not None:
                _guarded(lambda m=msg: calls.on_message(peer, m), None, "link message handler")  # type: ignore[misc]
        elif frame.type is aiohttp.WSMsgType.TEXT:
            return "protocol error: text frame on a msgpack link", CLOSE_UNSUPPORTED
        elif frame.type is aiohttp.WSMsgType.ERROR:
            code = getattr(frame.data, "code", None)  # aiohttp has already closed with this code
            detail = "frame too large" if code == CLOSE_TOO_BIG else str(frame.data)
            return (f"protocol error: {detail}" if code else f"connection error: {detail}"), None
        else:  # CLOSE, CLOSING, CLOSED
            session.state.host_answered = frame.type is aiohttp.WSMsgType.CLOSE  # it said goodbye: it is awake
            code = ws.close_code
            extra = f": {frame.extra}" if frame.extra else ""
            return (f"peer closed the link ({code}{extra})" if code is not None else "connection closed"), None


async def _close(ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, code: int, reason: str) -> None:
    """Close with a code and a short reason (a close frame carries at most 123 bytes)."""
    with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):  # it is going away either way
        await ws.close(code=code, message=reason.encode()[:120])


T = TypeVar("T")


def _guarded(call: Callable[[], T], fallback: T, what: str) -> T:
    """Call one of the daemon's callbacks; log and fall back if it is broken, so the link stays up."""
    try:
        return call()
    except Exception:
        log.exception("link: %s failed", what)
        return fallback


class LinkHub:
    """Server side: accepts one link per paired peer, authorized by the TLS layer through `authorize(request)`."""

    def __init__(self, *, local_hello: Hello, authorize: Callable[[web.Request], str | None],
                 snapshot: Snapshot = Capacity, inventory: InventorySource = Inventory,
                 on_message: OnMessage | None = None, on_state: OnState | None = None,
                 clock: Clock = time.monotonic, interval_s: float = 2.0, miss_limit: int = 3,
                 hello_for: Callable[[web.Request], Hello] | None = None) -> None:
        self.local_hello = local_hello
        # The hello for one link, when it depends on where the link came in (the NIC to wake this node by).
        self.hello_for = hello_for
        self.authorize = authorize
        self.on_state = on_state
        self.interval_s = interval_s
        self.miss_limit = miss_limit
        self.states: dict[str, PeerLinkState] = {}
        self._calls = _Callbacks(snapshot, inventory, on_message, clock)
        self._live: dict[str, web.WebSocketResponse] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """GET /hybridd/v1/link: 403 unless authorized, else run the link until it ends."""
        peer = _guarded(lambda: self.authorize(request), None, "link authorize")
        if peer is None:
            raise web.HTTPForbidden(text="not a paired peer")
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, compress=False, timeout=CLOSE_TIMEOUT_S)
        await ws.prepare(request)
        previous = self._live.get(peer)
        self._live[peer] = ws
        if previous is not None:  # a peer that redials after a network blip replaces its stale link
            await _close(previous, CLOSE_NORMAL, "replaced by a newer link")
        # A fresh state per link, so the link it replaced cannot mark this one down as it ends.
        state = self.states[peer] = PeerLinkState(down_reason="awaiting hello")
        hello = self.local_hello
        if self.hello_for is not None:
            hello = _guarded(lambda: self.hello_for(request), hello, "link hello")  # type: ignore[misc]
        session = LinkSession(hello, state, self._calls.clock(), interval_s=self.interval_s,
                              miss_limit=self.miss_limit, expected_node_id=peer)
        reason = await _run_link(ws, session, peer, self._calls, lambda: self._up(peer, state))
        if self._live.get(peer) is ws:
            del self._live[peer]
            log.warning("link from %s down: %s", _short(peer), reason)
            self._notify(peer, state)
        else:
            log.info("link from %s replaced: %s", _short(peer), reason)
        return ws

    async def send(self, peer: str, message: Message) -> bool:
        """Send one frame to `peer` on its live link; False when it has none (it catches up when it redials)."""
        ws = self._live.get(peer)
        if ws is None or ws.closed:
            return False
        try:
            await ws.send_bytes(encode(message))
        except (ConnectionError, RuntimeError):
            return False
        return True

    def _up(self, peer: str, state: PeerLinkState) -> None:
        hello = state.hello
        assert hello is not None
        log.info("link from %s up: %s (%s, %s)", _short(peer), hello.name, hello.role, hello.version)
        self._notify(peer, state)

    def _notify(self, peer: str, state: PeerLinkState) -> None:
        if self.on_state is not None:
            _guarded(lambda: self.on_state(peer, state), None, "link state handler")  # type: ignore[misc]

    async def close(self, app: web.Application | None = None) -> None:
        """Close every live link (an aiohttp on_shutdown hook)."""
        for ws in list(self._live.values()):
            await _close(ws, CLOSE_GOING_AWAY, "node shutting down")


def add_link_route(app: web.Application, hub: LinkHub) -> None:
    """Serve the control link at GET /hybridd/v1/link and close live links when the app shuts down."""
    app.router.add_get(LINK_PATH, hub.handle)
    app.on_shutdown.append(hub.close)


class LinkClient:
    """Client side: dials a peer's link, keeps it up, redials with backoff; `state` says how the peer is doing."""

    def __init__(self, url: str | Sequence[str], ssl_context: ssl.SSLContext, local_hello: Hello,
                 on_message: OnMessage | None = None, clock: Clock = time.monotonic, interval_s: float = 2.0, *,
                 snapshot: Snapshot = Capacity, inventory: InventorySource = Inventory,
                 expected_node_id: str | None = None, on_state: OnState | None = None, miss_limit: int = 3,
                 backoff_s: tuple[float, float] = (0.25, 15.0)) -> None:
        # Where the peer may answer, tried in turn until one does: a failed dial moves on to the next.
        self.urls = [url] if isinstance(url, str) else list(url)
        self._at = 0
        self.ssl_context = ssl_context
        self.local_hello = local_hello
        self.interval_s = interval_s
        self.miss_limit = miss_limit
        self.expected_node_id = expected_node_id
        self.on_state = on_state
        self.backoff_s = backoff_s
        self.state = PeerLinkState()
        self.connects = 0
        self._calls = _Callbacks(snapshot, inventory, on_message, clock)
        self._task: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._redial = asyncio.Event()

    def hurry(self) -> None:
        """Redial now rather than after the backoff (a peer was just woken), and keep redialing promptly."""
        self._redial.set()

    @property
    def url(self) -> str:
        """The address being dialed (or that answered)."""
        return self.urls[self._at]

    async def start(self) -> None:
        """Begin dialing in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._dial_forever(), name=f"link {self.url}")

    async def close(self) -> None:
        """Close the link and stop redialing."""
        task, self._task = self._task, None
        if task is None:
            return
        if self._ws is not None:
            await _close(self._ws, CLOSE_GOING_AWAY, "node shutting down")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.state.up = False
        self.state.down_reason = "closed"

    async def _dial_forever(self) -> None:
        backoff = self.backoff_s[0]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=None, connect=5.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                reason, established = await self._dial_once(http)
                self.state.up = False
                self.state.down_reason = reason
                # A peer that stays unreachable would log every redial; say it once per outage.
                (log.warning if established or self.connects <= 1 else log.debug)("link to %s down: %s", self.url,
                                                                                    reason)
                if established:
                    self._notify()
                    backoff = self.backoff_s[0]
                else:
                    self._at = (self._at + 1) % len(self.urls)  # try the next address the peer may be at
                if self._redial.is_set():  # hurried: the next dial at the shortest backoff
                    backoff = self.backoff_s[0]
                    self._redial.clear()
                with contextlib.suppress(TimeoutError):  # the backoff, cut short by hurry()
                    await asyncio.wait_for(self._redial.wait(), backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, self.backoff_s[1])

    async def _dial_once(self, http: aiohttp.ClientSession) -> tuple[str, bool]:
        self.connects += 1
        try:
            async with http.ws_connect(self.url, ssl=self.ssl_context, max_msg_size=MAX_FRAME_BYTES, compress=0,
                                       timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S)) as ws:
                self._ws = ws
                session = LinkSession(self.local_hello, self.state, self._calls.clock(), interval_s=self.interval_s,
                                      miss_limit=self.miss_limit, expected_node_id=self.expected_node_id)
                self.state.down_reason = "awaiting hello"
                try:
                    reason = await _run_link(ws, session, self.expected_node_id or self.url, self._calls, self._up)
                finally:
                    self._ws = None
                return reason, session.established
        except aiohttp.WSServerHandshakeError as exc:
            self.state.host_answered = True
            return f"handshake refused: HTTP {exc.status}", False
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.state.host_answered = _host_answered(exc)
            return f"connect failed: {type(exc).__name__}: {exc}", False

    def _up(self) -> None:
        hello = self.state.hello
        assert hello is not None
        log.info("link to %s up: %s (%s, %s)", self.url, hello.name, hello.role, hello.version)
        self._notify()

    def _notify(self) -> None:
        if self.on_state is not None:
            peer = self.state.hello.node_id if self.state.hello else self.url
            _guarded(lambda: self.on_state(peer, self.state), None, "link state handler")  # type: ignore[misc]


# A dial that failed with one of these reached no running host: it may be asleep (or gone).
_NO_ANSWER_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ETIMEDOUT})


def _host_answered(exc: BaseException) -> bool:
    """Whether a failed dial was answered by the peer's host (refused, reset, TLS failed): it is awake. A timeout or
    an unreachable host is no answer."""
    if isinstance(exc, TimeoutError):  # aiohttp's connect timeouts are TimeoutErrors too
        return False
    os_error = getattr(exc, "os_error", exc)
    return not (isinstance(os_error, OSError) and os_error.errno in _NO_ANSWER_ERRNOS)


def _short(node_id: str) -> str:
    return node_id[:16]
