"""A listening socket with our own accept loop in front of an aiohttp runner, so that no client, with or without
credentials, can take the process's file descriptors.

asyncio's server accepts whatever comes, holds a TLS handshake for 60 s and, out of descriptors, logs and stops
accepting for a second; aiohttp cuts no connection that never completes its request head. Here each accepted
socket is first put to the ConnectionTable (connections.py: caps, clocks), then handed to aiohttp's protocol
through `loop.connect_accepted_socket`, wrapped so that the table hears when bytes arrive and when a request starts
and ends. A sweep closes what overstayed; a rate-limited warning says what was cut or refused, and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import resource
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from hybridd.api.connections import OVERDUE, ConnectionTable, Limits, State, Tally, source_of

log = logging.getLogger("hybridd.listener")

BACKLOG = socket.SOMAXCONN  # kernel-held, no descriptor each: a burst waits there instead of being dropped
SWEEP_S = 0.25  # how often overdue connections are cut: the clocks' resolution
SSL_SHUTDOWN_S = 5.0  # how long a TLS client closed for idling gets to answer our close_notify
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

Trusted = Callable[[asyncio.BaseTransport], bool]


@dataclass(slots=True)
class _Live:
    """The I/O side of one table entry: the task running its handshake, then its transport."""

    task: asyncio.Task[None] | None = None
    transport: asyncio.Transport | None = None


class Listener:
    """Serve `runner`'s app under `limits` (TLS with `ssl_context`); `trusted` tells a paired client's transport."""

    def __init__(self, runner: web.AppRunner, limits: Limits, what: str, *, ssl_context: ssl.SSLContext | None = None,
                 trusted: Trusted | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        server = runner.server
        if server is None:
            raise RuntimeError("set the runner up before listening")
        self.what = what
        self._server = server
        self._ssl = ssl_context
        self._trusted = trusted
        self._clock = clock
        self._table = ConnectionTable(limits)
        self._tally = Tally()
        self._live: dict[int, _Live] = {}
        self._conn_of: dict[web.RequestHandler, int] = {}
        self._ids = itertools.count()
        self._sockets: list[socket.socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Every RequestHandler reads this when it is made, so it must be in place before the first connection.
        inner = server.request_handler

        async def observed(request: web.BaseRequest) -> web.StreamResponse:
            conn = self._conn_of.get(request.protocol)
            if conn is None:
                return await inner(request)
            self._table.started(conn)
            try:
                return await inner(request)
            finally:
                self._table.finished(conn, self._clock())

        server.request_handler = observed

    @property
    def url(self) -> str:
        """The URL actually bound (port 0 becomes the port the kernel chose)."""
        host, port = self._sockets[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self._ssl else 'http'}://{host}:{port}"

    async def start(self, host: str, port: int) -> None:
        """Bind and start accepting; OSError if the address cannot be had."""
        self._sockets = await _bind(host, port)
        self._tasks = [asyncio.create_task(self._accept(s), name=f"accept {self.what}") for s in self._sockets]
        self._tasks.append(asyncio.create_task(self._sweep(), name=f"sweep {self.what}"))

    async def stop(self) -> None:
        """Stop accepting and drop unfinished handshakes; open connections are the runner's to drain."""
        for task in self._tasks:
            task.cancel()
        handshakes = [live.task for live in self._live.values() if live.transport is None and live.task is not None]
        for task in handshakes:
            task.cancel()
        for task in [*self._tasks, *handshakes]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sock in self._sockets:
            sock.close()

    # -- accepting
    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, address = await loop.sock_accept(listening)
            except (ConnectionAbortedError, InterruptedError):
                continue  # the client left before we took it
            except OSError as exc:
                self._tally.add(f"accepts failed: {exc.strerror or exc}")
                self._report()
                # Out of descriptors because something else holds them (engines, files): make room if we can.
                victim = self._table.longest_waiting() if exc.errno in _OUT_OF_DESCRIPTORS else None
                if victim is not None:
                    self._table.closed(victim)
                    self._cut(victim, State.WAITING)
                else:
                    await asyncio.sleep(0.1)  # not to spin on an error that persists; asyncio waits 1 s
                continue
            self._admit(client, address[0])

    def _admit(self, client: socket.socket, host: str) -> None:
        conn = next(self._ids)
        verdict = self._table.open(conn, source_of(host), self._clock(), tls=self._ssl is not None)
        if not verdict.admitted:
            client.close()
            self._tally.add(f"refused: {verdict.refused}")
            self._report()
            return
        for victim in verdict.evicted:
            self._cut(victim, State.WAITING)
            self._tally.add("closed to make room (they had no request in progress)")
        if verdict.evicted:
            self._report()
        live = self._live[conn] = _Live()
        live.task = asyncio.create_task(self._handshake(conn, client))

    async def _handshake(self, conn: int, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        tls: dict[str, float] = {}
        if self._ssl is not None:
            # The table cuts a slow handshake first; this only replaces asyncio's 60 s default.
            tls = {"ssl_handshake_timeout": self._table.limits.handshake_s + 1, "ssl_shutdown_timeout": SSL_SHUTDOWN_S}
        try:
            await loop.connect_accepted_socket(lambda: _Guarded(self, conn), client, ssl=self._ssl, **tls)
        except asyncio.CancelledError:
            pass  # we cut it (room, clock, stop) and counted why; asyncio closed the socket
        except OSError as exc:  # ssl.SSLError and TimeoutError are OSErrors
            if self._table.state(conn) is not None:
                self._tally.add(f"TLS handshakes failed ({type(exc).__name__})")
                self._report()
        finally:
            live = self._live.get(conn)
            if live is not None and live.transport is None:
                self._forget(conn)

    # -- what the connections tell us
    def _ready(self, conn: int, transport: asyncio.Transport) -> bool:
        live = self._live.get(conn)
        if live is None or self._table.state(conn) is None:
            return False
        live.transport = transport
        trusted = self._trusted is not None and self._trusted(transport)
        self._table.ready(conn, self._clock(), trusted=trusted)
        return True

    def _receiving(self, conn: int) -> None:
        self._table.receiving(conn, self._clock())

    def _forget(self, conn: int, handler: web.RequestHandler | None = None) -> None:
        self._table.closed(conn)
        self._live.pop(conn, None)
        if handler is not None:
            self._conn_of.pop(handler, None)

    # -- cutting
    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            for conn, state in self._table.overdue(self._clock()):
                self._cut(conn, state)
                if state is not State.IDLE:  # idling out is how keep-alive ends; the others are not normal
                    timeout = self._table.limits.timeout(state)
                    self._tally.add(f"cut with {OVERDUE[state]} within {timeout:g} s")
            self._report()

    def _cut(self, conn: int, state: State) -> None:
        live = self._live.get(conn)
        if live is None:
            return
        if live.transport is not None:
            # A polite close for a client that idled out; the rest are aborted so the descriptor goes now.
            (live.transport.close if state is State.IDLE else live.transport.abort)()
        elif live.task is not None:
            live.task.cancel()  # asyncio closes a socket whose handshake is cancelled

    def _report(self) -> None:
        counts = self._tally.due(self._clock())
        if not counts:
            return
        said = "; ".join(f"{n} {reason}" for reason, n in counts[:5])
        if len(counts) > 5:
            said += f"; and {sum(n for _, n in counts[5:])} more"
        limits = self._table.limits
        per = f", {limits.max_per_source} per address" if limits.max_per_source is not None else ""
        kind = "untrusted connections" if self._trusted is not None else "connections"
        log.warning("%s: %s (cap: %d %s%s, under a descriptor limit of %d; open now: %d)", self.what, said,
                    limits.max_untrusted, kind, per, descriptor_limit(), len(self._table))


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the listener told of its start, bytes and end."""

    def __init__(self, listener: Listener, conn: int) -> None:
        self._listener = listener
        self._conn = conn
        self._handler = listener._server()
        self._made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio classes: no isinstance here
        if not self._listener._ready(self._conn, transport):
            transport.abort()  # cut while its handshake finished
            return
        self._made = True
        self._listener._conn_of[self._handler] = self._conn
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._made:
            self._listener._receiving(self._conn)
            self._handler.data_received(data)

    def eof_received(self) -> None:
        if self._made:
            self._handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._made:
            self._handler.connection_lost(exc)
        self._listener._forget(self._conn, self._handler)

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()


def descriptor_limit() -> int:
    """This process's soft RLIMIT_NOFILE: the descriptors it may hold."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


async def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address host resolves to, like asyncio's create_server."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if address in seen:
                continue
            seen.add(address)
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
