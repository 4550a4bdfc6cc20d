"""Host memory through psutil: the RAM a node can spill layers into, and a GB10's unified pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil


@dataclass(frozen=True)
class HostMemory:
    """Host RAM at one moment: total and what the kernel says can be had without swapping (MemAvailable)."""

    total_bytes: int
    available_bytes: int


class HostProbe:
    """Reads host RAM; the psutil module is passed in so tests can drive a fake one."""

    def __init__(self, psutil_module: Any | None = None) -> None:
        self._psutil: Any = psutil if psutil_module is None else psutil_module

    def memory(self) -> HostMemory:
        """Total and available host RAM now (psutil's `available` is Linux's MemAvailable)."""
        vm = self._psutil.virtual_memory()
        return HostMemory(total_bytes=int(vm.total), available_bytes=int(vm.available))
