"""GET /hybridd/v1/events: the status object as server-sent events, at once when a request was answered, else
every PUSH_EVERY_S, so the dashboard (and any script with an SSE client) follows the node live.

Each stream ends when the app shuts down (aiohttp runs on_shutdown before it waits for open handlers), so an open
dashboard never holds up the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import web

from hybridd.api.recent import RECENT
from hybridd.api.routes_status import status_of

PUSH_EVERY_S = 1.0
RETRY_MS = 2000  # how long a browser waits before it reconnects (a restarted daemon)
EVENTS_PATH = "/hybridd/v1/events"


class Changes:
    """Wakes the event streams: when something changed, and once for good when the app shuts down."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()
        self.closing = False

    def changed(self) -> None:
        """Something the streams show changed: each sends the status now."""
        self._changed.set()
        self._changed = asyncio.Event()  # those waiting hold the one just set; later waits take the new one

    def close(self) -> None:
        """The app is shutting down: every stream ends."""
        self.closing = True
        self.changed()

    async def wait(self, timeout_s: float) -> None:
        """Until the next change, the shutdown, or timeout_s, whichever comes first."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await changed.wait()


CHANGES = web.AppKey("status_changes", Changes)


def add_routes(app: web.Application) -> None:
    """Register the event stream; the recent requests wake it, the app's shutdown ends it."""
    app[CHANGES] = changes = Changes()
    if RECENT in app:
        app[RECENT].on_added = changes.changed

    async def end_streams(app: web.Application) -> None:
        changes.close()

    app.on_shutdown.append(end_streams)
    app.router.add_get(EVENTS_PATH, events)


async def events(request: web.Request) -> web.StreamResponse:
    """`event: status` with the status object as its data, until the client leaves or the app shuts down."""
    changes = request.app[CHANGES]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        await response.write(f"retry: {RETRY_MS}\n\n".encode())
        while not changes.closing:
            body = json.dumps(status_of(request.app), separators=(",", ":"))
            await response.write(f"event: status\ndata: {body}\n\n".encode())
            await changes.wait(PUSH_EVERY_S)
    except ConnectionResetError:  # the client left between two events
        return response
    await response.write_eof()
    return response
