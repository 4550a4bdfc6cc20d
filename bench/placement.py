"""Benchmark: hybridd's placement decisions against baselines and an oracle, in one discrete-event simulation.

    .venv/bin/python bench/placement.py [--requests N] [--seed S] [--budgets]
    .venv/bin/python bench/placement.py --agents [--sessions N] [--seed S]

The trace (fixed seed) is a coding-agent workload built from the facts of DESIGN.md: GLM-4.7-Flash and
Qwen3-Coder-30B-A3B at 8k-64k context as the bread and butter, GPT-OSS-120B and Qwen3-Coder-Next requests,
occasional 128k-256k context jobs, Llama-3.1-70B rarely; Poisson arrivals with bursts (agents fanning out).
Completions run to their max_tokens; with --budgets the same requests ask for an agent's budget (8k-32k) instead
and stop where they did, so the context must hold the budget while the work is only the completion.

Hardware: the desktop-4090-5070ti profile as the local node, one dgx-spark as the peer. Each node is the daemon's own
placement state (place/state.py): a strategy's choice is committed by the same transition the daemon runs, and the
simulated engines feed it the events the daemon's router would (loaded, answered, gone). Every strategy runs in the
same simulator:
- service time of a request on an engine = prompt / prefill tok/s + completion tokens / decode tok/s at the mean
  decode context, from the engine's SpeedModel (the one the scheduler predicts with; calibration factor 1), plus
  the peer's RTT when forwarded. Speeds are predicted exactly: the comparison is of decisions, not of speed models.
  Completion lengths are not known in advance: each node expects what its daemon would, from the lengths it
  learned (place/lengths.py) from the answers it has seen end, and the backlogs it sees are the sums of those
  predictions (place/backlog.py), as in the daemon.
- an engine serves one request at a time (FIFO queue); a new engine is ready option.load_s after the engines it
  evicts are gone.
  Engines run independently (two engines on one node do not slow each other: bandwidth sharing is not modelled).
- memory is the state's Ledger; an engine is evicted at once only when idle (nothing in flight, queued, loading);
  a busy one is drained first: it takes no new request and is unloaded when its admitted work is done, and its key
  is not loaded again until then.
- the peer is a node of its own that places forwarded requests with the same scheduler (hint local, no peers).
- a refused request (503: nothing can hold it now) is retried when the next engine frees up; its completion time
  still counts from its first arrival.

Strategies:
- hybridd: `decide()` on the desktop with the Spark as a peer; the desktop sees what the daemon's capacity message
  carries (place/peer_view.py): the peer's free memory (idle engines count as free: the peer may evict them), the
  models loaded there, the work ahead on each and when each busy engine there is done.
- budget: hybridd predicting every completion at its max_tokens (as before it learned lengths).
- local: always on the desktop (`decide()` with hint local and no peer): layers/experts in RAM when needed,
  evicting least recently used idle engines.
- peer: everything forwarded to the Spark (which places it on itself with the same scheduler).
- swap: swap by model name, no memory awareness: one engine on the desktop at a time, FIFO; a request for another
  model (or a longer context) waits for the engine to drain, unloads it and loads its own model alone at its
  context bucket (offloaded to RAM when it does not fit, at the speed the speed model predicts).
- now: exact knowledge of both nodes, none of the future: per request, every option on both nodes (the oracle's
  choices below) is committed in a copy of the simulation and the one that ends this request soonest wins. The
  best a placer can do one request at a time on what is knowable now; hybridd sees the peer only through its
  capacity message and keeps ties local.
- oracle: clairvoyant rollout. For each request, every option the scheduler enumerates on the desktop and on the
  Spark (reuse each engine, new load, offloaded load, after evicting idle engines or draining busy ones) is
  committed in a copy of the simulation, the next HORIZON events (future arrivals, known to it) are played under
  hybridd's policy, and the option whose requests (this one and those) end soonest in total wins. It sees both
  nodes exactly and the future, and weighs what a choice costs the requests after it, which hybridd, deciding
  one request at a time on what it knows now, cannot. Not a proven bound (the optimum is intractable), but a
  rollout is at least as good as its base policy in practice, so it sits at or below hybridd.
- envelope (reported, not a strategy): per request the minimum completion time over all the runs above; not a
  realizable schedule, only a reference.

Prints a table (mean and p95 completion time, arrival to last token, and ratios to the oracle) and writes
bench/results/placement.json.

--agents replays a multi-turn agent trace instead (make_agent_trace): coding-agent sessions, each a main agent
whose conversation starts from a 20k-token system and tools prefix and grows 1-4k tokens a turn for 10-40 turns;
now and then it forks 1-3 sub-agents at once (their conversations start from the main agent's prefix and grow on
their own) and waits for their answers. A turn arrives when the turn before it (or the sub-agents it waits for)
has ended and the agent's tools have run (closed loop). The simulated engines hold prefixes as llama.cpp does: an
engine keeps the prompt and completion of the last request it served, and prefills only what a new prompt does not
share with it; an engine loaded anew holds nothing. Strategies: hybridd (cache-aware: each node tracks what its
engines and its peer were given, node/prefixes.py, and the scheduler predicts prefill from it), blind (the same
placer with no prefix knowledge; the engines still cache), local, peer and now (which sees the real caches).
Writes bench/results/placement-agents.json.
"""

from __future__ import annotations

import argparse
import copy
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridd.model.spec import ModelSpec, model_spec
from hybridd.node.prefixes import BLOCK_TOKENS, Fingerprint, PrefixTracker
from hybridd.place.hardware import Hardware
from hybridd.place.peer_view import peer_view
from hybridd.place.scheduler import (
    Decision,
    Hint,
    LocalState,
    Option,
    PeerState,
    RequestNeed,
    decide,
    ledger_for,
)
from hybridd.place.speed import SpeedModel
from hybridd.place.state import (
    Answered,
    EngineGone,
    EngineLoaded,
    Event,
    Evict,
    EvictionsDone,
    Observation,
    PeersReported,
    PlacementState,
    RequestArrived,
    Step,
    Ticket,
    apply,
    commit,
)
from hybridd.probe.hardware_profiles import load_hardware_profile
from hybridd.probe.model_profiles import load_profile, profile_header

HERE = Path(__file__).resolve().parent
DESKTOP = load_hardware_profile("desktop-4090-5070ti").hardware()
SPARK = load_hardware_profile("dgx-spark").hardware()
PEER_NAME = "spark"
RTT_S = 0.001
QUANTS = {"glm-4.7-flash": "Q4_K_M", "qwen3-coder-30b-a3b": "Q4_K_M", "gpt-oss-120b": "MXFP4",
          "qwen3-coder-next": "Q4_K_M", "llama-3.1-70b": "Q4_K_M"}
STRATEGIES = ("hybridd", "budget", "local", "peer", "swap", "now", "oracle")
TARGET_RATIO = 1.05
HORIZON = 16  # events the oracle plays ahead after each option
QUEUE_LIMIT = 16  # the daemon's default node.queue_limit: a full queue answers 429 (retried later here)


@cache
def spec_of(model: str) -> ModelSpec:
    header = profile_header(load_profile(model), QUANTS[model])
    return model_spec(header.metadata, header.tensors)


# --- the trace -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    """One request of the trace."""

    id: int
    arrival: float
    model: str
    prompt: int
    max_tokens: int  # the budget the client asks for: the context is sized for it
    tokens: int = 0  # what the completion really runs to; 0: the whole budget
    # the agent trace: the prompt's fingerprint, what the engine holds after serving it (prompt and completion),
    # the requests whose answers it waits for (arrival: think_s after the last of them ends), its conversation
    prompt_fp: Fingerprint | None = None
    held_fp: Fingerprint | None = None
    after: tuple[int, ...] = ()
    think_s: float = 0.0
    conversation: str = ""

    @property
    def length(self) -> int:
        return self.tokens or self.max_tokens

    def need(self, hint: Hint = Hint.AUTO, expected: int = 0) -> RequestNeed:
        """The request as the scheduler sees it, expecting `expected` completion tokens (0: the whole budget)."""
        return RequestNeed(self.model, spec_of(self.model), self.prompt, self.max_tokens, hint=hint,
                           expected_tokens=expected)


# (weight, model, prompt range, max_tokens range)
MIX: tuple[tuple[float, str, tuple[int, int], tuple[int, int]], ...] = (
    (0.38, "glm-4.7-flash", (8_000, 64_000), (300, 2_000)),
    (0.29, "qwen3-coder-30b-a3b", (8_000, 64_000), (300, 2_000)),
    (0.12, "gpt-oss-120b", (4_000, 48_000), (300, 2_000)),
    (0.12, "qwen3-coder-next", (8_000, 64_000), (300, 2_000)),
    (0.02, "glm-4.7-flash", (128_000, 190_000), (1_000, 3_000)),
    (0.02, "qwen3-coder-30b-a3b", (128_000, 250_000), (1_000, 3_000)),
    (0.03, "qwen3-coder-next", (128_000, 250_000), (1_000, 3_000)),
    (0.02, "llama-3.1-70b", (2_000, 8_000), (100, 400)),
)


# what coding agents ask for as max_tokens when they set a budget rather than a length
AGENT_BUDGETS = (8_192, 16_384, 32_000)


def make_trace(n: int = 300, seed: int = 7, mean_gap_s: float = 60.0, budgets: bool = False) -> list[Job]:
    """`n` requests: Poisson arrivals (mean gap `mean_gap_s`), one in five a burst of 3-8 within a few seconds.

    Completions run to max_tokens; with `budgets`, each request asks for an agent's budget (8k-32k) instead and
    stops where the completion would have (the same lengths, the same arrivals: only max_tokens differs)."""
    rng = random.Random(seed)
    budget_rng = random.Random(seed + 1)
    weights = [w for w, *_ in MIX]
    jobs: list[Job] = []
    t = 0.0
    while len(jobs) < n:
        t += rng.expovariate(1.0 / mean_gap_s)
        burst = rng.randint(3, 8) if rng.random() < 0.2 else 1
        _, model, (p_lo, p_hi), (m_lo, m_hi) = rng.choices(MIX, weights)[0]
        at = t
        for _ in range(burst):
            if len(jobs) >= n:
                break
            # an agent's burst: mostly the same model, similar contexts
            if rng.random() < 0.25:
                _, model, (p_lo, p_hi), (m_lo, m_hi) = rng.choices(MIX, weights)[0]
            prompt = int(math.exp(rng.uniform(math.log(p_lo), math.log(p_hi))))
            length = rng.randint(m_lo, m_hi)
            if budgets:  # clients clamp the budget to what the model's context has left
                budget = min(budget_rng.choice(AGENT_BUDGETS), spec_of(model).n_ctx_train - prompt)
                jobs.append(Job(len(jobs), round(at, 3), model, prompt, max(budget, length), length))
            else:
                jobs.append(Job(len(jobs), round(at, 3), model, prompt, length))
            at += rng.uniform(0.05, 2.0)
        t = max(t, at)
    return sorted(jobs, key=lambda j: (j.arrival, j.id))


AGENT_PREFIX_TOKENS = 20_000  # system prompt and tool definitions
AGENT_BUDGET = 8_192  # max_tokens an agent asks for; its turns stop far short of it
AGENT_MODELS = ("glm-4.7-flash", "qwen3-coder-30b-a3b")


def _conversation_fp(name: str, base: str, fork: int, tokens: int) -> Fingerprint:
    """The fingerprint of the first `tokens` tokens of conversation `name`, whose first `fork` tokens are those of
    conversation `base` (its own for a main agent): each block is named by the conversation it comes from."""
    return Fingerprint.of_blocks(
        (f"{base if (k + 1) * BLOCK_TOKENS <= fork else name}:{k}".encode() for k in range(tokens // BLOCK_TOKENS)),
        tokens)


def make_agent_trace(sessions: int = 4, seed: int = 11, turns: tuple[int, int] = (10, 40),
                     sub_turns: tuple[int, int] = (5, 15), spawn_p: float = 0.12,
                     start_gap_s: float = 45.0) -> list[Job]:
    """Agent sessions (see the module's docstring): a main agent per session, alternating GLM-4.7-Flash and
    Qwen3-Coder-30B-A3B, starting `start_gap_s` apart; its turns, and those of the sub-agents it forks."""
    rng = random.Random(seed)
    jobs: list[Job] = []

    def turn(name: str, base: str, fork: int, model: str, prompt: int, after: tuple[int, ...], think_s: float,
             arrival: float = 0.0) -> Job:
        length = rng.randint(150, 1_000)
        budget = min(AGENT_BUDGET, spec_of(model).n_ctx_train - prompt)
        job = Job(len(jobs), arrival, model, prompt, max(budget, length), length,
                  _conversation_fp(name, base, fork, prompt), _conversation_fp(name, base, fork, prompt + length),
                  after, think_s, name)
        jobs.append(job)
        return job

    for session in range(sessions):
        model = AGENT_MODELS[session % len(AGENT_MODELS)]
        main = f"s{session}"
        tokens = AGENT_PREFIX_TOKENS + rng.randint(500, 3_000)
        after: tuple[int, ...] = ()
        n_turns = rng.randint(*turns)
        for t in range(n_turns):
            job = turn(main, main, 0, model, tokens, after, rng.uniform(1.0, 8.0), session * start_gap_s)
            tokens += max(rng.randint(1_000, 4_000), job.length + 200)
            after = (job.id,)
            if t < n_turns - 1 and rng.random() < spawn_p:
                ends = []
                for sub in range(rng.randint(1, 3)):
                    name = f"{main}.{t}.{sub}"
                    sub_tokens = AGENT_PREFIX_TOKENS + rng.randint(1_000, 4_000)
                    sub_after = after
                    for _ in range(rng.randint(*sub_turns)):
                        sub_job = turn(name, main, AGENT_PREFIX_TOKENS, model, sub_tokens, sub_after,
                                       rng.uniform(0.5, 6.0))
                        sub_tokens += max(rng.randint(1_000, 4_000), sub_job.length + 200)
                        sub_after = (sub_job.id,)
                    ends.append(sub_after[0])
                    tokens += rng.randint(500, 2_000)  # its report, in the main agent's next prompt
                after = tuple(ends)
    return jobs


# --- the simulated nodes -------------------------------------------------------------------------------------


def service_s(job: Job, speed: SpeedModel, cached: int = 0) -> float:
    """Seconds an engine with `speed` takes for `job`: the scheduler's own formula (_timed) at the completion's
    real length, factor 1, prefilling what the engine does not hold (`cached` tokens of the prompt it does)."""
    position = job.prompt + job.length // 2
    return (job.prompt - cached) / speed.prefill_tok_s + job.length / speed.decode_tok_s(position)


@dataclass
class Timeline:
    """What really happens on one engine: when it is ready, when its last admitted request ends, and what its KV
    cache holds once it has (that request's prompt and completion)."""

    speed: SpeedModel
    ready_at: float
    free_at: float
    held: Fingerprint = field(default_factory=Fingerprint)


class SimNode:
    """A node: the daemon's own placement state (place/state.py), fed the events its simulated engines produce
    (loaded, answered, gone) at the times they happen, and carrying out its effects as the router does."""

    def __init__(self, hardware: Hardware, name: str, peers: tuple[str, ...] = ()) -> None:
        self.hardware = hardware
        self.name = name
        self.peers = peers
        self.tracker = PrefixTracker()  # what the node's router knows its engines and its peer were given
        self.prefilled = 0  # prompt tokens its engines prefilled
        self.cached = 0  # prompt tokens its engines found in their caches
        self.state = PlacementState.empty(hardware, queue_limit=QUEUE_LIMIT)
        self.engines: dict[str, Timeline] = {}  # engines whose process exists (or will, once their victims go)
        self.events: list[tuple[float, int, Event]] = []  # what the engines will report, by time
        self.reported = 0
        self.loads = 0

    def clone(self) -> SimNode:
        other = copy.copy(self)
        other.engines = {k: replace(t) for k, t in self.engines.items()}
        other.events = list(self.events)
        other.tracker = copy.deepcopy(self.tracker)
        return other

    def report(self, at: float, event: Event) -> None:
        self.reported += 1
        heapq.heappush(self.events, (at, self.reported, event))

    def at(self, now: float) -> None:
        """Feed the state every event that has happened by `now`."""
        while self.events and self.events[0][0] <= now:
            t, _, event = heapq.heappop(self.events)
            if isinstance(event, EngineGone):
                self.tracker.forget(event.key)
            self.state = apply(self.state, event, t).state

    def local(self, now: float) -> LocalState:
        self.at(now)
        return self.state.local(now)

    def need(self, job: Job, now: float, hint: Hint = Hint.AUTO, budgets: bool = False) -> RequestNeed:
        """`job` as this node's scheduler sees it: its length predicted from the answers this node has seen
        end (with `budgets`: at its max_tokens, as hybridd did before it learned lengths)."""
        self.at(now)
        return job.need(hint, 0 if budgets else self.state.lengths.expect(job.model, job.max_tokens))

    def prefixes(self, job: Job) -> dict[str, int]:
        """What this node's router would fill RequestNeed.cached with for `job`."""
        if job.prompt_fp is None:
            return {}
        engines = [k for k, r in self.state.engines.items() if r.model == job.model]
        return self.tracker.cached(job.prompt_fp, engines, self.peers, job.model)

    def decide(self, need: RequestNeed, now: float) -> Decision:
        return decide(need, self.local(now), (), now, self.state.calibration, QUEUE_LIMIT)

    def commit(self, decision: Decision, need: RequestNeed, job: Job, now: float,
               option: Option | None = None) -> float | None:
        """Commit `decision` (or one of its options) through the placement state and play the engines' part;
        when `job` ends, or None when the state refused it."""
        self.at(now)
        return self.carry_out(commit(self.state, need, decision, now, option), job, now)

    def carry_out(self, step: Step, job: Job, now: float) -> float | None:
        """Evict, load, run: as the router carries out a local step, with the engines' real timings."""
        self.state = step.state
        if step.ticket is None or step.ticket.engine is None:
            return None
        key = step.ticket.engine
        timeline = self.engines.get(key)
        if timeline is None:  # a new engine: it loads once the engines it evicts are gone
            start = now
            for effect in step.effects:
                if isinstance(effect, Evict):
                    for victim in effect.keys:  # a drained one goes when its admitted work is done
                        gone = max(now, self.engines.pop(victim).free_at)
                        start = max(start, gone)
                        self.report(gone, EngineGone(victim))
                    self.report(start, EvictionsDone(key))
            record = self.state.engines[key]
            ready = start + record.load_s
            timeline = self.engines[key] = Timeline(record.speed, ready, ready)
            self.report(ready, EngineLoaded(key))
            self.loads += 1
        begin = max(now, timeline.free_at)
        cached = 0
        if job.prompt_fp is not None:  # the engine's cache, as llama.cpp keeps it, and the router's record of it
            cached = min(job.prompt_fp.shared(timeline.held), job.prompt - 1)
            timeline.held = job.held_fp or Fingerprint()
            slot = self.tracker.admit(key, 1, job.prompt_fp, now)
            self.tracker.release(key, 1, slot, job.prompt_fp, now)
        self.cached += cached
        self.prefilled += job.prompt - cached
        end = timeline.free_at = begin + service_s(job, timeline.speed, cached)
        self.report(end, Answered(step.ticket, _whole(job), service_s=end - begin))
        return end

    def next_free(self, now: float) -> float | None:
        ends = [t.free_at for t in self.engines.values() if t.free_at > now]
        return min(ends) if ends else None

    def peer_state(self, model: str, now: float) -> PeerState:
        """What this node reports as a peer (place/peer_view.py, as the daemon's capacity message): free bytes
        with idle engines counted as free, the models loaded and their contexts, the work ahead on each, its busy
        engines; and the requests outstanding on engines of `model`."""
        local = self.local(now)
        view = peer_view(local, now)
        loaded: dict[str, int] = {}
        depth = 0
        for e in local.engines:
            loaded[e.model] = max(loaded.get(e.model, 0), e.ctx)
            if e.model == model:
                depth += e.in_flight + e.queued
        return PeerState(self.name, self.hardware.with_free(view.free_bytes), frozenset(QUANTS), loaded,
                         queue_depth=depth, rtt_s=RTT_S, backlog_s=view.backlog_s, draining=view.draining)


def _whole(job: Job) -> Observation:
    """The answer to `job` as the router observes it: whole, with its real length (its speed is predicted
    exactly here, so it teaches no correction)."""
    return Observation(responded=True, complete=True, completion_tokens=job.length)


# --- strategies ----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Per request: when it ended and where it ran."""

    end: dict[int, float] = field(default_factory=dict)
    where: dict[int, str] = field(default_factory=dict)
    refusals: int = 0
    stale: int = 0
    loads: int = 0
    arrival: dict[int, float] = field(default_factory=dict)  # when each arrived (closed-loop turns: at run time)
    prefilled: int = 0  # prompt tokens prefilled, over both nodes
    cached: int = 0  # prompt tokens found in engines' caches


Placed = tuple[float, str] | None  # (end, placement), or None: refused, retry later


def _candidates(node: SimNode, need: RequestNeed, now: float) -> list[tuple[Decision, Option]]:
    """Every feasible option of `node` for a request that can be committed now (the oracle's choices there)."""
    d = node.decide(replace(need, hint=Hint.LOCAL), now)
    return [(d, o) for o in d.options if o.feasible and (o.engine is not None or o.engine_key not in node.engines)]


class Sim:
    """One replay of a trace under a strategy: both nodes, the events still to come, the outcome so far."""

    def __init__(self, strategy: str, jobs: Sequence[Job], horizon: int = HORIZON) -> None:
        self.strategy = strategy
        self.horizon = horizon
        self.jobs = {j.id: j for j in jobs}
        self.desktop = SimNode(DESKTOP, "local", (PEER_NAME,))
        self.spark = SimNode(SPARK, PEER_NAME)
        self.out = Outcome()
        self.swap_engine: tuple[str, int, SpeedModel, str] | None = None
        self.swap_free_at = 0.0
        # arrivals (a turn that waits for answers arrives once they have ended), then retries of refused requests
        self.events = [(j.arrival, j.id) for j in jobs if not j.after]
        heapq.heapify(self.events)
        self.out.arrival = {j.id: j.arrival for j in jobs if not j.after}
        self.dependents: dict[int, list[int]] = {}
        for j in jobs:
            for before in j.after:
                self.dependents.setdefault(before, []).append(j.id)
        self.waiting = {j.id: len(j.after) for j in jobs if j.after}  # answers each turn still waits for
        self.ready = {j.id: 0.0 for j in jobs if j.after}  # when the last of them ended

    def clone(self, strategy: str) -> Sim:
        other = copy.copy(self)
        other.strategy = strategy
        other.desktop, other.spark = self.desktop.clone(), self.spark.clone()
        other.out = Outcome(dict(self.out.end), dict(self.out.where), self.out.refusals, self.out.stale,
                            arrival=dict(self.out.arrival))
        other.events = list(self.events)
        other.waiting, other.ready = dict(self.waiting), dict(self.ready)
        return other

    def need(self, node: SimNode, job: Job, now: float, hint: Hint = Hint.AUTO) -> RequestNeed:
        need = node.need(job, now, hint, budgets=self.strategy == "budget")
        return need if self.strategy == "blind" else replace(need, cached=node.prefixes(job))

    def run(self) -> Outcome:
        while self.events:
            self.step()
        self.out.loads += self.desktop.loads + self.spark.loads
        self.out.prefilled = self.desktop.prefilled + self.spark.prefilled
        self.out.cached = self.desktop.cached + self.spark.cached
        return self.out

    def ended(self, jid: int, end: float, where: str) -> None:
        """Request `jid` ends at `end`: the turns that waited for it arrive once their tools have run."""
        self.out.end[jid], self.out.where[jid] = end, where
        for later in self.dependents.get(jid, ()):
            self.waiting[later] -= 1
            self.ready[later] = max(self.ready[later], end)
            if self.waiting[later] == 0:
                at = self.ready[later] + self.jobs[later].think_s
                self.out.arrival[later] = at
                heapq.heappush(self.events, (at, later))

    def step(self) -> float:
        """Place the next event's request (or schedule its retry); returns the event's time."""
        now, jid = heapq.heappop(self.events)
        job = self.jobs[jid]
        placed = getattr(self, f"_{self.strategy}")(job, now)
        if placed is None:
            self.out.refusals += 1
            frees = [t for t in (self.desktop.next_free(now), self.spark.next_free(now)) if t is not None]
            if not frees:  # nothing running that could make room: it never fits
                raise RuntimeError(f"{self.strategy}: request {jid} ({job.model}, {job.prompt} + {job.max_tokens} "
                                   "tokens) cannot be placed even on idle nodes")
            heapq.heappush(self.events, (min(frees), jid))
        else:
            self.ended(jid, *placed)
        return now

    def _on_peer(self, job: Job, now: float, ticket: Ticket | None = None) -> Placed:
        """The Spark places the forwarded request itself (hint local, no peers), as its daemon would; the desktop
        learns from the answer when it ends."""
        need = self.need(self.spark, job, now + RTT_S, Hint.LOCAL)
        d = self.spark.decide(need, now + RTT_S)
        end = None if d.chosen is None else self.spark.commit(d, need, job, now + RTT_S)
        return self._forwarded(job, now, end, ticket)

    def _forwarded(self, job: Job, now: float, end: float | None, ticket: Ticket | None = None) -> Placed:
        ticket = ticket or Ticket(job.model, job.max_tokens, now, peer=PEER_NAME)
        if end is None:  # the peer answered 503: the client retries later
            self.desktop.report(now, Answered(ticket, Observation(responded=True)))
            return None
        if job.prompt_fp is not None:
            self.desktop.tracker.forwarded(PEER_NAME, job.model, job.prompt_fp)
        self.desktop.report(end + RTT_S, Answered(ticket, _whole(job)))
        return end + RTT_S, f"peer:{PEER_NAME}"

    def _commit(self, node: SimNode, decision: Decision, option: Option, job: Job, now: float) -> Placed:
        if node is self.spark:
            need = self.need(self.spark, job, now + RTT_S)
            return self._forwarded(job, now, node.commit(decision, need, job, now + RTT_S, option))
        end = node.commit(decision, self.need(node, job, now), job, now, option)
        if end is None:
            self.out.stale += 1
        return None if end is None else (end, option.placement)

    def _hybridd(self, job: Job, now: float) -> Placed:
        desktop = self.desktop
        desktop.at(now)
        desktop.state = apply(desktop.state, PeersReported({PEER_NAME: self.spark.peer_state(job.model, now)}),
                              now).state
        step = apply(desktop.state, RequestArrived(self.need(desktop, job, now)), now)
        if step.ticket is not None and step.ticket.peer is not None:
            desktop.state = step.state
            return self._on_peer(job, now, step.ticket)
        end = desktop.carry_out(step, job, now)
        return None if end is None else (end, step.decision.placement if step.decision else "local")

    _budget = _hybridd  # the same placer, predicting every completion at its max_tokens (see need())
    _blind = _hybridd  # the same placer, told nothing of what engines hold (see need())

    def _local(self, job: Job, now: float) -> Placed:
        need = self.need(self.desktop, job, now, Hint.LOCAL)
        d = self.desktop.decide(need, now)
        return None if d.chosen is None else self._commit(self.desktop, d, d.chosen, job, now)

    def _peer(self, job: Job, now: float) -> Placed:
        return self._on_peer(job, now)

    def _swap(self, job: Job, now: float) -> Placed:
        current = self.swap_engine
        start = max(now, self.swap_free_at)
        if current is None or current[0] != job.model or current[1] < job.prompt + job.max_tokens:
            # alone on an idle desktop: the scheduler's own load (all on GPUs, else part in RAM) and its speed
            d = decide(job.need(Hint.LOCAL), LocalState(DESKTOP, ledger_for(DESKTOP)), (), start)
            if d.chosen is None:
                return self._on_peer(job, now)  # fits nowhere locally even alone
            o = d.chosen
            assert o.speed is not None
            current = self.swap_engine = (job.model, o.ctx, o.speed, o.placement)
            start += o.load_s
            self.out.loads += 1
        self.swap_free_at = start + service_s(job, current[2])
        return self.swap_free_at, current[3]

    def _oracle(self, job: Job, now: float) -> Placed:
        """Clairvoyant rollout: try every option on both nodes, play the next `horizon` events (future arrivals
        known) under hybridd's policy after each, keep the option whose requests end soonest in total."""
        return self._best(job, now, self.horizon)

    def _now(self, job: Job, now: float) -> Placed:
        """Exact knowledge of both nodes, none of the future: the option on either node that ends `job` first."""
        return self._best(job, now, 0)

    def _best(self, job: Job, now: float, horizon: int) -> Placed:
        choices = [(True, d, o) for d, o in _candidates(self.desktop, self.need(self.desktop, job, now), now)]
        choices += [(False, d, o) for d, o in _candidates(self.spark, self.need(self.spark, job, now + RTT_S),
                                                          now + RTT_S)]
        if len(choices) > 1:
            choices.sort(key=lambda c: self._rollout(job, now, c[0], c[1], c[2], horizon))
        if not choices:
            return None
        on_desktop, decision, option = choices[0]
        return self._commit(self.desktop if on_desktop else self.spark, decision, option, job, now)

    def _rollout(self, job: Job, now: float, on_desktop: bool, decision: Decision, option: Option,
                 horizon: int) -> float:
        sim = self.clone("hybridd")
        placed = sim._commit(sim.desktop if on_desktop else sim.spark, decision, option, job, now)
        if placed is None:
            return math.inf
        sim.ended(job.id, *placed)
        watched = [job.id] + [jid for _, jid in heapq.nsmallest(horizon, sim.events)]
        clock = now
        for _ in range(4 * horizon):
            if not sim.events or all(i in sim.out.end for i in watched):
                break
            clock = sim.step()
        # a request still refused at the end of the rollout has waited at least until then
        return sum(sim.out.end.get(i, clock) - sim.out.arrival.get(i, clock) for i in watched)


def simulate(strategy: str, jobs: Sequence[Job], horizon: int = HORIZON) -> Outcome:
    """Replay `jobs` under `strategy`; every request ends (refusals are retried when an engine frees up)."""
    return Sim(strategy, jobs, horizon).run()


# --- report --------------------------------------------------------------------------------------------------


def p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def summarize(jobs: Sequence[Job], outcomes: dict[str, Outcome],
              reference: str = "oracle") -> dict[str, dict[str, object]]:
    times = {name: [o.end[j.id] - o.arrival.get(j.id, j.arrival) for j in jobs] for name, o in outcomes.items()}
    times["envelope"] = [min(t[i] for t in times.values()) for i in range(len(jobs))]
    ref_mean, ref_p95 = statistics.fmean(times[reference]), p95(times[reference])
    env_mean, env_p95 = statistics.fmean(times["envelope"]), p95(times["envelope"])
    rows: dict[str, dict[str, object]] = {}
    for name, t in times.items():
        mean, tail = statistics.fmean(t), p95(t)
        row: dict[str, object] = {"mean_s": round(mean, 2), "p95_s": round(tail, 2),
                                  "mean_ratio": round(mean / ref_mean, 4), "p95_ratio": round(tail / ref_p95, 4),
                                  "mean_vs_envelope": round(mean / env_mean, 4),
                                  "p95_vs_envelope": round(tail / env_p95, 4)}
        if name in outcomes:
            o = outcomes[name]
            counts: dict[str, int] = {}
            for w in o.where.values():
                counts[w] = counts.get(w, 0) + 1
            row.update(placements=dict(sorted(counts.items())), loads=o.loads, refusals=o.refusals, stale=o.stale)
            if o.cached or o.prefilled:
                row.update(prefilled_tokens=o.prefilled, cached_tokens=o.cached)
        rows[name] = row
    return rows


def run(n: int = 300, seed: int = 7, budgets: bool = False) -> dict[str, object]:
    jobs = make_trace(n, seed, budgets=budgets)
    started = time.perf_counter()
    outcomes = {s: simulate(s, jobs) for s in STRATEGIES}
    rows = summarize(jobs, outcomes)
    h = rows["hybridd"]
    baselines = ("local", "peer", "swap")
    mix: dict[str, int] = {}
    for j in jobs:
        key = f"{j.model}{' long' if j.prompt >= 100_000 else ''}"
        mix[key] = mix.get(key, 0) + 1
    return {
        "trace": {"requests": n, "seed": seed, "span_s": round(jobs[-1].arrival, 1), "mix": dict(sorted(mix.items())),
                  "max_tokens": "agent budgets 8k-32k, completions shorter" if budgets else "the completion's length",
                  "quants": QUANTS, "local": DESKTOP.name, "peer": SPARK.name},
        "results": rows,
        "targets": {
            "within_5pct_of_oracle_mean": float(h["mean_ratio"]) <= TARGET_RATIO,  # type: ignore[arg-type]
            "within_5pct_of_oracle_p95": float(h["p95_ratio"]) <= TARGET_RATIO,  # type: ignore[arg-type]
            "better_than_every_baseline_mean": all(
                float(h["mean_s"]) < float(rows[b]["mean_s"]) for b in baselines),  # type: ignore[arg-type]
            "better_than_every_baseline_p95": all(
                float(h["p95_s"]) < float(rows[b]["p95_s"]) for b in baselines),  # type: ignore[arg-type]
        },
        "oracle": f"clairvoyant rollout: per request, every option on both nodes is tried in a copy of the "
                  f"simulation and the next {HORIZON} events (future arrivals known) played under hybridd's policy; "
                  f"the option with the least total completion time wins. now = the same choices, each request on "
                  f"the option that ends it first, with both nodes known exactly but not the future. envelope = "
                  f"per-request minimum over all runs (not a realizable schedule)",
        "sim_seconds": round(time.perf_counter() - started, 2),
    }


AGENT_STRATEGIES = ("hybridd", "blind", "local", "peer", "now")


def run_agents(sessions: int = 4, seed: int = 11, oracle: bool = False) -> dict[str, object]:
    """The multi-turn agent trace under each strategy (the oracle too when asked: it takes minutes)."""
    jobs = make_agent_trace(sessions, seed)
    started = time.perf_counter()
    strategies = (*AGENT_STRATEGIES, "oracle") if oracle else AGENT_STRATEGIES
    outcomes = {s: simulate(s, jobs) for s in strategies}
    rows = summarize(jobs, outcomes, "oracle" if oracle else "now")
    aware, blind = rows["hybridd"], rows["blind"]
    conversations = {j.conversation for j in jobs}
    return {
        "trace": {"sessions": sessions, "seed": seed, "requests": len(jobs),
                  "conversations": len(conversations),
                  "sub_agents": sum(1 for c in conversations if "." in c),
                  "prompt_tokens": {"min": min(j.prompt for j in jobs), "max": max(j.prompt for j in jobs),
                                    "mean": round(statistics.fmean(j.prompt for j in jobs))},
                  "models": sorted({j.model for j in jobs}), "quants": QUANTS, "local": DESKTOP.name,
                  "peer": SPARK.name, "prefix_tokens": AGENT_PREFIX_TOKENS, "max_tokens": AGENT_BUDGET},
        "results": rows,
        "reference": "oracle" if oracle else "now (ratios are to it)",
        "targets": {
            "cache_aware_beats_blind_mean": float(aware["mean_s"]) < float(blind["mean_s"]),  # type: ignore[arg-type]
            "cache_aware_beats_blind_p95": float(aware["p95_s"]) < float(blind["p95_s"]),  # type: ignore[arg-type]
        },
        "sim_seconds": round(time.perf_counter() - started, 2),
    }


def _print(result: dict[str, object], reference: str) -> None:
    rows = result["results"]
    assert isinstance(rows, dict)
    print(f"{'strategy':<10} {'mean s':>9} {'p95 s':>9} {f'mean/{reference}':>12} {f'p95/{reference}':>11} "
          f"{'mean/env':>9} {'p95/env':>8}  placements")
    for name, r in rows.items():
        print(f"{name:<10} {r['mean_s']:>9.1f} {r['p95_s']:>9.1f} {r['mean_ratio']:>12.3f} {r['p95_ratio']:>11.3f} "
              f"{r['mean_vs_envelope']:>9.3f} {r['p95_vs_envelope']:>8.3f}  "
              f"{r.get('placements', '')} {r.get('cached_tokens', '')}")
    print(f"targets: {result['targets']} (simulated in {result['sim_seconds']} s)")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--budgets", action="store_true",
                    help="requests ask for an agent's budget (8k-32k max_tokens) and stop far short of it")
    ap.add_argument("--agents", action="store_true",
                    help="the multi-turn agent trace: cache-aware placement against the same placer blind to prefixes")
    ap.add_argument("--sessions", type=int, default=4, help="agent sessions in the --agents trace")
    ap.add_argument("--oracle", action="store_true", help="with --agents: the clairvoyant oracle too (slow)")
    ap.add_argument("--out", type=Path, help="default: bench/results/placement[-budgets|-agents].json")
    args = ap.parse_args(argv)
    if args.agents:
        seed = 11 if args.seed == 7 else args.seed
        agents = run_agents(args.sessions, seed, args.oracle)
        print(f"agent trace: {agents['trace']}")
        _print(agents, "oracle" if args.oracle else "now")
        out = args.out or HERE / "results" / "placement-agents.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(agents, indent=2) + "\n")
        return 0
    out = args.out or HERE / "results" / f"placement{'-budgets' if args.budgets else ''}.json"
    result = run(args.requests, args.seed, args.budgets)
    trace = result["trace"]
    assert isinstance(trace, dict)
    print(f"trace: {trace['requests']} requests over {trace['span_s']} s, seed {trace['seed']}: {trace['mix']}")
    print(f"{'strategy':<10} {'mean s':>9} {'p95 s':>9} {'mean/oracle':>12} {'p95/oracle':>11} {'mean/env':>9} "
          f"{'p95/env':>8}  placements")
    rows = result["results"]
    assert isinstance(rows, dict)
    for name, r in rows.items():
        print(f"{name:<10} {r['mean_s']:>9.1f} {r['p95_s']:>9.1f} {r['mean_ratio']:>12.3f} {r['p95_ratio']:>11.3f} "
              f"{r['mean_vs_envelope']:>9.3f} {r['p95_vs_envelope']:>8.3f}  "
              f"{r.get('placements', '')}")
    print(f"targets: {result['targets']} (simulated in {result['sim_seconds']} s)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
