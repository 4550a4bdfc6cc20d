"""Which loaded engines have sat idle past their TTL. Pure: the clock is an argument."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadedEngine:
    """What the idle policy needs to know about one loaded engine."""

    model: str
    in_flight: int
    last_used: float
    idle_ttl_s: float


def idle_expired(engines: Iterable[LoadedEngine], now: float) -> list[str]:
    """Models whose engine has no request in flight and was last used idle_ttl_s or more before now."""
    return [e.model for e in engines if e.in_flight == 0 and now - e.last_used >= e.idle_ttl_s]


def next_expiry(engines: Iterable[LoadedEngine], now: float) -> float | None:
    """Seconds from now until the next idle engine expires, or None when none is idle."""
    waits = [e.last_used + e.idle_ttl_s - now for e in engines if e.in_flight == 0]
    return max(0.0, min(waits)) if waits else None
