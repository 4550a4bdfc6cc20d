"""The predicted work on one engine: what the scheduler's queue and drain waits are made of (fake clock)."""

from __future__ import annotations

import pytest

from hybridd.place.backlog import Backlog


def test_an_idle_engine_has_no_backlog() -> None:
    assert Backlog().seconds(100.0) == 0.0


def test_the_oldest_request_drains_with_time_and_the_rest_wait_whole() -> None:
    b = Backlog().admit(10.0, now=0.0).admit(5.0, now=2.0)  # the second queued behind the first
    assert b.seconds(2.0) == pytest.approx(8.0 + 5.0)
    assert b.seconds(9.0) == pytest.approx(1.0 + 5.0)
    assert b.seconds(30.0) == pytest.approx(5.0)  # the first overran its prediction: the queue is still whole
    b = b.done(now=30.0)  # the first ended; the second starts now
    assert len(b) == 1 and b.seconds(32.0) == pytest.approx(3.0)
    b = b.done(now=40.0)
    assert len(b) == 0 and b.seconds(40.0) == 0.0


def test_a_request_on_a_loading_engine_starts_when_the_load_ends() -> None:
    b = Backlog().admit(10.0, now=0.0, ready_at=20.0)
    assert b.seconds(5.0) == pytest.approx(10.0)  # the load is the caller's to add (EngineState.wait_s)
    assert b.seconds(25.0) == pytest.approx(5.0)


def test_a_backlog_is_a_value_each_change_a_new_one() -> None:
    empty = Backlog()
    one = empty.admit(10.0, now=0.0)
    assert len(empty) == 0 and len(one) == 1 and len(one.done(now=5.0)) == 0


def test_done_on_an_empty_backlog_is_harmless() -> None:
    b = Backlog().done(now=1.0).admit(-3.0, now=1.0)  # a nonsense prediction counts as nothing
    assert b.seconds(1.0) == 0.0


def test_parallel_slots_run_side_by_side_and_the_rest_take_the_first_free_slot() -> None:
    b = Backlog(slots=2).admit(10.0, now=0.0).admit(4.0, now=0.0)  # both start at once
    assert b.running == 2 and b.wait(0.0) == pytest.approx(4.0) and b.seconds(0.0) == pytest.approx(10.0)
    b = b.admit(6.0, now=1.0)  # waits for the 4 s one, then runs 6 s: done at 10
    assert b.running == 2 and b.wait(1.0) == pytest.approx(9.0)  # both slots busy until 10
    assert b.seconds(1.0) == pytest.approx(9.0)
    b = b.done(now=4.0)  # the 4 s one ended (it was predicted to end first); the waiting one starts now
    assert b.outstanding == (10.0, 6.0) and b.started == (0.0, 4.0)
    assert b.wait(4.0) == pytest.approx(6.0) and b.seconds(4.0) == pytest.approx(6.0)
    one_slot = Backlog().admit(10.0, now=0.0).admit(4.0, now=0.0)
    assert one_slot.wait(0.0) == one_slot.seconds(0.0) == pytest.approx(14.0)  # one slot: the old single queue
