"""`hybridd plan --train`: where a fine-tune fits (one device, never split) and how fast it runs there (pure).

A training job runs on one device of one node: the local node's largest GPU or a peer's (a Spark's unified pool).
It is feasible there when the estimate's total (hybridd.model.training) fits the device's usable bytes. Among the
feasible options the fastest wins; local stays chosen within LOCAL_MARGIN of the best peer, as for inference.

Speed, per optimizer step of T = batch x sequence tokens:

    step seconds = T * F / peak_bf16 + (3 * weights_bytes + OPTIMIZER_TRAFFIC * trainable) / bandwidth
    train tok/s  = CALIBRATION * T / step seconds

F, the FLOPs per token: forward 2 per matmul parameter (MoE: the used experts) plus causal attention
2 * seq * (heads x head size) per layer; gradient checkpointing runs the forward twice; the backward costs two
forwards, of which a frozen base skips the weight-gradient half. So full fine-tune F = 8 N + 4 A, LoRA and QLoRA
F = 6 N + 16 adapter + 4 A (adapters trained like a full model). The bytes: the weights read in the forward, the
recomputation and the backward, and AdamW's update (read fp32 gradient, moments and master, write them back and
the bf16 copy: about 30 bytes per trainable parameter).

CALIBRATION comes from one published DGX Spark figure (NVIDIA, "How NVIDIA DGX Spark's performance enables
intensive AI tasks": Llama 3.2 3B full fine-tune, sequence 2048, batch 8, 82,739 tok/s); the other two
(Llama 3.1 8B LoRA, batch 4, 53,658 tok/s; Llama 3.3 70B QLoRA, batch 8, 5,079 tok/s) check it:
tests/test_training.py holds them within TRAIN_SPEED_TOLERANCE (they land at -6% and +15%). The factor is about
20: those figures imply some 2 PFLOP/s of this model's work, far above the GB10's dense BF16 peak, so NVIDIA's
token count is not the one 6N-style accounting assumes. The model keeps their ratios between jobs, and applies the
same factor on other devices (each at its own peak and bandwidth), so a desktop option and a Spark option compare
on one scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hybridd.model.spec import ModelSpec
from hybridd.model.training import TrainingEstimate, TrainMethod
from hybridd.place.devices import Device
from hybridd.place.hardware import Hardware

GIB = 1024**3
# Dense BF16 tensor throughput with FP32 accumulation, by the name NVML reports.
DENSE_BF16_FLOPS: Mapping[str, float] = {
    # NVIDIA Ada whitepaper, RTX 4090: 165.2 TFLOPS BF16 (FP32 accumulate), dense.
    "NVIDIA GeForce RTX 4090": 165.2e12,
    # NVIDIA: 1 PFLOP FP4 with sparsity; dense halves it, FP8 halves again, BF16 again: 125 TFLOPS.
    "NVIDIA GB10": 125e12,
}
WEIGHT_PASSES = 3  # forward, recomputation under gradient checkpointing, backward
OPTIMIZER_TRAFFIC = 30  # bytes per trainable parameter per AdamW step (see the module docstring)
# Calibration factor: NVIDIA's Spark figure for Llama 3.2 3B full fine-tune (seq 2048, batch 8) over this
# model's raw prediction for it (tests/test_training.py recomputes it from the profiles).
CALIBRATION = 20.35
LOCAL_MARGIN = 0.05  # a local option within 5% of the best peer stays local


@dataclass(frozen=True, slots=True)
class TrainOption:
    """One place a fine-tune could run: which node and device, whether it fits, how fast."""

    placement: str  # "local" or "peer:<name>"
    device: str | None
    usable_bytes: int
    feasible: bool
    why_not: str
    train_tok_s: float | None
    seconds: float | None  # for the dataset, when its size was given and the job fits


@dataclass(frozen=True, slots=True)
class TrainPlacement:
    """The choice ("local", "peer:<name>" or "none"), why, and every option."""

    placement: str
    reason: str
    options: tuple[TrainOption, ...]


def flops_per_token(spec: ModelSpec, estimate: TrainingEstimate) -> float:
    """Training FLOPs per token: 8N + 4A (full) or 6N + 16 adapter + 4A (LoRA, QLoRA)."""
    params = estimate.params
    layers = spec.layers[: spec.n_layer] or spec.layers
    attention = sum(2 * estimate.settings.seq * ly.n_head * ly.key_length for ly in layers)
    if estimate.settings.method is TrainMethod.FULL:
        return 8.0 * params.matmul + 4.0 * attention
    return 6.0 * params.matmul + 16.0 * params.adapter + 4.0 * attention


def raw_train_tok_s(spec: ModelSpec, estimate: TrainingEstimate, peak_flops: float, bandwidth: float) -> float:
    """Tokens per second of the compute + bandwidth model before calibration."""
    tokens = estimate.settings.tokens_per_step
    moved = WEIGHT_PASSES * estimate.weights_bytes + OPTIMIZER_TRAFFIC * estimate.trainable_params
    step_s = tokens * flops_per_token(spec, estimate) / peak_flops + moved / bandwidth
    return tokens / step_s


def predict_train_tok_s(spec: ModelSpec, estimate: TrainingEstimate, device: Device,
                        bandwidth: float) -> float | None:
    """Calibrated training tokens per second on `device`; None when its compute peak is unknown."""
    peak = DENSE_BF16_FLOPS.get(device.name)
    if peak is None or bandwidth <= 0:
        return None
    return CALIBRATION * raw_train_tok_s(spec, estimate, peak, bandwidth)


def training_device(node: Hardware) -> Device | None:
    """The one device a job would run on: the node's largest by usable bytes (no GPU: None)."""
    return max(node.devices, key=lambda d: d.usable_bytes, default=None)


def _option(placement: str, node: Hardware, spec: ModelSpec, estimate: TrainingEstimate,
            dataset_tokens: int | None) -> TrainOption:
    device = training_device(node)
    if device is None:
        return TrainOption(placement, None, 0, False, f"{node.name} has no GPU (training is not planned on a CPU)",
                           None, None)
    need = estimate.total_bytes
    feasible = need <= device.usable_bytes
    why_not = "" if feasible else (
        f"needs {need / GIB:.1f} GiB on one device; the largest, {device.name}, has "
        f"{device.usable_bytes / GIB:.1f} GiB usable (a training job is never split across GPUs)")
    speed = predict_train_tok_s(spec, estimate, device, node.bandwidth_of(device.name))
    seconds = dataset_tokens / speed if feasible and speed and dataset_tokens else None
    return TrainOption(placement, device.name, device.usable_bytes, feasible, why_not, speed, seconds)


def place_training(spec: ModelSpec, estimate: TrainingEstimate, local: Hardware, peers: Sequence[Hardware],
                   dataset_tokens: int | None = None, local_why_not: str = "") -> TrainPlacement:
    """Every option (local first, then each peer) and the fastest feasible one, local within LOCAL_MARGIN.
    `local_why_not`: this node cannot train the model at all (no checkpoint of it), whatever its memory."""
    local_option = _option("local", local, spec, estimate, dataset_tokens)
    if local_why_not:
        local_option = TrainOption("local", local_option.device, local_option.usable_bytes, False, local_why_not,
                                   local_option.train_tok_s, None)
    options = (local_option, *(_option(f"peer:{hw.name}", hw, spec, estimate, dataset_tokens) for hw in peers))
    feasible = [o for o in options if o.feasible]
    if not feasible:
        return TrainPlacement("none", f"fits nowhere: needs {estimate.total_bytes / GIB:.1f} GiB on one device",
                              options)
    best = max(feasible, key=lambda o: o.train_tok_s or 0.0)
    if local_option.feasible and (local_option.train_tok_s or 0.0) >= (1 - LOCAL_MARGIN) * (best.train_tok_s or 0.0):
        best = local_option
    speed = f" at {best.train_tok_s:,.0f} tok/s" if best.train_tok_s else ""
    reason = (f"needs {estimate.total_bytes / GIB:.1f} GiB; fits {best.device} "
              f"({best.usable_bytes / GIB:.1f} GiB usable){speed}")
    return TrainPlacement(best.placement, reason, options)


def train_plan(spec: ModelSpec, estimate: TrainingEstimate, placement: TrainPlacement,
               dataset_tokens: int | None) -> dict[str, Any]:
    """JSON-ready `hybridd plan --train`: the memory breakdown under "train", the placement and each option."""
    settings, params = estimate.settings, estimate.params
    return {
        "model": spec.name,
        "architecture": spec.architecture,
        "train": {
            "method": str(settings.method), "seq": settings.seq, "batch": settings.batch,
            "rank": settings.rank if settings.method is not TrainMethod.FULL else None,
            "dataset_tokens": dataset_tokens,
            "params": params.total, "trainable_params": estimate.trainable_params,
            "adapter_params": params.adapter if settings.method is not TrainMethod.FULL else 0,
            "weights_bytes": estimate.weights_bytes, "adapter_bytes": estimate.adapter_bytes,
            "gradient_bytes": estimate.gradient_bytes, "optimizer_bytes": estimate.optimizer_bytes,
            "activation_bytes": estimate.activation_bytes, "logits_bytes": estimate.logits_bytes,
            "overhead_bytes": estimate.overhead_bytes, "total_bytes": estimate.total_bytes,
            "flops_per_token": flops_per_token(spec, estimate),
        },
        "placement": placement.placement,
        "placement_reason": placement.reason,
        "options": [
            {"placement": o.placement, "device": o.device, "usable_bytes": o.usable_bytes, "feasible": o.feasible,
             "why_not": o.why_not,
             "predicted_train_tok_s": round(o.train_tok_s, 1) if o.train_tok_s is not None else None,
             "predicted_s": round(o.seconds, 1) if o.seconds is not None else None}
            for o in placement.options
        ],
    }


def render_train_plan(plan: dict[str, Any]) -> str:
    """The `hybridd plan --train` text: each part of the memory, then each option and the choice."""
    train = plan["train"]
    shape = f"seq {train['seq']}, batch {train['batch']}"
    if train["rank"] is not None:
        shape += f", rank {train['rank']}"
    lines = [f"{plan['model'] or '(unnamed)'} ({plan['architecture']}): {train['method']} fine-tune, {shape}", ""]
    for label, key in (("weights", "weights_bytes"), ("adapter", "adapter_bytes"), ("gradients", "gradient_bytes"),
                       ("optimizer", "optimizer_bytes"), ("activations", "activation_bytes"),
                       ("logits", "logits_bytes"), ("overhead", "overhead_bytes"), ("total", "total_bytes")):
        lines.append(f"  {label:<16}{train[key] / GIB:8.2f} GiB")
    lines += ["", f"  placement: {plan['placement']} ({plan['placement_reason']})"]
    for o in plan["options"]:
        speed = f"{o['predicted_train_tok_s']:,.0f} tok/s" if o["predicted_train_tok_s"] else "-"
        took = f", {o['predicted_s']:,.0f} s for the dataset" if o["predicted_s"] else ""
        verdict = "fits" if o["feasible"] else o["why_not"]
        lines.append(f"  {o['placement']:<20}{speed:>14}{took}  {verdict}")
    return "\n".join(lines)
