"""Completion lengths learned per model, and the scheduler predicting time from them (pure)."""

from __future__ import annotations

import random

import pytest

from hybridd.place.lengths import CompletionLengths
from hybridd.place.scheduler import LocalState, RequestNeed, decide, ledger_for
from tests.test_scheduler import DESKTOP, spec_of


def test_before_any_answer_has_ended_a_request_is_expected_to_use_its_whole_budget() -> None:
    assert CompletionLengths().expect("glm", 32_000) == 32_000


def test_a_model_not_seen_yet_is_expected_to_answer_as_the_others_have() -> None:
    # The same agent, a model it has not asked for yet: its answers are as long as the agent's others so far, not
    # its 32k budget (which made every queue behind a first request look hours long).
    lengths = CompletionLengths().observe("glm", 800, 32_000).observe("qwen", 400, 32_000)
    assert lengths.expect("gpt-oss", 32_000) == round(0.7 * 800 + 0.3 * 400)
    assert lengths.expect("gpt-oss", 300) == 300
    assert lengths.expect("glm", 32_000) == 800  # a model seen keeps its own
    assert set(lengths.tokens) == {"glm", "qwen"}


def test_lengths_are_an_ewma_per_model_capped_by_the_budget() -> None:
    lengths = CompletionLengths().observe("glm", 800, 32_000).observe("glm", 400, 32_000).observe("qwen", 50, 8000)
    assert lengths.expect("glm", 32_000) == round(0.7 * 800 + 0.3 * 400)
    assert lengths.tokens == {"glm": pytest.approx(0.7 * 800 + 0.3 * 400), "qwen": 50}
    assert lengths.expect("glm", 300) == 300  # never beyond what the request allows
    assert lengths.expect("qwen", 32_000) == 50
    assert lengths.observe("glm", 0, 100) is lengths  # an answer that carried nothing teaches nothing


def mean_error(lengths: CompletionLengths, requests: list[tuple[int, int]]) -> float:
    """Mean absolute error of predicting each request before learning from it."""
    errors = []
    for tokens, budget in requests:
        errors.append(abs(lengths.expect("m", budget) - tokens))
        lengths = lengths.observe("m", tokens, budget)
    return sum(errors[5:]) / len(errors[5:])


def test_a_client_whose_budget_is_its_length_is_predicted_from_the_budget() -> None:
    # max_tokens set to what the client wants back: 300-2000 tokens, each answer uses all of it
    rng = random.Random(1)
    requests = [(n, n) for n in (rng.randint(300, 2000) for _ in range(40))]
    assert mean_error(CompletionLengths(), requests) < 1  # the share of the budget used (all of it) wins


def test_an_agent_with_a_large_budget_is_predicted_from_its_lengths() -> None:
    # an agent asks for 8k-32k and stops after 300-2000: the budget says nothing about the length
    rng = random.Random(2)
    requests = [(rng.randint(300, 2000), rng.choice((8192, 16_384, 32_000))) for _ in range(40)]
    lengths = CompletionLengths()
    for tokens, budget in requests:
        lengths = lengths.observe("m", tokens, budget)
    assert 300 <= lengths.expect("m", 32_000) <= 2000  # the mean length, not a share of the budget
    assert mean_error(CompletionLengths(), requests) < 700  # at most the spread of the lengths themselves


def test_time_is_predicted_from_the_expected_length_and_memory_from_the_budget() -> None:
    spec = spec_of("glm-4.7-flash", "Q4_K_M")
    state = LocalState(DESKTOP, ledger_for(DESKTOP))
    budget = RequestNeed("glm-4.7-flash", spec, 8000, 16_000)
    learned = RequestNeed("glm-4.7-flash", spec, 8000, 16_000, expected_tokens=500)
    full, short = decide(budget, state, (), 0.0).chosen, decide(learned, state, (), 0.0).chosen
    assert full is not None and short is not None
    assert short.ctx == full.ctx == 32768  # the context still holds the whole budget
    assert short.decode_s == pytest.approx(500 / short.predicted_tok_s)
    assert full.decode_s > 20 * short.decode_s
