"""GET /metrics on a real daemon with the real tiny engine, read back with prometheus-client's own parser."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from hybridd.proc.process import free_loopback_port
from tests.conftest import http
from tests.nodes import node_config


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = http("GET", url + "/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(reply.body.decode()) for s in family.samples}


def test_requests_memory_and_engines_are_exported_with_bounded_labels(daemon_factory,  # type: ignore[no-untyped-def]
                                                                      tiny_model: Path) -> None:
    daemon = daemon_factory(node_config(tiny_model, "desk", "desktop"))
    assert http("POST", daemon.url + "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2}).status == 200
    streamed = {"model": "a", "prompt": "hi", "max_tokens": 16, "stream": True, "logit_bias": {"2": -100}}
    assert http("POST", daemon.url + "/v1/completions", streamed).status == 200
    for name in ("nope", "also-nope"):  # a client's made-up names are one label value, not one each
        assert http("POST", daemon.url + "/v1/completions", {"model": name, "prompt": "hi"}).status == 404
    seen = samples(daemon.url)
    labels = (("api", "completion"), ("model", "a"), ("placement", "local"), ("status", "200"))
    assert seen["hybridd_requests_total", labels] == 2.0
    local = (("api", "completion"), ("placement", "local"))
    assert seen["hybridd_time_to_first_token_seconds_count", local] == 1.0  # the streamed one
    assert 0 < seen["hybridd_time_to_first_token_seconds_sum", local] < 30
    assert seen["hybridd_completion_tokens_total", (("api", "completion"), ("model", "a"), ("placement", "local"))] \
        >= 2 + 14  # the whole answer's usage, and the stream's events
    assert seen["hybridd_requests_total", (("api", "completion"), ("model", "unknown"), ("placement", "none"),
                                           ("status", "404"))] == 2.0
    assert seen["hybridd_request_duration_seconds_count", (("api", "completion"), ("placement", "local"))] == 2.0
    reserved = seen["hybridd_device_bytes", (("device", "budget0"), ("kind", "reserved"))]
    capacity = seen["hybridd_device_bytes", (("device", "budget0"), ("kind", "capacity"))]
    assert 0 < reserved < capacity
    assert seen["hybridd_device_bytes", (("device", "budget0"), ("kind", "free"))] == capacity - reserved
    assert seen["hybridd_engines", (("state", "ready"),)] == 1.0
    assert seen["hybridd_queue_depth", (("model", "a"),)] == 0.0
    assert seen["hybridd_engine_load_seconds", (("model", "a"),)] > 0
    assert seen["hybridd_engine_loads_total", (("model", "a"), ("outcome", "ok"))] == 1.0
    assert http("POST", daemon.url + "/hybridd/v1/unload-idle", {}).status == 200
    after = samples(daemon.url)
    assert after["hybridd_engine_unloads_total", (("cause", "requested"), ("model", "a"))] == 1.0
    assert after.get(("hybridd_engines", (("state", "ready"),)), 0.0) == 0.0


def test_metrics_listen_serves_metrics_alone(daemon_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_loopback_port()
    metrics = f'listen = "127.0.0.1:0"\nmetrics_listen = "127.0.0.1:{port}"'
    text = node_config(tiny_model, "desk", "desktop").replace('listen = "127.0.0.1:0"', metrics)
    daemon = daemon_factory(text)
    there = f"http://127.0.0.1:{port}"
    assert ("hybridd_engines", (("state", "ready"),)) not in samples(there)  # nothing loaded yet
    assert http("POST", daemon.url + "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2}).status == 200
    assert samples(there)["hybridd_engines", (("state", "ready"),)] == 1.0
    for path in ("/v1/models", "/hybridd/v1/status"):  # the API stays on loopback: only /metrics is served here
        assert http("GET", there + path).status == 404
