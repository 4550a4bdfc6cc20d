"""The llama-server engine with the real binary `hybridd engines build` makes, on the tiny test model."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import psutil
import pytest

from hybridd.config import ModelEntry
from hybridd.engine import build
from hybridd.engine.base import EngineState
from hybridd.engine.llamaserver import LlamaServerEngine, find_llama_server
from hybridd.errors import EngineLoadFailed

BINARY = find_llama_server("")
# In CI the setup builds it (scripts/build_engines.sh): there, a missing binary fails rather than skips.
pytestmark = pytest.mark.skipif(
    BINARY is None and not os.environ.get("CI"),
    reason=f"no llama-server on PATH or built for llama-cpp-python {build.installed_version()} under "
    f"{build.cache_root(os.environ)} (scripts/build_engines.sh builds it)")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def tiny_entry(path: Path, slots: int = 1) -> ModelEntry:
    return ModelEntry(name="tiny", path=path, ctx=1024, n_gpu_layers=0, slots=slots, load_timeout_s=60)


async def chat(http: aiohttp.ClientSession, engine: LlamaServerEngine, **extra: object) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
            **extra}
    async with http.post(engine.base_url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        result: dict = await response.json()
        return result


async def test_serves_health_a_completion_and_a_stream_with_usage_on_loopback_only(
        tiny_model: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_ARG_HOST", "0.0.0.0")  # llama-server would read it: the engine must not inherit it
    assert BINARY is not None
    engine = LlamaServerEngine(tiny_entry(tiny_model), http, BINARY)
    await engine.start()
    try:
        assert engine.state is EngineState.READY and engine.is_alive()
        assert await engine.healthy(2.0)
        listening = {c.laddr.ip for c in psutil.Process(engine.pid).net_connections("tcp") if c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}
        result = await chat(http, engine)
        assert result["model"] == "tiny" and result["choices"][0]["message"]["role"] == "assistant"
        assert result["usage"]["completion_tokens"] >= 1
        # greedy and with no end-of-sequence token, so the tiny model writes the same text every run (sampled, it
        # could end at once or write only bytes that make no whole character: a stream with no content delta)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": 0, "logit_bias": {"2": -100}}
        chunks = []
        async with http.post(engine.base_url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            async for raw in response.content:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        usage = [c for c in chunks if c.get("usage")]
        assert len(usage) == 1 and usage[0]["choices"] == [] and usage[0]["usage"]["prompt_tokens"] > 0
        assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks)
    finally:
        await engine.stop()


async def test_two_slots_answer_two_requests_at_once(tiny_model: Path, http: aiohttp.ClientSession) -> None:
    assert BINARY is not None
    engine = LlamaServerEngine(tiny_entry(tiny_model, slots=2), http, BINARY)
    await engine.start()
    try:
        async with http.get(engine.base_url + "/props") as response:
            assert (await response.json())["total_slots"] == 2
        first, second = await asyncio.wait_for(
            asyncio.gather(chat(http, engine, max_tokens=32), chat(http, engine, max_tokens=32)), 60)
        assert first["choices"][0]["finish_reason"] and second["choices"][0]["finish_reason"]
    finally:
        await engine.stop()


async def test_stop_leaves_no_process(tiny_model: Path, http: aiohttp.ClientSession) -> None:
    assert BINARY is not None
    engine = LlamaServerEngine(tiny_entry(tiny_model), http, BINARY)
    await engine.start()
    pid = engine.pid
    assert pid is not None and Path(psutil.Process(pid).exe()).name == "llama-server"
    await engine.stop()
    assert engine.state is EngineState.STOPPED and not engine.is_alive()
    assert not psutil.pid_exists(pid)
    assert not await engine.healthy(0.5)


async def test_a_model_that_does_not_load_fails_with_the_engines_last_log_lines(
        tmp_path: Path, tiny_model: Path, http: aiohttp.ClientSession) -> None:
    assert BINARY is not None
    engine = LlamaServerEngine(tiny_entry(tmp_path / "missing.gguf"), http, BINARY)
    with pytest.raises(EngineLoadFailed) as failure:
        await engine.start()
    message = str(failure.value)
    assert message.startswith("engine for model 'tiny' exited with code ")
    assert "missing.gguf" in message  # the log says which file it could not open
    assert engine.state is EngineState.FAILED and engine.pid is not None and not psutil.pid_exists(engine.pid)
    no_binary = LlamaServerEngine(replace(tiny_entry(tiny_model)), http, tmp_path / "no-such-llama-server")
    with pytest.raises(EngineLoadFailed, match="is not an executable file"):
        await no_binary.start()
