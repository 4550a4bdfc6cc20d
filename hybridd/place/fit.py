"""Spread a model's layers over GPUs the way llama.cpp's layer split does, spilling to RAM if needed (pure).

llama.cpp (-sm layer) splits the offloaded layers over devices in proportion to tensor_split (default: each
device's free memory), in order, and puts the output layer with the last layer when every layer is offloaded.
With -ngl N it offloads the *last* N layers; with --n-cpu-moe N the routed experts of the *first* N layers
stay in RAM. Each GPU holding layers also holds its own compute buffer, sized as llama.cpp's scheduler sizes it
for that GPU (MemoryEstimate.device_compute_bytes: four copies of the split inputs when pipeline parallelism is on,
the logits only on the GPU with the output layer), and the CUDA runtime (context, kernels, cuBLAS workspace,
pool). The token embeddings always stay in host memory. Here: first everything on the GPUs; else, for MoE, the
fewest layers whose experts go to RAM; else the fewest layers in RAM; else it does not fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hybridd.model.memory import MemoryEstimate, pipeline_copies
from hybridd.place.devices import Device

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class DevicePlacement:
    """What one device holds under a fit."""

    name: str
    bytes_placed: int  # everything the engine holds here: the parts below
    bytes_free: int  # usable bytes left after placement (negative never: a fit that overflows is rejected)
    layers: tuple[int, ...]
    weights_bytes: int = 0  # layer weights (and the output layer on the last GPU)
    kv_bytes: int = 0
    recurrent_bytes: int = 0
    compute_bytes: int = 0  # this GPU's compute buffer
    runtime_bytes: int = 0  # CUDA context, kernels, cuBLAS workspace, pool
    host_side_bytes: int = 0  # unified memory only: the host buffers (token embeddings, output buffer) live here
    display_bytes: int = 0  # kept back for the display / OS (Device.reserve_bytes), not the engine's

    @property
    def in_use_bytes(self) -> int:
        """What the device holds with the engine running: the engine's bytes plus the display's share."""
        return self.bytes_placed + self.display_bytes


@dataclass(frozen=True, slots=True)
class Fit:
    """Where a model would live: fits = all layers and the output on GPUs."""

    fits: bool
    runs: bool  # fits, or runs with part of the model in host RAM
    devices: tuple[DevicePlacement, ...]
    offload_layers: int  # whole layers kept in host RAM
    n_cpu_moe: int  # layers whose routed experts are kept in host RAM (llama.cpp --n-cpu-moe)
    host_bytes: int  # bytes in host RAM (token embeddings, output buffer, offloaded parts)
    host_free_bytes: int
    reason: str


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _layer_costs(est: MemoryEstimate, n_cpu_moe: int) -> list[int]:
    # a layer's KV and recurrent state live on the layer's device (offload_kqv)
    costs = []
    for i, ly in enumerate(est.layers):
        weights = ly.weight_bytes - (ly.expert_bytes if i < n_cpu_moe else 0)
        costs.append(weights + ly.kv_bytes + ly.recurrent_bytes)
    return costs


def _split(costs: Sequence[int], first_gpu_layer: int, capacities: Sequence[int],
           output_bytes: int) -> list[list[int]] | None:
    """Layers [first_gpu_layer, n) over devices: proportional to capacity like tensor_split, else greedy."""
    n = len(costs)
    gpu_layers = list(range(first_gpu_layer, n))
    with_output = first_gpu_layer == 0
    total_cap = sum(capacities)
    if total_cap <= 0:
        return None if gpu_layers else [[] for _ in capacities]

    def loads(assign: list[list[int]]) -> list[int]:
        out = [sum(costs[i] for i in layers) for layers in assign]
        if with_output and gpu_layers:
            last = max(d for d, layers in enumerate(assign) if layers)
            out[last] += output_bytes
        return out

    # llama.cpp: device of layer k is the first whose cumulative split fraction exceeds k / n_gpu_layers
    proportional: list[list[int]] = [[] for _ in capacities]
    cumulative, acc = [], 0
    for cap in capacities:
        acc += cap
        cumulative.append(acc / total_cap)
    for k, il in enumerate(gpu_layers):
        frac = k / max(len(gpu_layers), 1)
        dev = next(d for d, c in enumerate(cumulative) if frac < c or d == len(cumulative) - 1)
        proportional[dev].append(il)
    if all(load <= cap for load, cap in zip(loads(proportional), capacities, strict=True)):
        return proportional

    # the user can always set --tensor-split to match: fill devices in order up to their capacity
    greedy: list[list[int]] = [[] for _ in capacities]
    dev, used = 0, 0
    for il in gpu_layers:
        is_last = il == n - 1
        need = costs[il] + (output_bytes if with_output and is_last else 0)
        while dev < len(capacities) and used + need > capacities[dev]:
            dev, used = dev + 1, 0
        if dev == len(capacities):
            return None
        greedy[dev].append(il)
        used += need
    return greedy


def _fewest(split: Callable[[int], list[list[int]] | None], n: int) -> tuple[int, list[list[int]]] | None:
    """The smallest k in 1..n for which split(k) is an assignment (split must fail for k below it), with it."""
    lo, hi, found = 1, n, None
    while lo <= hi:
        mid = (lo + hi) // 2
        assign = split(mid)
        if assign is None:
            lo = mid + 1
        else:
            found, hi = (mid, assign), mid - 1
    return found


def fit_model(est: MemoryEstimate, devices: Sequence[Device], host_ram_free: int) -> Fit:
    """Place `est` on `devices` (+ host RAM); fewest bytes in RAM wins, MoE experts before whole layers."""
    gpus = list(devices)
    unified = any(d.unified for d in gpus)
    runtime = est.runtime_reserve_bytes
    host_fixed = est.token_embd_bytes + est.output_buffer_bytes
    if unified:
        # GB10: host memory is the same pool as the device; charge host-side buffers to it, not twice
        host_ram_free = 0
    host_need_fixed = 0 if unified else host_fixed
    n_layer = len(est.layers)
    has_experts = any(ly.expert_bytes for ly in est.layers)

    def fixed(dev: Device, n_copies: int, holds_output: bool) -> int:
        return (est.device_compute_bytes(n_copies, holds_output) + runtime
                + (host_fixed if dev.unified else 0))

    def capacities(n_copies: int) -> list[int]:
        # the output layer (and its logits) goes with the last layer: charge the logits to the last GPU with room
        # for layers only; result() checks the exact loads of whatever assignment comes back
        caps = [max(d.usable_bytes - fixed(d, n_copies, False), 0) for d in gpus]
        last = max((i for i, c in enumerate(caps) if c > 0), default=None)
        if last is not None:
            extra = fixed(gpus[last], n_copies, True) - fixed(gpus[last], n_copies, False)
            caps[last] = max(caps[last] - extra, 0)
        return caps

    def result(assign: list[list[int]], first_gpu: int, n_cpu_moe: int) -> Fit | None:
        costs = _layer_costs(est, n_cpu_moe)
        host = host_need_fixed + sum(costs[:first_gpu])
        host += sum(est.layers[i].expert_bytes for i in range(min(n_cpu_moe, n_layer)))
        if first_gpu > 0:
            host += est.output_weight_bytes  # the output layer follows the last layer only when all are offloaded
        if host > host_ram_free:
            return None
        holders = [d for d, layers in enumerate(assign) if layers]
        last = holders[-1] if holders else -1
        n_copies = pipeline_copies(len(gpus), first_gpu == 0, n_cpu_moe > 0)
        placed = []
        for d, (dev, layers) in enumerate(zip(gpus, assign, strict=True)):
            if not layers:
                placed.append(DevicePlacement(dev.name, 0, dev.usable_bytes, ()))
                continue
            holds_output = first_gpu == 0 and d == last
            weights = sum(est.layers[i].weight_bytes - (est.layers[i].expert_bytes if i < n_cpu_moe else 0)
                          for i in layers) + (est.output_weight_bytes if holds_output else 0)
            kv = sum(est.layers[i].kv_bytes for i in layers)
            recurrent = sum(est.layers[i].recurrent_bytes for i in layers)
            compute = est.device_compute_bytes(n_copies, holds_output)
            host_side = host_fixed if dev.unified else 0
            load = weights + kv + recurrent + compute + runtime + host_side
            if load > dev.usable_bytes:
                return None
            placed.append(DevicePlacement(dev.name, load, dev.usable_bytes - load, tuple(layers), weights, kv,
                                          recurrent, compute, runtime, host_side, dev.reserve_bytes))
        fits = first_gpu == 0 and n_cpu_moe == 0
        return Fit(fits, True, tuple(placed), first_gpu, n_cpu_moe, host, host_ram_free,
                   _reason(placed, fits, first_gpu, n_cpu_moe, est.geometry.n_ctx))

    if gpus:
        full = capacities(pipeline_copies(len(gpus), True))
        assign = _split(_layer_costs(est, 0), 0, full, est.output_weight_bytes)
        if assign is not None and (r := result(assign, 0, 0)):
            return r
        # Without every layer (or every expert) on a GPU there is no pipeline parallelism: one copy of the inputs.
        # More layers off the GPUs only lowers what they hold and raises what RAM holds, so the fewest that fit
        # on the GPUs is found by bisection, and if RAM cannot take that many it cannot take more either.
        single = capacities(1)
        if has_experts:
            k = _fewest(lambda k: _split(_layer_costs(est, k), 0, single, est.output_weight_bytes), n_layer)
            if k is not None and (r := result(k[1], 0, k[0])):
                return r
        costs = _layer_costs(est, 0)
        first = _fewest(lambda first: _split(costs, first, single, est.output_weight_bytes), n_layer)
        if first is not None and (r := result(first[1], first[0], 0)):
            return r
    # nothing on a GPU: all in host RAM
    cpu_only = host_need_fixed + sum(_layer_costs(est, 0)) + est.output_weight_bytes + est.compute_bytes
    runs = cpu_only <= host_ram_free and not unified
    need = est.total_bytes
    have = sum(d.usable_bytes for d in gpus)
    if runs:
        reason = f"all {n_layer} layers in RAM: needs {_gib(cpu_only)}; GPUs have {_gib(have)} usable"
    else:
        reason = (f"does not fit: needs {_gib(need)} at {est.geometry.n_ctx} ctx; "
                  f"GPUs have {_gib(have)} usable, RAM {_gib(host_ram_free)} free")
    return Fit(False, runs, tuple(DevicePlacement(d.name, 0, d.usable_bytes, ()) for d in gpus),
               n_layer if runs else 0, 0, cpu_only if runs else 0, host_ram_free, reason)


def _reason(placed: Sequence[DevicePlacement], fits: bool, offload: int, n_cpu_moe: int, ctx: int) -> str:
    need = sum(d.bytes_placed for d in placed)
    have = sum(d.bytes_placed + d.bytes_free for d in placed)
    tail = f"needs {_gib(need)} at {ctx} ctx; GPUs have {_gib(have)} usable"
    if fits:
        return f"fits: {tail} ({_gib(have - need)} to spare)"
    if n_cpu_moe:
        return f"experts of {n_cpu_moe} layers in RAM: {tail}"
    return f"{offload} layers in RAM: {tail}"
