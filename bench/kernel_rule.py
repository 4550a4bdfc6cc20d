"""Benchmark of the HBM class's calibration rule: kernel-aware attention against one attention cost for all layers.

The speed model's rule for the HBM class (hybridd/place/speed.py, KERNEL_AWARE) follows llama.cpp's choice of
flash-attention kernel per head shape, depth and GPU (hybridd/place/attention.py): the vec kernel's cost per
cached token, the MMA kernel's, and the stream-k partials the MMA kernel's fixup combines, with the KV reads
inside those costs and the routed experts' matrices at their own fixed cost. This fits three rules to the H200's
points with the same `fit_class` and checks each point leave-one-out:
- "one attention cost": the plain rule of the other classes (KV bytes read beside the weights, every layer's
  attention at one cost per cached token): the baseline, the rule in use before;
- "kernel-aware, one matrix cost": the kernel terms, every matrix at tensor_s;
- "kernel-aware (in use)": the rule of CLASS_CONSTANTS.
Writes bench/results/kernel_rule.json with each rule's misses, worst and rms error and constants.

Run: .venv/bin/python bench/kernel_rule.py
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hybridd.place.speed as speed
from hybridd.place.speed import ClassConstants, DeviceClass, Observation, fit_class, observe_point
from hybridd.probe.hardware_profiles import load_hardware_profile

TOLERANCE = 0.10
FALLBACK = speed.CLASS_CONSTANTS[DeviceClass.HBM]


def plain(o: Observation) -> Observation:
    """The observation as the plain rule sees it: every attention layer at one cost, no partials."""
    return replace(o, vec=o.vec + o.mma, mma=0.0, partials=0.0)


def fit(obs: list[Observation], rule: str) -> ClassConstants:
    if rule == "one attention cost":
        return fit_class([plain(o) for o in obs], FALLBACK)
    if rule == "kernel-aware, one matrix cost":
        return fit_class(obs, FALLBACK, kernels=True, terms=[t for t in speed.KERNEL_TERMS if t != "experts"])
    return fit_class(obs, FALLBACK, kernels=True)


RULES = ("one attention cost", "kernel-aware, one matrix cost", "kernel-aware (in use)")


def compare() -> dict[str, object]:
    """Each rule's leave-one-out misses, worst and rms error, and its constants fitted on every point."""
    hw = load_hardware_profile("h200-sxm").hardware()
    points = [(p, o) for p in hw.measured if (o := observe_point(p, hw)) is not None]
    out: dict[str, object] = {"hardware": hw.name, "points": len(points), "tolerance": TOLERANCE}
    for rule in RULES:
        errors, misses = [], []
        for i, (p, o) in enumerate(points):
            const = fit([x for j, (_, x) in enumerate(points) if j != i], rule)
            seen = plain(o) if rule == "one attention cost" else o
            error = seen.seconds / seen.predicted_seconds(const) - 1  # predicted tok/s / measured - 1
            errors.append(error)
            if abs(error) > TOLERANCE:
                misses.append(f"{p.model} {p.quant} ctx {p.run_ctx} d{p.prompt_tokens} measured {p.decode_tok_s}: "
                              f"{error:+.1%}")
        out[rule] = {"misses": misses, "max_error": round(max(map(abs, errors)), 4),
                     "rms_error": round(math.sqrt(sum(e * e for e in errors) / len(errors)), 4),
                     "constants": asdict(fit([o for _, o in points], rule))}
    return out


def main() -> None:
    out = compare()
    for rule in RULES:
        found = out[rule]
        assert isinstance(found, dict)
        print(f"{rule}: {len(found['misses'])} of {out['points']} outside {TOLERANCE:.0%} leave-one-out "
              f"(worst {found['max_error']:.1%}, rms {found['rms_error']:.1%})")
        for line in found["misses"]:
            print("   " + line)
    path = Path(__file__).resolve().parent / "results" / "kernel_rule.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
