"""Predicted decode and prefill speed from bytes read per token and memory bandwidth, calibrated (pure).

Decode is memory bound, with fixed costs per operation. Each token reads the active weights (MoE: the shared part
and the used experts only) and the KV cache filled so far; layers split over devices run one after the other:

    seconds per token = sum over places of weight bytes there / (bandwidth there x efficiency)
                      + weight matrices x tensor_s                  (each matmul's launch and tail)
                      + GPU boundaries of a layer split x split_s   (the hand-over between devices)
                      + per attention layer and cached token: attention x KV bytes / (bandwidth x efficiency)
                                                              + attend_s x attention_width (the kernel's own time)

where a place is a GPU (its layers, their KV, the output matrix on the last GPU) or system RAM (offloaded layers,
their KV, and the routed experts that --n-cpu-moe keeps there). The fixed cost per matrix is why a small model is
slower than its bytes say (GLM-4.7-Flash's 47 MLA+MoE blocks hold 13 matrices each: Q8_0 runs 109 tok/s on the
desktop, Q4_K_M only 1.2x faster at 0.58x the bytes); norms and biases are vectors that ride along in fused
kernels and are not counted (gpt-oss's 2-D per-expert biases are: spec._layer_tensor_counts says why). attend_s
is why decode falls with depth faster than the KV bytes say (published llama-bench -d sweeps: Qwen2.5 3B on an RTX
4090 loses 47% by 32k tokens, where its two KV heads' bytes alone would cost 25%); attention_width scales it for
layers wider or narrower than a typical one (MLA's 576-wide latent).

Calibration rule: one set of constants per device class (discrete GDDR GPU, HBM datacenter GPU, unified memory
GB10, CPU only), fitted by least squares on relative error over the `[[measured]]` points of every hardware
profile of that class (llama.cpp points only, single node, all layers on the GPUs): `fit_class`. The fitted
values are pinned in CLASS_CONSTANTS, and tests/test_measured_points.py re-fits them from the profiles and checks
each point leave-one-out. Per hardware on top of that:
- RAM efficiency = solved from a point with cpu_layers > 0 (its first cpu_layers layers and the output in RAM,
  the GPU part at the class constants); without one, RAM runs at the class efficiency.
- Prefill is compute bound, and compute per token scales with the active weights: a measured prefill point gives
  prefill_tok_s x active bytes, a constant per hardware (the point nearest in active bytes, log scale). Without
  one, prefill = decode at an empty context x FALLBACK_PREFILL_PER_DECODE. Offloaded layers slow prefill by the
  same factor as they slow the weight reads of decode. Prefill's growth with context is ignored.
Online: `Calibration` keeps an EWMA of measured / predicted per (node, model), and per node, from engine timings.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from hybridd.model.memory import MemoryEstimate, RunSettings, estimate_memory
from hybridd.model.spec import LayerSpec, ModelSpec
from hybridd.place.fit import Fit, fit_model
from hybridd.place.hardware import Hardware, SpeedPoint

# The engines hybridd runs, whose points calibrate and are checked. Ollama embeds llama.cpp with its own KV
# layout and scheduling: its offload point only calibrates the RAM tier.
PREFERRED_ENGINES = frozenset({"llama.cpp", "llama-cpp-python", "llama-server"})
RAM_CALIBRATING_ENGINES = PREFERRED_ENGINES | {"ollama"}
# CPU-only nodes have no published points: their RAM reads at this efficiency, as GPUs did before the class fit.
FALLBACK_EFFICIENCY = 0.35
# No measured prefill point: NVIDIA's llama.cpp gpt-oss-20b figure on the DGX Spark, pp2048 3670.42 / tg128 82.74.
FALLBACK_PREFILL_PER_DECODE = 3670.42 / 82.74
# Online correction: weight of the newest observation, and the range a ratio is trusted in (guards bad timings).
EWMA_ALPHA = 0.3
RATIO_MIN, RATIO_MAX = 0.1, 10.0
NODE_WIDE = "*"
# fit_class frees a term only when it cuts the sum of squared relative errors by this much (1% rms on one point)
FIT_MARGIN = 1e-4


HBM_BANDWIDTH = 2e12  # bytes/s from which a GPU is in the HBM class (GDDR7's RTX 5090 reads 1.8 TB/s)


class DeviceClass(StrEnum):
    """Hardware that shares one calibration."""

    DISCRETE = "discrete-gpu"
    HBM = "hbm-gpu"  # datacenter GPUs (H100, H200): HBM at 2+ TB/s, a server's host, often a VM
    UNIFIED = "unified"  # GB10: the GPU reads the host's LPDDR5X pool
    CPU = "cpu"


def device_class(hw: Hardware) -> DeviceClass:
    """The class whose constants `hw` predicts with."""
    if not hw.devices:
        return DeviceClass.CPU
    if hw.unified:
        return DeviceClass.UNIFIED
    slowest = min(d.bandwidth_bytes_s or 0.0 for d in hw.devices)
    return DeviceClass.HBM if slowest >= HBM_BANDWIDTH else DeviceClass.DISCRETE


@dataclass(frozen=True, slots=True)
class ClassConstants:
    """A device class's calibration: bandwidth efficiency, fixed seconds per matrix per token, attention costs."""

    efficiency: float  # fraction of the rated bandwidth weight reads reach
    tensor_s: float  # fixed seconds per weight matrix per decoded token (kernel launch and tail)
    attention: float  # KV bytes cost this many times their read time at `efficiency`
    attend_s: float = 0.0  # seconds per attention layer (x attention_width) per cached token: the kernel's own
    split_s: float = 0.0  # fixed seconds per token for each device boundary of a layer split (sync and copy)


# fit_class over the profiles' points (tests/test_measured_points.py re-fits these and fails when they drift).
CLASS_CONSTANTS: Mapping[DeviceClass, ClassConstants] = {
    # RTX 4090 sweep (Qwen2.5 3B) and the desktop's GLM-4.7-Flash Q8_0/Q4_K_M pair: rated bandwidth, 7.5 us per
    # weight matrix, 0.64 ms for the desktop's 4090 -> 5070 Ti boundary, 2.2 ns per attention layer of typical
    # width per cached token
    DeviceClass.DISCRETE: ClassConstants(efficiency=1.0, tensor_s=7.46e-6, attention=1.0, attend_s=2.25e-9,
                                         split_s=6.43e-4),
    # H200 sweeps of architecture twins (bench/gpu_check.sh: Llama 3.2 3B, Llama 3.1 8B, Qwen3-Coder-30B-A3B,
    # GLM-4.7-Flash): 60% of 4.8 TB/s, 9.4 us per weight matrix, 0.45 ns per attention layer per cached token
    DeviceClass.HBM: ClassConstants(efficiency=0.602, tensor_s=9.39e-6, attention=1.0, attend_s=4.53e-10),
    # DGX Spark sweeps (gpt-oss-20b/120b, Qwen3-Coder-30B-A3B, Qwen2.5-Coder 7B) and GLM-4.7-Flash Q8_0: 88% of
    # 273 GB/s, 13 us per weight matrix, KV read at 1.14x its bytes
    DeviceClass.UNIFIED: ClassConstants(efficiency=0.877, tensor_s=1.325e-5, attention=1.144),
    DeviceClass.CPU: ClassConstants(efficiency=FALLBACK_EFFICIENCY, tensor_s=0.0, attention=1.0),
}


@dataclass(frozen=True, slots=True)
class ReadLayout:
    """What a decoded token reads, by place: a device name, or RAM."""

    weight_bytes: tuple[tuple[str, int], ...]  # (device name, bytes); RAM appears under RAM_PLACE
    kv_bytes_per_cell: tuple[tuple[str, float, int], ...]  # (device, bytes per cached token, cells cap)
    n_tensors: int = 0  # weight matrices of the trunk layers (matmuls per decode step)
    attention_layers: tuple[tuple[str, float, int], ...] = ()  # (device, layers x attention_width, cells cap)


RAM_PLACE = "ram"


@dataclass(frozen=True, slots=True)
class SpeedModel:
    """Decode seconds per token as weight reads + fixed op costs + KV reads growing with context; prefill tok/s."""

    weight_s: float  # seconds per token reading weights and running the ops (efficiencies applied)
    kv_s: tuple[tuple[float, int], ...]  # (seconds per cached token, cells cap) per group of layers
    prefill_tok_s: float

    def seconds_per_token(self, context_tokens: float, streams: int = 1) -> float:
        """Decode seconds for one token when `context_tokens` are in the cache. With `streams` requests decoding at
        once (parallel slots), one step reads the weights once for all and each one's KV cache: the memory-bound
        step of batched decoding."""
        return self.weight_s + max(1, streams) * sum(s * min(max(context_tokens, 0), cap) for s, cap in self.kv_s)

    def decode_tok_s(self, context_tokens: float, factor: float = 1.0, streams: int = 1) -> float:
        """Decode tok/s of one request at `context_tokens` of context among `streams` decoding at once, times the
        online correction `factor`."""
        return factor / self.seconds_per_token(context_tokens, streams)

    def mean_decode_tok_s(self, prompt_tokens: int, completion_tokens: int, factor: float = 1.0,
                          streams: int = 1) -> float:
        """Tokens per second over a whole completion that starts with `prompt_tokens` cached: completion tokens
        over the sum of each token's seconds (each KV term is linear up to its cap, so this is exact)."""
        n = max(completion_tokens, 1)
        start, end = max(prompt_tokens, 0), max(prompt_tokens, 0) + n
        kv = 0.0
        for s, cap in self.kv_s:
            # mean of min(d, cap) for d uniform over [start, end]
            if end <= cap:
                mean = (start + end) / 2
            elif start >= cap:
                mean = cap
            else:
                mean = ((cap - start) * (start + cap) / 2 + (end - cap) * cap) / (end - start)
            kv += s * mean
        return factor / (self.weight_s + max(1, streams) * kv)


ATTENTION_WIDTH = 8192  # query heads x (key + value head size) of a typical layer: 32 x (128 + 128)


def attention_width(layer: LayerSpec) -> float:
    """What one cached token costs `layer`'s attention kernel against a typical layer: the square root of query
    heads x (key + value head size). The work grows with that product, the time more slowly, as the heads of a
    KV group share their loads: GLM-4.7-Flash's MLA (20 heads over a 576/512 latent, 2.7x the work of a typical
    layer) costs about 1.4x a GQA layer per cached token on an H200 (bench/results/gpu_check-NVIDIA-H200*.json),
    and its one published CUDA point at depth (RTX 3090, llama.cpp PR #19092, d32768) comes out 5% low with the
    square root, 38% low with the product itself and 25% high with no width at all."""
    return math.sqrt(layer.n_head * (layer.key_length + layer.value_length) / ATTENTION_WIDTH)


def read_layout(spec: ModelSpec, est: MemoryEstimate, fit: Fit) -> ReadLayout:
    """Where each byte read per decoded token lives under `fit` (the layers of `est`, in order)."""
    weights: dict[str, int] = {}
    kv: dict[tuple[str, int], float] = {}
    attending: dict[tuple[str, int], float] = {}
    owner: dict[int, str] = {}
    for d in fit.devices:
        for i in d.layers:
            owner[i] = d.name
    stream = max(est.geometry.n_stream, 1)
    tensors = 0
    for i, mem in enumerate(est.layers):
        layer = spec.layers[i]
        tensors += layer.n_tensors
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
            attending[key] = attending.get(key, 0) + attention_width(layer)
    # the output matrix follows the last layer when every layer is on a GPU, else it stays in RAM (fit.py)
    last = max((d for d in fit.devices if d.layers), key=lambda d: max(d.layers), default=None)
    out_place = last.name if (last is not None and fit.offload_layers == 0) else RAM_PLACE
    weights[out_place] = weights.get(out_place, 0) + est.output_weight_bytes
    return ReadLayout(tuple(sorted(weights.items())), tuple((p, b, c) for (p, c), b in sorted(kv.items())), tensors,
                      tuple((p, n, c) for (p, c), n in sorted(attending.items())))


def _place_bandwidth(hw: Hardware, place: str, gpu_eff: float, ram_eff: float) -> float:
    if place == RAM_PLACE:
        return hw.ram_bandwidth_bytes_s * ram_eff
    return hw.bandwidth_of(place) * gpu_eff


def _weight_seconds(hw: Hardware, layout: ReadLayout, gpu_eff: float, ram_eff: float) -> float:
    return sum(b / _place_bandwidth(hw, p, gpu_eff, ram_eff) for p, b in layout.weight_bytes)


def _kv_terms(hw: Hardware, layout: ReadLayout, gpu_eff: float, ram_eff: float,
              attention: float) -> tuple[tuple[float, int], ...]:
    return tuple((attention * b / _place_bandwidth(hw, p, gpu_eff, ram_eff), c) for p, b, c in layout.kv_bytes_per_cell)


@dataclass(frozen=True, slots=True)
class Observation:
    """One measured point as the class fit sees it: seconds per token = bytes_s / efficiency + tensors x
    tensor_s + kv_s x attention / efficiency + layer_tokens x attend_s (bytes_s and kv_s at full bandwidth,
    kv_s and layer_tokens at the mean depth)."""

    bytes_s: float
    tensors: int
    kv_s: float
    layer_tokens: float  # sum over attention layers of the tokens each one attends to at the mean depth
    splits: int  # device boundaries a token crosses (GPUs holding layers - 1)
    seconds: float  # measured: 1 / decode tok/s


def point_placement(point: SpeedPoint, hw: Hardware) -> tuple[MemoryEstimate, Fit] | None:
    """The memory estimate and the idle fit of a measured point's model at its context, or None when the point
    cannot be planned (no model profile, or it does not fit the GPUs)."""
    if point.spec is None:
        return None
    settings = RunSettings(ctx=max(point.run_ctx, 256), type_k=point.kv_type, type_v=point.kv_type)
    est = estimate_memory(point.spec, settings)
    fit = fit_model(est, hw.idle().devices, hw.ram_bytes)
    return (est, fit) if fit.runs else None


def _splits(fit: Fit) -> int:
    return max(0, sum(1 for d in fit.devices if d.layers) - 1)


def observe_point(point: SpeedPoint, hw: Hardware) -> Observation | None:
    """`point` as a fit observation: all layers on the GPUs, llama.cpp, one node; None when it is not one."""
    if point.engine not in PREFERRED_ENGINES or point.nodes != 1 or point.cpu_layers:
        return None
    placed = point_placement(point, hw)
    if placed is None or not placed[1].fits:
        return None
    est, fit = placed
    layout = read_layout(point.spec, est, fit) if point.spec is not None else None
    assert layout is not None
    depth = point.mean_depth
    kv_s = sum(s * min(depth, cap) for s, cap in _kv_terms(hw, layout, 1.0, 1.0, 1.0))
    layer_tokens = sum(n * min(depth, cap) for _, n, cap in layout.attention_layers)
    return Observation(_weight_seconds(hw, layout, 1.0, 1.0), layout.n_tensors, kv_s, layer_tokens,
                       _splits(fit), 1.0 / point.decode_tok_s)


def _solve(rows: Sequence[Sequence[float]], rhs: Sequence[float]) -> list[float] | None:
    """Gaussian elimination for a small square system; None when singular."""
    n = len(rhs)
    m = [[*r, b] for r, b in zip(rows, rhs, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-18:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [a - f * b for a, b in zip(m[r], m[col], strict=True)]
    return [m[i][n] / m[i][i] for i in range(n)]


def fit_class(observations: Iterable[Observation], fallback: ClassConstants) -> ClassConstants:
    """Least squares on relative error of seconds = bytes_s x a + tensors x b + kv_s x c + layer_tokens x d +
    splits x e (a = 1 / efficiency, b = tensor_s, c = attention / efficiency, d = attend_s, e = split_s), keeping
    efficiency <= 1, attention >= 1 and the fixed costs >= 0; `fallback` without points. Each bound is tried
    held and free; the feasible fit with the least error wins, the simpler one unless the error falls by more
    than FIT_MARGIN."""
    obs = list(observations)
    if not obs:
        return fallback
    best: tuple[float, ClassConstants] | None = None
    # the simplest designs first (most terms held at their bound), a freed term kept only when it cuts the error:
    # with few points several designs fit exactly, and the one at the physical bounds is the one to trust
    for held in itertools.product((True, False), repeat=5):
        hold_a, hold_b, hold_c, hold_d, hold_e = held
        rows, known = [], []
        for o in obs:
            # held: a = 1 (rated bandwidth), c = a (attention 1), b = d = e = 0
            read = o.bytes_s + (o.kv_s if hold_c else 0.0)
            free = [(hold_a, read), (hold_b, o.tensors), (hold_c, o.kv_s), (hold_d, o.layer_tokens),
                    (hold_e, o.splits)]
            rows.append([x / o.seconds for hold, x in free if not hold])
            known.append(read / o.seconds if hold_a else 0.0)
        k = len(rows[0])
        if k == 0:
            continue
        normal = [[sum(r[i] * r[j] for r in rows) for j in range(k)] for i in range(k)]
        solution = _solve(normal, [sum(r[i] * (1 - f) for r, f in zip(rows, known, strict=True)) for i in range(k)])
        if solution is None:
            continue
        values = iter(solution)
        a = 1.0 if hold_a else next(values)
        b = 0.0 if hold_b else next(values)
        c = a if hold_c else next(values)
        d = 0.0 if hold_d else next(values)
        e = 0.0 if hold_e else next(values)
        if a < 1 - 1e-9 or min(b, d, e) < 0 or c < a * (1 - 1e-9):
            continue
        cost = sum(((o.bytes_s * a + o.tensors * b + o.kv_s * c + o.layer_tokens * d + o.splits * e) / o.seconds
                    - 1) ** 2 for o in obs)
        if best is None or cost < best[0] - FIT_MARGIN:
            best = (cost, ClassConstants(efficiency=1 / a, tensor_s=b, attention=c / a, attend_s=d, split_s=e))
    return fallback if best is None else best[1]


@dataclass(frozen=True, slots=True)
class Efficiency:
    """A hardware's calibration: its class constants, its RAM tier and its prefill points."""

    constants: ClassConstants
    ram: float | None
    prefill: tuple[tuple[int, float, bool], ...]  # (active bytes, prefill_tok_s x active bytes, preferred)

    def prefill_constant(self, active_bytes: int) -> float | None:
        """prefill tok/s x active bytes from the nearest prefill point, or None when there is none."""
        preferred = [p for p in self.prefill if p[2]] or list(self.prefill)
        if not preferred:
            return None
        target = max(active_bytes, 1)
        return min(preferred, key=lambda p: (abs(math.log(max(p[0], 1) / target)), -p[1]))[1]


def _without_first_layers(fit: Fit, k: int) -> Fit:
    """`fit` with its first k layers (and so the output) moved to RAM, as -ngl does for a cpu_layers point."""
    devices = tuple(replace(d, layers=tuple(i for i in d.layers if i >= k)) for d in fit.devices)
    return replace(fit, fits=False, devices=devices, offload_layers=k)


def calibrate(hw: Hardware, constants: ClassConstants | None = None) -> Efficiency:
    """The calibration of `hw`: its class constants (or `constants`), RAM from a cpu_layers point, prefill."""
    const = constants or CLASS_CONSTANTS[device_class(hw)]
    prefill: list[tuple[int, float, bool]] = []
    ram: float | None = None
    for p in hw.measured:
        if p.spec is None or p.nodes != 1 or p.engine not in RAM_CALIBRATING_ENGINES:
            continue
        active = p.spec.active_bytes_per_token
        if p.prefill_tok_s and not p.cpu_layers:
            prefill.append((active, p.prefill_tok_s * active, p.engine in PREFERRED_ENGINES))
        if p.cpu_layers and ram is None and hw.devices and not hw.unified:
            ram = _ram_efficiency(p, hw, const)
    return Efficiency(const, ram, tuple(prefill))


def _ram_efficiency(p: SpeedPoint, hw: Hardware, const: ClassConstants) -> float | None:
    placed = point_placement(p, hw)
    if placed is None or p.spec is None:
        return None
    est, fit = placed
    layout = read_layout(p.spec, est, _without_first_layers(fit, p.cpu_layers))
    ram_bytes = sum(b for place, b in layout.weight_bytes if place == RAM_PLACE)
    on_gpu = ReadLayout(tuple(x for x in layout.weight_bytes if x[0] != RAM_PLACE), ())
    gpu_s = _weight_seconds(hw, on_gpu, const.efficiency, 1.0) + layout.n_tensors * const.tensor_s
    left = 1.0 / p.decode_tok_s - gpu_s
    return ram_bytes / hw.ram_bandwidth_bytes_s / left if ram_bytes and left > 0 else None


_CALIBRATIONS: dict[tuple[object, ...], Efficiency] = {}


def _calibration_key(hw: Hardware) -> tuple[object, ...]:
    # capacities change on every probe; the calibration depends only on what the hardware is and its points
    devices = tuple((d.name, d.total_bytes, d.reserve_bytes, d.unified, d.bandwidth_bytes_s) for d in hw.devices)
    points = tuple((p.model, p.engine, p.decode_tok_s, p.prefill_tok_s, p.prompt_tokens, p.ctx, p.kv_type,
                    p.cpu_layers, p.nodes, id(p.spec)) for p in hw.measured)
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


def speed_model(spec: ModelSpec, est: MemoryEstimate, fit: Fit, hw: Hardware,
                constants: ClassConstants | None = None) -> SpeedModel:
    """Predicted speed of `spec` placed by `fit` on `hw`, with its class constants (or `constants`)."""
    eff = efficiency(hw) if constants is None else calibrate(hw, constants)
    const = eff.constants
    gpu_eff = const.efficiency
    ram_eff = eff.ram if eff.ram is not None else gpu_eff
    if hw.unified or not hw.devices:
        # no separate RAM tier: everything reads at the pool's speed
        ram_eff = gpu_eff
    layout = read_layout(spec, est, fit)
    # A header that declares no weights (broken or lying) must not divide by zero: one byte per token.
    read_s = max(_weight_seconds(hw, layout, gpu_eff, ram_eff), 1.0 / (hw.ram_bandwidth_bytes_s or 1.0))
    weight_s = read_s + layout.n_tensors * const.tensor_s + _splits(fit) * const.split_s
    kv_s = _kv_terms(hw, layout, gpu_eff, ram_eff, const.attention)
    if const.attend_s:
        kv_s += tuple((n * const.attend_s, c) for _, n, c in layout.attention_layers)
    # the same bytes all on GPUs: how much the RAM tier slows the weight reads
    total_bytes = sum(b for _, b in layout.weight_bytes)
    gpu_bw = [hw.bandwidth_of(d.name) * gpu_eff for d in hw.devices] or [hw.ram_bandwidth_bytes_s * ram_eff]
    on_gpu_s = total_bytes / (sum(gpu_bw) / len(gpu_bw))
    slowdown = read_s / on_gpu_s if on_gpu_s > 0 else 1.0
    active = spec.active_bytes_per_token
    constant = eff.prefill_constant(active)
    if constant is not None:
        prefill = constant / max(active, 1) / max(slowdown, 1.0)
    else:
        prefill = FALLBACK_PREFILL_PER_DECODE / weight_s
    return SpeedModel(weight_s, kv_s, prefill)


def predict_point(point: SpeedPoint, hw: Hardware, constants: ClassConstants | None = None) -> float | None:
    """The predicted mean decode tok/s of a measured point's request (its model, quant, context, cache type,
    prompt and completion), or None when the point cannot be planned."""
    placed = point_placement(point, hw)
    if placed is None or point.spec is None:
        return None
    est, fit = placed
    if point.cpu_layers:
        fit = _without_first_layers(fit, point.cpu_layers)
    model = speed_model(point.spec, est, fit, hw, constants)
    return model.mean_decode_tok_s(point.prompt_tokens, point.completion_tokens)


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
