"""The reservation ledger: all-or-nothing reservations that never over-commit a device."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from hybridd.place.ledger import HOST, Ledger

GIB = 1024**3


def test_reserve_refuses_what_would_over_commit_and_changes_nothing() -> None:
    ledger = Ledger({"gpu0": 24 * GIB, "gpu1": 16 * GIB})
    assert ledger.reserve("a", {"gpu0": 20 * GIB, "gpu1": 10 * GIB})
    assert not ledger.reserve("b", {"gpu0": 2 * GIB, "gpu1": 7 * GIB})  # gpu1 would be 17 of 16
    assert ledger.held("b") == {}
    assert ledger.free_bytes("gpu0") == 4 * GIB and ledger.free_bytes("gpu1") == 6 * GIB


def test_release_returns_the_bytes_and_a_key_reserves_once() -> None:
    ledger = Ledger({"gpu0": 10 * GIB})
    assert ledger.reserve("a", {"gpu0": 6 * GIB})
    assert not ledger.reserve("a", {"gpu0": 1 * GIB})
    assert ledger.release("a") == {"gpu0": 6 * GIB}
    assert ledger.release("a") == {}
    assert ledger.free_bytes("gpu0") == 10 * GIB


def test_unknown_device_has_no_capacity_and_host_is_a_device() -> None:
    ledger = Ledger({HOST: 8 * GIB})
    assert not ledger.reserve("a", {"gpu9": 1})
    assert ledger.reserve("a", {HOST: 8 * GIB})
    assert ledger.free_bytes(HOST) == 0


def test_lowered_capacity_refuses_new_reservations_but_keeps_old_ones() -> None:
    ledger = Ledger({"gpu0": 10 * GIB})
    assert ledger.reserve("a", {"gpu0": 8 * GIB})
    ledger.set_capacity("gpu0", 6 * GIB)
    assert ledger.free_bytes("gpu0") == 0
    assert not ledger.reserve("b", {"gpu0": 1})
    assert ledger.held("a") == {"gpu0": 8 * GIB}


def test_can_reserve_counts_evicted_keys_as_released() -> None:
    ledger = Ledger({"gpu0": 10 * GIB})
    assert ledger.reserve("old", {"gpu0": 7 * GIB})
    assert not ledger.can_reserve({"gpu0": 5 * GIB})
    assert ledger.can_reserve({"gpu0": 5 * GIB}, releasing=["old"])


DEVICES = ("gpu0", "gpu1", HOST)


class LedgerMachine(RuleBasedStateMachine):
    """Random arrive / finish / evict / fail / re-probe sequences; the ledger must never over-commit."""

    engines = Bundle("engines")

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger({"gpu0": 24 * GIB, "gpu1": 16 * GIB, HOST: 64 * GIB})
        self.model: dict[str, dict[str, int]] = {}
        self.counter = 0
        # capacity at the time each reservation was granted: a later lowering must not be blamed on reserve()
        self.granted_under: dict[str, int] = {}

    @rule(target=engines, sizes=st.fixed_dictionaries({d: st.integers(0, 30 * GIB) for d in DEVICES}))
    def arrive(self, sizes: dict[str, int]) -> str:
        self.counter += 1
        key = f"e{self.counter}"
        before = {d: self.ledger.free_bytes(d) for d in DEVICES}
        fits = all(sizes[d] <= before[d] for d in DEVICES)
        granted = self.ledger.reserve(key, sizes)
        assert granted == fits
        if granted:
            self.model[key] = {d: b for d, b in sizes.items() if b}
        else:
            assert {d: self.ledger.free_bytes(d) for d in DEVICES} == before
        return key

    @rule(key=consumes(engines))
    def finish_and_unload(self, key: str) -> None:
        assert dict(self.ledger.release(key)) == self.model.pop(key, {})

    @rule(key=consumes(engines))
    def load_fails(self, key: str) -> None:
        self.ledger.release(key)
        self.model.pop(key, None)

    @rule()
    def evict_least_recently_used(self) -> None:
        if self.model:
            key = min(self.model, key=lambda k: int(k[1:]))
            self.ledger.release(key)
            del self.model[key]

    @rule(device=st.sampled_from(DEVICES), capacity=st.integers(0, 40 * GIB))
    def probe_changes_capacity(self, device: str, capacity: int) -> None:
        self.ledger.set_capacity(device, capacity)

    @invariant()
    def never_over_committed_by_a_grant(self) -> None:
        for device in DEVICES:
            used = sum(held.get(device, 0) for held in self.model.values())
            assert self.ledger.used_bytes(device) == used
            assert self.ledger.free_bytes(device) >= 0
            # a reservation is only ever granted within capacity: when nothing was re-probed lower, used <= cap
            if used > self.ledger.capacity(device):
                assert not self.ledger.reserve("probe", {device: 1})


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_free_can_count_keys_as_released_without_releasing_them() -> None:
    ledger = Ledger({"gpu0": 10, "gpu1": 10})
    assert ledger.reserve("a", {"gpu0": 6}) and ledger.reserve("b", {"gpu0": 1, "gpu1": 4})
    assert ledger.free(releasing=["a", "b", "a"]) == {"gpu0": 10, "gpu1": 10}
    assert ledger.free(releasing=["nobody"]) == ledger.free() == {"gpu0": 3, "gpu1": 6}
    assert ledger.held("a") == {"gpu0": 6}  # nothing was released
