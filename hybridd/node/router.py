"""Per request: size it, ask the scheduler where it finishes first, commit that choice, hand back a route.

The scheduler (place/scheduler.py) is pure; this module owns the state it decides on: the reservation ledger,
the predicted speed of each engine, the online calibration and the log of recent decisions. Between a
decision and its reservation there is no await, so two requests can never both take the same bytes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hybridd.api.proxy import StreamStats
from hybridd.api.schema import InferenceRequest
from hybridd.node.catalog import Catalog
from hybridd.config import Config, ModelEntry, PeerConfig
from hybridd.engine.pool import EnginePool, EngineSlot
from hybridd.errors import EngineLoadFailed, HybriddError
from hybridd.model.spec import ModelSpec
from hybridd.place.backlog import Backlog
from hybridd.place.breaker import Breaker
from hybridd.place.hardware import Hardware
from hybridd.place.ledger import Ledger
from hybridd.place.lengths import CompletionLengths
from hybridd.place.scheduler import (
    Decision,
    EngineState,
    Hint,
    LocalState,
    PeerState,
    Placement,
    RequestNeed,
    decide,
    ledger_for,
)
from hybridd.place.speed import Calibration, SpeedModel
from hybridd.node.sizing import PromptSize, Tokenizers, guess_tokens

log = logging.getLogger("hybridd.place")

RECENT_DECISIONS = 50


class PlacementRefused(HybriddError):
    """No option can serve the request; status and code come from the scheduler's decision."""

    error_type = "invalid_request_error"

    def __init__(self, decision: Decision) -> None:
        super().__init__(f"hybridd cannot place this request: {decision.reason}")
        self.status = decision.status
        self.code = decision.code
        if decision.status >= 500:
            self.error_type = "server_error"
        self.retry_after_s = decision.retry_after_s


@dataclass(frozen=True)
class Route:
    """Where one request goes: the engine or peer URL, and the placement and reason headers to send back."""

    placement: str
    reason: str
    base_url: str
    api_key: str | None = None
    forwarded: bool = False
    cold_start_s: float | None = None
    stats: StreamStats = field(default_factory=StreamStats)
    peer: str | None = None
    ssl: Any = True
    first_byte_timeout_s: float | None = None
    idle_timeout_s: float | None = None


@dataclass(frozen=True)
class Peer:
    """A configured peer with the hardware it runs on (from its profile)."""

    config: PeerConfig
    hardware: Hardware


@dataclass(frozen=True)
class PeerTarget:
    """A peer the scheduler may place on, and how to reach it: URL, key, TLS context (pinned for paired peers)."""

    state: PeerState
    base_url: str
    api_key: str | None = None
    ssl: Any = True  # as aiohttp takes it, or a callable making the SSL context when a request goes there

    def tls(self) -> Any:
        """What to give aiohttp's ssl= for one forwarded request."""
        return self.ssl() if callable(self.ssl) else self.ssl


PeerSource = Callable[[], list[PeerTarget]]


class Router:
    """Owns the ledger and turns each request into a Route."""

    def __init__(self, config: Config, catalog: Catalog, pool: EnginePool, hardware: Hardware | None,
                 peers: Sequence[Peer] = (), clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.catalog = catalog
        self.pool = pool
        self.hardware = hardware
        self.peers = {p.config.name: p for p in peers}
        self.peer_sources: list[PeerSource] = []
        self.clock = clock
        self.ledger = ledger_for(hardware) if hardware is not None else Ledger()
        self.calibration = Calibration()
        self.lengths = CompletionLengths()
        self.speeds: dict[str, SpeedModel] = {}
        self.request_s: dict[str, float] = {}
        self.backlogs: dict[str, Backlog] = {}
        self._evictions: set[asyncio.Task[None]] = set()
        self.ready_at: dict[str, float] = {}  # predicted end of each engine's (re)load
        self.load_s: dict[str, float] = {}  # predicted seconds of each engine's load
        self.base_tok_s: dict[str, float] = {}
        self.evicting: set[str] = set()
        self.pending: set[str] = set()  # reserved for a load whose lease has not begun yet
        self.breakers: dict[str, Breaker] = {}
        self.decisions: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_DECISIONS)
        self.tokenizers = Tokenizers()
        self._specs: dict[str, ModelSpec] = {}
        self._no_tokenizer: set[Path] = set()
        pool.on_stopped = self._stopped

    def _stopped(self, key: str) -> None:
        self.ledger.release(key)
        self.speeds.pop(key, None)
        self.ready_at.pop(key, None)
        self.load_s.pop(key, None)
        self.evicting.discard(key)
        self.backlogs.pop(key, None)

    async def spec(self, model: ModelEntry) -> ModelSpec:
        """The model's spec, from its GGUF header or its profile (read once, off the event loop)."""
        spec = self._specs.get(model.name)
        if spec is None:
            try:
                spec = await asyncio.to_thread(_read_spec, model)
            except (OSError, ValueError) as exc:
                raise EngineLoadFailed(f"model '{model.name}': cannot read {model.path or model.profile}: {exc}") \
                    from exc
            self._specs[model.name] = spec
        return spec

    async def size(self, inference: InferenceRequest, model: ModelEntry) -> PromptSize:
        """Prompt tokens, exact where the model's GGUF is here."""
        if model.path is None or model.path in self._no_tokenizer:
            return guess_tokens(inference.endpoint, inference.body)
        try:
            return await asyncio.to_thread(self.tokenizers.count, model.path, inference.endpoint, inference.body)
        except (ValueError, RuntimeError, OSError) as exc:
            # The engine's own load will say what is wrong with the file; size the request safely meanwhile.
            log.warning("cannot load the tokenizer of %s (%s); estimating prompt sizes from bytes", model.path, exc)
            self._no_tokenizer.add(model.path)
            return guess_tokens(inference.endpoint, inference.body)

    def _sweep_dead(self) -> None:
        # An engine that died (or never started) holds no memory: free its bytes so its key can be loaded again.
        # One being stopped keeps them until its process is gone (the pool's on_stopped frees them then).
        for slot in self.pool.slots.values():
            if (slot.key in self.speeds and slot.key not in self.pending and not slot.live and not slot.stopping
                    and not slot.waiting and not slot.in_flight):
                self._stopped(slot.key)

    def local_state(self) -> LocalState:
        """This node as the scheduler sees it now."""
        self._sweep_dead()
        hardware = self.hardware or Hardware("none", (), 0, 1.0)
        now = self.clock()
        engines = tuple(self._engine_state(s, now) for s in self.pool.slots.values() if self._counts(s))
        return LocalState(hardware, self.ledger, engines, node=self.node_name, leaving=frozenset(self.evicting))

    @property
    def node_name(self) -> str:
        return self.config.node.name or "local"

    def _counts(self, slot: EngineSlot) -> bool:
        # An engine the scheduler may reuse or evict: placed by us, not being evicted, alive or about to be, or
        # being stopped (idle, unloaded by the reaper): a request for it then waits for the stop and loads it again
        # in the bytes it still holds; another model's load drains it, so it starts only once the process is gone.
        return (slot.key in self.speeds and slot.key not in self.evicting
                and (slot.live or slot.stopping or slot.waiting > 0 or slot.in_flight > 0))

    def _engine_state(self, slot: EngineSlot, now: float) -> EngineState:
        return EngineState(
            key=slot.key, model=slot.model.name, ctx=slot.run.ctx, speed=self.speeds[slot.key],
            # An engine serves one request at a time; the rest of its in-flight requests wait inside it.
            placement=Placement(slot.placement), in_flight=min(slot.in_flight, 1),
            queued=slot.waiting + max(0, slot.in_flight - 1),
            last_used=slot.last_used, loading=not slot.live, ready_at=self._ready_at(slot, now),
            request_s=self.request_s.get(slot.key, 1.0), backlog_s=self._backlog(slot.key).seconds(now),
        )

    def _ready_at(self, slot: EngineSlot, now: float) -> float:
        """When the slot's engine is predicted ready. One that ran before and is not live now (being stopped, or
        stopped with a request waiting) must load again: the first time the scheduler sees that, its ready time
        moves to a whole load from now."""
        ready = self.ready_at.get(slot.key, 0.0)
        if not slot.live and ready <= now and slot.load_seconds is not None:
            ready = self.ready_at[slot.key] = now + self.load_s.get(slot.key, 0.0)
        return ready

    def _backlog(self, key: str) -> Backlog:
        backlog = self.backlogs.get(key)
        if backlog is None:
            backlog = self.backlogs[key] = Backlog()
        return backlog

    def peer_targets(self) -> dict[str, PeerTarget]:
        """Every peer now: configured ones and those the peer sources (paired, linked) report."""
        names = [m.name for m in self.catalog.models]
        targets = {
            p.config.name: PeerTarget(PeerState(p.config.name, p.hardware,
                                                frozenset(n for n in names if p.config.serves(n))),
                                      p.config.base_url, p.config.api_key)
            for p in self.peers.values()
        }
        for source in self.peer_sources:
            targets.update({t.state.name: t for t in source()})
        return targets

    def peer_states(self, targets: dict[str, PeerTarget], exclude: frozenset[str] = frozenset()) -> list[PeerState]:
        """The peers the scheduler may use; a peer whose breaker is open counts as down."""
        now = self.clock()
        return [replace(t.state, up=t.state.up and self.breakers.get(name, Breaker()).allows(now))
                for name, t in targets.items() if name not in exclude]

    def peer_failed(self, name: str, why: str) -> None:
        """A forward to name failed before its first byte."""
        breaker = self.breakers.get(name, Breaker()).on_failure(self.clock())
        self.breakers[name] = breaker
        log.warning("peer %s failed (%s); breaker %s", name, why, breaker.state(self.clock()))

    @contextlib.asynccontextmanager
    async def _to_peer(self, target: PeerTarget, reason: str) -> AsyncIterator[Route]:
        """The route of one request forwarded to `target`, counted by its breaker as an attempt. When the forward is
        over, the peer answered, or the request went away before it did (a failure before the first byte is counted
        by peer_failed, after this): either way a probe it was is no longer in flight, even when the client left and
        its handler was cancelled."""
        name = target.state.name
        self.breakers[name] = self.breakers.get(name, Breaker()).on_attempt(self.clock())
        route = Route(f"peer:{name}", reason, target.base_url, target.api_key, forwarded=True, peer=name,
                      ssl=target.tls(), first_byte_timeout_s=self.config.node.peer_first_byte_timeout_s,
                      idle_timeout_s=self.config.node.peer_idle_timeout_s)
        try:
            yield route
        finally:
            breaker = self.breakers.get(name, Breaker())
            self.breakers[name] = breaker.on_success() if route.stats.responded else breaker.on_abandoned()

    @contextlib.asynccontextmanager
    async def route(self, inference: InferenceRequest, model: ModelEntry,
                    exclude: frozenset[str] = frozenset()) -> AsyncIterator[Route]:
        """Decide where inference runs, hold what it needs there while the caller forwards it, then let go."""
        if model.engine == "external":
            slot = self.pool.slot(model.name, model)
            async with self.pool.lease(slot) as lease:
                yield Route("local", f"local: '{model.name}' is served by the external server at "
                            f"{lease.engine.base_url}", lease.engine.base_url, model.api_key)
            return
        if model.engine == "peer-only" and model.path is None and model.profile is None:
            # Only a peer knows this model (from its inventory): nothing to estimate here, it goes there.
            targets = self.peer_targets()
            now = self.clock()
            up = [t for name, t in targets.items() if model.name in t.state.models and t.state.up
                  and name not in exclude and self.breakers.get(name, Breaker()).allows(now)]
            if not up:
                raise PlacementRefused(Decision("none", None, (), f"no peer serving '{model.name}' is up", 0, 503,
                                                "capacity_busy", 5.0))
            target = min(up, key=lambda t: t.state.queue_depth)
            name = target.state.name
            async with self._to_peer(target, f"peer:{name}: only {name} serves '{model.name}'") as route:
                yield route
            return
        spec = await self.spec(model)
        size = await self.size(inference, model)
        budget = inference.max_tokens or self.config.node.default_max_tokens
        need = RequestNeed(
            model=model.name, spec=spec, prompt_tokens=size.tokens, max_tokens=budget, type_k=model.type_k,
            type_v=model.type_v, flash_attn=model.flash_attn, hint=Hint(inference.hints.placement),
            min_ctx=max(inference.hints.min_ctx, model.ctx if model.local else 0),
            expected_tokens=self.lengths.expect(model.name, budget),
        )
        targets = self.peer_targets()
        decision = decide(need, self.local_state(), self.peer_states(targets, exclude), self.clock(),
                          self.calibration, self.config.node.queue_limit)
        self._record(decision, need, size)
        option = decision.chosen
        if option is None:
            raise PlacementRefused(decision)
        if not option.local:
            async with self._to_peer(targets[option.placement.removeprefix("peer:")], decision.reason) as route:
                try:
                    yield route
                finally:  # also when the client left right after the answer (its handler is cancelled then)
                    self._learn_length(model.name, route.stats, budget)
            return
        slot = self._commit_local(model, option, decision)
        if option.evict:
            await self._evict(option, slot.key, f"evicted to make room for {model.name} at {option.ctx} ctx")
        started = self.clock()
        backlog = self._backlog(slot.key)
        backlog.admit(option.prefill_s + option.decode_s, started, self.ready_at.get(slot.key, 0.0))
        served: Route | None = None
        try:
            async with self.pool.lease(slot) as lease:
                served = Route(option.placement, decision.reason, lease.engine.base_url,
                               cold_start_s=lease.cold_start_s)
                yield served
        finally:
            backlog.done(self.clock())
            # Learning runs here so that a client that closes its connection as soon as it has read the last
            # event (its handler is cancelled while the stream is being closed) still teaches what it was sent.
            if served is not None:
                self._learn_local(model.name, slot.key, served, budget, self.clock() - started)

    def _learn_local(self, model: str, key: str, route: Route, budget: int, elapsed: float) -> None:
        """Fold one local request into the predictions: its engine's speed, from any stream long enough to time;
        and from an answer that came whole, how long it took and how long it ran."""
        self._calibrate(model, key, route.stats)
        if not route.stats.complete:
            return  # cut short (the client left, the engine failed): not a service time, not a length
        elapsed -= route.cold_start_s or 0.0
        old = self.request_s.get(key)
        self.request_s[key] = elapsed if old is None else 0.8 * old + 0.2 * elapsed
        self._learn_length(model, route.stats, budget)

    async def _evict(self, option: Any, key: str, why: str) -> None:
        """Unload the option's victims, the busy ones (option.drain) once their admitted work is done. Their bytes
        are already promised to the new engine `key`, so this runs to the end even if the request that asked goes
        away, and `key` stays reserved (pending) until then: the victims hold that memory until they are gone."""

        async def evict() -> None:
            try:
                for victim in option.evict:
                    await self.pool.wait_idle(victim)  # at once for the idle ones
                    await self.pool.unload(victim, why + (" once its requests finished" if victim in option.drain
                                                          else ""))
            finally:
                self.pending.discard(key)  # the lease that follows counts the request as waiting from here on

        self.pending.add(key)
        task = asyncio.ensure_future(evict())
        self._evictions.add(task)
        task.add_done_callback(self._evictions.discard)
        await asyncio.shield(task)

    def _calibrate(self, model: str, key: str, stats: StreamStats) -> None:
        """Fold an engine's measured decode speed into the calibration its next predictions use."""
        measured = stats.decode_tok_s()
        predicted = self.base_tok_s.get(key)
        if measured is None or not predicted:
            return
        self.calibration = self.calibration.observe(self.node_name, model, predicted, measured)
        log.debug("%s: measured %.1f tok/s, predicted %.1f; factor now %.2f", key, measured, predicted,
                  self.calibration.factor(self.node_name, model))

    def _learn_length(self, model: str, stats: StreamStats, budget: int) -> None:
        """Fold the length an answer ran to, out of its max_tokens `budget`, into what the model's next completions
        are expected to be; an answer cut short says nothing of its length."""
        if stats.complete:
            self.lengths = self.lengths.observe(model, stats.completion_tokens(), budget)

    def _commit_local(self, model: ModelEntry, option: Any, decision: Decision) -> EngineSlot:
        """Reserve the chosen local option's bytes (no await since decide) and return its engine slot."""
        if option.engine is not None:
            return self.pool.slots[option.engine]
        for key in option.evict:
            self.evicting.add(key)
            self.ledger.release(key)
        key = option.engine_key
        if not self.ledger.reserve(key, option.reserve):
            raise PlacementRefused(replace(decision, status=503, code="capacity_busy", retry_after_s=1.0,
                                           reason=f"{decision.reason}; its memory was taken meanwhile"))
        self.speeds[key] = option.speed
        self.base_tok_s[key] = option.base_tok_s
        self.ready_at[key] = self.clock() + option.load_s
        self.load_s[key] = option.load_s
        self.request_s.setdefault(key, option.prefill_s + option.decode_s)
        n_layers = len(self._specs[model.name].layers)
        gpu_layers = model.n_gpu_layers
        if option.offload_layers or option.n_cpu_moe:
            # llama-cpp-python has no --n-cpu-moe: whole layers go to RAM instead (more bytes off the GPU, never
            # fewer, so the reservation still holds).
            gpu_layers = max(0, n_layers - max(option.offload_layers, option.n_cpu_moe))
        run = replace(model, ctx=option.ctx, n_gpu_layers=gpu_layers)
        return self.pool.slot(key, model, run, placement=option.placement)

    def _record(self, decision: Decision, need: RequestNeed, size: PromptSize) -> None:
        entry = {
            "at": time.time(), "model": need.model, "placement": decision.placement, "ctx": decision.ctx,
            "prompt_tokens": size.tokens, "prompt_exact": size.exact, "max_tokens": need.max_tokens,
            "expected_tokens": need.completion_tokens,
            "reason": decision.reason,
            "options": [{"placement": o.placement, "feasible": o.feasible, "why_not": o.why_not, "ctx": o.ctx,
                         "predicted_tok_s": round(o.predicted_tok_s, 1), "total_s": round(o.total_s, 2)}
                        for o in decision.options],
        }
        self.decisions.append(entry)
        log.info("%s -> %s: %s", need.model, decision.placement, decision.reason)


def _read_spec(model: ModelEntry) -> ModelSpec:
    from hybridd.model.spec import model_spec
    from hybridd.node.planning import entry_header

    header = entry_header(model)
    return model_spec(header.metadata, header.tensors)
