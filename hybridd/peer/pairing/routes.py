"""The window owner's two pairing routes on the LAN listener: HTTP in front of `PairingServer`."""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web

from hybridd.errors import error_body
from hybridd.peer.errors import PeerError
from hybridd.peer.pairing.protocol import FINISH_PATH, START_PATH, PairingServer

log = logging.getLogger("hybridd.peer.pairing")

PAIRING_SERVER = web.AppKey("pairing_server", PairingServer)
_HEADERS = {"Cache-Control": "no-store"}


def add_pairing_routes(app: web.Application, state: PairingServer) -> None:
    """Mount the two pairing routes on the LAN listener's app (they work for clients that present no certificate)."""
    app[PAIRING_SERVER] = state

    async def start(request: web.Request) -> web.Response:
        return await _answer(request, lambda frame: state.start(frame, request.remote, state.clock()))

    async def finish(request: web.Request) -> web.Response:
        return await _answer(request, lambda frame: state.finish(frame, state.clock(), request.remote))

    app.router.add_post(START_PATH, start)
    app.router.add_post(FINISH_PATH, finish)


async def _answer(request: web.Request, step: Callable[[bytes], bytes]) -> web.Response:
    try:
        answer = step(await request.read())
    except PeerError as exc:
        log.debug("pairing: %s %s refused: %s", request.method, request.path, exc.message)
        return web.json_response(error_body(exc.message, exc.error_type, exc.code), status=exc.status,
                                 headers=_HEADERS)
    except web.HTTPException:
        raise  # the body was over the app's size cap: aiohttp's own answer
    except Exception:  # untrusted bytes must never reach the client as a traceback
        log.exception("pairing: internal error on %s", request.path)
        return web.json_response(error_body("internal error in hybridd (see the daemon log)", "server_error",
                                            "internal_error"), status=500, headers=_HEADERS)
    return web.Response(body=answer, content_type="application/json", headers=_HEADERS)
