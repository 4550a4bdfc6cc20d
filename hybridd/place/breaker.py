"""A circuit breaker per peer: after repeated failures stop trying for a while, then let one probe through.
Pure: time is an argument."""

from __future__ import annotations

from dataclasses import dataclass, replace

FAILURES_TO_OPEN = 3
OPEN_FOR_S = 15.0


@dataclass(frozen=True, slots=True)
class Breaker:
    """closed (failures < threshold), open (refusing until opened_at + open_for_s), then half-open (one probe)."""

    failures: int = 0
    opened_at: float | None = None
    probing: bool = False
    threshold: int = FAILURES_TO_OPEN
    open_for_s: float = OPEN_FOR_S

    def state(self, now: float) -> str:
        """'closed', 'open' or 'half-open'."""
        if self.opened_at is None:
            return "closed"
        return "open" if now - self.opened_at < self.open_for_s or self.probing else "half-open"

    def allows(self, now: float) -> bool:
        """True if a request may go to this peer now."""
        return self.state(now) != "open"

    def on_attempt(self, now: float) -> Breaker:
        """A request is sent; in half-open state it is the one probe."""
        return replace(self, probing=True) if self.state(now) == "half-open" else self

    def on_abandoned(self) -> Breaker:
        """The request went away before the peer answered or failed (its client left): no verdict on the peer, but
        the probe it may have been is free again."""
        return replace(self, probing=False)

    def on_success(self) -> Breaker:
        """The peer answered: close the breaker."""
        return replace(self, failures=0, opened_at=None, probing=False)

    def on_failure(self, now: float) -> Breaker:
        """The peer failed before its first byte: count it, open (again) at the threshold."""
        failures = self.failures + 1
        if failures >= self.threshold or self.opened_at is not None:
            return replace(self, failures=failures, opened_at=now, probing=False)
        return replace(self, failures=failures)
