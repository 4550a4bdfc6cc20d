"""The circuit breaker is pure: a fake clock drives it through closed, open and half-open."""

from hybridd.place.breaker import Breaker


def test_opens_after_repeated_failures_and_probes_once_later() -> None:
    b = Breaker(threshold=3, open_for_s=10)
    for t in (0.0, 1.0):
        b = b.on_failure(t)
        assert b.allows(t)
    b = b.on_failure(2.0)
    assert b.state(2.0) == "open" and not b.allows(11.9)
    assert b.state(12.0) == "half-open" and b.allows(12.0)
    b = b.on_attempt(12.0)
    assert not b.allows(12.5)  # only one probe at a time
    reopened = b.on_failure(13.0)
    assert reopened.state(13.0) == "open" and reopened.state(23.0) == "half-open"
    closed = b.on_success()
    assert closed.state(12.5) == "closed" and closed.failures == 0


def test_a_probe_whose_client_left_before_the_answer_frees_the_probe() -> None:
    b = Breaker(threshold=1, open_for_s=10).on_failure(0.0).on_attempt(10.0)
    assert not b.allows(10.5)
    freed = b.on_abandoned()
    assert freed.state(10.5) == "half-open" and freed.allows(10.5)  # the next request probes: no verdict yet
    assert freed.failures == 1
