"""GET /: the dashboard, one page of HTML, JS and CSS shipped in the package (hybridd/api/static/), no CDN and no
build step. The page draws the status object it reads from the event stream (hybridd/api/events.py).

It sits behind the same guards as the API (loopback Host, loopback Origin); its own policy lets it load only
hybridd's assets and talk only to hybridd, and no other page may frame it.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from hybridd.api import events
from hybridd.api.recent import RECENT, RecentRequests

ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": _POLICY, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer"}


def add_routes(app: web.Application) -> None:
    """Register / and its assets, the recent requests they show, and the event stream that keeps them live."""
    app[RECENT] = RecentRequests()
    events.add_routes(app)
    app.router.add_get("/", page)
    app.router.add_get("/dashboard/{asset}", asset)


def _read(name: str) -> bytes:
    return resources.files("hybridd.api").joinpath("static", name).read_bytes()


async def page(request: web.Request) -> web.Response:
    """The dashboard's HTML."""
    return web.Response(body=_read("dashboard.html"), content_type="text/html", charset="utf-8", headers=_HEADERS)


async def asset(request: web.Request) -> web.Response:
    """The dashboard's script or style sheet; any other name is a 404."""
    name = request.match_info["asset"]
    content_type = ASSETS.get(name)
    if content_type is None:
        raise web.HTTPNotFound(text=f"no dashboard asset '{name}'")
    return web.Response(body=_read(name), content_type=content_type, charset="utf-8", headers=_HEADERS)
