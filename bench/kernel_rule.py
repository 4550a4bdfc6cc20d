"""Analysis: would a depth rule that follows llama.cpp's CUDA flash-attention kernel choice fit the H200 points?

The speed model charges every attention layer the same cost per cached token (hybridd/place/speed.py), and six of
the H200's 32 decode points miss it by more than 10% (tests/test_measured_points.py: KNOWN_MISSES). The vendored
ggml-cuda/fattn.cu picks the kernel by head shape and depth on an H200 (compute capability 9.0, f16 cache):
- MLA (head size 576): the MMA kernel with stream-k, one block per 32-token KV tile until the GPU is full
  (132 SMs x occupancy 4 / 2 output tiles: 264 partials an output tile), its fixup combining them in one chain;
- more than 4 query heads a KV head: the vec kernel below 8192 cached tokens, the MMA kernel (128-token tiles,
  occupancy 2, one output tile a KV head: 66 partials at most) from there;
- otherwise the vec kernel.

This fits, leave-one-out over the H200 points, seconds per token = weight bytes x a + matrices x b + (vec layers'
width x depth) x c + (MMA layers' width x depth) x d + (MMA layers' partials) x e, with the KV cache's bytes read
beside the weights (as the rule in use reads them) or left to each kernel's cost per token; and the rule in use
(one attention cost for all: the same 6 misses as tests/test_measured_points.py). Writes
bench/results/kernel_rule.json.

It is not the speed model: that needs each GPU's SM count and generation in the profiles, a depth term that can
step at 8192 tokens, and the other classes' points come from older llama.cpp builds whose kernels chose
differently (the RTX 4090's Qwen2.5-3B sweep, 8 query heads a KV head, shows no step at 8192).

Run: .venv/bin/python bench/kernel_rule.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridd.place.hardware import SpeedPoint
from hybridd.place.speed import Observation, attention_width, observe_point
from hybridd.probe.hardware_profiles import load_hardware_profile

H200_TILES = 264  # 132 SMs x occupancy 4 / 2 output tiles (MLA: 20 query heads in tiles of 16)
GQA_PARTIALS = 66  # 132 SMs x occupancy 2 / 4 KV heads (Qwen3-Coder)
MMA_FROM = 8192  # cached tokens from which a GQA layer with more than 4 query heads a KV head runs the MMA kernel
TERMS = ("weight bytes", "KV bytes", "matrices", "vec width x depth", "MMA width x depth", "MMA partials")
TOLERANCE = 0.10


def kernel_features(point: SpeedPoint, observation: Observation) -> list[float]:
    """The six terms of one point at its mean depth (bytes as seconds at the rated bandwidth)."""
    depth = max(point.mean_depth, 1.0)
    vec = mma = partials = 0.0
    assert point.spec is not None  # observe_point answered for it
    for layer in point.spec.layers:
        if not layer.n_head or not layer.n_head_kv:
            continue
        width = attention_width(layer)
        if layer.key_length == 576:
            mma += width * depth
            partials += min(math.ceil(depth / 32), H200_TILES)
        elif layer.n_head // layer.n_head_kv > 4 and depth >= MMA_FROM:
            mma += width * depth
            partials += min(math.ceil(depth / 128), GQA_PARTIALS)
        else:
            vec += width * depth
    return [observation.bytes_s, observation.kv_s, observation.tensors, vec, mma, partials]


def leave_one_out(design: np.ndarray, seconds: np.ndarray) -> list[float]:
    """Each point's predicted tok/s / measured - 1, from a least-squares fit (relative error) without it."""
    errors = []
    for i in range(len(seconds)):
        keep = np.arange(len(seconds)) != i
        coef, *_ = np.linalg.lstsq(design[keep] / seconds[keep, None], np.ones(int(keep.sum())), rcond=None)
        errors.append(seconds[i] / float(design[i] @ coef) - 1)
    return errors


def fits() -> dict[str, object]:
    """Each rule's leave-one-out misses and its coefficients fitted on every point."""
    hw = load_hardware_profile("h200-sxm").hardware()
    points, rows, seconds = [], [], []
    for point in hw.measured:
        observation = observe_point(point, hw)
        if observation is None:
            continue
        points.append(point)
        rows.append(kernel_features(point, observation))
        seconds.append(observation.seconds)
    secs = np.array(seconds)
    weights, kv, matrices, vec, mma, partials = np.array(rows).T
    # the rule in use reads weights and KV at one efficiency, and has one attention cost and no partials
    rules = {
        "one attention cost": (np.column_stack([weights + kv, matrices, vec + mma]),
                               ("weight and KV bytes", "matrices", "width x depth")),
        "kernel-aware, KV bytes read beside the weights": (
            np.column_stack([weights + kv, matrices, vec, mma, partials]), ("weight and KV bytes", *TERMS[2:])),
        "kernel-aware, KV reads in each kernel's cost": (
            np.column_stack([weights, matrices, vec, mma, partials]), ("weight bytes", *TERMS[2:])),
    }
    out: dict[str, object] = {"points": len(points), "tolerance": TOLERANCE}
    for name, (design, names) in rules.items():
        errors = leave_one_out(design, secs)
        coef, *_ = np.linalg.lstsq(design / secs[:, None], np.ones(len(secs)), rcond=None)
        misses = [f"{p.model} {p.quant} ctx {p.run_ctx} d{p.prompt_tokens} measured {p.decode_tok_s}: {e:+.1%}"
                  for p, e in zip(points, errors, strict=True) if abs(e) > TOLERANCE]
        out[name] = {"coefficients": dict(zip(names, (float(c) for c in coef), strict=True)), "misses": misses,
                     "max_error": round(max(abs(e) for e in errors), 3)}
    return out


def main() -> None:
    out = fits()
    for name, rule in out.items():
        if isinstance(rule, dict):
            print(f"{name}: {len(rule['misses'])} of {out['points']} outside {TOLERANCE:.0%} leave-one-out "
                  f"(max {rule['max_error']:.1%})")
            for line in rule["misses"]:
                print("   " + line)
    path = Path(__file__).resolve().parent / "results" / "kernel_rule.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
