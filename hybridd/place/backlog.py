"""Predicted work admitted to one engine, for the scheduler's queue and drain waits (pure; `now` is an argument).

An engine serves its requests one at a time, oldest first. Each admitted request adds its predicted service time;
the oldest one has been running since the previous one ended (or since the engine became ready), so what is left
of the backlog is the rest of the oldest plus all the others.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backlog:
    """The predicted service seconds of the requests admitted to one engine and not yet done."""

    outstanding: tuple[float, ...] = ()
    since: float = 0.0  # when the oldest outstanding request started, or will start (the engine's ready time)

    def admit(self, service_s: float, now: float, ready_at: float = 0.0) -> Backlog:
        """A request joins the engine's queue; it starts at once when nothing is ahead (after the load)."""
        since = self.since if self.outstanding else max(now, ready_at)
        return Backlog((*self.outstanding, max(0.0, service_s)), since)

    def done(self, now: float) -> Backlog:
        """A request ended: the oldest leaves, and the next one starts now."""
        return Backlog(self.outstanding[1:], now)

    def seconds(self, now: float) -> float:
        """Predicted seconds until everything admitted is done (the load, if still running, not included)."""
        if not self.outstanding:
            return 0.0
        head = self.outstanding[0]
        return max(0.0, head - max(0.0, now - self.since)) + sum(self.outstanding) - head

    def __len__(self) -> int:
        return len(self.outstanding)
