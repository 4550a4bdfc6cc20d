"""The reservation ledger: the one owner of who holds how many bytes on which device (pure, no clock).

A local placement reserves its estimated bytes per device before its engine loads, and releases them when the
engine unloads or the load fails. A reservation is all or nothing, and is refused when it would take any device
past its capacity. Capacity is what hybridd's engines may use on a device: the usable bytes (total minus the
device's reserve_bytes, minus memory held by processes that are not hybridd engines), so a reservation can never
eat into a per-GPU reserve. System RAM for offloaded layers is the pseudo-device HOST.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

HOST = "host"


class Ledger:
    """Reservations per key (an engine) and capacities per device; never over-commits a device."""

    def __init__(self, capacities: Mapping[str, int] | None = None) -> None:
        self._capacity: dict[str, int] = {}
        self._held: dict[str, dict[str, int]] = {}
        for device, capacity in (capacities or {}).items():
            self.set_capacity(device, capacity)

    def set_capacity(self, device: str, usable_bytes: int) -> None:
        """Set what engines may use on `device` (from a probe). Lowering it below what is held refuses new
        reservations there until enough is released; it never cancels a reservation."""
        self._capacity[device] = max(0, int(usable_bytes))

    def capacity(self, device: str) -> int:
        """The device's capacity; 0 for a device never set."""
        return self._capacity.get(device, 0)

    @property
    def devices(self) -> tuple[str, ...]:
        """Devices with a capacity, in the order they were first set."""
        return tuple(self._capacity)

    def used_bytes(self, device: str) -> int:
        """Bytes reserved on `device` by every key."""
        return sum(held.get(device, 0) for held in self._held.values())

    def free_bytes(self, device: str) -> int:
        """Bytes a new reservation may still take on `device` (never negative)."""
        return max(0, self.capacity(device) - self.used_bytes(device))

    def free(self, releasing: Iterable[str] = ()) -> dict[str, int]:
        """free_bytes of every device, counting the keys in `releasing` as already released."""
        free = {device: self.free_bytes(device) for device in self._capacity}
        for key in set(releasing):
            for device, held in self._held.get(key, {}).items():
                free[device] = free.get(device, 0) + held
        return free

    def can_reserve(self, bytes_per_device: Mapping[str, int], releasing: Iterable[str] = ()) -> bool:
        """Whether reserve() would succeed, counting the keys in `releasing` as already released."""
        gone = set(releasing)
        for device, need in bytes_per_device.items():
            if need < 0:
                return False
            if need == 0:
                continue
            freed = sum(self._held.get(key, {}).get(device, 0) for key in gone)
            if need > self.capacity(device) - (self.used_bytes(device) - freed):
                return False
        return True

    def reserve(self, key: str, bytes_per_device: Mapping[str, int]) -> bool:
        """Hold bytes on each device for `key`, all or nothing; False (nothing changes) if any would over-commit
        or the key already holds a reservation."""
        if key in self._held or not self.can_reserve(bytes_per_device):
            return False
        self._held[key] = {d: int(b) for d, b in bytes_per_device.items() if b > 0}
        return True

    def release(self, key: str) -> dict[str, int]:
        """Drop `key`'s reservation (unload or failed load); returns what it held, {} when nothing."""
        return self._held.pop(key, {})

    def held(self, key: str) -> Mapping[str, int]:
        """What `key` holds per device (read-only; empty when nothing)."""
        return MappingProxyType(dict(self._held.get(key, {})))

    @property
    def keys(self) -> tuple[str, ...]:
        """Keys holding a reservation."""
        return tuple(self._held)

    def copy(self) -> Ledger:
        """An independent ledger with the same capacities and reservations (for what-if planning)."""
        other = Ledger(self._capacity)
        other._held = {k: dict(v) for k, v in self._held.items()}
        return other
