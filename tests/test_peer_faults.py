"""Failure behaviour of peering (issue 5), with a fault proxy between a real desktop and a real peer on loopback.

The desktop is paired with the peer *through* the proxy (by the proxy's address), so the pairing store, the control
link and every forwarded request cross it. TLS passes through untouched; the proxy only delays, holds or cuts bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path

import pytest

from hybridd.demo.tiny_gguf import TinyLlama, write_tiny_llama
from tests.conftest import Daemon, http, wait_for
from tests.hardening import Ledger
from tests.nodes import node_config as shared_node_config

NO_EOS = {"2": -100}
CTX = 16384
IDLE_S = 2.0
FIRST_BYTE_S = 6.0


# ------------------------------------------------------------------------------------------------ the fault proxy

def _rst(writer: asyncio.StreamWriter) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Direction:
    """One direction of one connection: read, delay by the proxy's latency, hold while stalled, write."""

    def __init__(self, proxy: FaultProxy, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                 stall_after: int | None) -> None:
        self.proxy, self.src, self.dst = proxy, src, dst
        self.stall_after = stall_after  # stall once this many bytes have passed (None: never)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.sent = 0
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read(self) -> None:
        while data := await self.src.read(65536):
            self.queue.put_nowait((time.monotonic() + self.proxy.latency_s, data))
        self.queue.put_nowait((time.monotonic() + self.proxy.latency_s, b""))

    async def write(self) -> None:
        while True:
            due, data = await self.queue.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not data:
                if self.dst.can_write_eof():
                    self.dst.write_eof()  # pass a clean half-close on, as TCP would
                return
            if self.stall_after is not None and self.sent + len(data) >= self.stall_after:
                cut = max(0, self.stall_after - self.sent)
                self.dst.write(data[:cut])
                self.sent += cut
                data = data[cut:]
                self.stall_after = None
                self.flowing.clear()
            await self.flowing.wait()
            self.dst.write(data)
            self.sent += len(data)
            await self.dst.drain()


class _Pipe:
    """One accepted connection and its upstream connection."""

    def __init__(self, proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proxy, self.reader, self.writer = proxy, reader, writer
        self.upstream: asyncio.StreamWriter | None = None
        self.directions: dict[str, _Direction] = {}
        self.ended = False

    async def run(self) -> None:
        proxy = self.proxy
        if proxy.refusing:
            self.writer.close()  # accepted, then closed at once: nothing ever answers
            return
        try:
            up_reader, self.upstream = await asyncio.open_connection(*proxy.target)
        except OSError:
            self.writer.close()  # the target is gone: so is the connection
            return
        if proxy.resetting:
            with contextlib.suppress(OSError):
                await self.reader.read(1)  # the client's first bytes (the TLS ClientHello), then RST both ways
            self.reset()
            return
        self.directions = {
            "up": _Direction(proxy, self.reader, self.upstream, proxy.stall_new["up"]),
            "down": _Direction(proxy, up_reader, self.writer, proxy.stall_new["down"]),
        }
        tasks = [asyncio.create_task(c) for d in self.directions.values() for c in (d.read(), d.write())]
        try:
            await asyncio.gather(*tasks)
        except (OSError, asyncio.IncompleteReadError):
            self.reset()  # one side was reset or broke: so is the other
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.close()

    def stall(self, up: bool, down: bool) -> None:
        for name, on in (("up", up), ("down", down)):
            if on and name in self.directions:
                self.directions[name].flowing.clear()

    def resume(self) -> None:
        for direction in self.directions.values():
            direction.stall_after = None
            direction.flowing.set()

    def reset(self) -> None:
        self.ended = True
        _rst(self.writer)
        if self.upstream is not None:
            _rst(self.upstream)

    def close(self) -> None:
        self.ended = True
        self.writer.close()
        if self.upstream is not None:
            self.upstream.close()


class FaultProxy:
    """A TCP relay on 127.0.0.1 to target, on its own thread and event loop, with faults switched from tests.

    latency_s delays every chunk both ways; stall() holds bytes (existing and/or new connections, one or both
    directions, optionally after some bytes); reset() sends RST both ways; refuse() closes new connections at once.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.latency_s = 0.0
        self.refusing = False
        self.resetting = False
        self.stall_new: dict[str, int | None] = {"up": None, "down": None}
        self.accepted = 0
        self._pipes: set[_Pipe] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _call(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run fn(*args) on the proxy's loop (its state is only touched there) and return its result."""
        async def call():  # type: ignore[no-untyped-def]
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=10)

    # -- lifecycle
    def start(self, port: int = 0) -> None:
        """Listen (again) on port; 0 picks one, the same port restarts the proxy where the pairing points."""
        async def listen() -> None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", port, reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]

        self._call(listen)

    def stop(self) -> None:
        """Stop listening and reset every connection (the machine in the middle went away)."""
        async def down() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for pipe in list(self._pipes):
                pipe.reset()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        self._call(down)

    def shutdown(self) -> None:
        """stop(), then end the loop and its thread."""
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        pipe = _Pipe(self, reader, writer)
        self._pipes.add(pipe)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await pipe.run()
        except asyncio.CancelledError:
            pass  # stop(): its connections are reset already; asyncio's accept callback would log a cancelled task
        finally:
            self._pipes.discard(pipe)
            self._tasks.discard(task)

    # -- faults
    def set_latency(self, seconds: float) -> None:
        def apply() -> None:
            self.latency_s = seconds

        self._call(apply)

    def stall(self, up: bool = True, down: bool = True, existing: bool = True, down_after: int | None = None) -> None:
        """Stop relaying: open connections now (existing), and new ones (down: after down_after bytes)."""
        def apply() -> None:
            if existing:
                for pipe in self._pipes:
                    pipe.stall(up, down)
            self.stall_new = {"up": 0 if up else None, "down": (down_after or 0) if down else None}

        self._call(apply)

    def reset(self, existing: bool = True) -> None:
        """RST every new connection as soon as its client speaks; existing: and every open one now."""
        def apply() -> None:
            if existing:
                for pipe in list(self._pipes):
                    pipe.reset()
            self.resetting = True

        self._call(apply)

    def refuse(self) -> None:
        """Close every new connection as soon as it is accepted."""
        def apply() -> None:
            self.refusing = True

        self._call(apply)

    def heal(self) -> None:
        """No more faults: relay everything, release what stalled connections held."""
        def apply() -> None:
            self.latency_s, self.refusing, self.resetting = 0.0, False, False
            self.stall_new = {"up": None, "down": None}
            for pipe in self._pipes:
                pipe.resume()

        self._call(apply)

    def open_connections(self) -> int:
        return int(self._call(lambda: sum(1 for p in self._pipes if not p.ended)))


# ------------------------------------------------------------------------------------------------ two nodes

@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("faults") / "a.gguf", TinyLlama(n_ctx_train=CTX))


def node_config(model: Path, name: str, role: str, bandwidth: float = 1.0e12) -> str:
    timeouts = f"peer_first_byte_timeout_s = {FIRST_BYTE_S}\npeer_idle_timeout_s = {IDLE_S}" \
        if role == "desktop" else ""
    return shared_node_config(model, name, role, bandwidth=bandwidth, ctx=CTX, node_extra=timeouts)


@dataclass
class Pair:
    peer: Daemon
    desk: Daemon
    proxy: FaultProxy


def get(url: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)  # type: ignore[no-any-return]


def link(desk: Daemon) -> dict:  # type: ignore[type-arg]
    paired = get(desk.url + "/hybridd/v1/peers")["paired"]
    assert len(paired) == 1
    return paired[0]  # type: ignore[no-any-return]


def wait_link(desk: Daemon, up: bool, timeout: float, what: str) -> dict:  # type: ignore[type-arg]
    def check() -> dict | None:  # type: ignore[type-arg]
        state = link(desk)
        return state if (state["link"] == "up" and bool(state["models"])) == up else None

    return wait_for(check, timeout=timeout, interval=0.1, what=what)  # type: ignore[no-any-return]


@pytest.fixture
def pair(daemon_factory, model: Path) -> Iterator[Pair]:  # type: ignore[no-untyped-def]
    """A peer, a fault proxy in front of its LAN port, and a desktop paired with it through the proxy.

    The desktop's only device is slow (1 kB/s), so it prefers the peer, yet can serve any request itself."""
    peer = daemon_factory(node_config(model, "spark", "peer"))
    host, _, port = peer.lan_url.removeprefix("https://").rpartition(":")
    proxy = FaultProxy((host, int(port)))
    try:
        proxy.start()
        desk = daemon_factory(node_config(model, "desk", "desktop", bandwidth=1.0e3))
        code = json.loads(cli("pair", "--url", peer.url, "--json").stdout)["code"]
        paired = cli("pair", proxy.address, code, "--url", desk.url, "--json")
        assert paired.returncode == 0, paired.stderr
        assert json.loads(paired.stdout)["name"] == "spark"
        state = wait_link(desk, True, 20, "the desktop's link to the peer through the proxy")
        assert (state["address"], state["port"]) == ("127.0.0.1", proxy.port)  # stored as the proxy's address
        yield Pair(peer, desk, proxy)
    finally:
        proxy.shutdown()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybridd", *args], capture_output=True, text=True, timeout=60)


def complete(desk: Daemon, max_tokens: int = 3) -> str:
    """A short non-streaming completion, answered by a real engine; its placement header."""
    reply = http("POST", desk.url + "/v1/completions",
                 {"model": "a", "prompt": "hi", "max_tokens": max_tokens, "logit_bias": NO_EOS}, timeout=30)
    assert reply.status == 200, reply.body
    assert reply.json()["usage"]["completion_tokens"] >= 1
    return reply.headers["x-hybridd-placement"]


@contextlib.contextmanager
def stream(desk: Daemon, max_tokens: int, timeout: float = 30.0) -> Iterator[tuple[dict[str, str], Iterator[dict]]]:  # type: ignore[type-arg]
    """A streaming completion: (headers, the data events as they arrive; '[DONE]' as {'done': True})."""
    url = desk.url.removeprefix("http://")
    connection = HTTPConnection(url, timeout=timeout)
    body = {"model": "a", "prompt": "hi", "max_tokens": max_tokens, "logit_bias": NO_EOS, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()

    def events() -> Iterator[dict]:  # type: ignore[type-arg]
        for line in response:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                yield {"done": True} if data == b"[DONE]" else json.loads(data)

    try:
        yield dict(response.headers), events()
    finally:
        connection.close()


def last_decision(desk: Daemon) -> dict:  # type: ignore[type-arg]
    return desk.status()["decisions"][-1]  # type: ignore[no-any-return]


def peer_option(decision: dict) -> dict:  # type: ignore[type-arg]
    return next(o for o in decision["options"] if o["placement"] == "peer:spark")  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------------ the tests

def test_latency_is_added_and_requests_still_forwarded(pair: Pair) -> None:
    assert complete(pair.desk) == "peer:spark"
    assert link(pair.desk)["rtt_ms"] < 100
    pair.proxy.set_latency(0.15)  # each way: a ping and its pong cross twice
    state = wait_for(lambda: (s := link(pair.desk))["rtt_ms"] is not None and s["rtt_ms"] >= 270 and s,
                     timeout=15, interval=0.1, what="the link's RTT to show the added latency")
    assert state["link"] == "up" and state["rtt_ms"] < 1000
    started = time.monotonic()
    assert complete(pair.desk) == "peer:spark"
    assert time.monotonic() - started >= 0.3  # it did cross the slow proxy


def test_stall_mid_stream_ends_with_an_error_event(pair: Pair, hardening: Ledger) -> None:
    attack = hardening.attack("hung peer", "a peer (or the path to it) that stops sending mid-stream",
                              "tests/test_peer_faults.py::test_stall_mid_stream_ends_with_an_error_event")
    with attack.trial("a stream through a proxy that stalls after 12 kB"):
        # New connections (the forward) pass the TLS handshake, headers and some events, then hold everything.
        pair.proxy.stall(up=False, down=True, existing=False, down_after=12_000)
        started = time.monotonic()
        with stream(pair.desk, max_tokens=3000) as (headers, events):
            assert headers["x-hybridd-placement"] == "peer:spark"
            seen = list(events)
        took = time.monotonic() - started
        tokens = [e for e in seen if "choices" in e]
        assert tokens, seen
        assert "error" in seen[-1] and {"done": True} not in seen, seen[-3:]
        error = seen[-1]["error"]
        assert error["type"] == "server_error" and f"no data for {IDLE_S:g} s" in error["message"], error
        assert IDLE_S <= took < FIRST_BYTE_S + 5  # the idle timeout tripped, not the longer first-byte one
        # The desktop dropped its connection to the peer, which lets go of the request for a client that is gone.
        wait_for(lambda: pair.peer.model_status("a")["in_flight"] == 0, timeout=5, interval=0.1,
                 what="the peer to stop working on the abandoned stream")
        attack.recovery_s.append(time.monotonic() - started)
    # (The llama-cpp-python engine behind it goes on generating after that disconnect: an engine-side gap.)


@pytest.mark.parametrize("fault", ["refuse", "reset"])
def test_failure_before_first_byte_retries_locally_then_opens_the_breaker(pair: Pair, fault: str) -> None:
    assert complete(pair.desk) == "peer:spark"
    if fault == "refuse":
        pair.proxy.refuse()
    else:
        pair.proxy.reset(existing=False)
    for _ in range(3):
        before = pair.proxy.accepted
        assert complete(pair.desk) == "local"  # retried on the next-best option
        assert pair.proxy.accepted > before  # after trying the peer
        assert link(pair.desk)["link"] == "up"  # the control link's own connection is untouched
    # Three failures: the breaker is open, the peer counts as down, nothing is even tried.
    before = pair.proxy.accepted
    assert complete(pair.desk) == "local"
    assert pair.proxy.accepted == before
    option = peer_option(last_decision(pair.desk))
    assert not option["feasible"] and "down" in option["why_not"], option
    if fault == "refuse":
        # Half-open later: once the peer works again, one probe goes through and closes the breaker.
        pair.proxy.heal()
        wait_for(lambda: complete(pair.desk) == "peer:spark", timeout=30, interval=0.5,
                 what="a half-open probe to reach the peer again")
        assert complete(pair.desk) == "peer:spark"


def test_first_byte_timeout_is_longer_than_the_idle_timeout(pair: Pair) -> None:
    pair.proxy.stall(existing=False)  # new connections hang from the start: not even the TLS handshake
    started = time.monotonic()
    assert complete(pair.desk) == "local"
    assert FIRST_BYTE_S <= time.monotonic() - started < FIRST_BYTE_S + 5


def test_peer_killed_mid_stream(pair: Pair) -> None:
    with stream(pair.desk, max_tokens=CTX - 100) as (headers, events):
        assert headers["x-hybridd-placement"] == "peer:spark"
        first = next(events)
        assert "choices" in first
        os.kill(pair.peer.pid, signal.SIGKILL)
        pair.peer.proc.wait(timeout=10)
        started = time.monotonic()
        rest = list(events)
    assert time.monotonic() - started < IDLE_S + 3, "the client's stream hung"
    assert rest and "error" in rest[-1] and {"done": True} not in rest, rest[-3:]
    state = wait_link(pair.desk, False, 10, "the link to the killed peer to be marked down")
    assert state["down_reason"]
    # Later requests are served here, the peer shown as down.
    assert complete(pair.desk) == "local"
    option = peer_option(last_decision(pair.desk))
    assert not option["feasible"] and "down" in option["why_not"]


def test_dropped_link_goes_down_and_comes_back(pair: Pair) -> None:
    # A silent network (a pulled cable): no FIN, no RST; the missed pings say it.
    pair.proxy.stall()
    started = time.monotonic()
    state = wait_link(pair.desk, False, 15, "a silent link to be marked down")
    assert "silent" in state["down_reason"] and time.monotonic() - started < 10, state
    pair.proxy.heal()
    wait_link(pair.desk, True, 30, "the link to come back once the network does")
    assert complete(pair.desk) == "peer:spark"

    # Connections reset, and every new one too: down at once; back when the resets stop.
    pair.proxy.reset()
    wait_link(pair.desk, False, 5, "a reset link to be marked down")
    assert complete(pair.desk) == "local"
    pair.proxy.heal()
    wait_link(pair.desk, True, 30, "the link to come back after the resets")

    # The proxy itself goes away (connections refused) and comes back on the same port.
    port = pair.proxy.port
    pair.proxy.stop()
    wait_link(pair.desk, False, 5, "the link to be marked down while nothing listens")
    pair.proxy.start(port)
    state = wait_link(pair.desk, True, 30, "the link to come back when the proxy does")
    assert (state["address"], state["port"]) == ("127.0.0.1", port)  # still through the proxy
    assert complete(pair.desk) == "peer:spark"
