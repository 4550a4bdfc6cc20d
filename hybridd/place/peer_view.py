"""What a node tells its peers about its load, from the same state its own scheduler decides on (pure).

A peer predicts a new load here from these figures: free bytes per device, counting idle engines as free (a new
load evicts them); for each loaded model, the seconds of work ahead of a new request on its largest engine (the
context the inventory reports); and each busy engine with the bytes it frees once its admitted work is done.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridd.place.scheduler import Drain, LocalState


@dataclass(frozen=True, slots=True)
class PeerView:
    """This node's load as a peer sees it."""

    free_bytes: dict[str, int]
    backlog_s: dict[str, float]
    draining: tuple[Drain, ...]


def peer_view(local: LocalState, now: float) -> PeerView:
    """The figures a peer predicts with, from this node's scheduler state at `now`."""
    ledger = local.ledger
    free = ledger.free(releasing=(e.key for e in local.engines if e.idle))
    largest: dict[str, tuple[int, float]] = {}  # model -> (ctx, seconds ahead) of its largest engine
    draining = []
    for engine in local.engines:
        if not engine.idle:
            draining.append(Drain(engine.drained_s(now), dict(ledger.held(engine.key))))
        if engine.ctx >= largest.get(engine.model, (0, 0.0))[0]:
            largest[engine.model] = (engine.ctx, engine.wait_s(now))
    return PeerView(free, {model: seconds for model, (_, seconds) in largest.items()},
                    tuple(sorted(draining, key=lambda d: d.backlog_s)))
