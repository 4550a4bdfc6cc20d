"""The placement state and every change to it: events in, a new state and effects out (pure; `now` is an argument).

After llama-swap's scheduler: the async side (node/router.py) feeds what happened and carries out what this module
returns; it holds no placement fact of its own. The bench's simulator (bench/placement.py) drives the same
functions, so what it measures is what the daemon does.

    events                                   effects
    RequestArrived(need)          ──▶  decide, reserve ──▶  Refuse | Forward | Evict?, Load?, Admit
    PeerOnlyArrived(model)        ──▶                  ──▶  Refuse | Forward
    EngineLoaded(key)                   its engine answers requests now
    EngineDown(key)                     stopping or died with requests waiting: they wait for a reload
    EngineGone(key)                     its process is gone and nothing waits: its bytes are free
    EvictionsDone(key)                  the engines its load waited for are gone (or will be: it may start)
    Answered(ticket, observation)       a request ended: its engine's queue, speed, the model's answer length,
                                        the peer's breaker
    PeersReported(peers)                the peers as their links last described them
    PeerFailed(name)                    a forward failed before its first byte
    TrainingArrived(key, device, bytes) ──▶  reserve, evicting idle engines ──▶  Evict?, Train | Hold
    TrainingEnded(key)                  the fine-tune's process is gone: its bytes are free

Between a decision and its reservation nothing else happens (both are one RequestArrived), so two requests can
never both take the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from hybridd.place.backlog import Backlog
from hybridd.place.breaker import Breaker
from hybridd.place.hardware import Hardware
from hybridd.place.ledger import Ledger
from hybridd.place.lengths import CompletionLengths
from hybridd.place.scheduler import (
    LOCAL_NODE,
    TRAINING_PREFIX,
    Decision,
    EngineState,
    LocalState,
    Option,
    PeerState,
    Placement,
    RequestNeed,
    decide,
    ledger_for,
)
from hybridd.place.speed import Calibration, SpeedModel

# Mean seconds per request: weight of the newest complete answer.
REQUEST_S_ALPHA = 0.2
# How soon a client refused for lack of a live peer should try again.
NO_PEER_RETRY_S = 5.0


# --- what placement knows -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineRecord:
    """One local engine as placement knows it: what it was placed with and the work admitted to it."""

    key: str
    model: str
    ctx: int
    placement: Placement
    speed: SpeedModel
    base_tok_s: float  # its decode prediction before the online correction (what Calibration.observe compares to)
    load_s: float  # predicted seconds of a (re)load
    ready_at: float  # predicted end of its load, or of the reload it needs
    request_s: float  # mean seconds a request holds it (predicted at first, then from complete answers)
    backlog: Backlog = field(default_factory=Backlog)  # its slots are the engine's
    loaded: bool = False  # its engine is up: an EngineLoaded came and nothing since took it down
    leaving: bool = False  # being evicted: its bytes are promised to another engine
    pending: bool = False  # its load waits for evictions: it has no process yet
    last_used: float = 0.0

    def view(self, now: float) -> EngineState:
        """The engine as the scheduler weighs it; it runs as many requests at once as it has slots, the rest of
        its admitted requests wait inside it."""
        admitted = len(self.backlog)
        running = min(admitted, self.backlog.slots) if self.loaded else 0
        return EngineState(
            key=self.key, model=self.model, ctx=self.ctx, speed=self.speed, placement=self.placement,
            in_flight=running, queued=admitted - running, last_used=self.last_used, loading=not self.loaded,
            ready_at=self.ready_at, request_s=self.request_s, backlog_s=self.backlog.wait(now),
            slots=self.backlog.slots, drain_s=self.backlog.seconds(now),
        )


@dataclass(frozen=True, slots=True)
class PlacementState:
    """Everything placement decides on: this node's memory and engines, its peers, what it has learned."""

    hardware: Hardware
    ledger: Ledger  # never changed in place: a transition that reserves or releases works on a copy
    node: str = LOCAL_NODE
    queue_limit: int | None = None
    engines: Mapping[str, EngineRecord] = field(default_factory=dict)
    peers: Mapping[str, PeerState] = field(default_factory=dict)
    breakers: Mapping[str, Breaker] = field(default_factory=dict)
    lengths: CompletionLengths = field(default_factory=CompletionLengths)
    calibration: Calibration = field(default_factory=Calibration)

    @classmethod
    def empty(cls, hardware: Hardware, node: str = LOCAL_NODE, queue_limit: int | None = None) -> PlacementState:
        """A node with nothing loaded: the whole usable memory of `hardware` free."""
        return cls(hardware, ledger_for(hardware), node, queue_limit)

    def local(self, now: float) -> LocalState:
        """This node as the scheduler sees it at `now`; engines being evicted are on their way out."""
        return LocalState(self.hardware, self.ledger,
                          tuple(r.view(now) for r in self.engines.values() if not r.leaving), node=self.node,
                          leaving=frozenset(k for k, r in self.engines.items() if r.leaving))

    def peer_states(self, now: float, exclude: frozenset[str] = frozenset()) -> list[PeerState]:
        """The peers the scheduler may use; one whose breaker is open counts as down."""
        return [replace(p, up=p.up and self.breaker(name).allows(now))
                for name, p in self.peers.items() if name not in exclude]

    def breaker(self, peer: str) -> Breaker:
        """The peer's circuit breaker (closed for a peer that never failed)."""
        return self.breakers.get(peer, Breaker())


# --- events ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestArrived:
    """A request to place; `exclude`: peers that already failed it before their first byte."""

    need: RequestNeed
    exclude: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PeerOnlyArrived:
    """A request for a model only peers know (no header here to size it by): it goes to the least busy one."""

    model: str
    budget: int
    exclude: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class EngineLoaded:
    key: str


@dataclass(frozen=True, slots=True)
class EngineDown:
    """The engine stopped or died while requests wait for it: it must load again before they run."""

    key: str


@dataclass(frozen=True, slots=True)
class EngineGone:
    """The engine's process is gone (or never started) and nothing waits for it."""

    key: str


@dataclass(frozen=True, slots=True)
class EvictionsDone:
    """The evictions the load of `key` waited for are over."""

    key: str


@dataclass(frozen=True, slots=True)
class Observation:
    """What one answer showed: whether the upstream answered, whether it came whole, how long and how fast."""

    responded: bool = False  # a status line came back, whatever followed
    complete: bool = False  # a 200 read to its end, or a stream up to [DONE]
    completion_tokens: int = 0  # 0: unknown
    decode_tok_s: float | None = None  # measured over the stream; None: too short to time
    first_token_s: float | None = None  # from sending the request to the stream's first event; None: not streamed


NO_ANSWER = Observation()


@dataclass(frozen=True, slots=True)
class Ticket:
    """What a placed request holds until it is answered: where it went, its budget, when it was placed."""

    model: str
    budget: int
    at: float
    engine: str | None = None  # a local engine's key
    peer: str | None = None


@dataclass(frozen=True, slots=True)
class Answered:
    """A request ended. `service_s`: seconds it held its engine once the engine was ready (None: not local)."""

    ticket: Ticket
    observation: Observation
    service_s: float | None = None


@dataclass(frozen=True, slots=True)
class PeersReported:
    peers: Mapping[str, PeerState]


@dataclass(frozen=True, slots=True)
class PeerFailed:
    name: str


@dataclass(frozen=True, slots=True)
class TrainingArrived:
    """A fine-tune asks for `need_bytes` on one device (a training job is never split across devices)."""

    key: str  # TRAINING_PREFIX + the job id
    device: str
    need_bytes: int


@dataclass(frozen=True, slots=True)
class TrainingEnded:
    """The fine-tune's trainer exited (or never started): what it held is free."""

    key: str


Event = (RequestArrived | PeerOnlyArrived | EngineLoaded | EngineDown | EngineGone | EvictionsDone | Answered
         | PeersReported | PeerFailed | TrainingArrived | TrainingEnded)


# --- effects ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer the client with this status, code and reason (Retry-After when given)."""

    status: int
    code: str
    reason: str
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request to the peer `name`."""

    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Evict:
    """Unload `keys` (those in `drain` once their admitted requests are done), then report EvictionsDone(for_key)."""

    keys: tuple[str, ...]
    drain: tuple[str, ...]
    for_key: str
    why: str


@dataclass(frozen=True, slots=True)
class Load:
    """Make engine `key` for `model` at `ctx`; `gpu_layers` None: as the model is configured."""

    key: str
    model: str
    ctx: int
    gpu_layers: int | None
    placement: Placement


@dataclass(frozen=True, slots=True)
class Admit:
    """Run the request on engine `key` (loading it first if it is not up). Once the engine is up, its first token
    is predicted `first_token_s` after the request is sent (its queue there, its prefill), its last `answer_s`."""

    key: str
    reason: str
    first_token_s: float = 0.0
    answer_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Train:
    """Start the fine-tune `key`: its bytes are reserved (after the Evict before it, if any)."""

    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class Hold:
    """The fine-tune `key` cannot start now (busy engines or other jobs hold the memory); ask again later."""

    key: str
    reason: str


Effect = Refuse | Forward | Evict | Load | Admit | Train | Hold


@dataclass(frozen=True, slots=True)
class Step:
    """What one event led to: the new state, the effects to carry out, and for a request its decision and ticket."""

    state: PlacementState
    effects: tuple[Effect, ...] = ()
    decision: Decision | None = None
    ticket: Ticket | None = None


# --- transitions -----------------------------------------------------------------------------------------------


def apply(state: PlacementState, event: Event, now: float) -> Step:
    """The state after `event` at `now`, and what to do about it."""
    match event:
        case RequestArrived(need, exclude):
            decision = decide(need, state.local(now), state.peer_states(now, exclude), now, state.calibration,
                              state.queue_limit)
            return commit(state, need, decision, now)
        case PeerOnlyArrived():
            return _peer_only(state, event, now)
        case Answered():
            return Step(_answered(state, event, now))
        case PeersReported(peers):
            return Step(replace(state, peers=dict(peers)))
        case PeerFailed(name):
            return Step(_with_breaker(state, name, state.breaker(name).on_failure(now)))
        case EngineLoaded(key):
            return Step(_with_engine(state, key, loaded=True, last_used=now))
        case EngineDown(key):
            record = state.engines.get(key)
            return Step(state if record is None else
                        _with_engine(state, key, loaded=False, ready_at=now + record.load_s))
        case EngineGone(key):
            return Step(_gone(state, key))
        case EvictionsDone(key):
            return Step(_with_engine(state, key, pending=False))
        case TrainingArrived():
            return _training(state, event)
        case TrainingEnded(key):
            ledger = state.ledger.copy()
            ledger.release(key)
            return Step(replace(state, ledger=ledger))
    raise TypeError(f"not a placement event: {event!r}")


def commit(state: PlacementState, need: RequestNeed, decision: Decision, now: float,
           option: Option | None = None) -> Step:
    """Carry out `decision` (or, for what-if planning, one of its options): admit the request to the engine it
    reuses, or evict, reserve and load a new one; forward it; or refuse it."""
    option = option or decision.chosen
    if option is None:
        refusal = Refuse(decision.status, decision.code, decision.reason, decision.retry_after_s)
        return Step(state, (refusal,), decision)
    service_s = option.prefill_s + option.decode_s
    if not option.local:
        name = option.placement.removeprefix(f"{Placement.PEER}:")
        state = _with_breaker(state, name, state.breaker(name).on_attempt(now))
        return Step(state, (Forward(name, decision.reason),), decision,
                    Ticket(need.model, need.max_tokens, now, peer=name))
    if option.engine is not None:
        record = state.engines[option.engine]
        state = _with_engine(state, record.key, backlog=record.backlog.admit(service_s, now, record.ready_at))
        first = option.wait_s + option.prefill_s
        return Step(state, (Admit(record.key, decision.reason, first, first + option.decode_s),), decision,
                    Ticket(need.model, need.max_tokens, now, engine=record.key))
    key = option.engine_key
    assert key is not None and option.speed is not None
    ledger = state.ledger.copy()
    engines = dict(state.engines)
    for victim in option.evict:
        ledger.release(victim)
        engines[victim] = replace(engines[victim], leaving=True)
    if key in engines or not ledger.reserve(key, option.reserve):
        stale = Refuse(503, "capacity_busy", f"{decision.reason}; its memory was taken meanwhile", 1.0)
        return Step(state, (stale,), decision)
    # A load after a drain starts once the drained engines are done.
    ready_at = now + option.wait_s + option.load_s
    engines[key] = EngineRecord(
        key, need.model, option.ctx, Placement(option.placement), option.speed, option.base_tok_s, option.load_s,
        ready_at, service_s, Backlog(slots=need.slots).admit(service_s, now, ready_at), pending=bool(option.evict),
        last_used=now)
    cpu_layers = max(option.offload_layers, option.n_cpu_moe)
    # llama-cpp-python has no --n-cpu-moe: whole layers go to RAM instead (more bytes off the GPU, never fewer,
    # so the reservation still holds).
    gpu_layers = max(0, len(need.spec.layers) - cpu_layers) if cpu_layers else None
    effects: list[Effect] = [Load(key, need.model, option.ctx, gpu_layers, Placement(option.placement))]
    if option.evict:
        why = f"evicted to make room for {need.model} at {option.ctx} ctx"
        effects.append(Evict(option.evict, option.drain, key, why))
    effects.append(Admit(key, decision.reason, option.prefill_s, service_s))  # its wait is before the load
    return Step(replace(state, ledger=ledger, engines=engines), tuple(effects), decision,
                Ticket(need.model, need.max_tokens, now, engine=key))


def _peer_only(state: PlacementState, event: PeerOnlyArrived, now: float) -> Step:
    serving = [p for p in state.peer_states(now, event.exclude) if event.model in p.models]
    up = [p for p in serving if p.up]
    asleep = [p for p in serving if not p.up and p.wakeable]
    if not up and not asleep:
        return Step(state, (Refuse(503, "capacity_busy", f"no peer serving '{event.model}' is up", NO_PEER_RETRY_S),))
    # none up: the one that wakes soonest (the router wakes it, then forwards)
    peer = min(up, key=lambda p: p.queue_depth) if up else min(asleep, key=lambda p: p.wake_s)
    state = _with_breaker(state, peer.name, state.breaker(peer.name).on_attempt(now))
    reason = f"peer:{peer.name}: only {peer.name} serves '{event.model}'"
    if not peer.up:
        reason += f", waking {peer.name} (~{peer.wake_s:.0f} s)"
    return Step(state, (Forward(peer.name, reason),), None, Ticket(event.model, event.budget, now, peer=peer.name))


def _training(state: PlacementState, event: TrainingArrived) -> Step:
    """Reserve a fine-tune's bytes on its device: from what is free, else by evicting idle engines there (least
    recently used first), else Hold. A running engine is never stopped for a fine-tune: the job waits for it."""
    key, device, need = event.key, event.device, event.need_bytes
    if key in state.ledger.keys:
        return Step(state, (Train(key, "its memory is already reserved"),))
    ledger = state.ledger.copy()
    idle = sorted((r for r in state.engines.values()
                   if not r.leaving and not r.pending and not r.backlog and device in state.ledger.held(r.key)),
                  key=lambda r: (r.last_used, r.key))
    victims: list[str] = []
    for record in [None, *idle]:
        if record is not None:
            victims.append(record.key)
            ledger.release(record.key)
        if ledger.reserve(key, {device: need}):
            engines = {k: replace(r, leaving=True) if k in victims else r for k, r in state.engines.items()}
            freed = f", evicting {', '.join(victims)}" if victims else ""
            reason = f"reserved {_gib(need)} on {device}{freed}"
            effects: tuple[Effect, ...] = (Train(key, reason),)
            if victims:
                effects = (Evict(tuple(victims), (), key, f"evicted to make room for fine-tune {key}"), *effects)
            return Step(replace(state, ledger=ledger, engines=engines), effects)
    busy = sum(state.ledger.held(r.key).get(device, 0) for r in state.engines.values() if r.key not in victims)
    jobs = sum(state.ledger.held(k).get(device, 0) for k in state.ledger.keys if k.startswith(TRAINING_PREFIX))
    reason = (f"waits for memory: needs {_gib(need)} on {device}, {_gib(state.ledger.free_bytes(device))} free; "
              f"busy engines hold {_gib(busy)} and other fine-tunes {_gib(jobs)}")
    return Step(state, (Hold(key, reason),))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _answered(state: PlacementState, event: Answered, now: float) -> PlacementState:
    """Fold one ended request in: its engine's queue moves on; a stream long enough to time corrects the engine's
    speed; an answer that came whole says how long the model's answers run and how long a request takes. An
    answer cut short (the client left, the upstream broke) teaches neither."""
    ticket, seen = event.ticket, event.observation
    if ticket.peer is not None:
        breaker = state.breaker(ticket.peer)
        state = _with_breaker(state, ticket.peer, breaker.on_success() if seen.responded else breaker.on_abandoned())
    record = state.engines.get(ticket.engine) if ticket.engine is not None else None
    if record is not None:
        request_s = record.request_s
        if seen.complete and event.service_s is not None:
            request_s = (1 - REQUEST_S_ALPHA) * request_s + REQUEST_S_ALPHA * event.service_s
        state = _with_engine(state, record.key, backlog=record.backlog.done(now), last_used=now, request_s=request_s)
        if seen.decode_tok_s is not None and record.base_tok_s > 0:
            state = replace(state, calibration=state.calibration.observe(state.node, ticket.model, record.base_tok_s,
                                                                         seen.decode_tok_s))
    if seen.complete:
        state = replace(state, lengths=state.lengths.observe(ticket.model, seen.completion_tokens, ticket.budget))
    return state


def _gone(state: PlacementState, key: str) -> PlacementState:
    if key not in state.engines:
        return state
    ledger = state.ledger.copy()
    ledger.release(key)
    return replace(state, ledger=ledger, engines={k: r for k, r in state.engines.items() if k != key})


def _with_engine(state: PlacementState, key: str, **changes: object) -> PlacementState:
    record = state.engines.get(key)
    if record is None:  # an event about an engine already gone (its requests may end after it)
        return state
    return replace(state, engines={**state.engines, key: replace(record, **changes)})  # type: ignore[arg-type]


def _with_breaker(state: PlacementState, peer: str, breaker: Breaker) -> PlacementState:
    return replace(state, breakers={**state.breakers, peer: breaker})
