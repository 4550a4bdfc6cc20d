"""The standing adversarial suite: each class of attack, bounded in count and time, against real daemons on
loopback. Each test asserts its contract and adds what it tried to bench/results/hardening.json."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import ssl
import string
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridd.config import parse_config
from hybridd.errors import ConfigError
from hybridd.peer.pairing import FINISH_PATH, START_PATH
from tests.conftest import Daemon, http, start_daemon, stop_daemon, wait_for
from tests.hardening import AttackClass, Ledger
from tests.nodes import node_config
from tests.test_serve_e2e import NO_EOS, tiny_config

# What an error a client sees must never carry: a traceback, a source file, a path on this machine.
LEAKS = ("Traceback", 'File "', ".py\"", ".py:", "site-packages", "/tmp/", "/work/", "/home/", "/usr/")
FUZZED_POSTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/hybridd/v1/plan",
                "/hybridd/v1/pair/open", "/v1/files", "/v1/fine_tuning/jobs")
EXAMPLES = 80  # per route: bounded, so the suite stays well under its 5 minutes


@pytest.fixture
def ledger(hardening: Ledger) -> Ledger:
    return hardening


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Daemon]:
    """One daemon serving the tiny model, attacked by the fuzzing tests in turn."""
    daemon = start_daemon(tiny_config(tiny_model), tmp_path_factory.mktemp("target"))
    yield daemon
    stop_daemon(daemon)


def normal_request(url: str, model: str = "tiny") -> float:
    """Seconds until the daemon answers an ordinary completion with 200."""
    started = time.monotonic()
    reply = http("POST", url + "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert reply.status == 200, reply.body[:300]
    return time.monotonic() - started


def check_reply(attack: AttackClass, what: str, status: int, body: bytes) -> None:
    """The contract for any answer to any input: no 5xx, no traceback or path, an OpenAI envelope on errors."""
    attack.attempts += 1
    text = body.decode("utf-8", "replace")
    leaked = [marker for marker in LEAKS if marker in text]
    if status >= 500 or leaked:
        attack.failed(f"{what} -> {status} {text[:200]!r}")
    elif status >= 400:
        try:
            error = json.loads(body)["error"]
            assert isinstance(error["message"], str) and "type" in error
        except (ValueError, KeyError, TypeError, AssertionError):
            attack.failed(f"{what} -> {status} without the OpenAI envelope: {text[:200]!r}")


# --- bodies and headers ----------------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                | st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | json_values,
                                 "content": st.text(max_size=60) | json_values})
# Mostly the right shape, one field at a time wrong: that is what gets past the first checks.
inference_body = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "tiny-alias", "nope"]) | json_values},
    optional={"messages": st.lists(message, max_size=3) | json_values,
              "prompt": st.text(max_size=60) | st.lists(st.integers(-5, 40000), max_size=8) | json_values,
              "input": st.text(max_size=60) | json_values,
              "max_tokens": st.integers(-5, 10**9) | json_values,
              "stream": st.booleans() | json_values,
              "temperature": st.floats(allow_nan=False) | json_values,
              "top_k": st.integers(-200, 200) | json_values,
              "logit_bias": st.dictionaries(st.text(max_size=6), st.integers(-200, 200), max_size=3) | json_values,
              "hybridd": st.fixed_dictionaries({}, optional={"placement": json_values, "min_ctx": json_values})
              | json_values},
)
hyper = st.fixed_dictionaries({}, optional={"n_epochs": st.integers(-5, 10**6) | json_values,
                                           "batch_size": st.sampled_from(["auto", 0, 1, 2**40]) | json_values,
                                           "learning_rate_multiplier": st.floats(allow_nan=False) | json_values})
job_body = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "nope"]) | json_values,
     "training_file": st.sampled_from(["file-0", "file-" + "a" * 300]) | json_values},
    optional={"suffix": st.text(max_size=80) | json_values, "seed": st.integers(-2**40, 2**40) | json_values,
              "hyperparameters": hyper | json_values,
              "method": st.fixed_dictionaries({"type": st.sampled_from(["supervised", "dpo"]) | json_values},
                                              optional={"supervised": st.fixed_dictionaries(
                                                  {"hyperparameters": hyper})}) | json_values,
              "metadata": st.dictionaries(st.text(max_size=70), st.text(max_size=600), max_size=20) | json_values,
              "hybridd": st.fixed_dictionaries({}, optional={
                  "adapter": st.sampled_from(["lora", "qlora", "full", "dora"]) | json_values,
                  "rank": st.integers(-1, 10**9) | json_values, "use_dora": json_values,
                  "max_seq": json_values}) | json_values},
)
header_text = st.text(alphabet=string.printable.replace("\r", "").replace("\n", ""), max_size=40)
headers = st.fixed_dictionaries({}, optional={
    "Origin": header_text, "x-hybridd-placement": header_text, "x-hybridd-min-ctx": header_text,
    "Content-Type": st.sampled_from(["application/json", "text/plain", "multipart/form-data"]) | header_text,
})
raw_bodies = st.binary(max_size=200) | st.just(b"[" * 5000) | st.just(b'{"model": "tiny", "max_tokens": '
                                                                    + b"9" * 5000 + b"}")


@pytest.mark.parametrize("path", FUZZED_POSTS)
def test_fuzzed_bodies_and_headers_never_get_a_5xx_or_a_traceback(path: str, target: Daemon,
                                                                  ledger: Ledger) -> None:
    attack = ledger.attack("fuzz: bodies and headers", "a careless or hostile local client sends malformed, "
                           "nested, huge-number or wrongly typed JSON and odd headers to every route",
                           "tests/test_hardening.py::test_fuzzed_bodies_and_headers_never_get_a_5xx_or_a_traceback")
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=(job_body if "fine_tuning" in path else inference_body) | json_values | raw_bodies, extra=headers)
    def attempt(body: object, extra: dict[str, str]) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        if isinstance(body, dict) and "stream" in body:
            body["stream"] = False  # a stream's status is sent before its end; its errors are checked elsewhere
            data = json.dumps(body).encode()
        reply = http("POST", target.url + path, data, {"Content-Type": "application/json", **extra}, timeout=60)
        check_reply(attack, f"POST {path} {data[:120]!r} {extra}", reply.status, reply.body)

    attempt()
    attack.recovery_s.append(normal_request(target.url))
    attack.seconds += time.monotonic() - started
    assert attack.failures == []


def test_fuzzed_get_routes(target: Daemon, ledger: Ledger) -> None:
    attack = ledger.attack("fuzz: paths and model ids", "odd model ids, escapes and unknown paths on the GET routes",
                           "tests/test_hardening.py::test_fuzzed_get_routes")
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
    @given(segment=st.text(alphabet=string.printable.replace("#", "").replace("?", ""), min_size=1, max_size=60),
           extra=headers)
    def attempt(segment: str, extra: dict[str, str]) -> None:
        quoted = "".join(c if c.isalnum() or c in "-._~" else f"%{ord(c):02X}" for c in segment)
        for path in (f"/v1/models/{quoted}", f"/{quoted}", f"/hybridd/v1/{quoted}", f"/v1/files/{quoted}",
                     f"/v1/files/{quoted}/content", f"/v1/fine_tuning/jobs/{quoted}",
                     f"/v1/fine_tuning/jobs/{quoted}/events", f"/v1/fine_tuning/jobs?limit={quoted}",
                     f"/v1/fine_tuning/jobs?after={quoted}", f"/hybridd/v1/fine_tuning/jobs/{quoted}/result"):
            reply = http("GET", target.url + path, headers=extra, timeout=30)
            check_reply(attack, f"GET {path} {extra}", reply.status, reply.body)

    attempt()
    attack.recovery_s.append(normal_request(target.url))
    attack.seconds += time.monotonic() - started
    assert attack.failures == []


pairing_body = st.fixed_dictionaries({}, optional={
    "name": st.text(max_size=80) | json_values, "role": st.sampled_from(["desktop", "peer"]) | json_values,
    "cert": st.text(max_size=80) | json_values, "message_a": st.text(max_size=60) | json_values,
    "session": st.text(max_size=40) | json_values, "confirmation_a": st.text(max_size=60) | json_values,
}) | json_values | raw_bodies


def test_fuzzed_pairing_bodies_on_a_peers_lan_listener(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
                                                        ledger: Ledger) -> None:
    """The routes anyone on the LAN may reach before pairing (the rest need a pinned certificate)."""
    attack = ledger.attack("fuzz: pairing bodies on the LAN listener", "anyone on the LAN sending malformed pairing "
                           "starts and finishes over TLS to a peer with its window open",
                           "tests/test_hardening.py::test_fuzzed_pairing_bodies_on_a_peers_lan_listener")
    peer = start_daemon(node_config(tiny_model, "spark", "peer"), tmp_path_factory.mktemp("lan"))
    started = time.monotonic()
    try:
        assert http("POST", peer.url + "/hybridd/v1/pair/open", {}).status == 200
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(path=st.sampled_from([START_PATH, FINISH_PATH]), body=pairing_body)
        def attempt(path: str, body: object) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            request = urllib.request.Request(peer.lan_url + path, data=data, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30, context=context) as reply:
                    status, payload = reply.status, reply.read()
            except urllib.error.HTTPError as exc:
                status, payload = exc.code, exc.read()
            check_reply(attack, f"POST {path} {data[:120]!r}", status, payload)

        attempt()
        attack.recovery_s.append(normal_request(peer.url, "a"))
        window = http("GET", peer.url + "/hybridd/v1/pair/window").json()
        assert window["failures"] == 0  # none of it counted as a wrong code against the window
    finally:
        attack.seconds += time.monotonic() - started
        stop_daemon(peer)
    assert attack.failures == []


# --- config ------------------------------------------------------------------------------------------------------

NUMBER_KEYS = ("server.shutdown_grace_s", "server.max_body_bytes", "engine.load_timeout_s", "engine.idle_ttl_s",
               "engine.ctx", "node.queue_limit", "node.default_max_tokens", "node.ram_bytes",
               "node.display_reserve_bytes", "node.peer_idle_timeout_s", "node.engine_idle_timeout_s")
TEXT_KEYS = ("node.name", "server.listen", "server.log_level", "engine.type_k")
toml_numbers = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "0.5", "-0.0", "1e400", "1e30", "123456789"]) | \
    st.integers(-2**64, 2**64).map(str) | st.floats().map(repr)
# A TOML basic string is a JSON string here; TOML has no way to write a lone surrogate, so none is generated.
toml_texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30).map(
    lambda s: json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f"))  # TOML wants DEL escaped too


def _toml(key: str, value: str) -> str:
    table, name = key.split(".")
    return f"[{table}]\n{name} = {value}\n"


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(key=st.sampled_from(NUMBER_KEYS), value=toml_numbers)
def test_config_fuzz_numbers_are_refused_with_the_key_or_accepted_sane(key: str, value: str) -> None:
    try:
        config = parse_config(_toml(key, value))
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and key in message, message
        return
    table, name = key.split(".")
    accepted = getattr(getattr(config, table), name)
    assert isinstance(accepted, int | float) and math.isfinite(accepted), (key, value, accepted)
    assert accepted >= 0, (key, value, accepted)
    if name in ("queue_limit", "default_max_tokens", "max_body_bytes", "ctx"):
        assert accepted >= 1 and float(value) == accepted, (key, value, accepted)  # never rounded down to 0


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(key=st.sampled_from(TEXT_KEYS), value=toml_texts)
def test_config_fuzz_texts_are_refused_with_the_key_or_printable(key: str, value: str) -> None:
    try:
        config = parse_config(_toml(key, value))
    except ConfigError as exc:
        assert "\n" not in str(exc) and key in str(exc), str(exc)
        return
    table, name = key.split(".")
    accepted = getattr(getattr(config, table), name)
    if name == "name":  # it goes into headers and logs
        assert accepted.isprintable(), accepted


def test_config_fuzz_record(ledger: Ledger) -> None:
    """The config fuzzers above ran (pytest runs this file in order); counted for the results file."""
    attack = ledger.attack("config fuzz", "a config value that is nan, inf, negative, fractional, a control "
                           "character, or an engine option that moves the engine off loopback",
                           "tests/test_hardening.py::test_config_fuzz_numbers_are_refused_with_the_key_or_accepted_sane"
                           " and ::test_config_fuzz_texts_are_refused_with_the_key_or_printable")
    attack.attempts += 500


# --- shutdown, hung engine ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [8, 3000])
def test_sigterm_mid_stream_ends_cleanly_and_exits_zero(max_tokens: int, tiny_model: Path, tmp_path: Path,
                                                        ledger: Ledger) -> None:
    attack = ledger.attack("SIGTERM mid-stream", "a stop (systemd, Ctrl-C) while short and long streams are open",
                           "tests/test_hardening.py::test_sigterm_mid_stream_ends_cleanly_and_exits_zero")
    config = tiny_config(tiny_model).replace("shutdown_grace_s = 20", "shutdown_grace_s = 1").replace(
        "ctx = 512", "ctx = 4096")
    daemon = start_daemon(config, tmp_path)
    try:
        host, port = daemon.url.removeprefix("http://").split(":")
        conn = HTTPConnection(host, int(port), timeout=60)
        body = {"model": "tiny", "prompt": "x", "max_tokens": max_tokens, "logit_bias": NO_EOS, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 200 and reply.readline().startswith(b"data: ")
        sent = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        rest = reply.read()  # http.client raises on a truncated chunked body
        attack.attempts += 1
        if not rest.rstrip().endswith(b"data: [DONE]") and b"shutting down" not in rest:
            attack.failed(f"max_tokens {max_tokens}: the stream ended without [DONE] or an error event")
        code = daemon.proc.wait(timeout=20)
        attack.recovery_s.append(time.monotonic() - sent)  # here: signal -> process gone
        assert code == 0
    finally:
        stop_daemon(daemon)
    assert attack.failures == []


def test_a_hung_engine_is_restarted_and_the_next_request_served(tiny_model: Path, tmp_path: Path,
                                                                ledger: Ledger) -> None:
    attack = ledger.attack("hung engine", "an engine process that stops answering (kill -STOP, a wedged GPU)",
                           "tests/test_hardening.py::test_a_hung_engine_is_restarted_and_the_next_request_served")
    config = tiny_config(tiny_model).replace("[[models]]", "[node]\nengine_health_interval_s = 0.5\n\n[[models]]")
    daemon = start_daemon(config, tmp_path)
    try:
        normal_request(daemon.url)
        engine = psutil.Process(daemon.model_status("tiny")["pid"])
        engine.suspend()
        try:
            reply = http("POST", daemon.url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4},
                         timeout=60)
            attack.attempts += 1
            if reply.status != 502 or b"stopped answering" not in reply.body:
                attack.failed(f"request to the hung engine: {reply.status} {reply.body[:200]!r}")
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):
                engine.resume()
        attack.recovery_s.append(normal_request(daemon.url))
        wait_for(lambda: daemon.model_status("tiny")["pid"] not in (None, engine.pid), what="a new engine")
    finally:
        stop_daemon(daemon)
    assert attack.failures == []
