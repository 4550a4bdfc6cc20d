"""Hand-driven engine control on the loopback API: unload the engines no request is using (the tray's and
`hybridd unload`'s button). A POST: the Host and Origin guards keep a web page from pressing it."""

from __future__ import annotations

from aiohttp import web

from hybridd.api import keys

UNLOAD_IDLE_PATH = "/hybridd/v1/unload-idle"


def add_routes(app: web.Application) -> None:
    """Register POST /hybridd/v1/unload-idle."""
    app.router.add_post(UNLOAD_IDLE_PATH, unload_idle)


async def unload_idle(request: web.Request) -> web.Response:
    """Stop every engine nothing is using now; the next request for its model loads it again."""
    unloaded, busy = await request.app[keys.POOL].unload_idle(f"asked to (POST {UNLOAD_IDLE_PATH})")
    return web.json_response({"unloaded": unloaded, "busy": busy})
