"""The idle policy is pure: the clock is an argument, so no test sleeps."""

from hybridd.place.idle import LoadedEngine, idle_expired, next_expiry


def test_only_idle_engines_past_ttl_expire() -> None:
    engines = [LoadedEngine("busy", 1, 0.0, 10), LoadedEngine("old", 0, 0.0, 10), LoadedEngine("new", 0, 95.0, 10)]
    assert idle_expired(engines, now=100.0) == ["old"]
    assert next_expiry(engines, now=100.0) == 0.0
    assert next_expiry(engines[2:], now=100.0) == 5.0
    assert next_expiry(engines[:1], now=100.0) is None
