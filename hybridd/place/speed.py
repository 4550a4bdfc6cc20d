"""Predicted decode and prefill speed from bytes read per token and memory bandwidth, calibrated (pure).

Decode is memory bound: each token reads the active weights (MoE: the shared part and the used experts only) and
the KV cache filled so far. Layers split over devices run one after the other, so

    seconds per token = sum over places of bytes read there / (bandwidth there x efficiency there)

where a place is a GPU (its layers, their KV, the output matrix on the last GPU) or system RAM (offloaded layers,
their KV, and the routed experts that --n-cpu-moe keeps there).

Calibration rule (offline, from the hardware profile's measured points, single node, llama.cpp preferred):
- GPU efficiency = measured tok/s x predicted seconds per token at efficiency 1, from the measured point whose
  model's active bytes per token are nearest (log scale) to the predicted model's. A point without a context is
  taken as measured at an empty context (llama-bench tg128). No usable point: FALLBACK_EFFICIENCY.
- RAM efficiency = solved from a point with cpu_layers > 0 (its first cpu_layers layers and the output in RAM,
  GPU part at the GPU efficiency); without one, RAM runs at the GPU efficiency.
- Prefill is compute bound, and compute per token scales with the active weights: a measured prefill point gives
  prefill_tok_s x active bytes, a constant per hardware (nearest point again). Without one, prefill =
  decode at an empty context x FALLBACK_PREFILL_PER_DECODE. Offloaded layers slow prefill by the same factor as
  they slow the weight reads of decode. Prefill's growth with context is ignored.
Online: `Calibration` keeps an EWMA of measured / predicted per (node, model), and per node, from engine timings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hybridd.model.memory import MemoryEstimate, RunSettings, estimate_memory
from hybridd.model.spec import ModelSpec
from hybridd.place.fit import Fit, fit_model
from hybridd.place.hardware import Hardware, SpeedPoint

# The engines hybridd runs; their points calibrate first. Ollama embeds llama.cpp, so its points are the fallback.
PREFERRED_ENGINES = frozenset({"llama.cpp", "llama-cpp-python", "llama-server"})
CALIBRATING_ENGINES = PREFERRED_ENGINES | {"ollama"}
# No measured point at all: the DGX Spark's llama.cpp GLM-4.7-Flash Q4_K_M point (43 tok/s of 124 at 273 GB/s).
FALLBACK_EFFICIENCY = 0.35
# No measured prefill point: NVIDIA's llama.cpp gpt-oss-20b figure on the DGX Spark, pp2048 3670.42 / tg128 82.74.
FALLBACK_PREFILL_PER_DECODE = 3670.42 / 82.74
# Online correction: weight of the newest observation, and the range a ratio is trusted in (guards bad timings).
EWMA_ALPHA = 0.3
RATIO_MIN, RATIO_MAX = 0.1, 10.0
NODE_WIDE = "*"


@dataclass(frozen=True, slots=True)
class ReadLayout:
    """Bytes read per decoded token, by place: a device name, or RAM."""

    weight_bytes: tuple[tuple[str, int], ...]  # (device name, bytes); RAM appears under RAM_PLACE
    kv_bytes_per_cell: tuple[tuple[str, float, int], ...]  # (device, bytes per cached token, cells cap)


RAM_PLACE = "ram"


@dataclass(frozen=True, slots=True)
class SpeedModel:
    """Decode seconds per token as weight reads + KV reads growing with context; prefill tok/s."""

    weight_s: float  # seconds per token reading weights (efficiencies applied)
    kv_s: tuple[tuple[float, int], ...]  # (seconds per cached token, cells cap) per group of layers
    prefill_tok_s: float

    def seconds_per_token(self, context_tokens: int, streams: int = 1) -> float:
        """Decode seconds for one token when `context_tokens` are in the cache. With `streams` requests decoding at
        once (parallel slots), one step reads the weights once for all and each one's KV cache: the memory-bound
        step of batched decoding."""
        return self.weight_s + max(1, streams) * sum(s * min(max(context_tokens, 0), cap) for s, cap in self.kv_s)

    def decode_tok_s(self, context_tokens: int, factor: float = 1.0, streams: int = 1) -> float:
        """Decode tok/s of one request at `context_tokens` of context among `streams` decoding at once, times the
        online correction `factor`."""
        return factor / self.seconds_per_token(context_tokens, streams)


def read_layout(spec: ModelSpec, est: MemoryEstimate, fit: Fit) -> ReadLayout:
    """Where each byte read per decoded token lives under `fit` (the layers of `est`, in order)."""
    weights: dict[str, int] = {}
    kv: dict[tuple[str, int], float] = {}
    owner: dict[int, str] = {}
    for d in fit.devices:
        for i in d.layers:
            owner[i] = d.name
    stream = max(est.geometry.n_stream, 1)
    for i, mem in enumerate(est.layers):
        layer = spec.layers[i]
        place = owner.get(i, RAM_PLACE)
        active = layer.active_bytes
        if place != RAM_PLACE and i < fit.n_cpu_moe and layer.expert_bytes:
            # the chosen experts are read from RAM; the dense part of the layer stays on its GPU
            experts = active - (layer.weight_bytes - layer.expert_bytes)
            weights[RAM_PLACE] = weights.get(RAM_PLACE, 0) + experts
            active -= experts
        weights[place] = weights.get(place, 0) + active
        if mem.cells:
            key = (place, mem.cells)
            kv[key] = kv.get(key, 0.0) + mem.kv_bytes / (mem.cells * stream)
    # the output matrix follows the last layer when every layer is on a GPU, else it stays in RAM (fit.py)
    last = max((d for d in fit.devices if d.layers), key=lambda d: max(d.layers), default=None)
    out_place = last.name if (last is not None and fit.offload_layers == 0) else RAM_PLACE
    weights[out_place] = weights.get(out_place, 0) + est.output_weight_bytes
    return ReadLayout(tuple(sorted(weights.items())), tuple((p, b, c) for (p, c), b in sorted(kv.items())))


def _place_bandwidth(hw: Hardware, place: str, gpu_eff: float, ram_eff: float) -> float:
    if place == RAM_PLACE:
        return hw.ram_bandwidth_bytes_s * ram_eff
    return hw.bandwidth_of(place) * gpu_eff


def _weight_seconds(hw: Hardware, layout: ReadLayout, gpu_eff: float, ram_eff: float) -> float:
    return sum(b / _place_bandwidth(hw, p, gpu_eff, ram_eff) for p, b in layout.weight_bytes)


def _kv_terms(hw: Hardware, layout: ReadLayout, gpu_eff: float, ram_eff: float) -> tuple[tuple[float, int], ...]:
    return tuple((b / _place_bandwidth(hw, p, gpu_eff, ram_eff), c) for p, b, c in layout.kv_bytes_per_cell)


@dataclass(frozen=True, slots=True)
class Efficiency:
    """A hardware's calibration from its measured points: GPU efficiency by active bytes, RAM, prefill."""

    gpu: tuple[tuple[int, float, bool], ...]  # (active bytes per token, efficiency, from a preferred engine)
    ram: float | None
    prefill: tuple[tuple[int, float, bool], ...]  # (active bytes, prefill_tok_s x active bytes, preferred)

    def gpu_for(self, active_bytes: int) -> float:
        """The efficiency of the point nearest in active bytes (log scale); preferred engines first."""
        found = _nearest(self.gpu, active_bytes)
        return FALLBACK_EFFICIENCY if found is None else found

    def prefill_constant(self, active_bytes: int) -> float | None:
        """prefill tok/s x active bytes from the nearest prefill point, or None when there is none."""
        return _nearest(self.prefill, active_bytes)


def _nearest(points: Sequence[tuple[int, float, bool]], active_bytes: int) -> float | None:
    preferred = [p for p in points if p[2]] or list(points)
    if not preferred:
        return None
    target = max(active_bytes, 1)
    return min(preferred, key=lambda p: (abs(math.log(max(p[0], 1) / target)), -p[1]))[1]


def _point_fit(point: SpeedPoint, hw: Hardware) -> tuple[MemoryEstimate, Fit] | None:
    assert point.spec is not None
    est = estimate_memory(point.spec, RunSettings(ctx=max(point.context_tokens, 4096)))
    fit = fit_model(est, hw.idle().devices, hw.ram_bytes)
    return (est, fit) if fit.fits else None


def _without_first_layers(fit: Fit, k: int) -> Fit:
    """`fit` with its first k layers (and so the output) moved to RAM, as -ngl does for a cpu_layers point."""
    from dataclasses import replace

    devices = tuple(replace(d, layers=tuple(i for i in d.layers if i >= k)) for d in fit.devices)
    return replace(fit, fits=False, devices=devices, offload_layers=k)


def calibrate(hw: Hardware) -> Efficiency:
    """The calibration of `hw` from its measured points (see the module docstring for the rule)."""
    gpu: list[tuple[int, float, bool]] = []
    prefill: list[tuple[int, float, bool]] = []
    offload_points: list[SpeedPoint] = []
    for p in hw.measured:
        if p.spec is None or p.nodes != 1 or p.engine not in CALIBRATING_ENGINES:
            continue
        if p.cpu_layers:
            offload_points.append(p)
            continue
        placed = _point_fit(p, hw)
        if placed is None:
            continue
        est, fit = placed
        layout = read_layout(p.spec, est, fit)
        raw_s = _weight_seconds(hw, layout, 1.0, 1.0) + sum(
            s * min(p.context_tokens, cap) for s, cap in _kv_terms(hw, layout, 1.0, 1.0))
        preferred = p.engine in PREFERRED_ENGINES
        active = p.spec.active_bytes_per_token
        gpu.append((active, p.decode_tok_s * raw_s, preferred))
        if p.prefill_tok_s:
            prefill.append((active, p.prefill_tok_s * active, preferred))
    eff = Efficiency(tuple(gpu), None, tuple(prefill))
    for p in offload_points:
        assert p.spec is not None
        placed = _point_fit(p, hw)
        if placed is None:
            continue
        est, fit = placed
        layout = read_layout(p.spec, est, _without_first_layers(fit, p.cpu_layers))
        gpu_eff = eff.gpu_for(p.spec.active_bytes_per_token)
        ram_bytes = sum(b for place, b in layout.weight_bytes if place == RAM_PLACE)
        gpu_s = _weight_seconds(hw, ReadLayout(tuple(x for x in layout.weight_bytes if x[0] != RAM_PLACE), ()),
                                gpu_eff, 1.0)
        left = 1.0 / p.decode_tok_s - gpu_s
        if ram_bytes and left > 0:
            return Efficiency(eff.gpu, ram_bytes / hw.ram_bandwidth_bytes_s / left, eff.prefill)
    return eff


_CALIBRATIONS: dict[tuple[object, ...], Efficiency] = {}


def _calibration_key(hw: Hardware) -> tuple[object, ...]:
    # capacities change on every probe; the calibration depends only on what the hardware is and its points
    devices = tuple((d.name, d.total_bytes, d.reserve_bytes, d.unified, d.bandwidth_bytes_s) for d in hw.devices)
    points = tuple((p.model, p.engine, p.decode_tok_s, p.prefill_tok_s, p.context_tokens, p.cpu_layers, p.nodes,
                    id(p.spec)) for p in hw.measured)
    return (hw.name, devices, hw.ram_bytes, hw.ram_bandwidth_bytes_s, points)


def efficiency(hw: Hardware) -> Efficiency:
    """calibrate(hw), memoised by what the hardware is (not by its current free bytes)."""
    key = _calibration_key(hw)
    found = _CALIBRATIONS.get(key)
    if found is None:
        if len(_CALIBRATIONS) > 256:
            _CALIBRATIONS.clear()
        found = _CALIBRATIONS[key] = calibrate(hw)
    return found


def speed_model(spec: ModelSpec, est: MemoryEstimate, fit: Fit, hw: Hardware) -> SpeedModel:
    """Predicted speed of `spec` placed by `fit` on `hw`, calibrated by the hardware's measured points."""
    eff = efficiency(hw)
    active = spec.active_bytes_per_token
    gpu_eff = eff.gpu_for(active)
    ram_eff = eff.ram if eff.ram is not None else gpu_eff
    if hw.unified or not hw.devices:
        # no separate RAM tier: everything reads at the pool's speed
        ram_eff = gpu_eff
    layout = read_layout(spec, est, fit)
    # A header that declares no weights (broken or lying) must not divide by zero: one byte per token.
    weight_s = max(_weight_seconds(hw, layout, gpu_eff, ram_eff), 1.0 / (hw.ram_bandwidth_bytes_s or 1.0))
    kv_s = _kv_terms(hw, layout, gpu_eff, ram_eff)
    # the same bytes all on GPUs: how much the RAM tier slows the weight reads
    total_bytes = sum(b for _, b in layout.weight_bytes)
    gpu_bw = [hw.bandwidth_of(d.name) * gpu_eff for d in hw.devices] or [hw.ram_bandwidth_bytes_s * ram_eff]
    on_gpu_s = total_bytes / (sum(gpu_bw) / len(gpu_bw))
    slowdown = weight_s / on_gpu_s if on_gpu_s > 0 else 1.0
    constant = eff.prefill_constant(active)
    if constant is not None:
        prefill = constant / max(active, 1) / max(slowdown, 1.0)
    else:
        prefill = FALLBACK_PREFILL_PER_DECODE / weight_s
    return SpeedModel(weight_s, kv_s, prefill)


@dataclass(frozen=True)
class Calibration:
    """Online correction: EWMA of measured / predicted decode tok/s per (node, model) and per node."""

    ratios: Mapping[tuple[str, str], float] = field(default_factory=dict)
    alpha: float = EWMA_ALPHA

    def factor(self, node: str, model: str) -> float:
        """Multiply a prediction for `model` on `node` by this; 1.0 until something was observed."""
        found = self.ratios.get((node, model))
        if found is None:
            found = self.ratios.get((node, NODE_WIDE), 1.0)
        return found

    def observe(self, node: str, model: str, predicted_tok_s: float, measured_tok_s: float) -> Calibration:
        """A new Calibration with one engine timing folded in; `predicted_tok_s` is the uncorrected prediction."""
        if not (predicted_tok_s > 0 and measured_tok_s > 0) or math.isinf(predicted_tok_s + measured_tok_s):
            return self
        ratio = min(max(measured_tok_s / predicted_tok_s, RATIO_MIN), RATIO_MAX)
        updated = dict(self.ratios)
        for key in ((node, model), (node, NODE_WIDE)):
            old = updated.get(key)
            updated[key] = ratio if old is None else (1 - self.alpha) * old + self.alpha * ratio
        return Calibration(updated, self.alpha)
