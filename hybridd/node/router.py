"""Per request: size it, feed it to the placement state, carry out the effects, send it, fold in what came back.

Every placement fact (reservations, engine speeds and queues, learned lengths, breakers) lives in one pure value,
place/state.py's PlacementState. The router only turns what happens around it into events (a request, an engine
loaded or gone, an answer and what it showed) and carries out the effects (load, evict, admit, forward, refuse).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from hybridd.config import Config, ModelEntry
from hybridd.engine.pool import EnginePool, EngineSlot
from hybridd.errors import EngineLoadFailed, PlacementRefused
from hybridd.model.memory import engine_outputs
from hybridd.model.spec import ModelSpec, model_spec
from hybridd.node.catalog import Catalog, entry_header
from hybridd.node.prefixes import Fingerprint, PrefixTracker
from hybridd.node.request import InferenceRequest
from hybridd.node.resources import Peer
from hybridd.node.sizing import PromptSize, Tokenizers, guess_tokens
from hybridd.place.hardware import Hardware
from hybridd.place.scheduler import Decision, Hint, LocalState, PeerState, RequestNeed
from hybridd.place.state import (
    NO_ANSWER,
    Admit,
    Answered,
    EngineDown,
    EngineGone,
    EngineLoaded,
    Event,
    Evict,
    EvictionsDone,
    Forward,
    Hold,
    Load,
    Observation,
    PeerFailed,
    PeerOnlyArrived,
    PeersReported,
    PlacementState,
    Refuse,
    RequestArrived,
    Step,
    Ticket,
    Train,
    TrainingArrived,
    TrainingEnded,
    apply,
)

log = logging.getLogger("hybridd.place")

RECENT_DECISIONS = 50
# A local engine's first byte may take this many times its predicted queue wait and prefill (and, unstreamed,
# decode): predictions are rough, a timeout cut short is an answer lost.
FIRST_BYTE_SLACK = 4.0
NO_HARDWARE = Hardware("none", (), 0, 1.0)


@dataclass(frozen=True)
class Route:
    """Where one request goes: the engine or peer URL, how to reach it, and the headers that say where and why."""

    placement: str
    reason: str
    base_url: str
    ticket: Ticket | None = None  # None: an external server, nothing to learn from
    api_key: str | None = None
    peer: str | None = None
    ssl: Any = True
    first_byte_timeout_s: float | None = None
    idle_timeout_s: float | None = None
    cold_start_s: float | None = None
    ready_at: float = 0.0  # when the engine was ready for this request (monotonic clock)
    speaks_hybridd: bool = False  # the upstream is a paired hybridd: it takes every API hybridd serves
    prompt_tokens: int | None = None  # the prompt as placement counted it (None where it was not counted)
    max_tokens: int | None = None  # the completion budget, where it was capped to the model's trained context

    @property
    def forwarded(self) -> bool:
        """True for a request sent to a peer."""
        return self.peer is not None


R = TypeVar("R")


def capped_budget(prompt_tokens: int, max_tokens: int, trained: int, min_ctx: int = 0) -> int | None:
    """The completion budget that fits the model's trained context beside the prompt, where the one asked for does
    not (None: it fits, or the prompt alone does not). Agents ask for far more than they use (Claude Code: 32000
    with a 20k-token prompt): a ceiling, met as llama-server meets it, by stopping at the end of the context."""
    if trained <= 0 or prompt_tokens >= trained or min_ctx > trained or prompt_tokens + max_tokens <= trained:
        return None
    return trained - prompt_tokens


@dataclass(frozen=True)
class Answer(Generic[R]):
    """What sending a request along its route returned: the response for the client and one observation of it."""

    response: R
    observation: Observation
    cancelled: bool = False  # the client went away while it was being answered


Send = Callable[[Route], Awaitable[Answer[R]]]


@dataclass(frozen=True)
class PeerTarget:
    """A peer the scheduler may place on, and how to reach it: URL, key, TLS context (pinned for paired peers)."""

    state: PeerState
    base_url: str
    api_key: str | None = None
    ssl: Any = True  # as aiohttp takes it, or a callable making the SSL context when a request goes there
    hybridd: bool = False  # a paired hybridd node (a static [[peers]] entry may be any OpenAI server)
    # A sleeping peer (state.wakeable): wakes it and returns its target once its link is up, or raises
    # PlacementRefused (it did not come up in time) or WakeError (the packet could not be sent).
    wake: Callable[[], Awaitable[PeerTarget]] | None = None

    def tls(self) -> Any:
        """What to give aiohttp's ssl= for one forwarded request."""
        return self.ssl() if callable(self.ssl) else self.ssl


PeerSource = Callable[[], list[PeerTarget]]


def _capped(send: Send[R], max_tokens: int, note: str) -> Send[R]:
    """`send` with the capped budget on each route it is given, and why in its reason."""

    async def capped(route: Route) -> Answer[R]:
        return await send(replace(route, max_tokens=max_tokens, reason=f"{route.reason}; {note}"))

    return capped


class Router:
    """Feeds the placement state and carries out its effects; serves each request along the route it gets."""

    def __init__(self, config: Config, catalog: Catalog, pool: EnginePool, hardware: Hardware | None,
                 peers: Sequence[Peer] = (), clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.catalog = catalog
        self.pool = pool
        self.peers = {p.config.name: p for p in peers}
        self.peer_sources: list[PeerSource] = []
        self.clock = clock
        self.state = PlacementState.empty(hardware or NO_HARDWARE, self.node_name, config.node.queue_limit)
        self.decisions: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_DECISIONS)
        self.forwarding: collections.Counter[str] = collections.Counter()  # requests on each peer now, for status
        self.tokenizers = Tokenizers()
        self.prefixes = PrefixTracker()  # what each engine slot and peer holds of the prompts it was sent
        self.specs: dict[str, ModelSpec] = {}
        self._no_tokenizer: set[Path] = set()
        self._evictions: set[asyncio.Task[None]] = set()
        pool.on_loaded = self._engine_loaded
        pool.on_stopped = self._engine_gone

    @property
    def node_name(self) -> str:
        return self.config.node.name or "local"

    def feed(self, event: Event) -> Step:
        """Fold one event into the placement state at the router's clock."""
        step = apply(self.state, event, self.clock())
        self.state = step.state
        return step

    def _engine_loaded(self, key: str) -> None:
        self.prefixes.forget(key)  # a new process: its KV cache is empty
        self.feed(EngineLoaded(key))

    def _engine_gone(self, key: str) -> None:
        self.prefixes.forget(key)
        self.feed(EngineGone(key))

    # -- what the state is fed before a decision

    def notice_engines(self) -> None:
        """Tell the state about engines that went down without a word: a dead process, or one being stopped. One
        nothing waits for is gone (its bytes free); one with requests waiting must load again first."""
        for key, record in self.state.engines.items():
            slot = self.pool.slots.get(key)
            if record.pending or (slot is not None and slot.live):
                continue
            busy = slot is not None and (slot.stopping or slot.waiting > 0 or slot.in_flight > 0)
            if not busy:
                self.feed(EngineGone(key))
            elif record.loaded:
                self.feed(EngineDown(key))

    def local_state(self) -> LocalState:
        """This node as the scheduler sees it now."""
        self.notice_engines()
        return self.state.local(self.clock())

    def peer_targets(self) -> dict[str, PeerTarget]:
        """Every peer now: configured ones and those the peer sources (paired, linked) report."""
        names = [m.name for m in self.catalog.models]
        targets = {
            # A configured peer is an OpenAI-compatible server (llama-server, vLLM): taken to parse tool calls.
            p.config.name: PeerTarget(PeerState(p.config.name, p.hardware, served, tools=served),
                                      p.config.base_url, p.config.api_key)
            for p in self.peers.values()
            for served in [frozenset(n for n in names if p.config.serves(n))]
        }
        for source in self.peer_sources:
            targets.update({t.state.name: t for t in source()})
        return targets

    def _report_peers(self) -> dict[str, PeerTarget]:
        targets = self.peer_targets()
        self.feed(PeersReported({name: t.state for name, t in targets.items()}))
        return targets

    def peer_failed(self, name: str, why: str) -> None:
        """A forward to name failed before its first byte."""
        self.feed(PeerFailed(name))
        log.warning("peer %s failed (%s); breaker %s", name, why, self.state.breaker(name).state(self.clock()))

    # -- sizing

    async def spec(self, model: ModelEntry) -> ModelSpec:
        """The model's spec, from its GGUF header or its profile (read once, off the event loop)."""
        spec = self.specs.get(model.name)
        if spec is None:
            try:
                spec = await asyncio.to_thread(_read_spec, model)
            except (OSError, ValueError) as exc:
                raise EngineLoadFailed(f"model '{model.name}': cannot read {model.path or model.profile}: {exc}") \
                    from exc
            self.specs[model.name] = spec
        return spec

    async def size(self, inference: InferenceRequest, model: ModelEntry) -> PromptSize:
        """Prompt tokens, exact where the model's GGUF is here, counted no further than its trained context (the
        scheduler refuses what goes past it). Only a tokenizer that cannot load sends the model's requests to the
        byte estimate; a request that cannot be counted fails alone (BadRequest) and changes nothing."""
        if model.path is None or model.path in self._no_tokenizer:
            return guess_tokens(inference.endpoint, inference.body)
        try:
            await self.tokenizers.load(model.path)
        except (ValueError, RuntimeError, OSError) as exc:
            # The engine's own load will say what is wrong with the file; size the request safely meanwhile.
            log.warning("cannot load the tokenizer of %s (%s); estimating prompt sizes from bytes", model.path, exc)
            self._no_tokenizer.add(model.path)
            return guess_tokens(inference.endpoint, inference.body)
        spec = await self.spec(model)
        return await self.tokenizers.size(model.path, inference.endpoint, inference.body, spec.n_ctx_train)

    # -- serving

    async def serve(self, inference: InferenceRequest, model: ModelEntry, send: Send[R],
                    exclude: frozenset[str] = frozenset()) -> Answer[R]:
        """Place `inference`, hold what it needs while `send` answers it along its route, then fold in what the
        answer showed. Raises PlacementRefused when it cannot run, and what `send` raises."""
        if model.engine == "external":
            # Not placed, so not counted, but for a stream: its translation may need the prompt's count.
            counted = (await self.size(inference, model)).tokens if inference.stream else None
            slot = self.pool.slot(model.name, model)
            async with self.pool.lease(slot) as lease:
                return await send(Route("local", f"local: '{model.name}' is served by the external server at "
                                        f"{lease.engine.base_url}", lease.engine.base_url, api_key=model.api_key,
                                        prompt_tokens=counted))
        budget = inference.max_tokens or self.config.node.default_max_tokens
        prompt_tokens: int | None = None
        if model.engine == "peer-only" and model.path is None and model.profile is None:
            # Only a peer knows this model (from its inventory): nothing to estimate here, it goes there.
            targets = self._report_peers()
            step = self.feed(PeerOnlyArrived(model.name, budget, exclude))
        else:
            spec = await self.spec(model)
            size = await self.size(inference, model)
            prompt_tokens = size.tokens
            capped = capped_budget(size.tokens, budget, spec.n_ctx_train, inference.hints.min_ctx)
            if capped is not None:
                send = _capped(send, capped, f"max_tokens {budget} capped at {capped}: {model.name} was trained "
                               f"for {spec.n_ctx_train} tokens of context")
                budget = capped
            targets = self._report_peers()
            self.notice_engines()
            need = RequestNeed(
                model=model.name, spec=spec, prompt_tokens=size.tokens, max_tokens=budget, type_k=model.type_k,
                type_v=model.type_v, flash_attn=model.flash_attn, hint=Hint(inference.hints.placement),
                min_ctx=max(inference.hints.min_ctx, model.ctx if model.local else 0),
                expected_tokens=self.state.lengths.expect(model.name, budget), slots=model.slots,
                n_outputs=engine_outputs(model.engine, model.slots, model.outputs_every_row),
                tools=inference.calls_tools, local_parses_tools=model.parses_tools,
                cached=self._cached(model.name, size.fingerprint, targets),
            )
            step = self.feed(RequestArrived(need, exclude))
            assert step.decision is not None
            self._record(step.decision, need, size)
            if size.fingerprint is not None and step.ticket is not None:
                return await self._holding(step, model, size.fingerprint,
                                           self._carry_out(step, model, targets, inference.stream, send, prompt_tokens))
        return await self._carry_out(step, model, targets, inference.stream, send, prompt_tokens)

    def _cached(self, model: str, prompt: Fingerprint | None, targets: dict[str, PeerTarget]) -> dict[str, int]:
        """Tokens of the prompt each engine of `model` here and each peer serving it holds in its KV cache."""
        if prompt is None:
            return {}
        engines = [key for key, record in self.state.engines.items() if record.model == model]
        peers = [name for name, target in targets.items() if model in target.state.models]
        return self.prefixes.cached(prompt, engines, peers, model)

    async def _holding(self, step: Step, model: ModelEntry, prompt: Fingerprint,
                       answer: Awaitable[Answer[R]]) -> Answer[R]:
        """Await `answer`, recording what the engine slot or the peer it went to holds of `prompt` afterwards: an
        engine slot is taken now (as llama-server picks one when the request reaches it), its prefix set when the
        request ends; a peer's once it answered."""
        assert step.ticket is not None
        key, peer = step.ticket.engine, step.ticket.peer
        slot = self.prefixes.admit(key, model.slots, prompt, self.clock()) if key is not None else 0
        kept: Fingerprint | None = None
        try:
            result = await answer
            kept = prompt
            return result
        finally:
            if key is not None:
                self.prefixes.release(key, model.slots, slot, kept, self.clock())
            elif peer is not None and kept is not None:
                self.prefixes.forwarded(peer, model.name, prompt)

    async def _carry_out(self, step: Step, model: ModelEntry, targets: dict[str, PeerTarget], stream: bool,
                         send: Send[R], prompt_tokens: int | None = None) -> Answer[R]:
        slot: EngineSlot | None = None
        for effect in step.effects:
            match effect:
                case Refuse(status, code, reason, retry_after_s):
                    raise PlacementRefused(reason, status, code, retry_after_s)
                case Forward(name, reason):
                    assert step.ticket is not None
                    return await self._forward(step.ticket, targets[name], reason, send, prompt_tokens)
                case Load(key, _, ctx, gpu_layers, placement):
                    # ctx is each slot's: a llama-server divides its context among its slots
                    run = replace(model, ctx=ctx * model.slots, n_gpu_layers=model.n_gpu_layers if gpu_layers is None
                                  else gpu_layers)
                    slot = self.pool.slot(key, model, run, placement=placement)
                case Evict():
                    await self._evict(effect)
                case Admit(key, reason, first_token_s, answer_s):
                    assert step.ticket is not None
                    # llama.cpp's servers send a whole answer's headers only once it is done
                    predicted = first_token_s if stream else answer_s
                    first_byte_s = max(self.config.node.engine_first_byte_floor_s, FIRST_BYTE_SLACK * predicted)
                    return await self._on_engine(step.ticket, slot or self.pool.slots[key], reason, first_byte_s,
                                                 send, prompt_tokens)
        raise AssertionError(f"a placement step with nothing to do: {step.effects}")

    async def _forward(self, ticket: Ticket, target: PeerTarget, reason: str, send: Send[R],
                       prompt_tokens: int | None = None) -> Answer[R]:
        name = target.state.name
        self.forwarding[name] += 1
        try:
            if not target.state.up and target.wake is not None:
                # Held until the sleeping peer's link is up; the wait was counted in the decision's prediction.
                log.info("holding a request for %s while it wakes", name)
                try:
                    target = await target.wake()
                except BaseException:
                    self.feed(Answered(ticket, NO_ANSWER))  # no verdict on the peer: its breaker is left as it was
                    raise
            route = Route(f"peer:{name}", reason, target.base_url, ticket, target.api_key,
                          peer=name, ssl=target.tls(), speaks_hybridd=target.hybridd,
                          first_byte_timeout_s=self.config.node.peer_first_byte_timeout_s,
                          idle_timeout_s=self.config.node.peer_idle_timeout_s, prompt_tokens=prompt_tokens)
            return await self._answered(route, send)
        finally:
            self.forwarding[name] -= 1

    async def _on_engine(self, ticket: Ticket, slot: EngineSlot, reason: str, first_byte_s: float,
                         send: Send[R], prompt_tokens: int | None = None) -> Answer[R]:
        async with self.pool.lease(slot) as lease:
            route = Route(slot.placement, reason, lease.engine.base_url, ticket, cold_start_s=lease.cold_start_s,
                          ready_at=self.clock(), first_byte_timeout_s=first_byte_s,
                          idle_timeout_s=self.config.node.engine_idle_timeout_s, prompt_tokens=prompt_tokens)
            return await self._answered(route, send)

    async def _answered(self, route: Route, send: Send[R]) -> Answer[R]:
        """Send along `route`; whatever happens, the answer (or its absence) is folded in as one event. This runs
        even when the client left as soon as it had read the last event and its handler was cancelled then."""
        observation = NO_ANSWER
        try:
            answer = await send(route)
            observation = answer.observation
            return answer
        finally:
            assert route.ticket is not None
            service_s = self.clock() - route.ready_at if route.ticket.engine is not None else None
            self.feed(Answered(route.ticket, observation, service_s))

    async def _evict(self, evict: Evict) -> None:
        """Unload the victims, the drained ones once their admitted work is done. Their bytes are already promised
        to the new engine, so this runs to the end even if the request that asked goes away, and that engine's
        load waits for it (pending) until then: the victims hold that memory until they are gone."""

        async def run() -> None:
            try:
                for victim in evict.keys:
                    await self.pool.wait_idle(victim)  # at once for the idle ones
                    drained = " once its requests finished" if victim in evict.drain else ""
                    await self.pool.unload(victim, evict.why + drained, "drained" if drained else "evicted")
            finally:
                self.feed(EvictionsDone(evict.for_key))

        task = asyncio.ensure_future(run())
        self._evictions.add(task)
        task.add_done_callback(self._evictions.discard)
        await asyncio.shield(task)

    # -- fine-tunes

    async def hold_for_training(self, key: str, device: str, need_bytes: int) -> str | None:
        """Reserve a fine-tune's bytes on `device`, evicting idle engines there; None once they are held (the
        trainer may start), else why it must wait."""
        self.notice_engines()
        step = self.feed(TrainingArrived(key, device, need_bytes))
        for effect in step.effects:
            match effect:
                case Evict():
                    await self._evict(effect)
                case Hold(_, reason):
                    return reason
                case Train(_, reason):
                    log.info("fine-tune %s: %s", key, reason)
        return None

    def release_training(self, key: str) -> None:
        """The fine-tune's trainer is gone: its bytes are free."""
        self.feed(TrainingEnded(key))

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
    header = entry_header(model)
    return model_spec(header.metadata, header.tensors)
