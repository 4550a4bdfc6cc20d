"""The plan a person or a client reads: `hybridd plan --json` / POST /hybridd/v1/plan, and its table (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hybridd.model.memory import MemoryEstimate, RunSettings, estimate_memory
from hybridd.model.spec import ModelSpec
from hybridd.place.devices import Device
from hybridd.place.fit import fit_model

GIB = 1024**3
MIB = 1024**2


def plan(spec: ModelSpec, settings: RunSettings, devices: Sequence[Device], host_ram_free: int) -> dict[str, Any]:
    """JSON-ready plan: totals per part, per-layer detail, fit per device and a one-line reason.

    Where the model sits on GPUs the parts are summed over the devices as placed (each GPU's compute buffer and
    CUDA runtime, the display's share on a GPU that drives one); otherwise they are the single-backend estimate.
    total_bytes is everything the running engine holds plus the display's share (on a unified GB10, what the OS
    keeps: the device's reserve either way); gpu_bytes the part on the GPUs.
    """
    est = estimate_memory(spec, settings)
    fit = fit_model(est, devices, host_ram_free)
    used = [d for d in fit.devices if d.bytes_placed]
    host_side = est.token_embd_bytes + est.output_buffer_bytes
    if used:
        compute = sum(d.compute_bytes for d in used)
        runtime = sum(d.runtime_bytes for d in used)
        display = sum(d.display_bytes for d in used)
        gpu_bytes = sum(d.in_use_bytes for d in used)
        host_bytes = fit.host_bytes
        if any(d.host_side_bytes for d in used):
            host_bytes = fit.host_bytes + sum(d.host_side_bytes for d in used) - host_side
        total = gpu_bytes + host_bytes
    elif fit.runs:  # all in RAM: the CPU backend's buffers, no CUDA runtime
        compute, runtime, display, gpu_bytes = est.compute_bytes, 0, 0, 0
        total = fit.host_bytes
    else:  # fits nowhere: what one GPU would need
        compute, runtime, display, gpu_bytes = est.total_compute_bytes, est.runtime_reserve_bytes, 0, 0
        total = est.total_bytes
    return {
        "model": spec.name,
        "architecture": spec.architecture,
        "ctx": est.geometry.n_ctx,
        "ctx_requested": settings.ctx,
        "n_seq": settings.n_seq,
        "type_k": settings.type_k,
        "type_v": settings.type_v,
        "flash_attn": settings.flash_attn,
        "weights_bytes": est.weights_bytes,
        "kv_bytes": est.kv_bytes,
        "recurrent_bytes": est.recurrent_bytes,
        "compute_bytes": compute,
        "output_buffer_bytes": est.output_buffer_bytes,
        "runtime_bytes": runtime,
        "reserve_bytes": runtime,  # the name before runtime_bytes
        "display_bytes": display,
        "gpu_bytes": gpu_bytes,
        "total_bytes": total,
        "active_bytes_per_token": spec.active_bytes_per_token,
        "fits": fit.fits,
        "runs": fit.runs,
        "offload_layers": fit.offload_layers,
        "n_cpu_moe": fit.n_cpu_moe,
        "host_bytes": fit.host_bytes,
        "reason": fit.reason,
        "devices": [{"name": d.name, "bytes_placed": d.bytes_placed, "bytes_free": d.bytes_free,
                     "layers": len(d.layers), "weights_bytes": d.weights_bytes, "kv_bytes": d.kv_bytes,
                     "recurrent_bytes": d.recurrent_bytes, "compute_bytes": d.compute_bytes,
                     "runtime_bytes": d.runtime_bytes, "display_bytes": d.display_bytes,
                     "in_use_bytes": d.in_use_bytes if d.bytes_placed else 0} for d in fit.devices],
        "parts": _parts(spec, est),
        "warnings": list(est.notes),
    }


def _parts(spec: ModelSpec, est: MemoryEstimate) -> dict[str, Any]:
    geo = est.geometry
    return {
        "token_embd_bytes": est.token_embd_bytes,
        "output_weight_bytes": est.output_weight_bytes,
        "layer_weight_bytes": est.layer_weight_bytes,
        "compute_buffer_bytes": est.compute_bytes,
        "flash_attn_copy_bytes": est.fa_copy_bytes,
        "graph_input_bytes": est.graph_input_bytes,
        "logits_bytes": est.logits_bytes,
        "n_ctx_seq": geo.n_ctx_seq,
        "n_stream": geo.n_stream,
        "swa_cells": geo.swa_cells,
        "n_ubatch": geo.n_ubatch,
        "layers": [{"index": ly.layer_index, "attention": str(ly.attention), "weight_bytes": ly.weight_bytes,
                    "expert_bytes": ly.expert_bytes, "kv_bytes": ly.kv_bytes,
                    "recurrent_bytes": ly.recurrent_bytes, "cells": ly.cells} for ly in est.layers],
    }


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def render_plan_table(plan_dict: dict[str, Any]) -> str:
    """A table a person can read: each part, each device, and the verdict."""
    p = plan_dict
    if p["fits"]:
        verdict = "fits"
    elif p["runs"] and p["n_cpu_moe"]:
        verdict = f"experts of {p['n_cpu_moe']} layers in RAM"
    elif p["runs"]:
        verdict = f"{p['offload_layers']} layers in RAM"
    else:
        verdict = "does not fit"
    title = f"{p['model'] or '(unnamed)'} ({p['architecture']}) at {p['ctx']} ctx"
    title += f", {p['n_seq']} slot{'s' if p['n_seq'] != 1 else ''}, KV {p['type_k']}/{p['type_v']}"
    if p.get("engine"):
        title += f", {p['engine']}"
    rows = [
        ("weights", p["weights_bytes"]),
        ("KV cache", p["kv_bytes"]),
        ("recurrent state", p["recurrent_bytes"]),
        ("compute", p["compute_bytes"]),
        ("output buffer", p["output_buffer_bytes"]),
        ("CUDA runtime", p.get("runtime_bytes", p["reserve_bytes"])),
        ("display / OS", p.get("display_bytes", 0)),
        ("total", p["total_bytes"]),
    ]
    lines = [title, ""]
    lines += [f"  {label:<16}{_gib(value)}" for label, value in rows]
    if p["devices"]:
        width = max(len("device"), *(len(d["name"]) for d in p["devices"])) + 2
        cols = [("weights", "weights_bytes"), ("KV", "kv_bytes"), ("compute", "compute_bytes"),
                ("runtime", "runtime_bytes"), ("display/OS", "display_bytes"), ("in use", "in_use_bytes"),
                ("free", "bytes_free")]
        lines += ["", f"  {'device':<{width}}" + "".join(f"{c:>12}" for c, _ in cols) + "  layers"]
        for d in p["devices"]:
            lines.append(f"  {d['name']:<{width}}" + "".join(_gib(d.get(k, 0)) for _, k in cols)
                         + f"  {d['layers']:>6}")
    reason = p["reason"]
    lines += ["", f"  {reason}" if verdict in reason else f"  {verdict}: {reason}"]
    lines += [f"  warning: {w}" for w in p["warnings"]]
    return "\n".join(lines)
