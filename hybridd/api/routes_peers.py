"""Peering on the loopback API (what `hybridd pair` and `hybridd peers` call) and the LAN listener's app."""

from __future__ import annotations

from aiohttp import web

from hybridd.api import keys, routes_anthropic, routes_jobs, routes_ollama, routes_openai, routes_responses
from hybridd.api.envelope import Handler, envelope_middleware, error_response
from hybridd.api.guards import body_deadline
from hybridd.api.metrics import METRICS, count_requests
from hybridd.api.proxy import OPEN_STREAMS
from hybridd.errors import BadRequest, HybriddError
from hybridd.node.peering import PeerNode
from hybridd.node.request import read_json
from hybridd.peer.link import add_link_route
from hybridd.peer.pairing import add_pairing_routes

PAIR_PATHS = ("/hybridd/v1/pair/start", "/hybridd/v1/pair/finish")


def add_routes(app: web.Application) -> None:
    """Register the peering routes on the loopback API: peers, pair/open, pair/window and pair/connect."""
    app.router.add_get("/hybridd/v1/peers", peers)
    app.router.add_post("/hybridd/v1/pair/open", open_window)
    app.router.add_get("/hybridd/v1/pair/window", window)
    app.router.add_post("/hybridd/v1/pair/connect", connect)
    app.router.add_post("/hybridd/v1/peers/{name}/wake", wake)


def _node(request: web.Request) -> PeerNode:
    node = request.app.get(keys.PEER)
    if node is None:
        raise BadRequest("peering is off on this node")
    return node


async def peers(request: web.Request) -> web.Response:
    """This node, the nodes mDNS shows, and each paired peer's link."""
    return web.json_response(_node(request).describe())


async def open_window(request: web.Request) -> web.Response:
    """Open the 2-minute pairing window and return its one-time code."""
    node = _node(request)
    if node.role != "peer":
        raise BadRequest("only a peer opens a pairing window; on the desktop run: hybridd pair <peer> <code>")
    code = node.open_window()
    return web.json_response({"code": code, "expires_in_s": 120, "name": node.name, "node_id": node.identity.node_id,
                              "lan_port": node.lan_port, "window": node.pairing.windows_opened})


async def window(request: web.Request) -> web.Response:
    """The pairing window as of now: open or how it ended, and what was tried against it, by address."""
    pairing = _node(request).pairing
    return web.json_response(pairing.report(pairing.clock()).as_json())


async def connect(request: web.Request) -> web.Response:
    """Pair with {target, code}: a discovered name or id, or host[:port]."""
    node = _node(request)
    body = read_json(await request.read())
    if not isinstance(body, dict) or not isinstance(body.get("target"), str) or not isinstance(body.get("code"), str):
        raise BadRequest("expected {\"target\": \"name-or-address\", \"code\": \"12345678\"}")
    peer = await node.pair(body["target"], body["code"], request.app[keys.HTTP])
    return web.json_response({"name": peer.name, "node_id": peer.node_id, "role": peer.role,
                              "address": peer.address, "port": peer.port})


async def wake(request: web.Request) -> web.Response:
    """Send the paired peer's Wake-on-LAN packet now (`hybridd wake`): what was sent where, and its link now. A POST
    on the loopback API only: the Host and Origin guards keep a web page from pressing it."""
    return web.json_response(_node(request).wake(request.match_info["name"]))


def make_lan_app(main: web.Application) -> web.Application:
    """The mutual-TLS listener for paired nodes: pairing is open to anyone, everything else needs a pinned cert."""
    node = main[keys.PEER]

    @web.middleware
    async def paired_only(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PAIR_PATHS or node.authorize(request) is not None:
            return await handler(request)
        return error_response(403, "this listener serves paired hybridd nodes only; pair first", code="not_paired")

    app = web.Application(middlewares=[count_requests, envelope_middleware, paired_only, body_deadline],
                          client_max_size=main[keys.NODE].config.server.max_body_bytes)
    # The same objects as the loopback app: one node, two listeners.
    app[keys.NODE], app[keys.POOL], app[keys.ROUTER] = main[keys.NODE], main[keys.POOL], main[keys.ROUTER]
    app[keys.HTTP], app[keys.PEER] = main[keys.HTTP], node
    app[METRICS] = main[METRICS]  # what paired nodes ask of this one counts with the rest
    app[OPEN_STREAMS] = main[OPEN_STREAMS]  # a shutdown ends the streams of both listeners at its grace
    add_pairing_routes(app, node.pairing)
    add_link_route(app, node.hub)
    routes_openai.add_routes(app)
    routes_anthropic.add_routes(app)
    routes_responses.add_routes(app)
    routes_ollama.add_routes(app)
    if keys.FILES in main:  # a node with a state dir trains for the desktops paired with it
        app[keys.FILES], app[keys.TRAININGS] = main[keys.FILES], main[keys.TRAININGS]
        routes_jobs.add_routes(app)
        routes_jobs.add_peer_routes(app)
    return app


__all__ = ["HybriddError", "add_routes", "make_lan_app"]
