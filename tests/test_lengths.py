"""Completion lengths learned per model, and the scheduler predicting time from them (pure)."""

from __future__ import annotations

import pytest

from hybridd.place.lengths import CompletionLengths
from hybridd.place.scheduler import LocalState, RequestNeed, decide, ledger_for
from tests.test_scheduler import DESKTOP, spec_of


def test_an_unseen_model_is_expected_to_use_its_whole_budget() -> None:
    assert CompletionLengths().expect("glm", 32_000) == 32_000


def test_lengths_are_an_ewma_per_model_capped_by_the_budget() -> None:
    lengths = CompletionLengths().observe("glm", 800).observe("glm", 400).observe("qwen", 50)
    assert lengths.expect("glm", 32_000) == round(0.7 * 800 + 0.3 * 400)
    assert lengths.expect("glm", 300) == 300  # never beyond what the request allows
    assert lengths.expect("qwen", 32_000) == 50
    assert lengths.observe("glm", 0) is lengths  # a stream that carried nothing teaches nothing


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
