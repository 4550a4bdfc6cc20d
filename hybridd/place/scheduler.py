"""The placement decision: where a request finishes first, or why it cannot run (pure; `now` is an argument).

For a request it weighs (a) each engine already loaded (or loading) with enough context, (b) a new load on the
local GPUs, after evicting idle engines least recently used first if needed, or else after waiting for busy engines
to finish their admitted work and evicting them (a drain), (c) a new local load with part of the model in system
RAM, after evicting idle engines, or else after a drain, (d) each peer that serves the model, as the peer would
serve it: queued on its engine of the model, or a new engine there (beside a busy one, or once its busy engines
have drained), whichever finishes first; and predicts for each

    total_s = queue or drain wait + load time if not loaded + (prompt - cached) / prefill tok/s
              + completion tokens / decode tok/s (+ RTT)

where the completion tokens are those the model's completions are expected to run to (place/lengths.py), at most
max_tokens; the context is sized for the whole max_tokens. `cached` is the prefix of the prompt that the engine
already holds in its KV cache from the request it served before (an agent's previous turn: RequestNeed.cached, by
engine key, and `peer:<name>` for the peer's engine of the model); a new engine holds nothing, so moving a long
conversation elsewhere pays its whole prompt again.

The fastest wins; a local option within TIE_TOLERANCE of the best peer wins over it. The decision reserves
nothing: the caller commits it with Ledger.reserve(option.engine_key, option.reserve) after evicting
option.evict, and a refused reserve means the snapshot was stale: decide again.

Refusals (placement "none") carry an honest HTTP status:
- 400 context_length_exceeded: the needed context is beyond the model's trained context, or the model fits
  somewhere at a smaller context but nowhere at this one.
- 400 placement_unavailable: the placement hint leaves no candidate (e.g. `peer` and no peer serves the model).
- 429 queue_full: every option that could run it has a full queue (Retry-After: retry_after_s).
- 503 capacity_busy: it would fit on idle hardware but not now (engines in flight, peers down); retry later.
- 507 insufficient_memory: the model does not fit anywhere even idle at the smallest context bucket.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from hybridd.model.memory import CTX_PAD, MemoryEstimate, RunSettings, estimate_memory, pad
from hybridd.model.spec import ModelSpec
from hybridd.place.buckets import MIN_BUCKET, context_bucket
from hybridd.place.fit import Fit, fit_model
from hybridd.place.hardware import Hardware
from hybridd.place.ledger import HOST, Ledger
from hybridd.place.speed import Calibration, SpeedModel, speed_model

GIB = 1024**3
# Process start, CUDA context and warm-up of a llama.cpp engine on top of reading the weights.
LOAD_OVERHEAD_S = 2.0
# Predictions are this rough: a local option at most 5% slower than the best peer still stays local.
TIE_TOLERANCE = 0.05
LOCAL_NODE = "local"


class Hint(StrEnum):
    """The client's placement hint (header x-hybridd-placement or body field)."""

    AUTO = "auto"
    LOCAL = "local"
    PEER = "peer"


# Ledger keys of fine-tunes: "train:<job id>" (engines are "<model>@<ctx>").
TRAINING_PREFIX = "train:"


class Placement(StrEnum):
    """Where a request runs; peers are PEER plus a name (`peer:<name>`)."""

    LOCAL = "local"
    LOCAL_OFFLOAD = "local-offload"
    PEER = "peer"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class RequestNeed:
    """One request as the scheduler sees it: model, token counts, cache settings, client hints."""

    model: str
    spec: ModelSpec
    prompt_tokens: int
    max_tokens: int
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True
    hint: Hint = Hint.AUTO
    min_ctx: int = 0
    expected_tokens: int = 0  # completion tokens expected (place/lengths.py); 0: the whole max_tokens budget
    slots: int = 1  # requests a new engine of this model runs at once (llama-server); each gets the whole ctx
    n_outputs: int = 0  # logits rows its engine reserves (RunSettings.n_outputs; memory.engine_outputs)
    # Tools the model may call as it sees fit (tool_choice "auto"): an engine that parses tool calls out of the
    # model's output is preferred to one that returns them as text (llama-cpp-python), whatever their speeds.
    tools: bool = False
    local_parses_tools: bool = True  # whether this node's engine of the model does
    # Tokens of the prompt's prefix each engine already holds in its KV cache, by engine key and `peer:<name>`
    # (node/prefixes.py tracks them): prefill there is only the rest.
    cached: Mapping[str, int] = field(default_factory=dict)

    def cached_on(self, where: str) -> int:
        """Prompt tokens the engine (or peer) `where` holds, short of the prompt's last token (an engine always
        prefills at least one token to start the completion)."""
        return max(0, min(self.cached.get(where, 0), self.prompt_tokens - 1))

    @property
    def completion_tokens(self) -> int:
        """Completion tokens to predict time with: the expected length, never beyond the budget."""
        return min(self.max_tokens, self.expected_tokens) if self.expected_tokens > 0 else self.max_tokens

    @property
    def needed_ctx(self) -> int:
        """Tokens the context must hold: prompt + completion budget, at least min_ctx."""
        return max(self.prompt_tokens + self.max_tokens, self.min_ctx, 1)

    def settings(self, ctx: int) -> RunSettings:
        """llama.cpp run settings at `ctx` with this request's cache types."""
        return RunSettings(ctx=ctx, type_k=self.type_k, type_v=self.type_v, flash_attn=self.flash_attn,
                           n_outputs=self.n_outputs)


@dataclass(frozen=True, slots=True)
class EngineState:
    """A local engine, loaded or loading: what it holds, how busy it is, how fast it runs."""

    key: str  # its ledger key
    model: str
    ctx: int
    speed: SpeedModel  # as predicted when it was placed (Option.speed)
    placement: Placement = Placement.LOCAL
    in_flight: int = 0
    queued: int = 0
    last_used: float = 0.0
    loading: bool = False
    ready_at: float = 0.0  # predicted end of the load, when loading
    request_s: float = 0.0  # predicted (or recent mean) seconds per request, for queue waits
    # predicted seconds of admitted work ahead of a new request once loaded (until a slot frees after the running
    # requests and every queued one); None: unknown, estimated from the counts and request_s
    backlog_s: float | None = None
    slots: int = 1  # requests it runs at once; ctx is each one's
    drain_s: float | None = None  # predicted seconds until all its admitted work is done (what a drain waits for)

    @property
    def idle(self) -> bool:
        """Nothing in flight, queued or loading: the only kind of engine eviction may take at once."""
        return self.in_flight == 0 and self.queued == 0 and not self.loading

    def wait_s(self, now: float) -> float:
        """Predicted seconds before a new request on this engine starts: what is left of its load, then until one
        of its slots is free."""
        if self.backlog_s is not None:
            work = self.backlog_s
        elif self.in_flight + self.queued < self.slots:
            work = 0.0
        else:
            work = self.request_s / 2 + self.queued * self.request_s / self.slots
        return work + self._load_left(now)

    def drained_s(self, now: float) -> float:
        """Predicted seconds until everything admitted to it is done (its load first, if it is loading)."""
        work = self.drain_s if self.drain_s is not None else \
            (self.request_s / 2 if self.in_flight else 0.0) + self.queued * self.request_s / self.slots
        return work + self._load_left(now)

    def _load_left(self, now: float) -> float:
        return max(0.0, self.ready_at - now) if self.loading else 0.0


@dataclass(frozen=True, slots=True)
class LocalState:
    """This node: its hardware, the ledger (capacities and reservations) and its engines."""

    hardware: Hardware
    ledger: Ledger
    engines: tuple[EngineState, ...] = ()
    node: str = LOCAL_NODE
    leaving: frozenset[str] = frozenset()  # keys of engines being evicted: not to be loaded again until gone


@dataclass(frozen=True, slots=True)
class Drain:
    """A busy engine on a peer: predicted seconds until its admitted work is done, and the bytes it holds."""

    backlog_s: float
    held: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class PeerState:
    """A peer as last reported: its hardware (free bytes now), what it serves and has loaded, how busy it is."""

    name: str
    hardware: Hardware
    models: frozenset[str]
    loaded: Mapping[str, int] = field(default_factory=dict)  # model -> ctx it is loaded with
    up: bool = True
    queue_depth: int = 0
    rtt_s: float = 0.001
    # per model: predicted seconds before a new request could start on its loaded engine (the peer's own backlog)
    backlog_s: Mapping[str, float] = field(default_factory=dict)
    draining: tuple[Drain, ...] = ()  # its busy engines: when each finishes and what it then frees
    trainable: frozenset[str] = frozenset()  # models it can fine-tune (it has their checkpoints)
    tools: frozenset[str] = frozenset()  # models its engines parse tool calls for (tool_choice "auto")
    # down, but a Wake-on-LAN packet can wake it (its MAC is known): an option that first waits wake_s for it
    wakeable: bool = False
    wake_s: float = 0.0



@dataclass(frozen=True, slots=True)
class Option:
    """One way to serve the request, with its predicted times; infeasible options say why not."""

    placement: str  # "local", "local-offload", "peer:<name>"
    feasible: bool
    why_not: str = ""
    ctx: int = 0
    engine: str | None = None  # existing engine reused (option a)
    engine_key: str | None = None  # ledger key for a new local load
    reserve: Mapping[str, int] = field(default_factory=dict)  # bytes per device to reserve (new local loads)
    evict: tuple[str, ...] = ()  # engine keys to unload first
    drain: tuple[str, ...] = ()  # those of them that are busy: wait until they finish their admitted work
    need_bytes: int = 0  # bytes on the GPUs (or the peer's pool)
    free_bytes: int = 0  # GPU bytes free for it (after evictions)
    offload_layers: int = 0
    n_cpu_moe: int = 0
    speed: SpeedModel | None = None
    factor: float = 1.0  # online calibration applied
    predicted_tok_s: float = 0.0
    base_tok_s: float = 0.0  # before the online correction: what Calibration.observe wants
    prefill_tok_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens its engine already holds: not prefilled again
    wait_s: float = 0.0
    load_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    network_s: float = 0.0
    queue_full: bool = False
    wake_s: float = 0.0  # a sleeping peer: seconds for it to wake, counted in wait_s

    @property
    def total_s(self) -> float:
        """Predicted seconds from now to the last token."""
        return self.wait_s + self.load_s + self.prefill_s + self.decode_s + self.network_s

    @property
    def local(self) -> bool:
        """True for options on this node."""
        return not self.placement.startswith(Placement.PEER)


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen option (None when refused), every option considered, and a reason a person can read."""

    placement: str  # "local", "local-offload", "peer:<name>" or "none"
    chosen: Option | None
    options: tuple[Option, ...]
    reason: str
    ctx: int
    status: int = 200  # HTTP status for a refusal
    code: str = ""  # OpenAI error code for a refusal
    retry_after_s: float | None = None


def queue_full(engine: EngineState, limit: int) -> bool:
    """Whether the engine's bounded queue is full (a new request would wait beyond `limit`)."""
    return engine.queued >= limit


def _training_note(ledger: Ledger) -> str:
    """What fine-tunes hold on this node, for the reason a request does not fit here ("" when none)."""
    jobs = [(key.removeprefix(TRAINING_PREFIX), sum(ledger.held(key).values())) for key in ledger.keys
            if key.startswith(TRAINING_PREFIX)]
    if not jobs:
        return ""
    held = ", ".join(f"{job} holds {_gib(n)}" for job, n in jobs)
    return f" (fine-tuning here until it ends: {held})"


def ledger_for(hardware: Hardware) -> Ledger:
    """A ledger whose capacities are the hardware's usable bytes now (reserves kept back) and its free RAM."""
    ledger = Ledger({d.name: d.usable_bytes for d in hardware.devices})
    if not hardware.unified and hardware.devices:
        ledger.set_capacity(HOST, hardware.ram_bytes)
    return ledger


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _gpu_need(fit: Fit) -> int:
    return sum(d.bytes_placed for d in fit.devices)


def _reservation(fit: Fit, hardware: Hardware) -> dict[str, int]:
    reserve = {d.name: d.bytes_placed for d in fit.devices if d.bytes_placed}
    if fit.host_bytes and not hardware.unified:
        reserve[HOST] = fit.host_bytes
    return reserve


def _load_s(est: MemoryEstimate, hardware: Hardware) -> float:
    return est.weights_bytes / hardware.disk_read_bytes_s + LOAD_OVERHEAD_S


def _timed(option: Option, need: RequestNeed, speed: SpeedModel, factor: float, streams: int = 1,
           cached: int = 0) -> Option:
    """The option's predicted times: prefill of what its engine does not hold (`cached` tokens of the prompt it
    does), then decode at the mean context, sharing each step's weight reads with the `streams` - 1 other requests
    its engine runs at once."""
    position = need.prompt_tokens + need.completion_tokens // 2  # the prompt plus half the completion
    base = speed.decode_tok_s(position, streams=streams)
    tok_s = base * factor
    prefill = speed.prefill_tok_s * factor
    return replace(option, speed=speed, factor=factor, predicted_tok_s=tok_s, base_tok_s=base, prefill_tok_s=prefill,
                   cached_tokens=cached, prefill_s=(need.prompt_tokens - cached) / prefill,
                   decode_s=need.completion_tokens / tok_s)


def _hardware_with_free(hardware: Hardware, free: Mapping[str, int]) -> Hardware:
    devices = tuple(replace(d, free_bytes=max(0, free.get(d.name, 0)), reserve_bytes=0) for d in hardware.devices)
    ram = free.get(HOST, hardware.ram_bytes) if not hardware.unified else 0
    return replace(hardware, devices=devices, ram_bytes=max(0, ram))


def _ctx_candidates(need: RequestNeed) -> list[int]:
    """The bucket first; the exact need (padded) too, so a long request can still fit below its bucket."""
    bucket = context_bucket(need.needed_ctx, need.spec.n_ctx_train)
    exact = pad(need.needed_ctx, CTX_PAD)
    return [bucket, exact] if MIN_BUCKET < exact < bucket else [bucket]


def _reuse_options(need: RequestNeed, local: LocalState, now: float, calibration: Calibration,
                   queue_limit: int | None) -> list[Option]:
    options = []
    for e in local.engines:
        if e.model != need.model or e.ctx < need.needed_ctx:
            continue
        load = max(0.0, e.ready_at - now) if e.loading else 0.0
        full = queue_limit is not None and queue_full(e, queue_limit)
        option = Option(str(e.placement), not full, "queue full" if full else "", e.ctx, engine=e.key,
                        wait_s=e.wait_s(now) - load, load_s=load, queue_full=full)
        streams = min(e.in_flight + e.queued + 1, e.slots)  # those it will run beside, once it starts
        options.append(_timed(option, need, e.speed, calibration.factor(local.node, need.model), streams,
                              need.cached_on(e.key)))
    return options


def _new_load_options(need: RequestNeed, local: LocalState, now: float, calibration: Calibration) -> list[Option]:
    """(b) all on GPUs, fewest evictions, else after the fewest drains; (c) part in RAM, fewest evictions, else
    after the fewest drains (when nothing idle makes room); at the bucket, else the exact ctx. Idle engines go first
    (least recently used first), then busy ones (loading ones too: they drain after their queue), soonest done
    first."""
    hw = local.hardware
    if not hw.devices:
        return []
    idle = sorted((e for e in local.engines if e.idle), key=lambda e: (e.last_used, e.key))
    # an engine of this model that could serve it is reused or queued on (option a), never drained for a copy
    busy = sorted((e for e in local.engines if not e.idle and not (e.model == need.model and e.ctx >= need.needed_ctx)),
                  key=lambda e: (e.drained_s(now), e.key))
    factor = calibration.factor(local.node, need.model)
    found: dict[tuple[Placement, bool], Option] = {}
    why_not = ""
    existing = {e.key for e in local.engines} | local.leaving
    for ctx in _ctx_candidates(need):
        if f"{need.model}@{ctx}" in existing:
            continue  # loaded or loading (reusing it is option a), or on its way out
        est = estimate_memory(need.spec, need.settings(ctx * need.slots))  # each slot has its own ctx of cache
        victims = idle + busy
        for k in range(len(victims) + 1):
            drain = victims[len(idle):k]
            if drain and (Placement.LOCAL, True) in found:
                break  # a longer drain than one already found
            evict = tuple(e.key for e in victims[:k])
            free = local.ledger.free(releasing=evict)
            avail = _hardware_with_free(hw, free)
            fit = fit_model(est, avail.devices, avail.ram_bytes)
            if not fit.runs:
                why_not = fit.reason
                continue
            kind = Placement.LOCAL if fit.fits else Placement.LOCAL_OFFLOAD
            if (kind, bool(drain)) in found:
                continue
            gpu_free = sum(free.get(d.name, 0) for d in hw.devices)
            option = Option(str(kind), True, ctx=ctx, engine_key=f"{need.model}@{ctx}", reserve=_reservation(fit, hw),
                            evict=evict, drain=tuple(e.key for e in drain), need_bytes=_gpu_need(fit),
                            free_bytes=gpu_free, offload_layers=fit.offload_layers, n_cpu_moe=fit.n_cpu_moe,
                            wait_s=max((e.drained_s(now) for e in drain), default=0.0), load_s=_load_s(est, hw))
            found[kind, bool(drain)] = _timed(option, need, speed_model(need.spec, est, fit, hw), factor)
            if kind is Placement.LOCAL:
                break
        if (Placement.LOCAL, False) in found:
            break
    if not found:
        why_not = (why_not or "does not fit") + _training_note(local.ledger)
        return [Option(str(Placement.LOCAL), False, why_not, ctx=_ctx_candidates(need)[-1])]
    return list(found.values())


def _peer_fit(est: MemoryEstimate, peer: PeerState) -> tuple[Fit, float]:
    """The layout of a new load on the peer, and how long it first waits for busy engines there to drain."""
    hw = peer.hardware
    fit = fit_model(est, hw.devices, hw.ram_bytes)
    free = {d.name: d.usable_bytes for d in hw.devices}
    wait = 0.0
    for drain in sorted(peer.draining, key=lambda d: d.backlog_s):
        if fit.runs:
            break
        for device, held in drain.held.items():
            free[device] = free.get(device, 0) + held
        avail = hw.with_free(free)
        fit, wait = fit_model(est, avail.devices, avail.ram_bytes), drain.backlog_s
    return fit, wait


def _peer_option(need: RequestNeed, peer: PeerState, calibration: Calibration) -> Option:
    """The peer's fastest way to serve it, as the peer decides: queue on its engine of the model, or load one (a
    copy at another context too, to run in parallel with a busy one)."""
    label = f"{Placement.PEER}:{peer.name}"
    if not peer.up and not peer.wakeable:
        return Option(label, False, f"{peer.name} is down")
    if not peer.up:  # asleep: planned from what it last reported, after the wake; nothing is loaded once it is up
        awake = replace(peer, up=True, wakeable=False, loaded={}, backlog_s={}, queue_depth=0)
        option = _peer_option(need, awake, calibration)
        return replace(option, wait_s=option.wait_s + peer.wake_s, wake_s=peer.wake_s) if option.feasible else option
    factor = calibration.factor(peer.name, need.model)
    loaded_ctx = peer.loaded.get(need.model, 0)
    options = []
    for ctx in _ctx_candidates(need):
        if ctx != loaded_ctx:
            options.append(_peer_load(need, peer, label, ctx, factor))
            if options[-1].feasible:
                break
    if loaded_ctx >= need.needed_ctx:
        options.append(_peer_queue(need, peer, label, loaded_ctx, factor))
    feasible = [o for o in options if o.feasible]
    if not feasible:
        return options[0]
    return min(feasible, key=lambda o: o.total_s)


def _peer_queue(need: RequestNeed, peer: PeerState, label: str, ctx: int, factor: float) -> Option:
    """Queue on the peer's engine of the model; its speed judged on the peer's idle layout."""
    est = estimate_memory(need.spec, need.settings(ctx))
    idle = peer.hardware.idle()
    timed = _on_peer(need, peer, label, ctx, factor, est, fit_model(est, idle.devices, idle.ram_bytes),
                     cached=need.cached_on(label))
    if not timed.feasible:
        return timed
    if need.model in peer.backlog_s:
        return replace(timed, wait_s=peer.backlog_s[need.model])
    # no backlog reported (a plain OpenAI-compatible peer): each queued request taken to be as long as this one
    return replace(timed, wait_s=peer.queue_depth * (timed.prefill_s + timed.decode_s))


def _peer_load(need: RequestNeed, peer: PeerState, label: str, ctx: int, factor: float) -> Option:
    """A new load on the peer at `ctx`, after its busy engines that must make room have drained."""
    est = estimate_memory(need.spec, need.settings(ctx))
    fit, drain_s = _peer_fit(est, peer)
    return _on_peer(need, peer, label, ctx, factor, est, fit, wait_s=drain_s, load_s=_load_s(est, peer.hardware))


def _on_peer(need: RequestNeed, peer: PeerState, label: str, ctx: int, factor: float, est: MemoryEstimate, fit: Fit,
             wait_s: float = 0.0, load_s: float = 0.0, cached: int = 0) -> Option:
    """The peer option for a layout there, timed; infeasible with the reason when the layout does not run."""
    if not fit.runs:
        return Option(label, False, f"{peer.name}: {fit.reason}", ctx=ctx, need_bytes=est.total_bytes)
    hw = peer.hardware
    option = Option(label, True, ctx=ctx, need_bytes=_gpu_need(fit), free_bytes=sum(d.usable_bytes for d in hw.devices),
                    offload_layers=fit.offload_layers, n_cpu_moe=fit.n_cpu_moe, wait_s=wait_s, load_s=load_s,
                    network_s=peer.rtt_s)
    return _timed(option, need, speed_model(need.spec, est, fit, hw), factor, cached=cached)


def _allowed(option: Option, hint: Hint) -> bool:
    return hint is Hint.AUTO or (hint is Hint.LOCAL) == option.local


def _describe(option: Option) -> str:
    where = option.placement.removeprefix(f"{Placement.PEER}:")
    waking = f", waking it first (~{option.wake_s:.0f} s)" if option.wake_s else ""
    cached = f", prefix cached: {option.cached_tokens:,} tokens" if option.cached_tokens else ""
    return f"{where} predicted {option.predicted_tok_s:.0f} tok/s{cached} ({option.total_s:.1f} s{waking})"


def _reason(chosen: Option, others: Sequence[Option], notes: Sequence[str] = (), prompt_tokens: int = 0) -> str:
    if chosen.engine is not None:
        state = f"loading ({chosen.load_s:.1f} s left)" if chosen.load_s else "loaded"
        head = (f"{chosen.placement}: engine {chosen.engine} {state} at {chosen.ctx} ctx, "
                f"{chosen.wait_s:.1f} s wait, predicted {chosen.predicted_tok_s:.0f} tok/s")
    else:
        head = (f"{chosen.placement}: needs {_gib(chosen.need_bytes)} at {chosen.ctx} ctx, "
                f"{_gib(chosen.free_bytes)} free, predicted {chosen.predicted_tok_s:.0f} tok/s")
        if chosen.n_cpu_moe:
            head += f", experts of {chosen.n_cpu_moe} layers in RAM"
        if chosen.offload_layers:
            head += f", {chosen.offload_layers} layers in RAM"
        if chosen.evict:
            head += f", evicts {', '.join(chosen.evict)}"
        if chosen.drain:
            head += f" once they finish ({chosen.wait_s:.1f} s)"
    if chosen.cached_tokens:
        head += f", prefix cached: {chosen.cached_tokens:,} of {prompt_tokens:,} tokens"
    if chosen.wake_s:
        head += f", waking {chosen.placement.removeprefix(f'{Placement.PEER}:')} (~{chosen.wake_s:.0f} s)"
    if chosen.local and notes:  # e.g. an engine that is a CPU build beside the GPUs
        head += "; " + "; ".join(notes)
    head += f" ({chosen.total_s:.1f} s)"
    rest = [_describe(o) for o in others if o.feasible and o is not chosen and o.placement != chosen.placement]
    return head + ("; " + "; ".join(rest) if rest else "")


def _fits_idle(need: RequestNeed, local: LocalState, peers: Sequence[PeerState], ctx: int) -> bool:
    """Whether some hint-allowed place could hold the model at `ctx` if it were idle."""
    est = estimate_memory(need.spec, need.settings(ctx))
    places = []
    if need.hint is not Hint.PEER and local.hardware.devices:
        places.append(local.hardware.idle())
    if need.hint is not Hint.LOCAL:
        places += [p.hardware.idle() for p in peers if need.model in p.models]
    return any(fit_model(est, hw.devices, hw.ram_bytes).runs for hw in places)


def _refusal(need: RequestNeed, local: LocalState, peers: Sequence[PeerState], options: Sequence[Option],
             ctx: int) -> Decision:
    def refuse(status: int, code: str, message: str, retry: float | None = None) -> Decision:
        return Decision(str(Placement.NONE), None, tuple(options), message, ctx, status, code, retry)

    allowed = [o for o in options if _allowed(o, need.hint)]
    if not allowed:
        return refuse(400, "placement_unavailable",
                      f"placement hint '{need.hint}' leaves no option for {need.model}")
    full = [o for o in allowed if o.queue_full]
    if full:
        return refuse(429, "queue_full", f"queue full for {need.model}; retry in {min(o.wait_s for o in full):.0f} s",
                      max(1.0, min(o.wait_s for o in full)))
    est = estimate_memory(need.spec, need.settings(ctx))
    why = "; ".join(f"{o.placement}: {o.why_not}" for o in allowed)
    if _fits_idle(need, local, peers, ctx):
        busy = [e.request_s for e in local.engines if not e.idle and e.request_s > 0]
        return refuse(503, "capacity_busy", f"needs {_gib(est.total_bytes)} at {ctx} ctx; nothing can hold it now "
                      f"({why})", max(1.0, min(busy, default=1.0)))
    if _fits_idle(need, local, peers, MIN_BUCKET):
        return refuse(400, "context_length_exceeded", f"needs {_gib(est.total_bytes)} at {ctx} ctx; no node can hold "
                      f"that context ({why})")
    return refuse(507, "insufficient_memory", f"{need.model} needs {_gib(est.total_bytes)} at {ctx} ctx; it fits "
                  f"nowhere even idle ({why})")


def decide(need: RequestNeed, local: LocalState, peers: Sequence[PeerState], now: float,
           calibration: Calibration | None = None, queue_limit: int | None = None) -> Decision:
    """Where `need` finishes first at time `now`, or a refusal with an HTTP status; reserves nothing."""
    calibration = calibration or Calibration()
    train = need.spec.n_ctx_train
    ctx = context_bucket(need.needed_ctx, train)
    if train > 0 and need.needed_ctx > train:
        return Decision(str(Placement.NONE), None, (), f"needs {need.needed_ctx} ctx ({need.prompt_tokens} prompt + "
                        f"{need.max_tokens} completion); {need.model} was trained for {train}", train, 400,
                        "context_length_exceeded")
    options: list[Option] = []
    if need.hint is not Hint.PEER:
        options += _reuse_options(need, local, now, calibration, queue_limit)
        options += _new_load_options(need, local, now, calibration)
    if need.hint is not Hint.LOCAL:
        options += [_peer_option(need, p, calibration) for p in peers if need.model in p.models]
    feasible = [o for o in options if o.feasible and _allowed(o, need.hint)]
    if not feasible:
        return _refusal(need, local, peers, options, ctx)
    notes = local.hardware.notes
    if need.tools and not need.local_parses_tools:
        parsing = {f"{Placement.PEER}:{p.name}" for p in peers if need.model in p.tools}
        preferred = [o for o in feasible if o.placement in parsing]
        if preferred:
            feasible = preferred
        else:
            notes = (*notes, "its engine returns tool calls as text (no engine here or on a peer parses them)")
    best_local = min((o for o in feasible if o.local), key=lambda o: o.total_s, default=None)
    best_peer = min((o for o in feasible if not o.local), key=lambda o: o.total_s, default=None)
    if best_local is not None and (best_peer is None or best_local.total_s <= best_peer.total_s * (1 + TIE_TOLERANCE)):
        chosen = best_local
    else:
        assert best_peer is not None
        chosen = best_peer
    reason = _reason(chosen, options, notes, need.prompt_tokens)
    if not chosen.local and need.tools and not need.local_parses_tools:
        reason += f"; tools: {chosen.placement} parses tool calls, this node's engine of {need.model} does not"
    return Decision(chosen.placement, chosen, tuple(options), reason, chosen.ctx)
