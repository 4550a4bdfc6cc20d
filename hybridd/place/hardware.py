"""A node's hardware as plain data for placement and speed prediction (pure); probes and profiles build it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from hybridd.model.spec import ModelSpec
from hybridd.place.devices import Device

# A PCIe 4.0 NVMe reads ~7 GB/s sequentially; a llama.cpp load (mmap, then copy to the GPU) runs at roughly half
# that. Used only when the node's probe or config gives no figure.
DEFAULT_DISK_READ_BYTES_S = 3.5e9


@dataclass(frozen=True, slots=True)
class SpeedPoint:
    """A measured single-stream speed of a model on this hardware, with the request it was measured at and the
    model resolved for calibration."""

    model: str
    engine: str
    decode_tok_s: float  # representative figure: the midpoint when a range was published
    spec: ModelSpec | None  # None when the model (or its quant) has no profile: kept, but cannot calibrate
    prefill_tok_s: float | None = None
    prompt_tokens: int = 0  # tokens in the cache when decoding starts (llama-bench -d depth; a request's prompt)
    completion_tokens: int = 128  # tokens the decode speed is averaged over (llama-bench tg128 by default)
    ctx: int = 0  # the context the engine was started with; 0: prompt + completion (llama-bench)
    kv_type: str = "f16"  # K and V cache type
    cpu_layers: int = 0  # whole layers left in system RAM during the measurement
    nodes: int = 1
    quant: str | None = None
    decode_low: float = 0.0  # the published range, (decode_tok_s, decode_tok_s) without one
    decode_high: float = 0.0

    @property
    def run_ctx(self) -> int:
        """The context the engine ran with."""
        return self.ctx or self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Hardware:
    """One node: its accelerators (free = what is usable now), system RAM, load speed and measured points."""

    name: str
    devices: tuple[Device, ...]
    ram_bytes: int  # host RAM free for model parts; 0 on unified memory (the device is the pool)
    ram_bandwidth_bytes_s: float
    disk_read_bytes_s: float = DEFAULT_DISK_READ_BYTES_S
    measured: tuple[SpeedPoint, ...] = ()
    notes: tuple[str, ...] = ()  # why the node plans as it does, e.g. "engine ... is a CPU build: 2 GPUs unused"

    @property
    def unified(self) -> bool:
        """True when the accelerator shares the host's memory (GB10): nothing can spill to separate RAM."""
        return any(d.unified for d in self.devices)

    def bandwidth_of(self, device_name: str) -> float:
        """A device's memory bandwidth; unknown devices or bandwidths count at RAM speed (the safe side)."""
        for d in self.devices:
            if d.name == device_name and d.bandwidth_bytes_s:
                return d.bandwidth_bytes_s
        return self.ram_bandwidth_bytes_s

    def with_free(self, free_bytes: Mapping[str, int], ram_bytes: int | None = None) -> Hardware:
        """A copy whose devices have exactly `free_bytes[name]` usable (reserve already taken off) and RAM free."""
        devices = tuple(
            replace(d, free_bytes=max(0, free_bytes.get(d.name, d.usable_bytes)), reserve_bytes=0)
            for d in self.devices
        )
        return replace(self, devices=devices, ram_bytes=self.ram_bytes if ram_bytes is None else max(0, ram_bytes))

    def idle(self) -> Hardware:
        """A copy as if nothing ran: each device's free bytes = its total (the reserve stays kept back)."""
        return replace(self, devices=tuple(replace(d, free_bytes=d.total_bytes) for d in self.devices))
