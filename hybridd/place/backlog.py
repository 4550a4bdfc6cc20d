"""Predicted work admitted to one engine, for the scheduler's queue and drain waits (pure; `now` is an argument).

An engine serves its requests one at a time, oldest first. Each admitted request adds its predicted service time;
the oldest one has been running since the previous one ended (or since the engine became ready), so what is left
of the backlog is the rest of the oldest plus all the others.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class Backlog:
    """The predicted service seconds of the requests admitted to one engine and not yet done."""

    outstanding: deque[float] = field(default_factory=deque)
    since: float = 0.0  # when the oldest outstanding request started, or will start (the engine's ready time)

    def admit(self, service_s: float, now: float, ready_at: float = 0.0) -> None:
        """A request joins the engine's queue; it starts at once when nothing is ahead (after the load)."""
        if not self.outstanding:
            self.since = max(now, ready_at)
        self.outstanding.append(max(0.0, service_s))

    def done(self, now: float) -> None:
        """A request ended: the oldest leaves, and the next one starts now."""
        if self.outstanding:
            self.outstanding.popleft()
        self.since = now

    def seconds(self, now: float) -> float:
        """Predicted seconds until everything admitted is done (the load, if still running, not included)."""
        if not self.outstanding:
            return 0.0
        head = self.outstanding[0]
        return max(0.0, head - max(0.0, now - self.since)) + sum(self.outstanding) - head

    def __len__(self) -> int:
        return len(self.outstanding)
