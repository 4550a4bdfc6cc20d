"""No client, with or without credentials, can take the daemon's file descriptors.

The table's policy is checked with time as an argument; the listeners are checked on real daemons started under
`prlimit --nofile=1024:1024` (soft and hard, so raising the soft limit cannot pass), with real sockets and real TLS.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from hybridd.api.connections import (
    HANDSHAKE_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    ConnectionTable,
    Limits,
    State,
    Tally,
    share_descriptors,
    source_of,
)
from hybridd.demo.tiny_gguf import TinyLlama, write_tiny_llama
from tests.conftest import REPO, Daemon, http, wait_for
from tests.hardening import Ledger
from tests.nodes import node_config

NOFILE = 1024
UNDER_PRLIMIT = ("prlimit", f"--nofile={NOFILE}:{NOFILE}", "--")
SWEEP_SLACK_S = 1.5  # the sweep runs every 0.25 s; the rest is a loaded 2-core machine


# -- the policy, time as an argument


def test_at_the_cap_a_newcomer_takes_the_place_of_the_connection_waiting_longest() -> None:
    table = ConnectionTable(Limits(max_untrusted=3))
    for conn, at in enumerate((0.0, 1.0, 2.0)):
        assert table.open(conn, "127.0.0.1", at).admitted
    table.started(0)  # busy: never evicted, however old
    verdict = table.open(3, "127.0.0.1", 3.0)
    assert verdict.admitted and verdict.evicted == (1,)
    assert table.state(1) is None and len(table) == 3
    # An idle keep-alive connection waits too; it is evicted by how long it has waited.
    table.finished(0, 4.0)
    assert table.open(4, "127.0.0.1", 5.0).evicted == (2,)
    assert table.open(5, "127.0.0.1", 6.0).evicted == (3,)
    assert table.open(6, "127.0.0.1", 7.0).evicted == (0,)


def test_when_every_connection_is_busy_the_newcomer_is_refused() -> None:
    table = ConnectionTable(Limits(max_untrusted=2))
    for conn in (0, 1):
        table.open(conn, "127.0.0.1", 0.0)
        table.started(conn)
    verdict = table.open(2, "127.0.0.1", 1.0)
    assert not verdict.admitted and verdict.refused == "all 2 connections busy"
    table.closed(0)
    table.closed(0)  # twice is fine
    assert table.open(2, "127.0.0.1", 2.0).admitted and table.untrusted == 2


def test_one_address_past_its_cap_is_refused_while_others_get_in() -> None:
    table = ConnectionTable(Limits(max_untrusted=10, max_per_source=2))
    assert all(table.open(conn, "192.0.2.7", 0.0, tls=True).admitted for conn in (0, 1))
    verdict = table.open(2, "192.0.2.7", 0.0, tls=True)
    assert not verdict.admitted and verdict.refused == "over 2 from 192.0.2.7"
    assert table.open(3, "192.0.2.8", 0.0, tls=True).admitted
    table.closed(0)
    assert table.open(4, "192.0.2.7", 0.0, tls=True).admitted
    # One host holds a whole IPv6 /64, so that is what is counted; a v4-mapped address is its v4 address.
    assert source_of("2001:db8:1:2::1") == source_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7" and source_of("fe80::1%eth0") == "fe80::/64"


def test_a_paired_node_leaves_the_count_once_its_certificate_is_seen() -> None:
    table = ConnectionTable(Limits(max_untrusted=2, max_per_source=1))
    table.open(0, "192.0.2.9", 0.0, tls=True)
    assert table.from_source("192.0.2.9") == 1
    table.ready(0, 0.1, trusted=True)
    assert table.untrusted == 0 and table.from_source("192.0.2.9") == 0
    assert table.open(1, "192.0.2.9", 0.2, tls=True).admitted  # its next connection gets in
    table.open(2, "192.0.2.10", 0.3, tls=True)
    assert table.open(3, "192.0.2.11", 0.4, tls=True).evicted == (1,)  # never the paired one
    table.closed(0)
    assert table.untrusted == 2


def test_clocks_cut_a_handshake_a_request_head_and_an_idle_connection_but_never_a_request() -> None:
    table = ConnectionTable(Limits(max_untrusted=10, header_s=10, handshake_s=5, idle_s=75))
    table.open(0, "a", 0.0, tls=True)  # never finishes its handshake
    table.open(1, "a", 0.0, tls=True)
    table.ready(1, 4.0)  # handshake done at 4 s; its head is due at 14 s
    table.open(2, "a", 0.0)
    table.started(2)  # a request served for ever
    assert table.overdue(4.9) == []
    assert table.overdue(5.0) == [(0, State.HANDSHAKE)]
    assert table.overdue(13.9) == []
    assert table.overdue(14.0) == [(1, State.WAITING)]
    table.finished(2, 20.0)
    table.receiving(2, 30.0)  # the first byte of its next request: the head is due at 40 s, not 95 s
    assert table.overdue(39.9) == [] and table.overdue(40.0) == [(2, State.WAITING)]
    table.open(3, "a", 50.0)
    table.started(3)
    table.receiving(3, 51.0)  # a body arriving is not a new request head
    assert table.overdue(10_000.0) == []
    table.finished(3, 60.0)
    assert table.overdue(134.9) == [] and table.overdue(135.0) == [(3, State.IDLE)]
    assert len(table) == 0


def test_the_warning_comes_at_once_then_at_most_once_per_interval() -> None:
    tally = Tally(every_s=10)
    assert tally.due(0.0) == []
    tally.add("refused")
    assert tally.due(1.0) == [("refused", 1)]
    tally.add("refused", 5)
    tally.add("cut")
    assert tally.due(5.0) == []
    assert tally.due(11.0) == [("refused", 5), ("cut", 1)]
    assert tally.due(30.0) == []


def test_the_caps_leave_room_under_the_descriptor_limit() -> None:
    shares = share_descriptors(1024)
    assert (shares.api, shares.lan, shares.lan_per_source) == (512, 128, 16)
    assert shares.left >= 1024 * 3 // 8
    assert share_descriptors(65536).api == 4096 and share_descriptors(65536).lan == 512
    assert share_descriptors(64).left > 0


@pytest.mark.parametrize("unit", sorted((REPO / "systemd").glob("*.service")), ids=lambda path: path.name)
def test_the_units_set_the_descriptor_limit_the_caps_are_sized_from(unit: Path) -> None:
    # systemd's default soft limit is 1024; the caps would then be 512 API connections.
    assert [line for line in unit.read_text().splitlines() if line.startswith("LimitNOFILE")] == ["LimitNOFILE=65536"]


# -- real daemons under prlimit


@pytest.fixture(scope="module")
def peer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("connections") / "b.gguf", TinyLlama())


def under_prlimit(daemon: Daemon) -> psutil.Process:
    process = psutil.Process(daemon.pid)
    assert process.rlimit(psutil.RLIMIT_NOFILE) == (NOFILE, NOFILE)
    return process


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybridd", *args], capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def held(sockets: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def idle_connections(url: str, count: int) -> list[socket.socket]:
    """Open count TCP connections to url's host:port and send nothing."""
    host, port = url.split("://")[1].rsplit(":", 1)
    return [socket.create_connection((host, int(port)), timeout=5) for _ in range(count)]


def tls_without_certificate(lan_url: str, count: int, sources: Callable[[int], str]) -> tuple[list[ssl.SSLSocket], int]:
    """count TLS connections that present no client certificate, connection i from address sources(i); the ones
    whose handshake finished (then held idle), and how many the listener closed before."""
    host, port = lan_url.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    opened, refused = [], 0
    for i in range(count):
        raw = socket.create_connection((host, int(port)), timeout=5, source_address=(sources(i), 0))
        try:
            opened.append(context.wrap_socket(raw))
        except OSError:  # closed by the listener before or during the handshake
            raw.close()
            refused += 1
    return opened, refused


def read_reply(sock: socket.socket) -> bytes:
    """One HTTP/1.1 reply with a Content-Length, read off a kept-alive connection."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(65536) or pytest.fail("closed mid-reply")
    head, body = reply.split(b"\r\n\r\n", 1)
    fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    length = int(fields[b"content-length"])
    while len(body) < length:
        body += sock.recv(65536) or pytest.fail("closed mid-reply")
    return reply


def closed_after(sock: socket.socket, started: float, trickle: bytes = b"", deadline_s: float = 30.0) -> float:
    """Send trickle one byte each half second (slowloris) until the server closes; seconds since started."""
    sock.settimeout(0.5)  # the trickle's pace
    end = started + deadline_s
    for byte in [trickle[i:i + 1] for i in range(len(trickle))] or [b""]:
        while True:
            try:
                if byte:
                    sock.sendall(byte)
                if sock.recv(4096) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                if byte:
                    break  # next byte
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                return time.monotonic() - started
            if time.monotonic() > end:
                raise AssertionError(f"the server kept the connection for {deadline_s:g} s")
    raise AssertionError("the server kept the connection while the whole trickle was sent")


def test_the_api_answers_under_1300_idle_connections_at_1024_descriptors(daemon_factory, tiny_model: Path,  # type: ignore[no-untyped-def]
                                                                         hardening: Ledger) -> None:
    attack = hardening.attack("connection flood: API", "1300 idle connections on the loopback API under a "
                              "1024-descriptor limit", "tests/test_connections.py::"
                              "test_the_api_answers_under_1300_idle_connections_at_1024_descriptors")
    attack.attempts += 1300
    daemon = daemon_factory(node_config(tiny_model, "desk", "desktop"), wrapper=UNDER_PRLIMIT)
    process = under_prlimit(daemon)
    before = process.num_fds()
    with held(idle_connections(daemon.url, 1300)):
        asked = time.monotonic()
        reply = http("POST", daemon.url + "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2},
                     timeout=HEADER_TIMEOUT_S + 5)
        took = time.monotonic() - asked
        assert reply.status == 200, reply.body
        assert took < HEADER_TIMEOUT_S + 5
        attack.recovery_s.append(took)
        assert process.num_fds() < NOFILE - 256  # the cap, not the limit, stopped the flood
        print(f"200 under 1300 idle connections after {took:.2f} s; {process.num_fds()} descriptors open")
        warning = wait_for(lambda: [line for line in daemon.log().splitlines() if "WARNING hybridd.listener" in line],
                           timeout=5, what="the listener's warning")
    assert "closed to make room (they had no request in progress)" in warning[0]
    assert "cap: 512 connections, under a descriptor limit of 1024" in warning[0]
    # Once the flood is gone the API is as before, and so are its descriptors.
    assert http("GET", daemon.url + "/v1/models").status == 200
    wait_for(lambda: process.num_fds() <= before + 8, timeout=10, what="the flood's descriptors to be released")


def test_slow_heads_and_handshakes_are_cut_at_their_timeouts(daemon_factory, tiny_model: Path,  # type: ignore[no-untyped-def]
                                                            hardening: Ledger) -> None:
    attack = hardening.attack("slowloris", "request heads trickled byte by byte, TLS handshakes never sent or "
                              "never followed by a request, on the API and the LAN listener",
                              "tests/test_connections.py::test_slow_heads_and_handshakes_are_cut_at_their_timeouts")
    peer = daemon_factory(node_config(tiny_model, "spark", "peer"), wrapper=UNDER_PRLIMIT)
    under_prlimit(peer)
    host, port = peer.url.removeprefix("http://").rsplit(":", 1)
    lan_host, lan_port = peer.lan_url.removeprefix("https://").rsplit(":", 1)
    head = f"GET /v1/models HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE

    def slowloris() -> float:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            return closed_after(sock, time.monotonic(), head + b"x-slow: " + b"a" * 100)

    def second_head_slow() -> float:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(head + b"\r\n")
            assert read_reply(sock).startswith(b"HTTP/1.1 200")
            return closed_after(sock, time.monotonic(), head + b"x-slow: " + b"a" * 100)

    def no_client_hello() -> float:
        with socket.create_connection((lan_host, int(lan_port)), timeout=5) as sock:
            return closed_after(sock, time.monotonic())

    def handshake_then_nothing() -> float:
        with context.wrap_socket(socket.create_connection((lan_host, int(lan_port)), timeout=5)) as sock:
            return closed_after(sock, time.monotonic())

    cases = {"slowloris": (slowloris, HEADER_TIMEOUT_S), "second": (second_head_slow, HEADER_TIMEOUT_S),
             "no hello": (no_client_hello, HANDSHAKE_TIMEOUT_S), "tls idle": (handshake_then_nothing, HEADER_TIMEOUT_S)}
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:  # one wait for all four
        futures = {name: pool.submit(run) for name, (run, _) in cases.items()}
        took = {name: future.result() for name, future in futures.items()}
    print("closed after", {name: round(t, 2) for name, t in took.items()})
    attack.attempts += len(cases)
    attack.recovery_s += list(took.values())  # here: how long each was held before it was cut
    for name, (_, timeout) in cases.items():
        assert timeout - 0.5 <= took[name] <= timeout + SWEEP_SLACK_S, (name, took)
    log = wait_for(lambda: (text := peer.log()) and "no TLS handshake" in text and text, timeout=15,
                   what="the warnings")
    assert "cut with no complete request head within 10 s" in log and "cut with no TLS handshake within 10 s" in log
    assert http("GET", peer.url + "/v1/models").status == 200


def test_a_neighbour_without_a_certificate_leaves_the_peer_and_its_desktop_working(daemon_factory,  # type: ignore[no-untyped-def]
                                                                                    tiny_model: Path,
                                                                                    peer_model: Path,
                                                                                    hardening: Ledger) -> None:
    attack = hardening.attack("connection flood: LAN", "2200 TLS connections without a client certificate on a "
                              "peer's LAN listener under a 1024-descriptor limit, from one address and from 110",
                              "tests/test_connections.py::"
                              "test_a_neighbour_without_a_certificate_leaves_the_peer_and_its_desktop_working")
    attack.attempts += 2200
    only_there = f'[[models]]\nname = "b"\npath = "{peer_model}"\nctx = 512\n'
    peer = daemon_factory(node_config(tiny_model, "spark", "peer", extra=only_there), wrapper=UNDER_PRLIMIT)
    desk = daemon_factory(node_config(tiny_model, "desk", "desktop"))
    process = under_prlimit(peer)
    code = json.loads(cli("pair", "--url", peer.url, "--json").stdout)["code"]
    paired = cli("pair", peer.lan_url.removeprefix("https://"), code, "--url", desk.url)
    assert paired.returncode == 0, paired.stderr

    def link_up() -> dict | None:  # type: ignore[type-arg]
        (link,) = http("GET", desk.url + "/hybridd/v1/peers").json()["paired"] or [None]
        return link if link is not None and link["link"] == "up" and "b" in link["models"] else None

    wait_for(link_up, timeout=20, what="the desktop's link to the peer")
    before = process.num_fds()

    # One neighbour (127.0.0.2) opens 1100 TLS connections without a certificate: all but 16 are refused at once.
    one, refused_one = tls_without_certificate(peer.lan_url, 1100, lambda i: "127.0.0.2")
    # Then neighbours on 110 addresses, 10 each: the total cap holds, each newcomer replacing the longest waiting.
    many, refused_many = tls_without_certificate(peer.lan_url, 1100, lambda i: f"127.0.1.{i // 10 + 1}")
    with held([*one, *many]):
        assert len(one) <= 32 and refused_one >= 1100 - 32 and refused_many == 0  # 16 at a time from 127.0.0.2
        assert process.num_fds() < NOFILE - 256
        # The peer's own loopback API and the desktop's forwards to it keep working; the link stays up.
        assert http("GET", peer.url + "/v1/models").status == 200
        asked = time.monotonic()
        forwarded = http("POST", desk.url + "/v1/completions", {"model": "b", "prompt": "x", "max_tokens": 2},
                         timeout=HEADER_TIMEOUT_S + 5)
        took = time.monotonic() - asked
        assert forwarded.status == 200, forwarded.body
        attack.recovery_s.append(took)
        assert forwarded.headers["x-hybridd-placement"] == "peer:spark"
        print(f"forward answered under the LAN flood after {took:.2f} s; the peer holds {process.num_fds()} fds")
        assert link_up() is not None
        (shown,) = http("GET", desk.url + "/hybridd/v1/status").json()["peers"]
        assert shown["up"]
    # What stays: the engine for "b" and the desktop's kept-alive forwarding connection.
    wait_for(lambda: process.num_fds() <= before + 8, timeout=10, what="the flood's descriptors to be released")
    print(f"the peer holds {process.num_fds()} descriptors after the flood, {before} before it")
    # The first warning comes at once, the counts after it within the 10 s that warnings are spaced by.
    log = wait_for(lambda: (text := peer.log()) and "closed to make room" in text and text, timeout=15,
                   what="the warnings")
    assert "refused: over 16 from 127.0.0.2" in log
    assert "closed to make room (they had no request in progress)" in log
    assert "cap: 128 untrusted connections, 16 per address, under a descriptor limit of 1024" in log



def test_a_body_trickled_after_a_complete_head_is_cut_with_408(daemon_factory, tiny_model: Path,  # type: ignore[no-untyped-def]
                                                               hardening: Ledger) -> None:
    attack = hardening.attack("slow body", "a complete request head, then a body trickled a byte at a time: the "
                              "connection counts as busy, so only a body deadline frees it",
                              "tests/test_connections.py::test_a_body_trickled_after_a_complete_head_is_cut_with_408")
    daemon = daemon_factory(node_config(tiny_model, "desk", "desktop"))
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 4000\r\n\r\n").encode()
    with attack.trial("4000-byte body, a byte every 0.5 s"), \
            socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head + b'{"model": "a", ')
        started = time.monotonic()
        reply = b""
        while not reply and time.monotonic() - started < 30:
            sock.sendall(b" ")
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                reply = sock.recv(65536)
        took = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b'"code": "body_timeout"' in reply
        assert 9.5 <= took < 15, took  # 10 s and a second per 256 KiB of the declared 4000 bytes
        attack.recovery_s.append(took)
        sock.settimeout(5)
        # and the connection is closed with it: an end of stream, or a reset when the server closed with some of
        # the trickle still unread in its buffer
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(65536) == b""
    assert http("GET", daemon.url + "/v1/models").status == 200
