"""Which engine serves a model whose config names none: llama-server where one is built, else llama-cpp-python."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hybridd.config import ConfigError, parse_config, with_default_engine
from hybridd.engine.choice import default_engine
from hybridd.engine.llamaserver import find_llama_server
from tests.conftest import http
from tests.test_serve_e2e import tiny_config

CONFIG = """
[[models]]
name = "implied"
path = "/m/a.gguf"

[[models]]
name = "named"
path = "/m/b.gguf"
engine = "llama-cpp-python"

[[models]]
name = "remote"
base_url = "http://127.0.0.1:9"
"""


def fake_binary(folder: Path) -> Path:
    binary = folder / "llama-server"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


def test_only_the_models_that_name_no_engine_follow_the_default() -> None:
    config = parse_config(CONFIG)
    assert config.engine.auto and [m.engine for m in config.models] == ["llama-cpp-python", "llama-cpp-python",
                                                                         "external"]
    chosen = with_default_engine(config, "llama-server")
    assert [m.engine for m in chosen.models] == ["llama-server", "llama-cpp-python", "external"]
    assert chosen.engine.kind == "llama-server" and not chosen.engine.auto
    with pytest.raises(ConfigError, match=r"engine\.kind: unknown value"):
        with_default_engine(config, "vllm")


def test_llama_server_is_the_default_where_one_is_found(tmp_path: Path) -> None:
    empty = {"PATH": str(tmp_path / "nothing"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    config = parse_config(CONFIG)
    kind, why = default_engine(config, env=empty)
    assert kind == "llama-cpp-python" and "hybridd engines build llama-server" in why
    binary = fake_binary(tmp_path)
    assert default_engine(config, env={**empty, "PATH": str(tmp_path)}) == (
        "llama-server", f"llama-server found at {binary}")
    # A named kind, or --engine, wins over what is found.
    named = parse_config('[engine]\nkind = "llama-cpp-python"\n' + CONFIG)
    assert default_engine(named, env={**empty, "PATH": str(tmp_path)})[0] == "llama-cpp-python"
    assert default_engine(config, "llama-cpp-python", env={**empty, "PATH": str(tmp_path)})[0] == "llama-cpp-python"
    broken = parse_config(f'[engine]\nllama_server = "{tmp_path / "gone"}"\n' + CONFIG)
    assert default_engine(broken, env=empty) == (
        "llama-cpp-python", f"engine.llama_server {tmp_path / 'gone'} is not an executable file")


BINARY = find_llama_server("")


@pytest.mark.skipif(BINARY is None and not os.environ.get("CI"), reason="no llama-server built (scripts/setup.sh test)")
def test_a_daemon_serves_on_llama_server_when_one_is_built(daemon_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    auto = daemon_factory(tiny_config(tiny_model), extra_env={"HYBRIDD_ENGINE": ""})  # the choice left to hybridd
    reply = http("POST", auto.url + "/v1/chat/completions",
                 {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert reply.status == 200, reply.body
    assert auto.model_status("tiny")["engine"] == "llama-server"
    assert "engine for models that name none: llama-server (llama-server found at" in auto.log()
    pinned = daemon_factory(tiny_config(tiny_model), extra_env={"HYBRIDD_ENGINE": "llama-cpp-python"})
    assert pinned.model_status("tiny")["engine"] == "llama-cpp-python"

    def tools(daemon) -> bool:  # type: ignore[no-untyped-def]
        models = http("GET", daemon.url + "/v1/models").json()["data"]
        return next(m for m in models if m["id"] == "tiny")["hybridd"]["capabilities"]["tool_choice_auto"]

    assert tools(auto) and not tools(pinned)  # what agents read before they send tools


def test_an_unknown_engine_in_the_environment_stops_the_start(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:0"\n')
    env = {**os.environ, "HYBRIDD_ENGINE": "vllm", "XDG_STATE_HOME": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-m", "hybridd", "serve", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3  # a startup failure: systemd does not restart it
    assert "engine.kind: unknown value \"vllm\" (valid: llama-cpp-python, llama-server)" in done.stderr
