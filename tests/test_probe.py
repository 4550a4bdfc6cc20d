"""Machine probes: NVML driven by a scripted fake passed to the constructor, never patched module-wide."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from hybridd.place.devices import Device
from hybridd.probe.gpus import (
    DEFAULT_DISPLAY_RESERVE_BYTES,
    GpuProbe,
    MachineSnapshot,
    devices_from_snapshot,
)
from hybridd.probe.host import HostMemory, HostProbe

MIB = 1024**2
GIB = 1024**3

# What NVML reports on real cards (nvidia-smi "Total" in MiB).
RTX_4090_TOTAL = 24564 * MIB
RTX_5070TI_TOTAL = 16303 * MIB
# A DGX Spark's host: 128 GB LPDDR5X, about 119.7 GiB visible to the kernel.
SPARK_HOST_TOTAL = 128_524_456_000
SPARK_HOST_AVAILABLE = 101_000_000_000

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15


class FakeNVMLError(Exception):
    """Mimics pynvml.NVMLError: the code is in .value."""

    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class FakeGpu:
    name: str
    total: int
    free: int
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    memory_error: int | None = None
    handle_error: int | None = None
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    graphics_processes: list[tuple[int, int | None]] = field(default_factory=list)
    bus_width_bits: int | None = None
    max_memory_clock_mhz: int | None = None
    display_active: int | None = 0
    compute_capability: tuple[int, int] | None = None  # None: the driver does not answer
    cuda_cores: int | None = None


class FakeNvml:
    """A scripted stand-in for the pynvml module: the functions and constants GpuProbe touches."""

    NVMLError = FakeNVMLError
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_CLOCK_MEM = 2

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        gpu = self.gpus[index]
        if gpu.handle_error is not None:
            raise FakeNVMLError(gpu.handle_error)
        return gpu

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        return gpu.name

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        return gpu.uuid

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> Any:
        if gpu.memory_error is not None:
            raise FakeNVMLError(gpu.memory_error)
        return SimpleNamespace(total=gpu.total, free=gpu.free, used=gpu.total - gpu.free)

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> list[Any]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.processes]

    def nvmlDeviceGetGraphicsRunningProcesses(self, gpu: FakeGpu) -> list[Any]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.graphics_processes]

    def nvmlDeviceGetMemoryBusWidth(self, gpu: FakeGpu) -> int:
        if gpu.bus_width_bits is None:
            raise FakeNVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.bus_width_bits

    def nvmlDeviceGetMaxClockInfo(self, gpu: FakeGpu, clock: int) -> int:
        assert clock == self.NVML_CLOCK_MEM
        if gpu.max_memory_clock_mhz is None:
            raise FakeNVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.max_memory_clock_mhz

    def nvmlDeviceGetCudaComputeCapability(self, gpu: FakeGpu) -> tuple[int, int]:
        if gpu.compute_capability is None:
            raise FakeNVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.compute_capability

    def nvmlDeviceGetNumGpuCores(self, gpu: FakeGpu) -> int:
        if gpu.cuda_cores is None:
            raise FakeNVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.cuda_cores

    def nvmlDeviceGetDisplayActive(self, gpu: FakeGpu) -> int:
        if gpu.display_active is None:
            raise FakeNVMLError(NVML_ERROR_NO_PERMISSION)
        return gpu.display_active


class FakePsutil:
    """Mimics psutil.virtual_memory()."""

    def __init__(self, total: int, available: int) -> None:
        self.total = total
        self.available = available

    def virtual_memory(self) -> Any:
        return SimpleNamespace(total=self.total, available=self.available, percent=0.0)


DESKTOP_HOST = FakePsutil(total=64 * GIB, available=50 * GIB)


def rtx_4090(**overrides: Any) -> FakeGpu:
    fields: dict[str, Any] = {
        "name": "NVIDIA GeForce RTX 4090",
        "total": RTX_4090_TOTAL,
        "free": 23_000 * MIB,
        "uuid": "GPU-4090",
        "processes": [(4242, 1200 * MIB)],
        "graphics_processes": [(1111, 300 * MIB)],
        "bus_width_bits": 384,
        "max_memory_clock_mhz": 10501,
        "display_active": 1,
        "compute_capability": (8, 9),
        "cuda_cores": 16_384,
    }
    fields.update(overrides)
    return FakeGpu(**fields)


def rtx_5070ti(**overrides: Any) -> FakeGpu:
    fields: dict[str, Any] = {
        "name": "NVIDIA GeForce RTX 5070 Ti",
        "total": RTX_5070TI_TOTAL,
        "free": 15_800 * MIB,
        "uuid": "GPU-5070TI",
        "bus_width_bits": 256,
        "max_memory_clock_mhz": 14001,
        "compute_capability": (12, 0),
        "cuda_cores": 8_960,
    }
    fields.update(overrides)
    return FakeGpu(**fields)


def desktop_probe(*gpus: FakeGpu) -> tuple[GpuProbe, FakeNvml]:
    nvml = FakeNvml(list(gpus))
    return GpuProbe(nvml=nvml, host=HostProbe(DESKTOP_HOST)), nvml


def test_host_probe_reads_total_and_available_from_psutil() -> None:
    assert HostProbe(FakePsutil(total=100, available=40)).memory() == HostMemory(
        total_bytes=100, available_bytes=40
    )


def test_two_mismatched_gpus_report_their_own_memory_processes_and_bandwidth() -> None:
    probe, _ = desktop_probe(rtx_4090(), rtx_5070ti())

    snap = probe.snapshot(now=1234.5)

    assert snap.taken_at == 1234.5
    assert not snap.unified and not snap.cpu_only and snap.notes == ()
    big, small = snap.gpus
    assert (big.index, big.name, big.uuid) == (0, "NVIDIA GeForce RTX 4090", "GPU-4090")
    assert (big.total_bytes, big.free_bytes, big.used_bytes) == (RTX_4090_TOTAL, 23_000 * MIB, 1564 * MIB)
    assert [(p.pid, p.used_bytes) for p in big.processes] == [(1111, 300 * MIB), (4242, 1200 * MIB)]
    assert big.display_active and not small.display_active
    assert (small.name, small.total_bytes, small.free_bytes) == (
        "NVIDIA GeForce RTX 5070 Ti",
        RTX_5070TI_TOTAL,
        15_800 * MIB,
    )
    # bus width x memory clock x 2 transfers: the published 1008 GB/s and 896 GB/s, within a clock rounding.
    assert big.bandwidth_bytes_s == pytest.approx(1008e9, rel=1e-3)
    assert small.bandwidth_bytes_s == pytest.approx(896e9, rel=1e-3)
    # they pick llama.cpp's attention kernel: NVML counts CUDA cores, 128 a multiprocessor on both
    assert (big.compute_capability, big.sm_count, small.compute_capability, small.sm_count) == (89, 128, 120, 70)
    assert (snap.host_total_bytes, snap.host_available_bytes) == (64 * GIB, 50 * GIB)


def test_gb10_memory_not_supported_is_unified_and_uses_mem_available() -> None:
    nvml = FakeNvml(
        [
            FakeGpu(
                name="NVIDIA GB10",
                total=0,
                free=0,
                memory_error=NVML_ERROR_NOT_SUPPORTED,
                processes=[(777, None)],
            )
        ]
    )
    probe = GpuProbe(nvml=nvml, host=HostProbe(FakePsutil(SPARK_HOST_TOTAL, SPARK_HOST_AVAILABLE)))

    snap = probe.snapshot(now=0.0)

    (gb10,) = snap.gpus
    assert gb10.unified and snap.unified
    assert gb10.total_bytes == SPARK_HOST_TOTAL
    assert gb10.free_bytes == SPARK_HOST_AVAILABLE
    assert gb10.used_bytes == SPARK_HOST_TOTAL - SPARK_HOST_AVAILABLE
    assert gb10.processes[0].used_bytes is None  # the driver gives no per-process figure there
    assert gb10.bandwidth_bytes_s is None
    assert (gb10.compute_capability, gb10.sm_count) == (0, 0)  # unknown: the speed model's plain attention rule
    assert snap.notes == ()


def test_other_memory_errors_are_not_mistaken_for_unified_memory() -> None:
    probe, _ = desktop_probe(rtx_4090(memory_error=NVML_ERROR_GPU_IS_LOST), rtx_5070ti())

    snap = probe.snapshot(now=0.0)

    assert [gpu.name for gpu in snap.gpus] == ["NVIDIA GeForce RTX 5070 Ti"]
    assert not snap.unified
    assert snap.notes == ("GPU 0 skipped: GPU is lost",)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (NVML_ERROR_LIBRARY_NOT_FOUND, "NVML library not found"),
        (NVML_ERROR_DRIVER_NOT_LOADED, "driver not loaded"),
    ],
)
def test_no_nvml_library_or_driver_means_cpu_only_not_an_error(code: int, reason: str) -> None:
    nvml = FakeNvml([rtx_4090()], init_error=code)
    probe = GpuProbe(nvml=nvml, host=HostProbe(DESKTOP_HOST))

    snap = probe.snapshot(now=0.0)

    assert snap.cpu_only and snap.gpus == ()
    assert snap.host_available_bytes == 50 * GIB
    assert len(snap.notes) == 1 and snap.notes[0].startswith("CPU-only") and reason in snap.notes[0]
    assert devices_from_snapshot(snap) == []


def test_init_failing_with_a_foreign_error_is_cpu_only_too() -> None:
    class BrokenNvml(FakeNvml):
        def nvmlInit(self) -> None:
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    probe = GpuProbe(nvml=BrokenNvml([rtx_4090()]), host=HostProbe(DESKTOP_HOST))

    snap = probe.snapshot(now=0.0)

    assert snap.cpu_only
    assert "libnvidia-ml.so.1" in snap.notes[0]


def test_init_failure_is_retried_on_the_next_snapshot() -> None:
    # A driver loaded after the daemon started must be picked up without a restart.
    nvml = FakeNvml([rtx_4090()], init_error=NVML_ERROR_DRIVER_NOT_LOADED)
    probe = GpuProbe(nvml=nvml, host=HostProbe(DESKTOP_HOST))
    assert probe.snapshot(now=0.0).cpu_only

    nvml.init_error = None
    snap = probe.snapshot(now=1.0)

    assert [gpu.name for gpu in snap.gpus] == ["NVIDIA GeForce RTX 4090"]
    assert nvml.init_calls == 2


def test_nvml_is_initialised_once_and_shut_down_on_close() -> None:
    probe, nvml = desktop_probe(rtx_4090())
    probe.snapshot(now=0.0)
    probe.snapshot(now=1.0)

    probe.close()

    assert (nvml.init_calls, nvml.shutdown_calls) == (1, 1)


def test_gpu_that_disappears_mid_probe_is_skipped_and_noted() -> None:
    probe, _ = desktop_probe(rtx_4090(handle_error=NVML_ERROR_GPU_IS_LOST), rtx_5070ti())

    snap = probe.snapshot(now=0.0)

    assert [(gpu.index, gpu.name) for gpu in snap.gpus] == [(1, "NVIDIA GeForce RTX 5070 Ti")]
    assert snap.notes == ("GPU 0 skipped: GPU is lost",)


def test_unsupported_optional_queries_leave_fields_empty() -> None:
    probe, _ = desktop_probe(rtx_4090(bus_width_bits=None, display_active=None))

    (gpu,) = probe.snapshot(now=0.0).gpus

    assert gpu.bandwidth_bytes_s is None
    assert gpu.display_active is False
    assert gpu.total_bytes == RTX_4090_TOTAL


def test_unavailable_process_memory_sentinel_reads_as_unknown() -> None:
    # NVML_VALUE_NOT_AVAILABLE is an unsigned -1 in older pynvml.
    probe, _ = desktop_probe(rtx_5070ti(processes=[(9, 2**64 - 1)]))

    (gpu,) = probe.snapshot(now=0.0).gpus

    assert gpu.processes[0].pid == 9 and gpu.processes[0].used_bytes is None


def test_snapshot_stamps_with_the_injected_clock_when_no_time_is_given() -> None:
    probe = GpuProbe(nvml=FakeNvml([]), host=HostProbe(DESKTOP_HOST), clock=lambda: 42.0)

    assert probe.snapshot().taken_at == 42.0


def test_devices_from_snapshot_reserve_runtime_everywhere_and_display_only_where_active() -> None:
    probe, _ = desktop_probe(rtx_4090(), rtx_5070ti())

    big, small = devices_from_snapshot(probe.snapshot(now=0.0))

    assert isinstance(big, Device)
    assert big.name == "CUDA0 (NVIDIA GeForce RTX 4090)"
    assert small.name == "CUDA1 (NVIDIA GeForce RTX 5070 Ti)"
    assert (big.total_bytes, big.free_bytes) == (RTX_4090_TOTAL, 23_000 * MIB)
    # The CUDA context is the memory estimate's to charge; only the display is kept back here.
    assert big.reserve_bytes == DEFAULT_DISPLAY_RESERVE_BYTES
    assert small.reserve_bytes == 0
    assert not big.unified and big.bandwidth_bytes_s == pytest.approx(1008e9, rel=1e-3)
    assert (big.compute_capability, big.sm_count) == (89, 128)


def test_devices_from_snapshot_keeps_unified_memory_and_custom_reserves() -> None:
    nvml = FakeNvml([FakeGpu(name="NVIDIA GB10", total=0, free=0, memory_error=NVML_ERROR_NOT_SUPPORTED)])
    snap = GpuProbe(nvml=nvml, host=HostProbe(FakePsutil(SPARK_HOST_TOTAL, SPARK_HOST_AVAILABLE))).snapshot(
        now=0
    )

    (gb10,) = devices_from_snapshot(snap, display_reserve_bytes=0, runtime_reserve_bytes=2 * GIB)

    assert gb10.unified
    assert (gb10.total_bytes, gb10.free_bytes, gb10.reserve_bytes) == (
        SPARK_HOST_TOTAL,
        SPARK_HOST_AVAILABLE,
        2 * GIB,
    )


def test_missing_pynvml_module_is_cpu_only() -> None:
    # What for_this_machine() builds when `import pynvml` fails.
    probe = GpuProbe(nvml=None, host=HostProbe(DESKTOP_HOST))

    snap = probe.snapshot(now=0.0)

    assert snap.cpu_only and snap.gpus == ()
    assert snap.notes == ("CPU-only: no NVML module (nvidia-ml-py is not installed)",)


def test_cpu_only_snapshot_has_no_devices() -> None:
    snap = MachineSnapshot(
        gpus=(), host_total_bytes=GIB, host_available_bytes=GIB, unified=False, taken_at=0.0
    )

    assert snap.cpu_only and devices_from_snapshot(snap) == []


def test_real_pynvml_on_this_machine_never_raises() -> None:
    import psutil
    import pynvml

    probe = GpuProbe(nvml=pynvml, host=HostProbe(psutil))
    try:
        snap = probe.snapshot()
    finally:
        probe.close()

    assert snap.host_total_bytes > 0 and 0 < snap.host_available_bytes <= snap.host_total_bytes
    if snap.cpu_only:
        # The CI machine has no NVIDIA driver: the probe says why instead of raising.
        assert snap.notes and snap.notes[0].startswith("CPU-only")
    else:
        assert all(gpu.total_bytes > 0 and gpu.name for gpu in snap.gpus)
