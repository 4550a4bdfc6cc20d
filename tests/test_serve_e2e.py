"""End to end: a real daemon, real llama-cpp-python engines on tiny GGUFs, the official openai client."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil
import pytest

from tests.conftest import engine_processes, http, wait_for

# The tiny model's weights are random, so sampling can hit end-of-sequence (token 2) at any step; tests that
# count tokens forbid it, as a client would with logit_bias.
NO_EOS = {"2": -100}


def tiny_config(model: Path, **model_keys: object) -> str:
    extra = "".join(f"{key} = {value!r}\n".replace("'", '"').replace("True", "true").replace("False", "false")
                    for key, value in model_keys.items())
    return f"""
[server]
listen = "127.0.0.1:0"
shutdown_grace_s = 20

[[models]]
name = "tiny"
aliases = ["tiny-alias"]
path = "{model}"
ctx = 512
embeddings = true
{extra}"""


def client(daemon) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_chat_completions_embeddings(daemon_factory, tiny_model: Path) -> None:
    daemon = daemon_factory(tiny_config(tiny_model))
    api = client(daemon)

    chat = api.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4, logit_bias=NO_EOS)
    assert chat.headers["x-hybridd-placement"] == "local"
    reason = chat.headers["x-hybridd-reason"]
    assert reason.startswith("local: needs ") and "predicted" in reason and "engine loaded in" in reason
    parsed = chat.parse()
    assert parsed.choices[0].finish_reason == "length" and parsed.usage.completion_tokens == 4

    stream = api.chat.completions.create(model="tiny-alias", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=5, logit_bias=NO_EOS, stream=True)
    chunks = list(stream)
    assert len(chunks) >= 5 and chunks[-1].choices[0].finish_reason == "length"

    completion = api.completions.create(model="tiny", prompt="once upon", max_tokens=3, logit_bias=NO_EOS)
    assert completion.usage.completion_tokens == 3
    streamed = list(api.completions.create(model="tiny", prompt="once upon", max_tokens=3, logit_bias=NO_EOS,
                                           stream=True))
    assert streamed[-1].choices[0].finish_reason == "length"

    embeddings = api.embeddings.create(model="tiny", input=["alpha", "beta"])
    assert len(embeddings.data) == 2 and len(embeddings.data[0].embedding) == 64
    assert embeddings.data[0].embedding != embeddings.data[1].embedding

    models = api.models.list()
    assert [m.id for m in models.data] == ["tiny", "tiny-alias"]  # a client picking from the list finds either
    assert models.data[0].model_extra["context_length"] == models.data[1].model_extra["context_length"] == 512
    assert models.data[1].model_extra["hybridd"]["alias_of"] == "tiny"

    # The status the CLI shows names the model the client just used, loaded, with its request count.
    out = subprocess.run([sys.executable, "-m", "hybridd", "status", "--url", daemon.url],
                         capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("tiny "))
    # ctx 512 is the configured floor; the engine runs at the smallest context bucket, 4096
    assert "ready" in row and "llama-cpp-python" in row and " 4096 " in row
    status = wait_for(lambda: (s := daemon.model_status("tiny"))["in_flight"] == 0 and s, what="requests to end")
    assert status["requests"] == 5 and status["loaded"]


def test_concurrent_first_requests_start_one_engine(daemon_factory, tiny_model: Path) -> None:
    daemon = daemon_factory(tiny_config(tiny_model))
    api = client(daemon)

    def ask(i: int) -> str:
        reply = api.completions.create(model="tiny", prompt=f"request {i}", max_tokens=2, logit_bias=NO_EOS)
        return reply.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(ask, range(8)))
    assert reasons == ["length"] * 8
    assert len(engine_processes(daemon.pid)) == 1
    assert daemon.model_status("tiny")["restarts"] == 0


def test_idle_engine_is_unloaded_and_reloaded(daemon_factory, tiny_model: Path) -> None:
    # 3 s: long enough that the reaper cannot take the engine between a reply and the status read after it
    daemon = daemon_factory(tiny_config(tiny_model, idle_ttl_s=3))
    api = client(daemon)
    api.completions.create(model="tiny", prompt="x", max_tokens=1)
    pid = daemon.model_status("tiny")["pid"]
    assert psutil.pid_exists(pid)

    wait_for(lambda: daemon.model_status("tiny")["state"] == "stopped", timeout=20, what="idle unload")
    wait_for(lambda: not engine_processes(daemon.pid), timeout=10, what="engine process gone")
    api.completions.create(model="tiny", prompt="x", max_tokens=1)
    assert daemon.model_status("tiny")["state"] == "ready"


def test_engine_killed_then_next_request_works(daemon_factory, tiny_model: Path) -> None:
    daemon = daemon_factory(tiny_config(tiny_model))
    api = client(daemon)
    api.completions.create(model="tiny", prompt="x", max_tokens=1)
    old_pid = daemon.model_status("tiny")["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: daemon.model_status("tiny")["state"] == "failed", what="death noticed")

    reply = api.completions.create(model="tiny", prompt="x", max_tokens=2, logit_bias=NO_EOS)
    assert reply.usage.completion_tokens == 2
    status = daemon.model_status("tiny")
    assert status["pid"] != old_pid and status["restarts"] == 1


def test_sigkill_of_daemon_leaves_no_engine(daemon_factory, tiny_model: Path) -> None:
    daemon = daemon_factory(tiny_config(tiny_model))
    client(daemon).completions.create(model="tiny", prompt="x", max_tokens=1)
    engine = psutil.Process(daemon.model_status("tiny")["pid"])
    assert engine.is_running()

    daemon.proc.kill()
    daemon.proc.wait()
    wait_for(lambda: not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE, timeout=10,
             what="engine to die with the daemon")


def test_sigterm_drains_inflight_stream_then_exits_zero(daemon_factory, tiny_model: Path) -> None:
    daemon = daemon_factory(tiny_config(tiny_model))
    api = client(daemon)
    stream = api.completions.create(model="tiny", prompt="x", max_tokens=200, logit_bias=NO_EOS, stream=True)
    first = next(iter(stream))
    assert first.choices is not None
    engine = psutil.Process(daemon.model_status("tiny")["pid"])

    daemon.proc.send_signal(signal.SIGTERM)
    rest = list(stream)  # the stream in flight finishes despite the shutdown
    assert rest[-1].choices[0].finish_reason == "length"
    assert daemon.proc.wait(timeout=30) == 0
    assert any("STOPPING=1" in message for message in daemon.notifications(timeout=1.0))
    wait_for(lambda: not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE, what="engine stopped")
    with pytest.raises(OSError):
        http("GET", daemon.url + "/v1/models", timeout=5)


def test_failed_load_is_503_with_engine_log_and_frees_everything(daemon_factory, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    daemon = daemon_factory(tiny_config(broken).replace('name = "tiny"', 'name = "broken"'))
    started = time.monotonic()
    response = http("POST", daemon.url + "/v1/completions", {"model": "broken", "prompt": "x"})
    assert response.status == 503
    error = response.json()["error"]
    assert error["code"] == "engine_load_failed"
    assert "exited with code" in error["message"] and "broken" in error["message"]
    assert time.monotonic() - started < 60
    assert engine_processes(daemon.pid) == []
    assert daemon.model_status("broken")["state"] == "failed"


def test_bad_config_prints_one_line_and_exits_3(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[models]]\nname = "m"\npath = "/x.gguf"\ntype_k = "q9"\n')
    result = subprocess.run([sys.executable, "-m", "hybridd", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0
    assert 'models[0].type_k: unknown value "q9" (valid: bf16, f16, f32' in result.stderr


# Each of these crashed `hybridd serve` with a traceback and exit 1 (issue 12, item 8).
STARTUP_REFUSALS = [
    ("queue_limit inf", b"[node]\nqueue_limit = inf\n", "node.queue_limit: expected an integer, got a number"),
    ("default_max_tokens inf", b"[node]\ndefault_max_tokens = inf\n",
     "node.default_max_tokens: expected an integer, got a number"),
    ("control character in the name", b'[node]\nname = "desk\\u0007top"\n', "node.name: contains control characters"),
    ("not UTF-8", b'[node]\nname = "d\xe9sktop"\n', "not UTF-8 text (byte 16); TOML files are UTF-8"),
    ("state_dir is a file", b'state_dir = "a-file"\n', "state_dir: "),
]


@pytest.mark.parametrize(("text", "message"), [(text, message) for _, text, message in STARTUP_REFUSALS],
                         ids=[why for why, _, _ in STARTUP_REFUSALS])
def test_a_refused_config_value_prints_one_line_naming_the_key_and_exits_3(tmp_path: Path, text: bytes,
                                                                          message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_bytes(text + b'[server]\nlisten = "127.0.0.1:0"\n')
    (tmp_path / "a-file").write_text("not a folder")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    result = subprocess.run([sys.executable, "-m", "hybridd", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith(f"hybridd: {config}: ") and message in result.stderr, result.stderr


def test_port_in_use_is_startup_failure(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "HYBRIDD_LISTEN": f"127.0.0.1:{port}", "XDG_CONFIG_HOME": str(tmp_path),
               "HYBRIDD_CONFIG": str(tmp_path / "c.toml")}
        (tmp_path / "c.toml").write_text("")
        result = subprocess.run([sys.executable, "-m", "hybridd", "serve"], capture_output=True, text=True,
                                env=env, timeout=60)
    assert result.returncode == 3
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_bare_serve_serves_the_demo_model(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    # No config file at all: the README's first command must still serve a real model.
    daemon = daemon_factory(None)
    api = client(daemon)
    assert [m.id for m in api.models.list().data] == ["gemma-3-270m", "default"]  # its alias listed too
    reply = api.chat.completions.create(model="gemma-3-270m", max_tokens=24,
                                        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply.choices[0].message.content.strip()
    text = api.completions.create(model="default", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert len(text.choices[0].text.split()) >= 3  # real words from a real model, not random bytes


def test_engine_keeps_serving_after_a_client_leaves_mid_stream(daemon_factory, tiny_model: Path) -> None:
    # hybridd drops the engine connection when its client goes (test_api checks that against a fake engine);
    # the engine must come out of that healthy, with the request that was waiting behind it answered.
    daemon = daemon_factory(tiny_config(tiny_model))
    api = client(daemon)
    stream = api.completions.create(model="tiny", prompt="x", max_tokens=200, logit_bias=NO_EOS, stream=True)
    next(iter(stream))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(api.completions.create, model="tiny", prompt="y", max_tokens=2, logit_bias=NO_EOS)
        wait_for(lambda: daemon.model_status("tiny")["in_flight"] == 2, what="second request inside the engine")
        stream.close()  # the first client goes away mid-stream
        reply = waiting.result(timeout=90)
    assert reply.usage.completion_tokens >= 1
    assert daemon.model_status("tiny")["restarts"] == 0


def test_measured_stream_speed_corrects_the_prediction(daemon_factory, tiny_model: Path) -> None:
    daemon = daemon_factory(tiny_config(tiny_model))
    assert daemon.status()["calibration"] == {}
    # long enough that hybridd reads it in many parts: a stream read all at once cannot be timed, whatever its length
    chunks = list(client(daemon).completions.create(model="tiny", prompt="x", max_tokens=300, logit_bias=NO_EOS,
                                                    stream=True))
    assert len(chunks) >= 300
    # hybridd learns once the stream has ended on its side, which may be just after the client read [DONE]
    node = daemon.status()["node"]
    factors = wait_for(lambda: daemon.status()["calibration"], what="the stream's speed to be learned")
    # The speed model predicts GPU-class speed for this tiny model; the CPU engine's real rate pulls it down.
    assert set(factors) == {f"{node}/tiny", f"{node}/*"}
    assert all(f < 1.0 for f in factors.values())
    # the stream's length is learned too (from its events: about one per token; this random-vocabulary model's
    # byte tokens add a few empty ones): the next request's time is predicted from it, not from its budget
    learned = daemon.status()["completion_tokens"]["tiny"]
    assert 298 <= learned <= 345
    reply = client(daemon).completions.create(model="tiny", prompt="y", max_tokens=1000, logit_bias=NO_EOS)
    last = daemon.status()["decisions"][-1]
    assert last["max_tokens"] == 1000 and last["expected_tokens"] == learned
    # a whole answer teaches its exact length, from its usage: the estimate moves toward 1000
    assert reply.usage.completion_tokens >= 1000  # llama-cpp-python may count one more
    wait_for(lambda: daemon.status()["completion_tokens"]["tiny"] > learned + 100, what="the answer's length")


def test_sigterm_ends_a_stream_longer_than_the_grace_with_an_error_event_and_exits(daemon_factory,
                                                                                  tiny_model: Path) -> None:
    config = tiny_config(tiny_model).replace("shutdown_grace_s = 20", "shutdown_grace_s = 1").replace(
        "ctx = 512", "ctx = 4096")
    daemon = daemon_factory(config)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4000, "logit_bias": NO_EOS, "stream": True}
    import http.client
    import json as jsonlib

    host, port = daemon.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", jsonlib.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200
    assert reply.readline().startswith(b"data: ")  # streaming has begun
    engine = psutil.Process(daemon.model_status("tiny")["pid"])
    sent = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    rest = reply.read()  # the whole chunked body, properly terminated (http.client raises on a truncated one)
    events = [line for line in rest.split(b"\n") if line.startswith(b"data: ")]
    assert events and b"shutting down" in events[-1] and b'"error"' in events[-1], events[-3:]
    assert daemon.proc.wait(timeout=15) == 0
    assert time.monotonic() - sent < 10  # the grace (1 s) plus stopping the engine, not a hang
    wait_for(lambda: not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE, what="engine stopped")


def test_a_hung_engine_is_noticed_killed_and_restarted_and_its_client_told_why(daemon_factory,
                                                                              tiny_model: Path) -> None:
    config = tiny_config(tiny_model).replace("[[models]]", "[node]\nengine_health_interval_s = 0.5\n"
                                             "engine_idle_timeout_s = 30\n\n[[models]]")
    daemon = daemon_factory(config)
    api = client(daemon)
    stream = api.completions.create(model="tiny", prompt="x", max_tokens=400, logit_bias=NO_EOS, stream=True)
    chunks = iter(stream)
    assert next(chunks).choices is not None
    engine = psutil.Process(daemon.model_status("tiny")["pid"])
    engine.suspend()  # kill -STOP: alive, answering nothing
    try:
        with pytest.raises(openai.APIError) as broken:
            for _ in chunks:  # the stream stalls, then ends with an error event that says why
                pass
        assert "stopped answering" in str(broken.value)
        wait_for(lambda: not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE, what="hung engine killed")
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            engine.resume()
    assert "stopped answering" in (daemon.model_status("tiny")["last_error"] or "")
    again = api.completions.create(model="tiny", prompt="x", max_tokens=8)  # the next request starts it again
    assert again.choices[0].text is not None
    assert daemon.model_status("tiny")["pid"] != engine.pid
    assert "stopped answering" in daemon.log()


def test_client_mistakes_the_engine_refuses_are_400_naming_the_field(daemon_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    # llama-cpp-python's server answers each of these with HTTP 500, its validation text and a frame of its own
    # source (path included); token-id prompts are valid OpenAI input that it cannot read.
    daemon = daemon_factory(tiny_config(tiny_model))
    cases = [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_k": -100}, "top_k", "engine refused 'top_k'"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "top_k": -1},
         "top_k", "engine refused 'top_k'"),
        ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2}, "prompt", "'prompt' is an array of token ids"),
        ("/v1/completions", {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 2}, "prompt[0]",
         "'prompt[0]' is an array of token ids"),
        ("/v1/completions", {"prompt": ["one", "two"], "max_tokens": 2}, "prompt", "'prompt' holds 2 prompts"),
        ("/v1/embeddings", {"input": [1, 2, 3]}, "input", "'input' is an array of token ids"),
        ("/v1/embeddings", {"input": [[1, 2, 3]]}, "input[0]", "'input[0]' is an array of token ids"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logprobs": 2}, "logprobs",
         "'logprobs': model 'tiny' runs on llama-cpp-python's server without logits_all"),
        ("/v1/chat/completions", {"messages": [{"role": "x", "content": "hi"}], "max_tokens": 2}, "messages[0]",
         "engine refused 'messages[0]': it is none of the forms the engine takes"),
    ]
    for path, body, param, fragment in cases:
        reply = http("POST", daemon.url + path, {"model": "tiny", **body})
        error = reply.json()["error"]
        assert reply.status == 400, (path, body, error)
        assert error["param"] == param and error["message"].startswith(fragment), error
        assert "File" not in error["message"] and ".py" not in error["message"]
    # the engine that refused top_k still serves
    reply = http("POST", daemon.url + "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert reply.status == 200


def test_a_prompt_that_is_not_unicode_fails_alone(daemon_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(tiny_config(tiny_model))
    bad = b'{"model": "tiny", "prompt": "abc\\ud800", "max_tokens": 2}'
    reply = http("POST", daemon.url + "/v1/completions", bad)
    assert reply.status == 400
    assert reply.json()["error"]["message"].startswith("'prompt' holds a lone surrogate (U+D800) at character 3")
    # the next request is still counted with the model's own tokenizer
    reply = http("POST", daemon.url + "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 2})
    assert reply.status == 200
    decision = daemon.status()["decisions"][-1]
    assert decision["prompt_exact"] and decision["prompt_tokens"] < 16  # bytes / 2 would not be exact


def test_engines_listen_on_loopback_whatever_host_the_environment_names(daemon_factory, tiny_model: Path) -> None:
    # llama_cpp.server reads HOST and PORT ahead of its flags; an engine must not inherit them from the daemon.
    daemon = daemon_factory(tiny_config(tiny_model), extra_env={"HOST": "0.0.0.0", "PORT": "8"})
    reply = http("POST", daemon.url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert reply.status == 200, reply.body
    engine = psutil.Process(daemon.model_status("tiny")["pid"])
    listening = [c.laddr for c in engine.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(address.ip == "127.0.0.1" for address in listening), listening


def test_a_long_completion_is_not_taken_for_a_hung_engine(daemon_factory, tiny_model: Path) -> None:
    # llama_cpp.server holds its model lock for a whole completion: a health check that waited on that lock would
    # miss every check while a long answer is written, and kill a healthy engine.
    config = tiny_config(tiny_model).replace("ctx = 512", "ctx = 4096").replace(
        "[[models]]", "[node]\nengine_health_interval_s = 0.2\n\n[[models]]")
    daemon = daemon_factory(config)
    assert http("POST", daemon.url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2}).status == 200
    pid = daemon.model_status("tiny")["pid"]
    started = time.monotonic()
    reply = http("POST", daemon.url + "/v1/completions",
                 {"model": "tiny", "prompt": "x", "max_tokens": 3800, "logit_bias": NO_EOS}, timeout=120)
    took = time.monotonic() - started
    assert reply.status == 200, reply.body[:300]
    assert reply.json()["usage"]["completion_tokens"] == 3800
    assert took > 4 * 0.2 * 3, f"the completion ({took:.1f} s) must outlast three missed checks to test anything"
    assert daemon.model_status("tiny")["pid"] == pid and "stopped answering" not in daemon.log()
