"""The aiohttp application, defined apart from serving it: state in typed keys, resources in cleanup_ctx."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import aiohttp
from aiohttp import web

from hybridd.api import (
    dashboard,
    metrics,
    routes_anthropic,
    routes_engines,
    routes_files,
    routes_jobs,
    routes_ollama,
    routes_openai,
    routes_peers,
    routes_responses,
    routes_status,
)
from hybridd.api.envelope import envelope_malformed_requests, envelope_middleware
from hybridd.api.guards import body_deadline, make_guard
from hybridd.api.keys import FILES, HTTP, NODE, PEER, POOL, ROUTER, TRAININGS, Node
from hybridd.api.metrics import count_requests
from hybridd.api.proxy import OPEN_STREAMS, OpenStreams
from hybridd.config import Config, ModelEntry
from hybridd.engine.base import Engine
from hybridd.engine.build import installed_version
from hybridd.engine.external import ExternalEngine
from hybridd.engine.llamacpp import LlamaCppEngine
from hybridd.engine.llamaserver import LlamaServerEngine, find_llama_server
from hybridd.engine.pool import EnginePool
from hybridd.jobs.files import FileStore
from hybridd.jobs.store import JobStore
from hybridd.node.catalog import Catalog
from hybridd.node.peering import PeerNode
from hybridd.node.resources import Peer
from hybridd.node.router import Router
from hybridd.node.training import Trainings
from hybridd.node.training_peer import PeerJobs
from hybridd.place.hardware import Hardware

log = logging.getLogger("hybridd")

EngineMaker = Callable[[ModelEntry, aiohttp.ClientSession], Engine]


def default_engine_maker(python: str, llama_server: Path | None = None) -> EngineMaker:
    """Managed engines for local GGUFs (llama-cpp-python's server, or llama-server where a model asks for it and
    one was found), pass-through for external URLs."""

    def make(model: ModelEntry, http: aiohttp.ClientSession) -> Engine:
        if model.engine == "external":
            return ExternalEngine(model)
        if model.engine == "llama-server":
            # Without a binary the engine's load fails naming engine.llama_server and `hybridd engines build`.
            return LlamaServerEngine(model, http, llama_server or Path("llama-server"))
        return LlamaCppEngine(model, http, python)

    return make


def _file_store(state_dir: Path) -> Callable[[web.Application], AsyncIterator[None]]:
    """Uploaded files in state_dir's jobs.db and files/, open while the app runs."""

    async def files(app: web.Application) -> AsyncIterator[None]:
        app[FILES] = store = FileStore(state_dir)
        try:
            yield
        finally:
            store.close()

    return files


def _trainings(state_dir: Path) -> Callable[[web.Application], AsyncIterator[None]]:
    """Fine-tuning jobs (state_dir's jobs.db and jobs/), placed and followed while the app runs."""

    async def trainings(app: web.Application) -> AsyncIterator[None]:
        store = JobStore(state_dir)
        router = app[ROUTER]
        service = Trainings(app[NODE].config, app[NODE].catalog, router, app[FILES], store, state_dir)
        service.peers = PeerJobs(service, app[HTTP], router.peer_targets)
        if PEER in app:
            node = app[PEER]
            node.on_job_changed = service.peers.changed
            service.on_change = lambda job: node.tell_job_changed(job.from_node or "", job.id)
        app[TRAININGS] = service
        await service.start()
        try:
            yield
        finally:
            await service.stop()
            store.close()

    return trainings


def _llama_server(config: Config, catalog: Catalog) -> Path | None:
    """The llama-server binary, looked for once at start (config, PATH, `hybridd engines build`'s cache) and only
    when a model runs on it."""
    if not any(m.engine == "llama-server" for m in catalog.models):
        return None
    found = find_llama_server(config.engine.llama_server, version=installed_version(config.engine.python or None))
    if found is None:
        log.warning("models use engine = \"llama-server\" but no llama-server binary was found (engine.llama_server, "
                    "PATH, or build one: hybridd engines build llama-server)")
    return found


def make_app(config: Config, catalog: Catalog, engine_maker: EngineMaker | None = None,
             hardware: Hardware | None = None, peers: Sequence[Peer] = (),
             peering: tuple[Path, str] | None = None) -> web.Application:
    """Build the application; nothing starts until it is run. Without hardware, only external models serve;
    without a state dir (config.state_dir, else peering's), there is no /v1/files."""
    server = config.server
    app = web.Application(
        middlewares=[count_requests, envelope_middleware,
                     make_guard(server.extra_hosts, server.host, server.max_body_bytes), body_deadline],
        client_max_size=server.max_body_bytes,
    )
    envelope_malformed_requests(app)
    app[NODE] = Node(config, catalog, time.time(), time.monotonic())
    app[OPEN_STREAMS] = OpenStreams()
    maker = engine_maker or default_engine_maker(config.engine.python, _llama_server(config, catalog))

    async def engines(app: web.Application) -> AsyncIterator[None]:
        # One pooled client for every engine; no total timeout because a long generation is not a failure.
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        pool = EnginePool(lambda model: maker(model, http), health_interval_s=config.node.engine_health_interval_s)
        pool.on_hung = app[OPEN_STREAMS].end_to
        app[HTTP], app[POOL] = http, pool
        app[ROUTER] = router = Router(config, catalog, pool, hardware, peers)
        if peering is not None:
            state_dir, name = peering
            app[PEER] = PeerNode(config, state_dir, name, router, catalog, pool)
        reaper = asyncio.create_task(pool.reap_forever(), name="idle-reaper")
        watch = asyncio.create_task(pool.watch_health(), name="engine-health")
        try:
            yield
        finally:
            # Not cancelled: a reaper cut off while it stops an engine would leave that engine running. Closing
            # the pool lets it finish what it is doing and return.
            pool.close()
            await reaper
            await watch
            if PEER in app:
                await app[PEER].stop()
            await pool.stop_all()
            await http.close()

    app.cleanup_ctx.append(engines)
    state = config.state_dir or (peering[0] if peering is not None else None)
    if state is not None:
        app.cleanup_ctx.append(_file_store(state))
        app.cleanup_ctx.append(_trainings(state))
        routes_files.add_routes(app)
        routes_jobs.add_routes(app)
    routes_openai.add_routes(app)
    routes_anthropic.add_routes(app)
    routes_responses.add_routes(app)
    routes_ollama.add_routes(app)
    routes_status.add_routes(app)
    routes_engines.add_routes(app)
    routes_peers.add_routes(app)
    metrics.add_routes(app)
    dashboard.add_routes(app)
    return app
