"""hybridd's own routes: status of the node and its engines."""

from __future__ import annotations

import asyncio
import os
import time

from aiohttp import web

from hybridd import __version__
from hybridd.api import keys
from hybridd.api.recent import RECENT
from hybridd.errors import BadRequest
from hybridd.node.planning import make_plan, plan_request_from_json
from hybridd.node.request import read_json
from hybridd.place.ledger import HOST
from hybridd.place.scheduler import TRAINING_PREFIX


def add_routes(app: web.Application) -> None:
    """Register /hybridd/v1/status and /hybridd/v1/plan."""
    app.router.add_get("/hybridd/v1/status", status)
    app.router.add_post("/hybridd/v1/plan", plan)


async def status(request: web.Request) -> web.Response:
    """The node at a glance: version, uptime, listen address, every model's engine state."""
    return web.json_response(status_of(request.app))


def status_of(app: web.Application) -> dict[str, object]:
    """GET /hybridd/v1/status's object (the dashboard's events push the same one)."""
    node = app[keys.NODE]
    router = app[keys.ROUTER]
    return {
        "version": __version__,
        "pid": os.getpid(),
        "listen": node.config.server.listen,
        "config": node.config.source,
        "started_at": node.started_wall,
        "uptime_s": round(time.monotonic() - node.started_mono, 1),
        "node": router.node_name,
        "warnings": list(router.state.hardware.notes),
        "models": app[keys.POOL].describe(node.catalog.models),
        "devices": _devices(app),
        "peers": _peers(app),
        "decisions": list(router.decisions)[-10:],
        "recent": app[RECENT].to_json() if RECENT in app else [],
        "calibration": {f"{node}/{model}": round(f, 3) for (node, model), f in router.state.calibration.ratios.items()},
        "completion_tokens": {model: round(n) for model, n in router.state.lengths.tokens.items()},
        "fine_tuning_jobs": _training(app),
    }


async def plan(request: web.Request) -> web.Response:
    """The plan for a model on this node (or a hardware profile): same object as `hybridd plan --json`."""
    plan_request = plan_request_from_json(read_json(await request.read()))
    try:
        # Reading a GGUF header and asking NVML block: keep them off the event loop.
        result = await asyncio.to_thread(make_plan, plan_request, request.app[keys.NODE].catalog)
    except ValueError as exc:  # a malformed profile or GGUF header
        raise BadRequest(str(exc)) from exc
    return web.json_response(result)


def _devices(app: web.Application) -> list[dict[str, object]]:
    """Each device's memory as placement sees it: the bytes of other programs and the display reserve (kept back at
    start), and, of what hybridd's engines may use, what each engine (or fine-tune) holds and what is free."""
    router, pool = app[keys.ROUTER], app[keys.POOL]
    ledger = router.state.ledger
    devices = {d.name: d for d in router.state.hardware.devices}
    rows: list[dict[str, object]] = []
    for name in ledger.devices:
        capacity = ledger.capacity(name)
        device = devices.get(name)
        held = []
        for key in ledger.keys:
            on_device = ledger.held(key).get(name, 0)
            if not on_device:
                continue
            slot = pool.slots.get(key)
            training = key.startswith(TRAINING_PREFIX)
            held.append({"key": key, "bytes": on_device,
                         "model": slot.model.name if slot is not None else key.removeprefix(TRAINING_PREFIX),
                         "kind": "training" if training else "engine",
                         "state": slot.state.value if slot is not None else ("training" if training else None)})
        reserve = device.reserve_bytes if device is not None else 0
        total = device.total_bytes if device is not None else capacity
        rows.append({"name": name, "host": name == HOST, "unified": device.unified if device is not None else False,
                     "total_bytes": total, "display_reserve_bytes": min(reserve, total),
                     "other_bytes": max(0, total - capacity - reserve), "capacity_bytes": capacity,
                     "reserved_bytes": ledger.used_bytes(name), "free_bytes": ledger.free_bytes(name), "held": held})
    return rows


def _training(app: web.Application) -> list[dict[str, object]]:
    """Fine-tuning jobs not finished, oldest first: where each runs, how far it got, and why it is where it is."""
    if keys.TRAININGS not in app:
        return []
    return [{"id": job.id, "model": job.model, "status": job.status, "placement": job.placement, "step": job.step,
             "total_steps": job.total_steps, "reason": job.reason, "estimated_finish": job.estimated_finish}
            for job in app[keys.TRAININGS].store.active()]


def _peers(app: web.Application) -> list[dict[str, object]]:
    """Every peer the scheduler may use, with its link's figures where it is a paired peer."""
    links = {}
    if keys.PEER in app:
        links = {p["name"]: p for p in app[keys.PEER].describe()["paired"]}
    rows = []
    forwarding = app[keys.ROUTER].forwarding  # requests on each peer now
    for name, target in app[keys.ROUTER].peer_targets().items():
        link = links.pop(name, {})
        rows.append({"name": name, "base_url": target.base_url, "hardware": target.state.hardware.name,
                     "up": target.state.up, "models": sorted(target.state.models), "rtt_ms": link.get("rtt_ms"),
                     "free_bytes": sum(d.usable_bytes for d in target.state.hardware.devices),
                     "queue_depth": target.state.queue_depth, "in_flight": forwarding[name]})
    for name, link in links.items():  # paired but not linked yet: down
        rows.append({"name": name, "base_url": f"https://{link['address']}:{link['port']}",
                     "hardware": link["hardware"], "up": False, "models": link["models"], "rtt_ms": None,
                     "free_bytes": None, "queue_depth": None, "down_reason": link["down_reason"], "in_flight": 0})
    return rows
