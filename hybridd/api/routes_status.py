"""hybridd's own routes: status of the node and its engines."""

from __future__ import annotations

import asyncio
import os
import time

from aiohttp import web

from hybridd import __version__
from hybridd.api import keys
from hybridd.errors import BadRequest
from hybridd.node.planning import make_plan, plan_request_from_json
from hybridd.node.request import read_json


def add_routes(app: web.Application) -> None:
    """Register /hybridd/v1/status and /hybridd/v1/plan."""
    app.router.add_get("/hybridd/v1/status", status)
    app.router.add_post("/hybridd/v1/plan", plan)


async def status(request: web.Request) -> web.Response:
    """The node at a glance: version, uptime, listen address, every model's engine state."""
    node = request.app[keys.NODE]
    return web.json_response({
        "version": __version__,
        "pid": os.getpid(),
        "listen": node.config.server.listen,
        "config": node.config.source,
        "started_at": node.started_wall,
        "uptime_s": round(time.monotonic() - node.started_mono, 1),
        "node": request.app[keys.ROUTER].node_name,
        "warnings": list(request.app[keys.ROUTER].state.hardware.notes),
        "models": request.app[keys.POOL].describe(node.catalog.models),
        "peers": _peers(request),
        "decisions": list(request.app[keys.ROUTER].decisions)[-10:],
        "calibration": {f"{node}/{model}": round(f, 3)
                        for (node, model), f in request.app[keys.ROUTER].state.calibration.ratios.items()},
        "completion_tokens": {model: round(n) for model, n in request.app[keys.ROUTER].state.lengths.tokens.items()},
        "fine_tuning_jobs": _training(request),
    })


async def plan(request: web.Request) -> web.Response:
    """The plan for a model on this node (or a hardware profile): same object as `hybridd plan --json`."""
    plan_request = plan_request_from_json(read_json(await request.read()))
    try:
        # Reading a GGUF header and asking NVML block: keep them off the event loop.
        result = await asyncio.to_thread(make_plan, plan_request, request.app[keys.NODE].catalog)
    except ValueError as exc:  # a malformed profile or GGUF header
        raise BadRequest(str(exc)) from exc
    return web.json_response(result)


def _training(request: web.Request) -> list[dict[str, object]]:
    """Fine-tuning jobs not finished, oldest first: where each runs, how far it got, and why it is where it is."""
    if keys.TRAININGS not in request.app:
        return []
    return [{"id": job.id, "model": job.model, "status": job.status, "placement": job.placement, "step": job.step,
             "total_steps": job.total_steps, "reason": job.reason, "estimated_finish": job.estimated_finish}
            for job in request.app[keys.TRAININGS].store.active()]


def _peers(request: web.Request) -> list[dict[str, object]]:
    """Every peer the scheduler may use, with its link's figures where it is a paired peer."""
    links = {}
    if keys.PEER in request.app:
        links = {p["name"]: p for p in request.app[keys.PEER].describe()["paired"]}
    rows = []
    forwarding = request.app[keys.ROUTER].forwarding  # requests on each peer now
    for name, target in request.app[keys.ROUTER].peer_targets().items():
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
