"""Predicted work admitted to one engine, for the scheduler's queue and drain waits (pure; `now` is an argument).

An engine runs up to `slots` requests at once (llama-server's parallel slots; llama-cpp-python's server has one),
oldest first. Each admitted request adds its predicted service time; a running one has been running since it
started (when a slot freed, or the engine became ready), so what is left of it is its time less what has passed.
The requests waiting take the slots in order as they free.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backlog:
    """The predicted service seconds of the requests admitted to one engine and not yet done."""

    outstanding: tuple[float, ...] = ()  # running ones first, then the waiting ones oldest first
    started: tuple[float, ...] = ()  # when each running request started (or will: the engine's ready time)
    slots: int = 1

    def admit(self, service_s: float, now: float, ready_at: float = 0.0) -> Backlog:
        """A request joins; it starts at once when a slot is free and nothing waits (after the load)."""
        started = self.started
        if len(started) < self.slots and len(started) == len(self.outstanding):
            started = (*started, max(now, ready_at))
        return Backlog((*self.outstanding, max(0.0, service_s)), started, self.slots)

    def done(self, now: float) -> Backlog:
        """A request ended: the running one predicted to end first leaves (with one slot, the oldest), and the
        first waiting one starts now."""
        if not self.outstanding:
            return self
        running = range(len(self.started)) or range(1)
        gone = min(running, key=lambda i: (self.started[i] + self.outstanding[i]) if self.started else 0.0)
        outstanding = self.outstanding[:gone] + self.outstanding[gone + 1:]
        started = self.started[:gone] + self.started[gone + 1:]
        if len(outstanding) > len(started):
            # the first waiting request is the one just after the running ones: it starts now
            started = (*started, now)
        return Backlog(outstanding, started, self.slots)

    def _slots_free_at(self, now: float) -> list[float]:
        """When each slot is next free once everything admitted has run (the load, if any, not counted)."""
        free = [now + max(0.0, took - max(0.0, now - since)) for since, took in zip(self.started, self.outstanding,
                                                                                   strict=False)]
        free += [now] * (self.slots - len(free))
        heapq.heapify(free)
        for took in self.outstanding[len(self.started):]:
            heapq.heapreplace(free, free[0] + took)
        return free

    def wait(self, now: float) -> float:
        """Predicted seconds until a new request could start: the first slot free after the admitted work."""
        return min(self._slots_free_at(now)) - now if self.outstanding else 0.0

    def seconds(self, now: float) -> float:
        """Predicted seconds until everything admitted is done (what a drain waits for)."""
        return max(self._slots_free_at(now)) - now if self.outstanding else 0.0

    @property
    def running(self) -> int:
        return len(self.started)

    def __len__(self) -> int:
        return len(self.outstanding)
