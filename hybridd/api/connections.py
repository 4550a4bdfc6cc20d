"""Which connections a listener keeps: caps in total and per source address, and the clocks that cut the idle.

Pure: no sockets, no logging, time is an argument. The listener (hybridd/api/listener.py) feeds it events and
carries out what it answers: close these, refuse that.

A connection is, in turn:

    handshake   TLS not finished yet                    cut at limits.handshake_s
    waiting     no complete request head yet            cut at limits.header_s
    busy        a request is being served               never cut, never evicted
    idle        kept alive between requests             cut at limits.idle_s
                (its first byte of a next request makes it waiting again)

Only untrusted connections count against the caps (on the loopback API that is every one; on the LAN listener, every
one until its TLS handshake shows a paired node's certificate). At the total cap a newcomer takes the place of the
untrusted connection that has waited longest without a request in progress; if every one is busy, the newcomer is
refused. Past the per-source cap the newcomer is refused: that source only crowds itself out.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass
from enum import Enum

HEADER_TIMEOUT_S = 10.0  # a client on loopback or a LAN sends its request head in milliseconds
HANDSHAKE_TIMEOUT_S = 10.0  # the same for a TLS handshake (asyncio's own default is 60 s)
# Longer than the pools of common clients keep an idle connection (httpx 5 s, aiohttp 15 s, undici 4 s), so the client
# closes first and never sends into a connection we are closing; nginx's default for the same reason.
KEEPALIVE_TIMEOUT_S = 75.0
PER_SOURCE = 16  # untrusted connections from one address on the LAN listener: pairing takes one or two
WARN_EVERY_S = 10.0


class State(Enum):
    HANDSHAKE = "handshake"
    WAITING = "waiting"
    BUSY = "busy"
    IDLE = "idle"


# What each clocked state is cut for, as the listener's warning says it.
OVERDUE = {State.HANDSHAKE: "no TLS handshake", State.WAITING: "no complete request head",
           State.IDLE: "idle keep-alive"}


@dataclass(frozen=True, slots=True)
class Limits:
    """One listener's caps and clocks."""

    max_untrusted: int
    max_per_source: int | None = None  # None: no per-address cap (loopback, where every client is 127.0.0.1)
    header_s: float = HEADER_TIMEOUT_S
    handshake_s: float = HANDSHAKE_TIMEOUT_S
    idle_s: float = KEEPALIVE_TIMEOUT_S

    def timeout(self, state: State) -> float | None:
        """How long a connection may stay in state; None: as long as it takes."""
        return {State.HANDSHAKE: self.handshake_s, State.WAITING: self.header_s, State.IDLE: self.idle_s}.get(state)


@dataclass(frozen=True, slots=True)
class Descriptors:
    """How a process's descriptor limit is shared: the loopback API, untrusted LAN connections, the rest."""

    limit: int
    api: int
    lan: int
    lan_per_source: int

    @property
    def left(self) -> int:
        """What stays for engines, their connections, paired peers, mDNS and files."""
        return self.limit - self.api - self.lan


def share_descriptors(limit: int) -> Descriptors:
    """Caps under RLIMIT_NOFILE `limit`: half for the API (at most 4096), an eighth for untrusted LAN connections."""
    api = max(16, min(4096, limit // 2))
    lan = max(8, min(512, limit // 8))
    return Descriptors(limit, api, lan, min(PER_SOURCE, lan))


def source_of(host: str) -> str:
    """The address a per-source cap counts: an IPv4 address, or an IPv6 /64 (one host owns a whole /64)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a new connection: admit it (after closing `evicted`), or refuse it and say why."""

    admitted: bool
    evicted: tuple[int, ...] = ()
    refused: str = ""


@dataclass(slots=True)
class _Conn:
    source: str
    state: State
    trusted: bool = False


class ConnectionTable:
    """The open connections of one listener, by id; each event takes `now` and answers what to close."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._conns: dict[int, _Conn] = {}
        # Per clocked state, id -> when it entered that state. Insertion order is that time's order (now never goes
        # back), so the front of each is the one due first and the one that has waited longest.
        self._since: dict[State, dict[int, float]] = {s: {} for s in State if limits.timeout(s) is not None}
        self._per_source: Counter[str] = Counter()
        self._untrusted = 0

    def __len__(self) -> int:
        return len(self._conns)

    @property
    def untrusted(self) -> int:
        """Connections counting against the caps."""
        return self._untrusted

    def from_source(self, source: str) -> int:
        """Untrusted connections from source."""
        return self._per_source[source]

    def state(self, conn: int) -> State | None:
        """conn's state; None once it is closed."""
        entry = self._conns.get(conn)
        return entry.state if entry is not None else None

    def open(self, conn: int, source: str, now: float, tls: bool = False) -> Verdict:
        """A connection was accepted from source: admit it, maybe in place of one waiting longest, or refuse it."""
        limits = self.limits
        if limits.max_per_source is not None and self._per_source[source] >= limits.max_per_source:
            return Verdict(False, refused=f"over {limits.max_per_source} from {source}")
        evicted: tuple[int, ...] = ()
        if self._untrusted >= limits.max_untrusted:
            victim = self.longest_waiting()
            if victim is None:
                return Verdict(False, refused=f"all {limits.max_untrusted} connections busy")
            self.closed(victim)
            evicted = (victim,)
        self._conns[conn] = _Conn(source, State.WAITING)
        self._per_source[source] += 1
        self._untrusted += 1
        self._enter(conn, State.HANDSHAKE if tls else State.WAITING, now)
        return Verdict(True, evicted)

    def ready(self, conn: int, now: float, trusted: bool = False) -> None:
        """The TLS handshake finished (trusted: with a paired node's certificate): the request head's clock starts."""
        entry = self._conns.get(conn)
        if entry is None:
            return
        if trusted and not entry.trusted:
            entry.trusted = True
            self._uncount(entry)
        self._enter(conn, State.WAITING, now)

    def receiving(self, conn: int, now: float) -> None:
        """Bytes arrived: on an idle connection they begin a request, whose head now has header_s to complete."""
        entry = self._conns.get(conn)
        if entry is not None and entry.state is State.IDLE:
            self._enter(conn, State.WAITING, now)

    def started(self, conn: int) -> None:
        """A request head is complete and its handler runs: no clock until it is answered."""
        if conn in self._conns:
            self._enter(conn, State.BUSY, 0.0)

    def finished(self, conn: int, now: float) -> None:
        """The request was answered: the connection idles until the client sends more, or idle_s passes."""
        entry = self._conns.get(conn)
        if entry is not None and entry.state is State.BUSY:
            self._enter(conn, State.IDLE, now)

    def closed(self, conn: int) -> None:
        """The connection is gone (or being closed); forgetting it twice is fine."""
        entry = self._conns.pop(conn, None)
        if entry is None:
            return
        self._since.get(entry.state, {}).pop(conn, None)
        if not entry.trusted:
            self._uncount(entry)

    def longest_waiting(self) -> int | None:
        """The untrusted connection that has gone longest without a request in progress; None if all are busy."""
        best: tuple[float, int] | None = None
        for since in self._since.values():
            for conn, at in since.items():
                if not self._conns[conn].trusted:
                    if best is None or at < best[0]:
                        best = (at, conn)
                    break  # the rest of this state entered it later
        return best[1] if best is not None else None

    def overdue(self, now: float) -> list[tuple[int, State]]:
        """Connections whose clock ran out by now, with the state they overstayed; they are forgotten here."""
        out = []
        for state, since in self._since.items():
            timeout = self.limits.timeout(state)
            assert timeout is not None
            for conn, at in since.items():
                if at + timeout > now:
                    break
                out.append((conn, state))
        for conn, _ in out:
            self.closed(conn)
        return out

    def _enter(self, conn: int, state: State, now: float) -> None:
        entry = self._conns[conn]
        self._since.get(entry.state, {}).pop(conn, None)
        entry.state = state
        if state in self._since:
            self._since[state][conn] = now

    def _uncount(self, entry: _Conn) -> None:
        self._untrusted -= 1
        self._per_source[entry.source] -= 1
        if not self._per_source[entry.source]:
            del self._per_source[entry.source]


class Tally:
    """What a listener cut or refused, by reason, released as one summary: the first at once, then one per every_s."""

    def __init__(self, every_s: float = WARN_EVERY_S) -> None:
        self.every_s = every_s
        self._counts: Counter[str] = Counter()
        self._next_at = float("-inf")

    def add(self, reason: str, count: int = 1) -> None:
        self._counts[reason] += count

    def due(self, now: float) -> list[tuple[str, int]]:
        """The counts to report now, most frequent first (empty until every_s has passed since the last report)."""
        if not self._counts or now < self._next_at:
            return []
        out = self._counts.most_common()
        self._counts.clear()
        self._next_at = now + self.every_s
        return out
