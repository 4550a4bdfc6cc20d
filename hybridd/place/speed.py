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

On an HBM GPU (KERNEL_AWARE) the last line follows the flash-attention kernel llama.cpp picks per layer, depth
and GPU (place/attention.py): a cost per cached token for the vec kernel and one for the MMA kernel, each with
its KV reads inside, plus a cost per stream-k partial the MMA kernel's fixup combines; the routed experts'
matrices there have their own fixed cost.

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
from hybridd.place.attention import QUANTIZED_CACHE_TYPES, DecodeKernel, decode_kernel
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
    attention: float  # KV bytes cost this many times their read time at `efficiency` (0: in the kernels' costs)
    attend_s: float = 0.0  # seconds per attention layer (x attention_width) per cached token: the (vec) kernel's
    split_s: float = 0.0  # fixed seconds per token for each device boundary of a layer split (sync and copy)
    expert_tensor_s: float | None = None  # fixed seconds per routed-expert matrix (mul_mat_id); None: tensor_s
    mma_s: float = 0.0  # as attend_s, for a layer that runs the MMA kernel (kernel-aware classes only)
    partial_s: float = 0.0  # seconds per stream-k partial result an MMA layer combines, per token

    @property
    def expert_s(self) -> float:
        """Fixed seconds per routed-expert matrix."""
        return self.tensor_s if self.expert_tensor_s is None else self.expert_tensor_s


# fit_class over the profiles' points (tests/test_measured_points.py re-fits these and fails when they drift).
CLASS_CONSTANTS: Mapping[DeviceClass, ClassConstants] = {
    # RTX 4090 sweep (Qwen2.5 3B) and the desktop's GLM-4.7-Flash Q8_0/Q4_K_M pair: rated bandwidth, 7.5 us per
    # weight matrix, 0.64 ms for the desktop's 4090 -> 5070 Ti boundary, 2.2 ns per attention layer of typical
    # width per cached token
    DeviceClass.DISCRETE: ClassConstants(efficiency=1.0, tensor_s=7.46e-6, attention=1.0, attend_s=2.25e-9,
                                         split_s=6.43e-4),
    # H200 sweeps of architecture twins (bench/gpu_check.sh: Llama 3.2 3B, Llama 3.1 8B, Qwen3-Coder-30B-A3B,
    # GLM-4.7-Flash), kernel-aware: 66% of 4.8 TB/s, 10.2 us per weight matrix and 5.6 us per routed-expert
    # stack; per attention layer of typical width per cached token 1.9 ns in the vec kernel and 0.56 ns in the
    # MMA kernel (its reads included), plus 93 ns per stream-k partial its fixup combines
    DeviceClass.HBM: ClassConstants(efficiency=0.660, tensor_s=1.022e-5, attention=0.0, attend_s=1.903e-9,
                                    expert_tensor_s=5.573e-6, mma_s=5.555e-10, partial_s=9.303e-8),
    # DGX Spark sweeps (gpt-oss-20b/120b, Qwen3-Coder-30B-A3B, Qwen2.5-Coder 7B) and GLM-4.7-Flash Q8_0: 88% of
    # 273 GB/s, 13 us per weight matrix, KV read at 1.14x its bytes
    DeviceClass.UNIFIED: ClassConstants(efficiency=0.877, tensor_s=1.325e-5, attention=1.144),
    DeviceClass.CPU: ClassConstants(efficiency=FALLBACK_EFFICIENCY, tensor_s=0.0, attention=1.0),
}


@dataclass(frozen=True, slots=True)
class AttentionGroup:
    """Attention layers of one head shape on one place with one cache size."""

    place: str
    cells: int  # cells cap: the tokens a layer attends to at most (its window, or the context)
    shape: LayerSpec  # the first such layer: its heads pick the kernel
    layers: int
    width: float  # sum of attention_width over the layers


@dataclass(frozen=True, slots=True)
class ReadLayout:
    """What a decoded token reads, by place: a device name, or RAM."""

    weight_bytes: tuple[tuple[str, int], ...]  # (device name, bytes); RAM appears under RAM_PLACE
    kv_bytes_per_cell: tuple[tuple[str, float, int], ...]  # (device, bytes per cached token, cells cap)
    n_tensors: int = 0  # weight matrices of the trunk layers (matmuls per decode step)
    attention: tuple[AttentionGroup, ...] = ()
    n_expert_tensors: int = 0  # of n_tensors, the routed experts' stacks
    cache_type: str = "f16"  # quantized when either K or V is
    flash_attn: bool = True


RAM_PLACE = "ram"


def _integral_min(x: float, cap: float) -> float:
    """The integral of min(t, cap) for t from 0 to x."""
    x = max(x, 0.0)
    return x * x / 2 if x <= cap else cap * cap / 2 + (x - cap) * cap


@dataclass(frozen=True, slots=True)
class DepthTerm:
    """Seconds per decoded token that grow with the cached tokens d: per_token x min(d, cap) for start <= d < stop,
    else nothing (a kernel that runs only from or up to some depth)."""

    per_token: float
    cap: float
    start: float = 0.0
    stop: float = math.inf

    def at(self, depth: float) -> float:
        """Seconds at `depth` cached tokens."""
        return self.per_token * min(depth, self.cap) if self.start <= depth < self.stop else 0.0

    def mean(self, low: float, high: float) -> float:
        """The mean of `at` over depths uniform in [low, high] (exact: the term is piecewise linear)."""
        if high <= low:
            return self.at(low)
        a, b = max(low, self.start), min(high, self.stop)
        if b <= a:
            return 0.0
        return self.per_token * (_integral_min(b, self.cap) - _integral_min(a, self.cap)) / (high - low)

    def scaled(self, k: float) -> DepthTerm:
        """This term costing k times as much."""
        return replace(self, per_token=self.per_token * k)


@dataclass(frozen=True, slots=True)
class SpeedModel:
    """Decode seconds per token as weight reads + fixed op costs + KV reads growing with context; prefill tok/s."""

    weight_s: float  # seconds per token reading weights and running the ops (efficiencies applied)
    depth: tuple[DepthTerm, ...]  # KV reads and attention kernels, growing with the cached tokens
    prefill_tok_s: float

    def seconds_per_token(self, context_tokens: float, streams: int = 1) -> float:
        """Decode seconds for one token when `context_tokens` are in the cache. With `streams` requests decoding at
        once (parallel slots), one step reads the weights once for all and each one's KV cache: the memory-bound
        step of batched decoding."""
        depth = max(context_tokens, 0.0)
        return self.weight_s + max(1, streams) * sum(t.at(depth) for t in self.depth)

    def decode_tok_s(self, context_tokens: float, factor: float = 1.0, streams: int = 1) -> float:
        """Decode tok/s of one request at `context_tokens` of context among `streams` decoding at once, times the
        online correction `factor`."""
        return factor / self.seconds_per_token(context_tokens, streams)

    def mean_decode_tok_s(self, prompt_tokens: int, completion_tokens: int, factor: float = 1.0,
                          streams: int = 1) -> float:
        """Tokens per second over a whole completion that starts with `prompt_tokens` cached: completion tokens
        over the sum of each token's seconds (each term is piecewise linear in the depth, so this is exact)."""
        start = max(prompt_tokens, 0)
        end = start + max(completion_tokens, 1)
        return factor / (self.weight_s + max(1, streams) * sum(t.mean(start, end) for t in self.depth))


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
    attending: dict[tuple[str, int, int, int, int, int], AttentionGroup] = {}
    owner: dict[int, str] = {}
    for d in fit.devices:
        for i in d.layers:
            owner[i] = d.name
    stream = max(est.geometry.n_stream, 1)
    tensors = expert_tensors = 0
    for i, mem in enumerate(est.layers):
        layer = spec.layers[i]
        tensors += layer.n_tensors
        expert_tensors += layer.n_expert_tensors
        place = owner.get(i, RAM_PLACE)
        active = layer.active_bytes
        if place != RAM_PLACE and i < fit.n_cpu_moe and layer.expert_bytes:
            # the chosen experts are read from RAM; the dense part of the layer stays on its GPU
            experts = active - (layer.weight_bytes - layer.expert_bytes)
            weights[RAM_PLACE] = weights.get(RAM_PLACE, 0) + experts
            active -= experts
        weights[place] = weights.get(place, 0) + active
        if mem.cells:
            kv[place, mem.cells] = kv.get((place, mem.cells), 0.0) + mem.kv_bytes / (mem.cells * stream)
            shape = (place, mem.cells, layer.n_head, layer.n_head_kv, layer.key_length, layer.value_length)
            group = attending.get(shape) or AttentionGroup(place, mem.cells, layer, 0, 0.0)
            attending[shape] = replace(group, layers=group.layers + 1, width=group.width + attention_width(layer))
    # the output matrix follows the last layer when every layer is on a GPU, else it stays in RAM (fit.py)
    last = max((d for d in fit.devices if d.layers), key=lambda d: max(d.layers), default=None)
    out_place = last.name if (last is not None and fit.offload_layers == 0) else RAM_PLACE
    weights[out_place] = weights.get(out_place, 0) + est.output_weight_bytes
    settings = est.settings
    quantized = {settings.type_k, settings.type_v} & QUANTIZED_CACHE_TYPES
    return ReadLayout(tuple(sorted(weights.items())), tuple((p, b, c) for (p, c), b in sorted(kv.items())), tensors,
                      tuple(attending[k] for k in sorted(attending)), expert_tensors,
                      min(quantized) if quantized else "f16", settings.flash_attn)


def _place_bandwidth(hw: Hardware, place: str, gpu_eff: float, ram_eff: float) -> float:
    if place == RAM_PLACE:
        return hw.ram_bandwidth_bytes_s * ram_eff
    return hw.bandwidth_of(place) * gpu_eff


def _weight_seconds(hw: Hardware, layout: ReadLayout, gpu_eff: float, ram_eff: float) -> float:
    return sum(b / _place_bandwidth(hw, p, gpu_eff, ram_eff) for p, b in layout.weight_bytes)


def _kv_terms(hw: Hardware, layout: ReadLayout, gpu_eff: float, ram_eff: float) -> tuple[DepthTerm, ...]:
    """Reading each cached token's K and V once, at the place's bandwidth."""
    return tuple(DepthTerm(b / _place_bandwidth(hw, p, gpu_eff, ram_eff), c) for p, b, c in layout.kv_bytes_per_cell)


# Classes whose rule follows llama.cpp's choice of attention kernel (place/attention.py). The H200's points were
# measured with the vendored llama.cpp this module describes; the desktop's and the Spark's come from older builds
# whose kernels chose otherwise (the RTX 4090's Qwen2.5 3B sweep, 8 query heads a KV head, shows no step at the
# 8192 tokens where this build moves it to the MMA kernel), so their rule keeps one attention cost for all layers.
KERNEL_AWARE = frozenset({DeviceClass.HBM})
# The plain rule's constants for a kernel-aware class, for hardware whose GPUs do not say which kernels they run
# (a [[node.devices]] budget without compute_capability and sm_count, a driver without the NVML queries): one
# attention cost fitted to the same points (bench/kernel_rule.py, "one attention cost").
PLAIN_CONSTANTS: Mapping[DeviceClass, ClassConstants] = {
    DeviceClass.HBM: ClassConstants(efficiency=0.602, tensor_s=9.39e-6, attention=1.0, attend_s=4.53e-10),
}


def kernel_aware(hw: Hardware) -> bool:
    """True when `hw` predicts with its class's kernel-aware rule: the class follows kernels, and every GPU's
    compute capability and SM count are known."""
    return device_class(hw) in KERNEL_AWARE and all(d.compute_capability and d.sm_count for d in hw.devices)


def class_constants(hw: Hardware) -> ClassConstants:
    """The constants `hw` predicts with: its class's, or the plain rule's where it cannot follow kernels."""
    cls = device_class(hw)
    return PLAIN_CONSTANTS[cls] if cls in KERNEL_AWARE and not kernel_aware(hw) else CLASS_CONSTANTS[cls]


@dataclass(frozen=True, slots=True)
class AttentionTerms:
    """An attention layout's depth terms at unit cost, by what prices them."""

    vec: tuple[DepthTerm, ...] = ()  # layer widths in the vec kernel (every kernel, where the class is not aware)
    mma: tuple[DepthTerm, ...] = ()  # layer widths in the MMA kernel
    partials: tuple[DepthTerm, ...] = ()  # stream-k partials the MMA kernel's fixup combines

    def priced(self, const: ClassConstants) -> tuple[DepthTerm, ...]:
        """The terms at the class's costs; a term the class gives no cost is left out."""
        priced = ((self.vec, const.attend_s), (self.mma, const.mma_s), (self.partials, const.partial_s))
        return tuple(t.scaled(cost) for terms, cost in priced if cost for t in terms)


def _kernel(hw: Hardware, layout: ReadLayout, group: AttentionGroup) -> DecodeKernel | None:
    if not layout.flash_attn:
        return None
    device = next((d for d in hw.devices if d.name == group.place), None)
    if device is None:  # in RAM: the CPU's attention
        return None
    return decode_kernel(group.shape, device.compute_capability, device.sm_count, layout.cache_type, group.cells)


def attention_terms(hw: Hardware, layout: ReadLayout) -> AttentionTerms:
    """What each attention group costs per cached token, split by the kernel it runs where the class follows
    kernels (KERNEL_AWARE) and its GPUs' compute capability and SM count are known; else all in `vec`."""
    aware = kernel_aware(hw)
    vec: list[DepthTerm] = []
    mma: list[DepthTerm] = []
    partials: list[DepthTerm] = []
    for g in layout.attention:
        kernel = _kernel(hw, layout, g) if aware else None
        if kernel is None or kernel.mma_from == math.inf:
            vec.append(DepthTerm(g.width, g.cells))
            continue
        if kernel.mma_from > 0:
            vec.append(DepthTerm(g.width, g.cells, stop=kernel.mma_from))
        mma.append(DepthTerm(g.width, g.cells, start=kernel.mma_from))
        cap = min(g.cells, kernel.partials_cap)
        partials.append(DepthTerm(g.layers / kernel.tile_tokens, cap, start=kernel.mma_from))
    return AttentionTerms(tuple(vec), tuple(mma), tuple(partials))


@dataclass(frozen=True, slots=True)
class Observation:
    """One measured point as the class fit sees it, each term at unit cost and averaged over the completion:
    seconds per token = bytes_s / efficiency + matrices x tensor_s (+ expert matrices x their own cost) +
    kv_s x attention / efficiency + vec x attend_s + mma x mma_s + partials x partial_s + splits x split_s."""

    bytes_s: float  # weight reads at the rated bandwidth
    tensors: int
    kv_s: float  # KV reads at the rated bandwidth
    vec: float  # sum over attention layers (in the vec kernel) of width x tokens attended
    splits: int  # device boundaries a token crosses (GPUs holding layers - 1)
    seconds: float  # measured: 1 / decode tok/s
    expert_tensors: int = 0
    mma: float = 0.0  # as vec, for layers in the MMA kernel
    partials: float = 0.0  # stream-k partials, summed over the MMA layers

    def predicted_seconds(self, c: ClassConstants) -> float:
        """Seconds per token the class constants `c` predict for this point."""
        return ((self.bytes_s + self.kv_s * c.attention) / c.efficiency
                + (self.tensors - self.expert_tensors) * c.tensor_s + self.expert_tensors * c.expert_s
                + self.vec * c.attend_s + self.mma * c.mma_s + self.partials * c.partial_s + self.splits * c.split_s)


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
    low, high = point.prompt_tokens, point.prompt_tokens + point.completion_tokens

    def mean(terms: Iterable[DepthTerm]) -> float:
        return sum(t.mean(low, high) for t in terms)

    attn = attention_terms(hw, layout)
    return Observation(_weight_seconds(hw, layout, 1.0, 1.0), layout.n_tensors, mean(_kv_terms(hw, layout, 1.0, 1.0)),
                       mean(attn.vec), _splits(fit), 1.0 / point.decode_tok_s, layout.n_expert_tensors,
                       mean(attn.mma), mean(attn.partials))


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


# The terms a class's fit may free; the rest stay held (fit_class). The kernel-aware rule prices the KV reads
# inside each kernel's cost per cached token, so it has no separate KV term (attention 0); it frees the routed
# experts' matrices from tensor_s, which its leave-one-out check needs (the H200's Qwen3-Coder at an empty
# context: -11% with one cost for all matrices, -7% with its own), while the unified class's gets worse with
# them free (rms 4.9% -> 5.0%, worst point 10% -> 16%: GLM-4.7-Flash Q8_0), so the plain rule holds them.
PLAIN_TERMS = ("bytes", "tensors", "kv", "vec", "splits")
KERNEL_TERMS = ("bytes", "tensors", "experts", "vec", "mma", "partials", "splits")


def _columns(o: Observation, free: frozenset[str], kernels: bool) -> tuple[dict[str, float], float]:
    """The observation's column for each free term and the seconds the held terms predict, both over its
    measured seconds. Held: efficiency 1, attention 1 (KV reads beside the weights, at their efficiency) or 0
    (kernel-aware), expert matrices at tensor_s, the other costs 0."""
    kv_with_bytes = not kernels and "kv" not in free
    read = o.bytes_s + (o.kv_s if kv_with_bytes else 0.0)
    values = {"bytes": read, "tensors": o.tensors - (o.expert_tensors if "experts" in free else 0),
              "experts": o.expert_tensors, "kv": o.kv_s, "vec": o.vec, "mma": o.mma, "partials": o.partials,
              "splits": o.splits}
    held = read if "bytes" not in free else 0.0
    return {t: values[t] / o.seconds for t in free}, held / o.seconds


def fit_class(observations: Iterable[Observation], fallback: ClassConstants, kernels: bool = False,
              terms: Sequence[str] | None = None) -> ClassConstants:
    """Least squares on relative error of seconds = bytes_s x a + tensors x b + expert_tensors x (b2 - b) +
    kv_s x c + vec x d + mma x f + partials x g + splits x e (a = 1 / efficiency, b = tensor_s, b2 =
    expert_tensor_s, c = attention / efficiency, d = attend_s, f = mma_s, g = partial_s, e = split_s), keeping
    efficiency <= 1, attention >= 1 and the fixed costs >= 0; `fallback` without points. `kernels`: the
    kernel-aware rule (KERNEL_TERMS: attention 0, the MMA terms free), else PLAIN_TERMS; `terms` narrows them
    (bench/kernel_rule.py compares rules). Each term is tried held and free; the feasible fit with the least
    error wins, the simpler one unless the error falls by more than FIT_MARGIN."""
    obs = list(observations)
    if not obs:
        return fallback
    terms = tuple(terms) if terms is not None else KERNEL_TERMS if kernels else PLAIN_TERMS
    best: tuple[float, ClassConstants] | None = None
    # designs in product order from all held; a later design replaces the best only when it cuts the error by
    # FIT_MARGIN: with few points several designs fit exactly, and the one at the physical bounds is the one to
    # trust
    for pattern in itertools.product((False, True), repeat=len(terms)):
        free = frozenset(t for t, freed in zip(terms, pattern, strict=True) if freed)
        if not free:
            continue
        names = [t for t in terms if t in free]
        rows, known = [], []
        for o in obs:
            columns, held = _columns(o, free, kernels)
            rows.append([columns[t] for t in names])
            known.append(held)
        k = len(names)
        normal = [[sum(r[i] * r[j] for r in rows) for j in range(k)] for i in range(k)]
        solution = _solve(normal, [sum(r[i] * (1 - f) for r, f in zip(rows, known, strict=True)) for i in range(k)])
        if solution is None:
            continue
        got = dict(zip(names, solution, strict=True))
        a = got.get("bytes", 1.0)
        b = got.get("tensors", 0.0)
        b2 = got.get("experts", b)
        c = 0.0 if kernels else got.get("kv", a)
        d, f, g, e = (got.get(t, 0.0) for t in ("vec", "mma", "partials", "splits"))
        if a < 1 - 1e-9 or min(b, b2, d, f, g, e) < 0 or (not kernels and c < a * (1 - 1e-9)):
            continue
        const = ClassConstants(efficiency=1 / a, tensor_s=b, attention=c / a, attend_s=d, split_s=e,
                               expert_tensor_s=b2 if "experts" in free else None, mma_s=f, partial_s=g)
        cost = sum((o.predicted_seconds(const) / o.seconds - 1) ** 2 for o in obs)
        if best is None or cost < best[0] - FIT_MARGIN:
            best = (cost, const)
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


def _matrix_seconds(layout: ReadLayout, const: ClassConstants) -> float:
    """The fixed costs of a decode step's matrix products."""
    return (layout.n_tensors - layout.n_expert_tensors) * const.tensor_s + layout.n_expert_tensors * const.expert_s


def _without_first_layers(fit: Fit, k: int) -> Fit:
    """`fit` with its first k layers (and so the output) moved to RAM, as -ngl does for a cpu_layers point."""
    devices = tuple(replace(d, layers=tuple(i for i in d.layers if i >= k)) for d in fit.devices)
    return replace(fit, fits=False, devices=devices, offload_layers=k)


def calibrate(hw: Hardware, constants: ClassConstants | None = None) -> Efficiency:
    """The calibration of `hw`: its class constants (or `constants`), RAM from a cpu_layers point, prefill."""
    const = constants or class_constants(hw)
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
    gpu_s = _weight_seconds(hw, on_gpu, const.efficiency, 1.0) + _matrix_seconds(layout, const)
    left = 1.0 / p.decode_tok_s - gpu_s
    return ram_bytes / hw.ram_bandwidth_bytes_s / left if ram_bytes and left > 0 else None


_CALIBRATIONS: dict[tuple[object, ...], Efficiency] = {}


def _calibration_key(hw: Hardware) -> tuple[object, ...]:
    # capacities change on every probe; the calibration depends only on what the hardware is and its points
    devices = tuple((d.name, d.total_bytes, d.reserve_bytes, d.unified, d.bandwidth_bytes_s, d.compute_capability,
                     d.sm_count) for d in hw.devices)
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
    weight_s = read_s + _matrix_seconds(layout, const) + _splits(fit) * const.split_s
    kv = tuple(t.scaled(const.attention) for t in _kv_terms(hw, layout, gpu_eff, ram_eff)) if const.attention else ()
    depth = kv + attention_terms(hw, layout).priced(const)
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
    return SpeedModel(weight_s, depth, prefill)


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
