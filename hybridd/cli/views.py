"""Render the daemon's status and model list as text a person reads at a glance. Pure."""

from __future__ import annotations

import math
import time
from typing import Any


def duration(seconds: float | None) -> str:
    """'-', '42s', '5m03s', '2h04m', '3d02h'."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def load_fraction(load: dict[str, Any]) -> float | None:
    """How much of its model file a loading engine has read, 0..1, or None where that is not known."""
    done, total = load.get("bytes_read"), load.get("bytes_total")
    if not isinstance(done, int | float) or not isinstance(total, int | float) or not 0 < total < math.inf:
        return None
    fraction = done / total
    return max(0.0, min(1.0, fraction)) if math.isfinite(fraction) else None


def load_progress(load: dict[str, Any]) -> str:
    """'reading weights, 42% of 1.2 GiB, 3s' — the phase, how far, for how long."""
    parts = [str(load.get("phase") or "loading")]
    fraction = load_fraction(load)
    if fraction is not None:
        parts.append(f"{fraction:.0%} of {_gib(load['bytes_total'])}")
    elapsed = load.get("elapsed_s")
    if isinstance(elapsed, int | float) and math.isfinite(elapsed):
        parts.append(f"{elapsed:.0f}s")
    return ", ".join(parts)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def render_status(status: dict[str, Any]) -> str:
    """The `hybridd status` text."""
    models = status.get("models", [])
    loaded = sum(1 for m in models if m.get("loaded"))
    head = (f"hybridd {status.get('version')} · http://{status.get('listen')} · up "
            f"{duration(status.get('uptime_s'))} · {loaded} of {len(models)} models loaded")
    rows = []
    for m in models:
        state = m["state"] + (f" ({m['last_error'][:60]}…)" if m.get("last_error") else "")
        loads = [e["load"] for e in m.get("engines") or [] if e.get("load")]
        if loads:
            state = f"{m['state']} ({load_progress(loads[0])})"
        rows.append([
            m["name"], state, m["engine"], str(m["ctx"]), f"{m['type_k']}/{m['type_v']}",
            duration(m.get("idle_s")) if m.get("loaded") else "-", str(m["in_flight"]), str(m["requests"]),
            str(m["pid"] or "-"),
        ])
    body = table(["MODEL", "STATE", "ENGINE", "CTX", "KV", "IDLE", "ACTIVE", "REQUESTS", "PID"], rows)
    text = f"{head}\n\n{body}" if rows else f"{head}\n\nno models configured"
    peers = status.get("peers", [])
    if peers:
        rows = [[p["name"], "up" if p.get("up") else "down", p["base_url"], str(p.get("hardware")),
                 "-" if p.get("rtt_ms") is None else f"{p['rtt_ms']:.1f} ms",
                 "-" if not p.get("free_bytes") else f"{p['free_bytes'] / 2**30:.1f} GiB",
                 ", ".join(p.get("models", [])) or "-"] for p in peers]
        text += "\n\n" + table(["PEER", "LINK", "URL", "HARDWARE", "RTT", "FREE", "MODELS"], rows)
    training = status.get("fine_tuning_jobs", [])
    if training:
        text += "\n\n" + render_training(training)
    decisions = status.get("decisions", [])
    if decisions:
        text += "\n\nrecent decisions:"
        for d in decisions[-5:]:
            expected = d.get("expected_tokens", d.get("max_tokens"))
            text += (f"\n  {d['model']} ({d['prompt_tokens']} prompt tokens, ~{expected} of {d.get('max_tokens')} "
                     f"completion) -> {d['placement']}: {d['reason']}")
    return text


def render_models(listing: dict[str, Any]) -> str:
    """The `hybridd models` text."""
    rows = []
    for m in listing.get("data", []):
        info = m.get("hybridd", {})
        rows.append([m["id"], ", ".join(m.get("aliases", [])) or "-", str(m.get("context_length", "-")),
                     info.get("placement", "-"), info.get("state", "-")])
    return table(["MODEL", "ALIASES", "CTX", "WHERE", "STATE"], rows)


def render_options(plan: dict[str, Any]) -> str:
    """The placement part of `hybridd plan`: each option with its predicted speed, and the choice."""
    rows = []
    for option in plan.get("options", []):
        start, mean = option.get("decode_tok_s_start"), option.get("decode_tok_s_mean")
        first = f"{start:.0f} tok/s" if option["feasible"] and start is not None else "-"
        speed = f"{mean if mean is not None else option['predicted_tok_s']:.0f} tok/s" if option["feasible"] else "-"
        total = f"{option['total_s']:.1f} s" if option.get("total_s") is not None else "-"
        rows.append([option["placement"], str(option["ctx"]), first, speed, total,
                     "" if option["feasible"] else option["why_not"][:70]])
    if not rows:
        return ""
    ref = plan.get("reference_request", {})
    head = (f"\n  placement: {plan.get('placement')} (reference request: {ref.get('prompt_tokens')} prompt + "
            f"{ref.get('max_tokens')} completion tokens)")
    body = table(["OPTION", "CTX", "DECODE AT START", "DECODE MEAN", "TOTAL", "WHY NOT"], rows)
    return head + "\n" + "\n".join("  " + line for line in body.splitlines())


def render_peers(peers: dict[str, Any]) -> str:
    """The `hybridd peers` text."""
    me = peers.get("node", {})
    head = f"this node: {me.get('name')} ({me.get('role')}), node id {str(me.get('node_id'))[:16]}…"
    if me.get("lan_port"):
        head += f", paired nodes connect to port {me['lan_port']}"
    rows = []
    for p in peers.get("paired", []):
        free = sum(p.get("free_bytes", {}).values())
        rows.append([p["name"], p["role"], f"{p.get('address')}:{p.get('port')}", p["link"],
                     "-" if p.get("rtt_ms") is None else f"{p['rtt_ms']:.1f} ms",
                     f"{free / 2**30:.1f} GiB" if free else "-", ", ".join(p.get("models", [])) or "-"])
    text = head + "\n\n" + (table(["PAIRED", "ROLE", "ADDRESS", "LINK", "RTT", "FREE", "MODELS"], rows)
                             if rows else "no paired peers (on the peer run 'hybridd pair', then here "
                             "'hybridd pair NAME CODE')")
    found = [[a["name"], a["role"], ", ".join(a["addresses"]) + f":{a['port']}", "yes" if a["paired"] else "no"]
             for a in peers.get("discovered", [])]
    if found:
        text += "\n\n" + table(["ON THE LAN", "ROLE", "ADDRESS", "PAIRED"], found)
    return text


def render_pairing_event(event: dict[str, Any], opened_at: float | None) -> str:
    """One line of `hybridd pair` on the peer: when (since the window opened), from where, what happened."""
    since = f"+{event['at'] - opened_at:.1f}s" if opened_at is not None else ""
    return f"  {since:>7}  {event['source'] or 'this node':<24}  {event['kind']:<15}  {event['detail']}"


def _step(info: dict[str, Any]) -> str:
    """'12/200', or '-' before the trainer has said how many steps there are."""
    if not info.get("total_steps"):
        return "-"
    return f"{info.get('step') or 0}/{info['total_steps']}"


def render_jobs(listing: dict[str, Any]) -> str:
    """The `hybridd jobs` text: each job with its model, status, where it runs, step and fine-tuned model."""
    rows = []
    for job in listing.get("data", []):
        info = job.get("hybridd") or {}
        rows.append([job["id"], job["model"], job["status"], info.get("placement") or "-", _step(info),
                     job.get("fine_tuned_model") or "-"])
    if not rows:
        return "no fine-tuning jobs (create one with the OpenAI API: POST /v1/fine_tuning/jobs)"
    text = table(["JOB", "MODEL", "STATUS", "WHERE", "STEP", "FINE-TUNED MODEL"], rows)
    if listing.get("has_more"):
        text += "\n(older jobs not shown)"
    return text


def render_job(job: dict[str, Any], now: float) -> str:
    """The head of `hybridd jobs show`: the job's fields that say what it is, where it is and how far it got."""
    info = job.get("hybridd") or {}
    hyper = job.get("hyperparameters") or {}
    lines = [f"job {job['id']}: {job['status']}",
             f"  model:      {job['model']} ({info.get('adapter', '-')}"
             + (f", rank {info['rank']}" if info.get("rank") else "") + f", {hyper.get('n_epochs')} epochs)",
             f"  where:      {info.get('placement') or '-'}" + (f" on {info['device']}" if info.get("device") else "")
             + (f": {info['reason']}" if info.get("reason") else ""),
             f"  step:       {_step(info)}"]
    if job.get("trained_tokens"):
        lines.append(f"  tokens:     {job['trained_tokens']}")
    if job.get("estimated_finish") and job["status"] not in ("succeeded", "failed", "cancelled"):
        lines.append(f"  eta:        {duration(max(0.0, job['estimated_finish'] - now))}")
    if job.get("fine_tuned_model"):
        lines.append(f"  model made: {job['fine_tuned_model']}")
    if job.get("error"):
        lines.append(f"  error:      {job['error'].get('message')}")
    return "\n".join(lines)


def render_event(event: dict[str, Any]) -> str:
    """One event of a job: its time (local clock), level, message."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("created_at", 0)))
    return f"  {stamp}  {event.get('level', 'info'):<5}  {event.get('message', '')}"


def render_progress(metrics: dict[str, Any], estimated_finish: float | None, now: float, width: int = 24) -> str:
    """The `--follow` progress line: a bar, step/total, loss, tokens/s and the time left."""
    step, total = int(metrics.get("step") or 0), int(metrics.get("total_steps") or 0)
    filled = width * step // total if total > 0 else 0
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}"]
    if total > 0:
        parts.append(f"{100 * step // total:3d}%")
    loss = metrics.get("train_loss")
    parts.append(f"loss {loss:.4f}" if isinstance(loss, int | float) else "loss -")
    speed = metrics.get("tokens_per_s")
    parts.append(f"{speed:.0f} tok/s" if isinstance(speed, int | float) else "- tok/s")
    parts.append(f"ETA {duration(max(0.0, estimated_finish - now))}" if estimated_finish else "ETA -")
    return "  ".join(parts)


def render_training(jobs: list[dict[str, Any]]) -> str:
    """The fine-tuning part of `hybridd status`: each job not finished, where it runs and why."""
    rows = [[j["id"], j["model"], j["status"], j.get("placement") or "-", _step(j), (j.get("reason") or "-")[:70]]
            for j in jobs]
    return table(["FINE-TUNING JOB", "MODEL", "STATUS", "WHERE", "STEP", "WHY"], rows)
