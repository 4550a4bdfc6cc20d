"""The placement state's transitions: events in, a new state and effects out, on a fake clock (no I/O)."""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import pytest

from hybridd.model.spec import ModelSpec, model_spec
from hybridd.place.scheduler import PeerState, RequestNeed
from hybridd.place.state import (
    NO_ANSWER,
    Admit,
    Answered,
    EngineDown,
    EngineGone,
    EngineLoaded,
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
    Train,
    TrainingArrived,
    TrainingEnded,
    apply,
)
from hybridd.probe.hardware_profiles import load_hardware_profile
from hybridd.probe.model_profiles import load_profile, profile_header

DESKTOP = load_hardware_profile("desktop-4090-5070ti").hardware()
SPARK = load_hardware_profile("dgx-spark").hardware()
WHOLE = Observation(responded=True, complete=True, completion_tokens=300, decode_tok_s=50.0)


@cache
def spec_of(name: str, quant: str | None = None) -> ModelSpec:
    header = profile_header(load_profile(name), quant)
    return model_spec(header.metadata, header.tensors)


def glm(prompt: int = 2000, max_tokens: int = 1000) -> RequestNeed:
    return RequestNeed("glm-4.7-flash", spec_of("glm-4.7-flash", "Q4_K_M"), prompt, max_tokens)


def arrive(state: PlacementState, need: RequestNeed, now: float) -> Step:
    return apply(state, RequestArrived(need), now)


def test_a_new_load_reserves_its_bytes_and_says_load_then_admit() -> None:
    step = arrive(PlacementState.empty(DESKTOP), glm(), 0.0)
    load, admit = step.effects
    assert isinstance(load, Load) and isinstance(admit, Admit) and load.key == admit.key == "glm-4.7-flash@4096"
    assert load.gpu_layers is None  # all of it on the GPUs: as configured
    assert step.state.ledger.keys == (load.key,)
    record = step.state.engines[load.key]
    assert not record.loaded and len(record.backlog) == 1 and step.ticket and step.ticket.engine == load.key
    # the state it came from is a value: unchanged
    assert PlacementState.empty(DESKTOP).ledger.keys == ()


def test_an_engine_goes_from_loading_to_up_to_gone_and_its_bytes_with_it() -> None:
    step = arrive(PlacementState.empty(DESKTOP), glm(), 0.0)
    key = step.effects[0].key  # type: ignore[union-attr]
    state = apply(step.state, EngineLoaded(key), 5.0).state
    assert state.engines[key].loaded and state.local(5.0).engines[0].in_flight == 1
    state = apply(state, Answered(step.ticket, WHOLE, service_s=3.0), 8.0).state  # type: ignore[arg-type]
    assert state.local(8.0).engines[0].idle and state.engines[key].last_used == 8.0
    state = apply(state, EngineGone(key), 9.0).state
    assert state.engines == {} and state.ledger.keys == ()


def test_an_engine_that_went_down_with_requests_waiting_must_load_again_first() -> None:
    step = arrive(PlacementState.empty(DESKTOP), glm(), 0.0)
    key = step.effects[0].key  # type: ignore[union-attr]
    state = apply(step.state, EngineLoaded(key), 5.0).state
    state = apply(state, EngineDown(key), 100.0).state
    record = state.engines[key]
    assert not record.loaded and record.ready_at == pytest.approx(100.0 + record.load_s)
    assert state.ledger.keys == (key,)  # the exiting process keeps its bytes
    again = arrive(state, glm(prompt=100), 101.0)
    assert isinstance(again.effects[0], Admit) and again.decision is not None
    assert again.decision.chosen and again.decision.chosen.load_s == pytest.approx(record.load_s - 1.0)


def test_what_an_answer_teaches_and_what_a_cut_one_does_not() -> None:
    step = arrive(PlacementState.empty(DESKTOP), glm(), 0.0)
    key = step.effects[0].key  # type: ignore[union-attr]
    loaded = apply(step.state, EngineLoaded(key), 5.0).state
    cut = Observation(responded=True, complete=False, completion_tokens=40, decode_tok_s=50.0)
    after_cut = apply(loaded, Answered(step.ticket, cut, service_s=2.0), 7.0).state  # type: ignore[arg-type]
    assert after_cut.lengths.models == {}  # where the client stopped reading, not the answer's length
    assert after_cut.engines[key].request_s == loaded.engines[key].request_s
    assert after_cut.calibration.ratios  # a stream long enough to time still measures speed
    whole = apply(loaded, Answered(step.ticket, WHOLE, service_s=2.0), 7.0).state  # type: ignore[arg-type]
    assert whole.lengths.tokens == {"glm-4.7-flash": 300}
    assert whole.engines[key].request_s == pytest.approx(0.8 * loaded.engines[key].request_s + 0.2 * 2.0)
    ratio = 50.0 / loaded.engines[key].base_tok_s
    assert whole.calibration.factor(whole.node, "glm-4.7-flash") == pytest.approx(min(10.0, max(0.1, ratio)))


def test_an_answer_for_an_engine_already_gone_still_teaches_the_length() -> None:
    step = arrive(PlacementState.empty(DESKTOP), glm(), 0.0)
    gone = apply(step.state, EngineGone(step.ticket.engine or ""), 1.0).state  # type: ignore[union-attr]
    state = apply(gone, Answered(step.ticket, WHOLE), 2.0).state  # type: ignore[arg-type]
    assert state.engines == {} and state.lengths.tokens == {"glm-4.7-flash": 300}


def test_a_forward_counts_against_the_peers_breaker_until_it_answers() -> None:
    spark = PeerState("spark", SPARK, frozenset({"glm-4.7-flash"}))
    state = apply(PlacementState.empty(DESKTOP), PeersReported({"spark": spark}), 0.0).state
    for t in range(3):
        state = apply(state, PeerFailed("spark"), float(t)).state
    assert state.breaker("spark").state(3.0) == "open"
    assert not state.peer_states(3.0)[0].up
    # once open long enough, one probe goes, and nothing else while it is out
    sent = apply(state, PeerOnlyArrived("glm-4.7-flash", 100), 30.0)
    assert isinstance(sent.effects[0], Forward) and sent.ticket and sent.ticket.peer == "spark"
    blocked = apply(sent.state, PeerOnlyArrived("glm-4.7-flash", 100), 30.0)
    assert isinstance(blocked.effects[0], Refuse) and blocked.effects[0].status == 503
    answered = apply(sent.state, Answered(sent.ticket, WHOLE), 31.0).state
    assert answered.breaker("spark").state(31.0) == "closed"
    abandoned = apply(sent.state, Answered(sent.ticket, NO_ANSWER), 31.0).state
    assert abandoned.breaker("spark").state(31.0) == "half-open"  # no verdict; the next request may probe


def test_an_eviction_marks_its_victims_leaving_and_the_new_load_pending_until_done() -> None:
    state = PlacementState.empty(DESKTOP)
    models = ("llama-3.1-8b", "gpt-oss-20b", "glm-4.7-flash")
    tickets = []
    for t, model in enumerate(models):
        need = RequestNeed(model, spec_of(model, "Q4_K_M" if model == "glm-4.7-flash" else None), 2000, 1000)
        step = arrive(state, need, float(t))
        state = apply(step.state, EngineLoaded(step.ticket.engine or ""), float(t)).state  # type: ignore[union-attr]
        tickets.append(step.ticket)
    for t, ticket in enumerate(tickets):
        state = apply(state, Answered(ticket, WHOLE, 1.0), 10.0 + t).state  # type: ignore[arg-type]
    gemma = RequestNeed("gemma-3-27b", spec_of("gemma-3-27b", "Q8_0"), 2000, 1000)
    step = arrive(state, gemma, 20.0)
    load, evict, admit = step.effects
    assert isinstance(load, Load) and isinstance(evict, Evict) and isinstance(admit, Admit)
    loaded = [f"{model}@4096" for model in models]
    assert evict.keys == tuple(loaded[:len(evict.keys)]) and evict.keys and evict.for_key == load.key  # LRU first
    assert all(step.state.engines[k].leaving for k in evict.keys)
    kept = set(loaded) - set(evict.keys)
    assert set(step.state.ledger.keys) == kept | {load.key}  # the victims' bytes are the new engine's
    assert step.state.engines[load.key].pending
    assert not apply(step.state, EvictionsDone(load.key), 21.0).state.engines[load.key].pending
    # the victims leave the state when their processes are gone
    state = step.state
    for key in evict.keys:
        state = apply(state, EngineGone(key), 22.0).state
    assert set(state.engines) == kept | {load.key}


def test_a_peer_only_model_with_no_live_peer_is_refused_with_a_retry() -> None:
    step = apply(PlacementState.empty(DESKTOP), PeerOnlyArrived("mystery", 100), 0.0)
    refusal = step.effects[0]
    assert isinstance(refusal, Refuse) and (refusal.status, refusal.code) == (503, "capacity_busy")
    assert refusal.retry_after_s == 5.0 and step.ticket is None


GIB = 2**30


def loaded(state: PlacementState, model: str, now: float, answered: bool = True) -> PlacementState:
    """`state` with `model` loaded on its own engine; its one request answered (idle) unless `answered` is False."""
    step = arrive(state, RequestNeed(model, spec_of(model), 2000, 1000), now)
    state = apply(step.state, EngineLoaded(step.ticket.engine or ""), now).state  # type: ignore[union-attr]
    return apply(state, Answered(step.ticket, WHOLE, 1.0), now + 1).state if answered else state  # type: ignore[arg-type]


def test_a_fine_tune_reserves_its_device_and_gives_it_back_when_it_ends() -> None:
    state = PlacementState.empty(DESKTOP)
    device = DESKTOP.devices[0].name
    step = apply(state, TrainingArrived("train:ftjob-1", device, 10 * GIB), 0.0)
    (train,) = step.effects
    assert isinstance(train, Train) and train.key == "train:ftjob-1" and "reserved 10.0 GiB" in train.reason
    assert step.state.ledger.held("train:ftjob-1") == {device: 10 * GIB}
    again = apply(step.state, TrainingArrived("train:ftjob-1", device, 10 * GIB), 1.0)
    assert isinstance(again.effects[0], Train) and again.state.ledger.held("train:ftjob-1") == {device: 10 * GIB}
    ended = apply(step.state, TrainingEnded("train:ftjob-1"), 2.0).state
    assert ended.ledger.keys == () and ended.ledger.free_bytes(device) == state.ledger.free_bytes(device)


def test_a_fine_tune_evicts_idle_engines_but_waits_for_busy_ones() -> None:
    device = DESKTOP.devices[0].name
    idle = loaded(PlacementState.empty(DESKTOP), "llama-3.1-8b", 0.0)
    (engine,) = idle.engines
    need = idle.ledger.capacity(device) - idle.ledger.held(engine).get(device, 0) // 2  # more than is free now
    step = apply(idle, TrainingArrived("train:ftjob-2", device, need), 5.0)
    evict, train = step.effects
    assert isinstance(evict, Evict) and evict.keys == (engine,) and evict.drain == ()
    assert isinstance(train, Train) and engine in train.reason
    assert step.state.engines[engine].leaving and engine not in step.state.ledger.keys

    busy = loaded(PlacementState.empty(DESKTOP), "llama-3.1-8b", 0.0, answered=False)
    step = apply(busy, TrainingArrived("train:ftjob-3", device, need), 5.0)
    (hold,) = step.effects
    assert isinstance(hold, Hold) and "waits for memory" in hold.reason and "busy engines hold" in hold.reason
    assert step.state is busy  # nothing reserved, nothing evicted


def test_a_request_that_no_longer_fits_says_a_fine_tune_holds_the_memory() -> None:
    state = PlacementState.empty(DESKTOP)
    for device in state.ledger.devices:  # both GPUs and the host RAM layers could spill to
        state = apply(state, TrainingArrived(f"train:ftjob-{device}", device, state.ledger.free_bytes(device)),
                      0.0).state
    step = arrive(state, glm(), 1.0)
    assert isinstance(step.effects[0], Refuse)
    local = next(o for o in step.decision.options if o.placement == "local")  # type: ignore[union-attr]
    assert "fine-tuning here until it ends" in local.why_not and "ftjob-" in local.why_not


def test_a_slotted_engine_takes_a_second_request_at_once_sharing_each_decode_step() -> None:
    alone = RequestNeed("llama-3.1-8b", spec_of("llama-3.1-8b"), 2000, 1000, slots=2)
    first = arrive(PlacementState.empty(DESKTOP), alone, 0.0)
    load = first.effects[0]
    assert isinstance(load, Load)
    single = arrive(PlacementState.empty(DESKTOP), replace(alone, slots=1), 0.0)
    # a new engine with two slots holds the cache of both: more bytes than the one-slot engine
    assert sum(first.state.ledger.held(load.key).values()) > sum(single.state.ledger.held(load.key).values())
    state = apply(first.state, EngineLoaded(load.key), 10.0).state
    second = arrive(state, alone, 10.0)
    (admit,) = second.effects
    assert isinstance(admit, Admit) and admit.key == load.key  # the free slot, not a second copy
    chosen = second.decision.chosen  # type: ignore[union-attr]
    assert chosen is not None and chosen.wait_s == 0.0
    assert chosen.predicted_tok_s < first.decision.chosen.predicted_tok_s  # type: ignore[union-attr]
    view = second.state.engines[load.key].view(10.0)
    assert (view.in_flight, view.queued, view.slots) == (2, 0, 2)
    third = arrive(second.state, alone, 10.0)  # both slots busy: it waits for the first to free
    assert third.decision.chosen.wait_s > 0  # type: ignore[union-attr]
