"""What a status bar shows of the daemon: one class, a short text, a tooltip and a percentage, from the status
object (or its absence), and the waybar, i3bar and one-line forms of it. Pure: no I/O, no clock but `now`.

Classes, first match wins (a bar colours one state):
    down        no status: the daemon is not running or did not answer
    serving     a local engine is answering a request
    forwarding  a request is being answered by a peer
    loading     an engine is loading its model
    training    a fine-tuning job is running
    peer-down   a peer placement could use is down
    idle        none of the above
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

from hybridd.cli.views import duration, load_fraction, load_progress

CLASSES = ("down", "serving", "forwarding", "loading", "training", "peer-down", "idle")
FORMATS = ("waybar", "i3bar", "oneline")

# i3bar colours per class (None: the bar's own colour). The Solarized accents: readable on dark and light bars.
I3_COLORS: dict[str, str | None] = {
    "down": "#dc322f", "serving": "#859900", "forwarding": "#2aa198", "loading": "#b58900",
    "training": "#6c71c4", "peer-down": "#cb4b16", "idle": None,
}


class BarView(NamedTuple):
    """One status-bar reading: the class, the text on the bar, the tooltip, and a 0-100 progress."""

    cls: str
    text: str
    short: str
    tooltip: str
    percentage: int


def _count(value: object) -> int:
    """A count from the status object, 0 for anything that is not a non-negative integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _number(value: object) -> float | None:
    """A finite number from the status object, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _name(value: object) -> str:
    """A name from the status object as one line: control characters (a newline in a peer's name) become spaces."""
    return "".join(c if c.isprintable() else " " for c in str(value))


def _models(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in status.get("models") or [] if isinstance(m, dict)]


def _peers(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in status.get("peers") or [] if isinstance(p, dict)]


def _running_jobs(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [j for j in status.get("fine_tuning_jobs") or [] if isinstance(j, dict) and j.get("status") == "running"]


def loading_engines(status: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(model name, its engine's load record) for every engine loading now."""
    found = []
    for model in _models(status):
        for engine in model.get("engines") or []:
            if isinstance(engine, dict) and isinstance(engine.get("load"), dict):
                found.append((_name(model.get("name")), engine["load"]))
    return found


def bar_class(status: dict[str, Any] | None) -> str:
    """The one class that says what the node is doing (see the module docstring for the order)."""
    if status is None:
        return "down"
    if any(_count(m.get("in_flight")) for m in _models(status)):
        return "serving"
    if any(_count(p.get("in_flight")) for p in _peers(status)):
        return "forwarding"
    if loading_engines(status):
        return "loading"
    if _running_jobs(status):
        return "training"
    if any(not p.get("up") for p in _peers(status)):
        return "peer-down"
    return "idle"


def _step(job: dict[str, Any]) -> str:
    total = _count(job.get("total_steps"))
    return f"{_count(job.get('step'))}/{total}" if total else "starting"


def _percent(done: int, total: int) -> int:
    return max(0, min(100, round(100 * done / total))) if total > 0 else 0


def bar_view(status: dict[str, Any] | None, why_down: str = "") -> BarView:
    """The reading a bar shows for status (None: the daemon is down, why_down says why)."""
    cls = bar_class(status)
    if status is None:
        return BarView(cls, "hybridd down", "down", f"hybridd is not running\n{why_down}".strip(), 0)
    models, peers = _models(status), _peers(status)
    down = [_name(p.get("name")) for p in peers if not p.get("up")]
    percentage = 0
    if cls == "serving":
        busy = [m for m in models if _count(m.get("in_flight"))]
        what = f"serving {', '.join(_name(m.get('name')) for m in busy)} ({sum(_count(m['in_flight']) for m in busy)})"
    elif cls == "forwarding":
        busy = [p for p in peers if _count(p.get("in_flight"))]
        names, count = ", ".join(_name(p.get("name")) for p in busy), sum(_count(p["in_flight"]) for p in busy)
        what = f"forwarding to {names} ({count})"
    elif cls == "loading":
        name, load = loading_engines(status)[0]
        fraction = load_fraction(load)
        percentage = 0 if fraction is None else round(100 * fraction)
        what = f"loading {name} " + (f"{percentage}%" if fraction is not None else
                                     f"{_number(load.get('elapsed_s')) or 0:.0f}s")
    elif cls == "training":
        job = _running_jobs(status)[0]
        percentage = _percent(_count(job.get("step")), _count(job.get("total_steps")))
        what = f"training {_name(job.get('model'))} {_step(job)}"
    else:
        loaded = sum(1 for m in models if m.get("loaded"))
        what = f"idle, {loaded} loaded" if loaded else "idle"
    if down:
        what += f", {', '.join(down)} down"
    return BarView(cls, f"hybridd {what}", cls, tooltip(status), percentage)


def tooltip(status: dict[str, Any]) -> str:
    """Several lines: the node, each model's engine state, each peer's link, running jobs, the last decision."""
    node, up = status.get("node", "?"), duration(_number(status.get("uptime_s")))
    lines = [f"hybridd {status.get('version', '?')} on {node}, up {up}"]
    for model in _models(status):
        state = str(model.get("state"))
        loads = [e["load"] for e in model.get("engines") or []
                 if isinstance(e, dict) and isinstance(e.get("load"), dict)]
        if loads:
            state = f"{state} ({load_progress(loads[0])})"
        elif _count(model.get("in_flight")):
            state += f", {model['in_flight']} in flight"
        elif model.get("loaded") and _number(model.get("idle_s")) is not None:
            state += f", idle {duration(_number(model['idle_s']))}"
        lines.append(f"{model.get('name')}: {state}")
    for peer in _peers(status):
        link = "up" if peer.get("up") else "down"
        rtt = _number(peer.get("rtt_ms"))
        if peer.get("up") and rtt is not None:
            link += f", {rtt:.1f} ms"
        if _count(peer.get("in_flight")):
            link += f", {peer['in_flight']} forwarded"
        lines.append(f"peer {peer.get('name')}: {link}")
    for job in _running_jobs(status):
        lines.append(f"training {job.get('model')}: step {_step(job)}" +
                     (f" on {job['placement']}" if job.get("placement") else ""))
    decisions = [d for d in status.get("decisions") or [] if isinstance(d, dict)]
    if decisions:
        last = decisions[-1]
        lines.append(f"last: {last.get('model')} -> {last.get('placement')}")
    return "\n".join(lines)


def _markup(text: str) -> str:
    """Escape for Pango markup, which waybar parses in text and tooltip (a bare '&' blanks the module)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def waybar(view: BarView) -> str:
    """One line of waybar custom-module JSON (`"return-type": "json"`)."""
    return json.dumps({"text": _markup(view.text), "alt": view.cls, "tooltip": _markup(view.tooltip),
                       "class": view.cls, "percentage": view.percentage}, ensure_ascii=False)


def i3bar_block(view: BarView) -> dict[str, Any]:
    """One block of the i3bar protocol (what i3blocks reads with `format=json`)."""
    block: dict[str, Any] = {"name": "hybridd", "instance": view.cls, "full_text": view.text,
                             "short_text": view.short}
    color = I3_COLORS.get(view.cls)
    if color is not None:
        block["color"] = color
    if view.cls == "down":
        block["urgent"] = True
    return block


def i3bar(view: BarView) -> str:
    """The i3bar block as one JSON line."""
    return json.dumps(i3bar_block(view), ensure_ascii=False)


def oneline(view: BarView) -> str:
    """The bar text alone (tmux, polybar)."""
    return view.text


RENDERERS = {"waybar": waybar, "i3bar": i3bar, "oneline": oneline}


def render(fmt: str, view: BarView) -> str:
    """view in the named format (one of FORMATS)."""
    return RENDERERS[fmt](view)
