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
    """JSON-ready plan: totals per part, per-layer detail, fit per device and a one-line reason."""
    est = estimate_memory(spec, settings)
    fit = fit_model(est, devices, host_ram_free)
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
        "compute_bytes": est.total_compute_bytes,
        "output_buffer_bytes": est.output_buffer_bytes,
        "reserve_bytes": est.runtime_reserve_bytes,
        "total_bytes": est.total_bytes,
        "active_bytes_per_token": spec.active_bytes_per_token,
        "fits": fit.fits,
        "runs": fit.runs,
        "offload_layers": fit.offload_layers,
        "n_cpu_moe": fit.n_cpu_moe,
        "host_bytes": fit.host_bytes,
        "reason": fit.reason,
        "devices": [{"name": d.name, "bytes_placed": d.bytes_placed, "bytes_free": d.bytes_free,
                     "layers": len(d.layers)} for d in fit.devices],
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
    rows = [
        ("weights", p["weights_bytes"]),
        ("KV cache", p["kv_bytes"]),
        ("recurrent state", p["recurrent_bytes"]),
        ("compute", p["compute_bytes"]),
        ("output buffer", p["output_buffer_bytes"]),
        ("reserve", p["reserve_bytes"]),
        ("total", p["total_bytes"]),
    ]
    lines = [title, ""]
    lines += [f"  {label:<16}{_gib(value)}" for label, value in rows]
    if p["devices"]:
        width = max(len("device"), *(len(d["name"]) for d in p["devices"])) + 2
        lines += ["", f"  {'device':<{width}}{'placed':>12}{'free':>12}  layers"]
        for d in p["devices"]:
            lines.append(f"  {d['name']:<{width}}{_gib(d['bytes_placed'])}{_gib(d['bytes_free'])}  {d['layers']:>6}")
    reason = p["reason"]
    lines += ["", f"  {reason}" if verdict in reason else f"  {verdict}: {reason}"]
    lines += [f"  warning: {w}" for w in p["warnings"]]
    return "\n".join(lines)
