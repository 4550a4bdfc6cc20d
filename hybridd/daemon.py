"""`hybridd serve`: wire config, catalog and app; serve until a signal; drain; stop every engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

from hybridd.api.app import make_app
from hybridd.api.connections import Descriptors, Limits, share_descriptors
from hybridd.api.envelope import envelope_middleware
from hybridd.api.keys import PEER, POOL
from hybridd.api.listener import Listener, descriptor_limit
from hybridd.api.metrics import METRICS, scrape
from hybridd.api.proxy import OPEN_STREAMS
from hybridd.api.routes_peers import make_lan_app
from hybridd.api.status_line import status_line
from hybridd.config import Config, lan_listen, parse_listen
from hybridd.errors import StartupError
from hybridd.node.catalog import Catalog
from hybridd.node.peering import PeerNode
from hybridd.node.resources import Peer
from hybridd.peer.tls import peer_fingerprint
from hybridd.place.hardware import Hardware
from hybridd.systemd.notify import sd_notify
from hybridd.systemd.watchdog import ping_watchdog, publish_status, under_notify_socket, watchdog_interval_s

log = logging.getLogger("hybridd")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STARTUP = 0, 1, 2, 3
# After the grace, the streams still open are ended (each with an error event); this is how long they get to say
# so and close before aiohttp cancels what is left.
STREAM_END_S = 2.0


async def serve(config: Config, catalog: Catalog, hardware: Hardware | None = None,
                peers: Sequence[Peer] = (), peering: tuple[Path, str] | None = None) -> int:
    """Run the node until SIGTERM or SIGINT; return the process exit code."""
    # From the first moment to the last: systemd's watchdog runs from the start, through the drain.
    interval = watchdog_interval_s(os.environ, os.getpid())
    watchdog = asyncio.create_task(ping_watchdog(interval), name="watchdog") if interval else None
    try:
        return await _serve(config, catalog, hardware, peers, peering)
    finally:
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog


async def _serve(config: Config, catalog: Catalog, hardware: Hardware | None, peers: Sequence[Peer],
                 peering: tuple[Path, str] | None) -> int:
    app = make_app(config, catalog, hardware=hardware, peers=peers, peering=peering)
    server = config.server
    # handler_cancellation: a client that disconnects cancels its handler, which drops the engine request.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=server.shutdown_grace_s + STREAM_END_S,
                           access_log=None)
    await runner.setup()
    shares = share_descriptors(descriptor_limit())
    api = Listener(runner, Limits(max_untrusted=shares.api), f"API on {server.listen}")
    try:
        await api.start(server.host, server.port)
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {server.listen}: {exc.strerror or exc}") from exc
    url = api.url
    names = ", ".join(m.name for m in catalog.models) or "no models (add [[models]] to the config)"
    log.info("hybridd serving on %s; models: %s", url, names)
    lan = await _start_lan(app, config, runner, api, shares)
    lan_url = lan[1].url if lan is not None else ""
    served = [(runner, api)] if lan is None else [(runner, api), lan]
    if server.metrics_listen:
        try:
            served.append(await _start_metrics(app, server.metrics_listen, config.source, shares))
        except StartupError:
            await asyncio.gather(*(listener.stop() for _, listener in served))
            await asyncio.gather(*(each.cleanup() for each, _ in served))
            raise
    sd_notify(f"READY=1\nSTATUS={status_line(app, url)}\nMAINPID={os.getpid()}\nX_HYBRIDD_URL={url}\n"
              f"X_HYBRIDD_LAN={lan_url}")
    status = (asyncio.create_task(publish_status(lambda: status_line(app, url)), name="sd-status")
              if under_notify_socket() else None)

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
        if status is not None:
            status.cancel()  # its next line would hide the one below
        sd_notify("STOPPING=1\nSTATUS=draining requests and stopping engines")
        ending = loop.call_later(server.shutdown_grace_s, _end_streams, app, server.shutdown_grace_s)
        try:
            # Both listeners at once: each stops accepting, then its runner waits for its in-flight handlers (the
            # streams still open at the grace are ended), then the API's cleanup_ctx stops the engines. The signal
            # handlers stay: a second SIGINT during the drain exits at once.
            await asyncio.gather(*(listener.stop() for _, listener in served))
            await asyncio.gather(*(each.cleanup() for each, _ in served))
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


async def _start_lan(app: web.Application, config: Config, runner: web.AppRunner, api: Listener,
                     shares: Descriptors) -> tuple[web.AppRunner, Listener] | None:
    """Start the mutual-TLS listener for paired nodes (a peer's, or where server.lan_listen asks), and peering."""
    if PEER not in app:
        return None
    node = app[PEER]
    where = lan_listen(config)
    lan = None
    port = None
    if where is not None:
        lan_runner = web.AppRunner(make_lan_app(app), handler_cancellation=True,
                                   shutdown_timeout=config.server.shutdown_grace_s + STREAM_END_S, access_log=None)
        await lan_runner.setup()
        address = f"{where[0]}:{where[1]}"
        listener = Listener(lan_runner, Limits(max_untrusted=shares.lan, max_per_source=shares.lan_per_source),
                            f"LAN listener on {address}", ssl_context=node.server_ssl, trusted=_paired_with(node))
        try:
            await listener.start(*where)
        except OSError as exc:
            await lan_runner.cleanup()
            await api.stop()
            await runner.cleanup()
            raise StartupError(f"cannot listen on {address} for peers: {exc.strerror or exc}") from exc
        lan = (lan_runner, listener)
        port = int(listener.url.rsplit(":", 1)[1])
        log.info("paired nodes reach %s at %s (node id %s)", node.name, listener.url, node.identity.node_id[:16])
    await node.start(port)
    return lan


async def _start_metrics(app: web.Application, where: str, source: str,
                         shares: Descriptors) -> tuple[web.AppRunner, Listener]:
    """server.metrics_listen: GET /metrics alone, on an address a Prometheus elsewhere can reach (nothing else is
    served there: the API stays on loopback)."""
    metrics_app = web.Application(middlewares=[envelope_middleware])
    metrics_app[METRICS] = app[METRICS]
    metrics_app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(metrics_app, access_log=None)
    await runner.setup()
    host, port = parse_listen(where, "server.metrics_listen", source)
    listener = Listener(runner, Limits(max_untrusted=shares.lan), f"metrics on {where}")
    try:
        await listener.start(host, port)
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {where} for metrics: {exc.strerror or exc}") from exc
    log.info("Prometheus metrics at %s/metrics", listener.url)
    return runner, listener


def _paired_with(node: PeerNode) -> Callable[[asyncio.BaseTransport], bool]:
    """Whether a LAN connection's TLS handshake showed the certificate of a node paired with `node`."""

    def trusted(transport: asyncio.BaseTransport) -> bool:
        seen = peer_fingerprint(transport)
        return seen is not None and node.store.get(seen) is not None

    return trusted
