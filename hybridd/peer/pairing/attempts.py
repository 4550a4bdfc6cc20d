"""What was tried against a pairing window: per-source bounds on starts, and the record `hybridd pair` shows. Pure.

A start costs the window owner one SPAKE2 computation and holds nothing: it expires within seconds unless finished,
and only a finished exchange with a wrong code counts against the code. So all a source is bounded in is how often it
may start: SOURCE_BURST starts in any SOURCE_BURST_S seconds and SOURCE_STARTS in one window. An IPv6 source is its
/64, which one host may hold whole.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

SOURCE_BURST = 3
SOURCE_BURST_S = 10.0
SOURCE_STARTS = 10
MAX_SOURCES = 256  # past this many sources in one window, the least recent is forgotten
MAX_EVENTS = 100  # a window's record keeps this many events; the rest are only counted

# started: an exchange began; expired: it was not finished in time; dropped: a newer start took its place;
# throttled: a start over the bounds; malformed: a message we could not read; unknown_session: a finish for no
# exchange in flight; wrong_code: a finished exchange whose confirmation failed; paired; closed: the window closed.
EVENT_KINDS = ("started", "expired", "dropped", "throttled", "malformed", "unknown_session", "wrong_code", "paired",
               "closed")


def source_key(address: str) -> str:
    """What the bounds count a start against: the IPv4 address, or the /64 of an IPv6 one ("" when unknown)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class StartBounds:
    """The starts each source made in this window, least recent source first; a new value per counted start."""

    starts: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def refusal(self, address: str, now: float) -> str | None:
        """Why a start from `address` at `now` is over the bounds, or None when it may go ahead."""
        times = self.starts.get(source_key(address), ())
        if len(times) >= SOURCE_STARTS:
            return f"{SOURCE_STARTS} starts from this address in this window already"
        # A clock that stepped back makes earlier starts look recent: refuse rather than admit.
        if sum(1 for t in times if now - t < SOURCE_BURST_S) >= SOURCE_BURST:
            return f"{SOURCE_BURST} starts from this address in the last {SOURCE_BURST_S:g} s already"
        return None

    def counted(self, address: str, now: float) -> StartBounds:
        """These bounds with a start from `address` at `now` counted."""
        key = source_key(address)
        starts = {k: v for k, v in self.starts.items() if k != key}
        starts[key] = (*self.starts.get(key, ()), now)
        while len(starts) > MAX_SOURCES:
            del starts[next(iter(starts))]
        return StartBounds(starts)


@dataclass(frozen=True)
class PairingEvent:
    """One thing that happened to a window: when, from which address ("" when unknown), what (EVENT_KINDS), how."""

    at: float
    source: str
    kind: str
    detail: str


@dataclass(frozen=True)
class PairingReport:
    """A window as `hybridd pair` on its owner shows it: open or how it ended, and what happened to it."""

    window: int  # how many windows this node has opened; a new `hybridd pair` replaces the old window
    open: bool
    opened_at: float | None
    expires_in_s: float
    failures: int
    max_failures: int
    outcome: str | None  # None while open, then paired, failed (too many wrong codes), expired or closed
    events: tuple[PairingEvent, ...]
    events_left_out: int  # past MAX_EVENTS: counted, not kept

    def as_json(self) -> dict[str, Any]:
        """The report as the loopback API returns it."""
        return asdict(self)
