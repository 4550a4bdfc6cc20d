"""Devices a model can be placed on, as plain data (pure); probes build these from NVML / MemAvailable."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Device:
    """One GPU, or a unified-memory pool (GB10) counted once, with the bytes kept back for the display etc."""

    name: str
    total_bytes: int
    free_bytes: int
    unified: bool = False  # memory shared with the host (DGX Spark / GB10): one pool, no separate host RAM
    reserve_bytes: int = 0  # kept free on purpose: desktop compositor, other apps
    bandwidth_bytes_s: float | None = None
    compute_capability: int = 0  # CUDA major x 10 + minor (89: Ada, 90: Hopper); 0 unknown
    sm_count: int = 0  # streaming multiprocessors; 0 unknown

    def __post_init__(self) -> None:
        if self.total_bytes < 0 or self.free_bytes < 0 or self.reserve_bytes < 0:
            raise ValueError(f"device {self.name!r}: byte counts must not be negative")

    @property
    def usable_bytes(self) -> int:
        """Free bytes minus the reserve, never below zero."""
        return max(0, self.free_bytes - self.reserve_bytes)
