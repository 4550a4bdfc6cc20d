"""`hybridd serve`: wire config, catalog and app; serve until a signal; drain; stop every engine."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from hybridd.api.app import make_app
from hybridd.api.keys import PEER, POOL
from hybridd.api.proxy import OPEN_STREAMS
from hybridd.api.routes_peers import make_lan_app
from hybridd.config import Config, lan_listen
from hybridd.errors import StartupError
from hybridd.node.catalog import Catalog
from hybridd.node.resources import Peer
from hybridd.place.hardware import Hardware
from hybridd.sdnotify import sd_notify

log = logging.getLogger("hybridd")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STARTUP = 0, 1, 2, 3
# After the grace, the streams still open are ended (each with an error event); this is how long they get to say
# so and close before aiohttp cancels what is left.
STREAM_END_S = 2.0


async def serve(config: Config, catalog: Catalog, hardware: Hardware | None = None,
                peers: Sequence[Peer] = (), peering: tuple[Path, str] | None = None) -> int:
    """Run the node until SIGTERM or SIGINT; return the process exit code."""
    app = make_app(config, catalog, hardware=hardware, peers=peers, peering=peering)
    server = config.server
    # handler_cancellation: a client that disconnects cancels its handler, which drops the engine request.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=server.shutdown_grace_s + STREAM_END_S,
                           access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, server.host, server.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {server.listen}: {exc.strerror or exc}") from exc
    url = _bound_url(site)
    names = ", ".join(m.name for m in catalog.models) or "no models (add [[models]] to the config)"
    log.info("hybridd serving on %s; models: %s", url, names)
    lan_runner, lan_url = await _start_lan(app, config, runner)
    sd_notify(f"READY=1\nSTATUS=serving on {url}\nMAINPID={os.getpid()}\nX_HYBRIDD_LAN={lan_url or ''}")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s: no new connections; draining in-flight requests (up to %g s)", sig.name,
                     server.shutdown_grace_s)
            stop.set()
        elif sig is signal.SIGINT:
            log.warning("second SIGINT: exiting now")
            if POOL in app:
                app[POOL].kill_all_now()
            os._exit(130)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
    finally:
        sd_notify("STOPPING=1\nSTATUS=draining requests and stopping engines")
        ending = loop.call_later(server.shutdown_grace_s, _end_streams, app, server.shutdown_grace_s)
        try:
            # Both listeners at once: each stops listening, waits for its in-flight handlers (the streams still
            # open at the grace are ended), then the API's cleanup_ctx stops the engines. The signal handlers
            # stay: a second SIGINT during the drain exits at once.
            await asyncio.gather(*(r.cleanup() for r in (lan_runner, runner) if r is not None))
        finally:
            ending.cancel()
            if POOL in app:
                app[POOL].kill_all_now()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    log.info("hybridd stopped")
    return EXIT_OK


def _end_streams(app: web.Application, grace_s: float) -> None:
    ended = app[OPEN_STREAMS].end_all(f"hybridd is shutting down: the stream was ended after the {grace_s:g} s "
                                      "grace (server.shutdown_grace_s)")
    if ended:
        log.warning("shutdown grace (%g s) is over: ending %d open streams", grace_s, ended)


async def _start_lan(app: web.Application, config: Config, runner: web.AppRunner) -> tuple[web.AppRunner | None, str]:
    """Start the mutual-TLS listener for paired nodes (a peer's, or where server.lan_listen asks), and peering."""
    if PEER not in app:
        return None, ""
    node = app[PEER]
    where = lan_listen(config)
    lan_runner = None
    lan_url = ""
    port = None
    if where is not None:
        lan_runner = web.AppRunner(make_lan_app(app), handler_cancellation=True,
                                   shutdown_timeout=config.server.shutdown_grace_s + STREAM_END_S, access_log=None)
        await lan_runner.setup()
        site = web.TCPSite(lan_runner, where[0], where[1], ssl_context=node.server_ssl, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await lan_runner.cleanup()
            await runner.cleanup()
            raise StartupError(f"cannot listen on {where[0]}:{where[1]} for peers: {exc.strerror or exc}") from exc
        lan_url = _bound_url(site).replace("http://", "https://")
        port = int(lan_url.rsplit(":", 1)[1])
        log.info("paired nodes reach %s at %s (node id %s)", node.name, lan_url, node.identity.node_id[:16])
    await node.start(port)
    return lan_runner, lan_url


def _bound_url(site: web.TCPSite) -> str:
    """The URL actually bound (port 0 becomes the port the kernel chose)."""
    server = site._server  # aiohttp keeps the asyncio server here; no public accessor exists
    sockets = getattr(server, "sockets", None)
    if sockets:
        host, port = sockets[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"
    return site.name
