"""GET /metrics: the node in Prometheus' text format, through prometheus-client.

Requests are counted as they end (by API, model, where they ran and status) with their duration; everything else
is read from the node's own state at each scrape: memory per device, engines, queues, peers, fine-tuning jobs.
Label sets stay bounded: a model label is a model this node serves (anything else is "unknown"), a placement is
local, local-offload, peer or none, and no label carries a request id or a free-form reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hybridd.api import keys
from hybridd.api.envelope import Handler
from hybridd.api.recent import RECENT, Served, reason_of
from hybridd.api.request_log import log_served
from hybridd.place.state import Observation

MODEL = web.RequestKey("hybridd_model", str)  # set by a route once it knows the model
OBSERVED = web.RequestKey("hybridd_observed", Observation)  # set once the answer has ended
_APIS = (("/v1/chat/", "chat"), ("/v1/completions", "completion"), ("/v1/embeddings", "embedding"),
         ("/v1/messages", "messages"), ("/v1/responses", "responses"), ("/api/", "ollama"),
         ("/v1/fine_tuning/", "fine_tuning"), ("/v1/files", "files"), ("/v1/models", "models"))
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOK_S_BUCKETS = (5, 10, 20, 40, 60, 80, 100, 150, 200, 300, 500, 1000)


class Metrics:
    """The registry of one app: request counters, and a collector that reads the node at scrape time."""

    def __init__(self, app: web.Application) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("hybridd_requests", "Requests answered, by API, model, placement and status",
                                ["api", "model", "placement", "status"], registry=self.registry)
        self.duration = Histogram("hybridd_request_duration_seconds", "Seconds from a request to its answer's end",
                                  ["api", "placement"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.first_token = Histogram("hybridd_time_to_first_token_seconds", "Seconds from sending a streamed "
                                     "request upstream to its first event", ["api", "placement"],
                                     buckets=TTFT_BUCKETS, registry=self.registry)
        self.tokens = Counter("hybridd_completion_tokens", "Completion tokens of the answers that came whole",
                              ["api", "model", "placement"], registry=self.registry)
        self.tok_s = Histogram("hybridd_decode_tokens_per_second", "Decode speed of each stream long enough to time",
                               ["api", "placement"], buckets=TOK_S_BUCKETS, registry=self.registry)
        self.registry.register(_NodeCollector(app))

    def observe(self, request: web.Request, status: int, placement: str, seconds: float) -> str | None:
        """Count one answered request; returns its API, None for a request that is not for a model."""
        api = next((name for prefix, name in _APIS if request.path.startswith(prefix)), None)
        if api is None:
            return None  # hybridd's own routes, pairing, unknown paths: not requests for a model
        kind = placement.split(":", 1)[0] if placement else "none"
        model = request.get(MODEL, "unknown")
        self.requests.labels(api, model, kind, str(status)).inc()
        self.duration.labels(api, kind).observe(seconds)
        seen = request.get(OBSERVED)
        if seen is None:
            return api
        if seen.first_token_s is not None:
            self.first_token.labels(api, kind).observe(seen.first_token_s)
        if seen.complete and seen.completion_tokens:
            self.tokens.labels(api, model, kind).inc(seen.completion_tokens)
        if seen.decode_tok_s is not None:
            self.tok_s.labels(api, kind).observe(seen.decode_tok_s)
        return api


METRICS = web.AppKey("metrics", Metrics)


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count each request once its answer has ended (outside the error envelope, so errors count too); the recent
    requests (status, dashboard) and the request's log line come from the same record, so all see the same ones."""
    started = time.monotonic()
    response = await handler(request)
    seconds = time.monotonic() - started
    placement = response.headers.get("x-hybridd-placement", "")
    api = request.app[METRICS].observe(request, response.status, placement, seconds)
    if api is None:
        return response
    served = Served(time.time(), api, request.get(MODEL, "unknown"), placement, reason_of(response),
                    response.status, seconds, request.get(OBSERVED))
    if placement or MODEL in request:  # a request for a model, not a listing (clients poll those)
        log_served(served)
    if RECENT in request.app:
        request.app[RECENT].add(served)
    return response


async def scrape(request: web.Request) -> web.Response:
    """GET /metrics."""
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app[METRICS] = Metrics(app)
    app.router.add_get("/metrics", scrape)


class _NodeCollector(Collector):
    """The node's state as gauges, read when Prometheus scrapes."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        if keys.ROUTER not in self.app:  # before the engines are set up
            return
        router, pool = self.app[keys.ROUTER], self.app[keys.POOL]
        ledger = router.state.ledger
        memory = GaugeMetricFamily("hybridd_device_bytes", "Bytes per device: what engines may use, what placement "
                                   "has reserved, what is free", labels=["device", "kind"])
        for device in ledger.devices:
            memory.add_metric([device, "capacity"], ledger.capacity(device))
            memory.add_metric([device, "reserved"], ledger.used_bytes(device))
            memory.add_metric([device, "free"], ledger.free_bytes(device))
        yield memory
        engines = GaugeMetricFamily("hybridd_engines", "Engines by state", labels=["state"])
        queue = GaugeMetricFamily("hybridd_queue_depth", "Requests waiting for an engine of the model",
                                  labels=["model"])
        running = GaugeMetricFamily("hybridd_requests_in_flight", "Requests on an engine of the model now",
                                    labels=["model"])
        load = GaugeMetricFamily("hybridd_engine_load_seconds", "Seconds the model's engine took to load, last",
                                 labels=["model"])
        restarts = GaugeMetricFamily("hybridd_engine_restarts", "Times the model's engines died and were started "
                                     "again", labels=["model"])
        states: dict[str, int] = {}
        for slot in pool.slots.values():
            states[slot.state.value] = states.get(slot.state.value, 0) + 1
            name = slot.model.name
            queue.add_metric([name], slot.waiting)
            running.add_metric([name], slot.in_flight)
            restarts.add_metric([name], slot.restarts)
            if slot.load_seconds is not None:
                load.add_metric([name], slot.load_seconds)
        for state, count in states.items():
            engines.add_metric([state], count)
        yield from (engines, queue, running, load, restarts)
        loads = CounterMetricFamily("hybridd_engine_loads", "Engine loads of the model, by outcome (ok, failed)",
                                    labels=["model", "outcome"])
        unloads = CounterMetricFamily("hybridd_engine_unloads", "Engines of the model stopped, by cause: evicted "
                                      "(idle, for another load), drained (busy: once its work was done), idle_ttl, "
                                      "requested (hybridd unload), reload (with a new adapter)",
                                      labels=["model", "cause"])
        for (name, event), count in sorted(pool.tally.items()):
            if event in ("load", "load_failed"):
                loads.add_metric([name, "ok" if event == "load" else "failed"], count)
            else:
                unloads.add_metric([name, event], count)
        yield from (loads, unloads)
        up = GaugeMetricFamily("hybridd_peer_up", "1 while the peer can be placed on", labels=["peer"])
        rtt = GaugeMetricFamily("hybridd_peer_rtt_seconds", "Round trip to the peer on its link", labels=["peer"])
        free = GaugeMetricFamily("hybridd_peer_free_bytes", "Memory the peer reports free", labels=["peer"])
        for name, target in router.peer_targets().items():
            up.add_metric([name], 1.0 if target.state.up else 0.0)
            rtt.add_metric([name], target.state.rtt_s)
            free.add_metric([name], sum(d.usable_bytes for d in target.state.hardware.devices))
        yield from (up, rtt, free)
        if keys.TRAININGS in self.app:
            jobs = GaugeMetricFamily("hybridd_fine_tuning_jobs", "Fine-tuning jobs not finished, by status and "
                                     "where they train", labels=["status", "placement"])
            progress = GaugeMetricFamily("hybridd_fine_tuning_progress", "Steps done over total steps of each "
                                         "running job", labels=["job"])
            counts: dict[tuple[str, str], int] = {}
            for job in self.app[keys.TRAININGS].store.active():
                where = (job.placement or "none").split(":", 1)[0]
                counts[job.status, where] = counts.get((job.status, where), 0) + 1
                if job.status == "running" and job.total_steps:
                    progress.add_metric([job.id], job.step / job.total_steps)
            for (status, where), count in counts.items():
                jobs.add_metric([status, where], count)
            yield from (jobs, progress)
