"""hybridd's own routes: status of the node and its engines."""

from __future__ import annotations

import os
import time

from aiohttp import web

from hybridd import __version__
from hybridd.api import keys


def add_routes(app: web.Application) -> None:
    """Register /hybridd/v1/status."""
    app.router.add_get("/hybridd/v1/status", status)


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
        "models": request.app[keys.POOL].describe(),
    })
