"""What this machine has now: GPUs through NVML, unified memory through MemAvailable, host RAM through psutil.

The NVML module (nvidia-ml-py's `pynvml`) is passed to `GpuProbe`, so tests drive a scripted fake and nothing
is patched module-wide. All NVML calls block: the daemon runs `GpuProbe.snapshot` in a worker thread.

Errors, translated here so none of NVML's escapes:
    no NVML (module missing, library not found, driver not loaded, init fails) -> CPU-only node, with a note
    one GPU failing mid-probe (fell off the bus, handle lost)                  -> GPU skipped, with a note
    memory info "Not Supported" (GB10 / DGX Spark)                             -> unified memory: host figures
    an optional query unsupported (processes, bus width, display)              -> that field left empty
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hybridd.place.devices import Device
from hybridd.probe.host import HostMemory, HostProbe

GIB = 1024**3
MIB = 1024**2

# A CUDA context plus cuBLAS workspaces costs a few hundred MiB per device before any weight is loaded.
DEFAULT_RUNTIME_RESERVE_BYTES = 512 * MIB
# The GPU driving a desktop needs headroom for the compositor and browsers growing after the probe.
DEFAULT_DISPLAY_RESERVE_BYTES = 1 * GIB

# NVML reports the memory clock once per cycle; GDDR6X/GDDR7/LPDDR5X move data on both edges.
_TRANSFERS_PER_MEMORY_CLOCK = 2

# Numeric values of the pynvml constants, used when a fake or an old pynvml lacks the attribute.
_NVML_ERROR_NOT_SUPPORTED = 3
_NVML_CLOCK_MEM = 2

_NVML_ERROR_NAMES = {
    1: "NVML not initialized",
    2: "invalid argument",
    3: "not supported",
    4: "no permission",
    6: "not found",
    9: "NVIDIA driver not loaded",
    12: "NVML library not found",
    13: "function not found in NVML library",
    15: "GPU is lost",
    17: "operating system call failed",
    18: "driver/library version mismatch",
    999: "unknown NVML error",
}


@dataclass(frozen=True)
class GpuProcess:
    """A process holding GPU memory; used_bytes is None where the driver will not say (GB10, containers)."""

    pid: int
    used_bytes: int | None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML saw it; for unified memory the byte figures are the host's."""

    index: int
    name: str
    uuid: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    unified: bool
    processes: tuple[GpuProcess, ...] = ()
    display_active: bool = False
    bandwidth_bytes_s: float | None = None
    compute_capability: int = 0  # major x 10 + minor; 0 when NVML cannot say
    sm_count: int = 0


@dataclass(frozen=True)
class MachineSnapshot:
    """The machine at `taken_at`: GPUs (none on a CPU-only node), host RAM, and why anything is missing."""

    gpus: tuple[GpuInfo, ...]
    host_total_bytes: int
    host_available_bytes: int
    unified: bool
    taken_at: float
    notes: tuple[str, ...] = ()

    @property
    def cpu_only(self) -> bool:
        """True when no GPU could be used."""
        return not self.gpus


def _load_pynvml() -> Any | None:
    try:
        import pynvml  # here, not at the top: without nvidia-ml-py this machine is a CPU-only node, not a crash
    except ImportError:
        return None
    return pynvml


class GpuProbe:
    """Takes `MachineSnapshot`s; never raises for a missing driver or a GPU that disappears mid-probe."""

    def __init__(
        self,
        nvml: Any | None,
        host: HostProbe | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # nvml is the pynvml module (or a fake of it); None means this node has no NVML and is CPU-only.
        self._nvml: Any = nvml
        self._host = host if host is not None else HostProbe()
        self._clock = clock
        self._initialized = False

    @classmethod
    def for_this_machine(cls) -> GpuProbe:
        """A probe on the real pynvml and psutil; CPU-only when nvidia-ml-py is not installed."""
        return cls(nvml=_load_pynvml(), host=HostProbe())

    def snapshot(self, now: float | None = None) -> MachineSnapshot:
        """The machine's GPUs and host memory now; `now` stamps it (defaults to the probe's clock)."""
        taken_at = self._clock() if now is None else now
        host = self._host.memory()
        notes: list[str] = []
        gpus = self._probe_gpus(host, notes)
        return MachineSnapshot(
            gpus=tuple(gpus),
            host_total_bytes=host.total_bytes,
            host_available_bytes=host.available_bytes,
            unified=any(gpu.unified for gpu in gpus),
            taken_at=taken_at,
            notes=tuple(notes),
        )

    def close(self) -> None:
        """Release NVML if this probe initialised it."""
        if self._initialized and self._nvml is not None:
            # Shutting down a broken driver must not fail the caller.
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
        self._initialized = False

    def _probe_gpus(self, host: HostMemory, notes: list[str]) -> list[GpuInfo]:
        nvml = self._nvml
        if nvml is None:
            notes.append("CPU-only: no NVML module (nvidia-ml-py is not installed)")
            return []
        if not self._initialized:
            try:
                nvml.nvmlInit()
            except Exception as exc:  # any init failure means no usable GPU, never a traceback
                notes.append(f"CPU-only: NVML unavailable ({self._describe(exc)})")
                return []
            self._initialized = True
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except self._nvml_errors as exc:
            notes.append(f"CPU-only: NVML could not count GPUs ({self._describe(exc)})")
            return []
        gpus: list[GpuInfo] = []
        for index in range(count):
            try:
                gpus.append(self._probe_gpu(index, host))
            except self._nvml_errors as exc:  # one lost GPU must not hide the others
                notes.append(f"GPU {index} skipped: {self._describe(exc)}")
        return gpus

    def _probe_gpu(self, index: int, host: HostMemory) -> GpuInfo:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = _text(nvml.nvmlDeviceGetName(handle))
        uuid = _text(self._optional("", nvml.nvmlDeviceGetUUID, handle))
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except self._nvml_errors as exc:
            if not self._is_not_supported(exc):
                raise
            # GB10 (DGX Spark, Ascent GX10): GPU and CPU share LPDDR5X and NVML reports no framebuffer;
            # what the GPU can allocate is what the kernel can give, MemAvailable.
            total, free, unified = host.total_bytes, host.available_bytes, True
        else:
            total, free, unified = int(memory.total), int(memory.free), False
        cc, sms = self._architecture(handle)
        return GpuInfo(
            index=index,
            name=name,
            uuid=uuid,
            total_bytes=total,
            free_bytes=free,
            used_bytes=max(total - free, 0),
            unified=unified,
            processes=self._processes(handle),
            display_active=bool(self._optional(0, nvml.nvmlDeviceGetDisplayActive, handle)),
            bandwidth_bytes_s=self._bandwidth(handle),
            compute_capability=cc,
            sm_count=sms,
        )

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        nvml = self._nvml
        found: dict[int, GpuProcess] = {}
        for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
            for proc in self._optional([], query, handle):
                used = getattr(proc, "usedGpuMemory", None)
                found.setdefault(
                    int(proc.pid), GpuProcess(pid=int(proc.pid), used_bytes=_bytes_or_none(used))
                )
        return tuple(found[pid] for pid in sorted(found))

    def _bandwidth(self, handle: Any) -> float | None:
        nvml = self._nvml
        bus_bits = self._optional(None, nvml.nvmlDeviceGetMemoryBusWidth, handle)
        clock_kind = getattr(nvml, "NVML_CLOCK_MEM", _NVML_CLOCK_MEM)
        clock_mhz = self._optional(None, nvml.nvmlDeviceGetMaxClockInfo, handle, clock_kind)
        if not bus_bits or not clock_mhz:
            return None
        return float(bus_bits) / 8 * float(clock_mhz) * 1e6 * _TRANSFERS_PER_MEMORY_CLOCK

    def _architecture(self, handle: Any) -> tuple[int, int]:
        """Compute capability and SM count, which pick llama.cpp's attention kernel (place/attention.py). NVML
        gives CUDA cores, not SMs: 64 a multiprocessor on Volta, Turing and the A100, 128 from compute capability 8.6
        (GA10x, Ada, Hopper, Blackwell); older GPUs have no kernel the rule needs the count for."""
        nvml = self._nvml
        query = getattr(nvml, "nvmlDeviceGetCudaComputeCapability", None)
        version = self._optional(None, query, handle) if query else None
        if not version:
            return 0, 0
        cc = int(version[0]) * 10 + int(version[1])
        cores_query = getattr(nvml, "nvmlDeviceGetNumGpuCores", None)
        cores = self._optional(0, cores_query, handle) if cores_query else 0
        return cc, int(cores) // (64 if cc < 86 else 128)

    def _optional(self, default: Any, query: Callable[..., Any], *args: Any) -> Any:
        """Run an optional NVML query; any NVML error (unsupported, no permission) yields the default."""
        try:
            return query(*args)
        except self._nvml_errors:
            return default

    @property
    def _nvml_errors(self) -> tuple[type[BaseException], ...]:
        error_type = getattr(self._nvml, "NVMLError", None)
        if isinstance(error_type, type) and issubclass(error_type, BaseException):
            return (error_type,)
        return (Exception,)

    def _is_nvml_error(self, exc: BaseException) -> bool:
        return isinstance(exc, self._nvml_errors)

    def _is_not_supported(self, exc: BaseException) -> bool:
        code = getattr(self._nvml, "NVML_ERROR_NOT_SUPPORTED", _NVML_ERROR_NOT_SUPPORTED)
        return self._is_nvml_error(exc) and getattr(exc, "value", None) == code

    def _describe(self, exc: BaseException) -> str:
        code = getattr(exc, "value", None)
        if self._is_nvml_error(exc) and isinstance(code, int):
            return _NVML_ERROR_NAMES.get(code, f"NVML error {code}")
        return f"{type(exc).__name__}: {exc}"


def devices_from_snapshot(
    snapshot: MachineSnapshot,
    display_reserve_bytes: int = DEFAULT_DISPLAY_RESERVE_BYTES,
    runtime_reserve_bytes: int = 0,
) -> list[Device]:
    """The snapshot's GPUs as placement devices, in CUDA index order; a CPU-only snapshot gives none.

    The engine's CUDA context is charged per GPU by the memory estimate (RunSettings.runtime_reserve_bytes), so
    by default it is not kept back here too; runtime_reserve_bytes is for anything else that must stay free.
    """
    if not snapshot.gpus:
        return []
    devices = []
    for gpu in snapshot.gpus:
        reserve = runtime_reserve_bytes + (display_reserve_bytes if gpu.display_active else 0)
        devices.append(
            Device(
                name=f"CUDA{gpu.index} ({gpu.name})",
                total_bytes=gpu.total_bytes,
                free_bytes=gpu.free_bytes,
                unified=gpu.unified,
                reserve_bytes=reserve,
                bandwidth_bytes_s=gpu.bandwidth_bytes_s,
                compute_capability=gpu.compute_capability,
                sm_count=gpu.sm_count,
            )
        )
    return devices


def _text(value: Any) -> str:
    # Older pynvml returns bytes, newer returns str.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _bytes_or_none(value: Any) -> int | None:
    # NVML marks "not available" as None (new pynvml) or a huge sentinel (NVML_VALUE_NOT_AVAILABLE, ULL -1).
    if value is None:
        return None
    number = int(value)
    return None if number < 0 or number >= 2**63 else number
