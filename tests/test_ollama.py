"""Ollama's API (what Open WebUI and Continue speak) driven by the official `ollama` client against a scripted
engine, the mapper's properties, and one answer from the real tiny engine through a daemon."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import ollama
import pytest
from hypothesis import given, settings

from hybridd.api.translate.ollama import OllamaTranslator, chat_request, generate_request
from hybridd.errors import BadRequest
from tests.scripted_engine import Script, ScriptedEngine, ToolCall, hybridd_with

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


@pytest.fixture
async def node() -> AsyncIterator[tuple[ScriptedEngine, ollama.Client]]:
    engine = ScriptedEngine()
    async with hybridd_with(engine, embeddings=True, ctx=8192) as url:
        yield engine, ollama.Client(host=url, timeout=30)


async def test_list_ps_show_version(node: tuple[ScriptedEngine, ollama.Client]) -> None:
    _, client = node
    listed = await asyncio.to_thread(client.list)
    [model] = listed.models
    assert model.model == "m" and model.modified_at is not None and model.digest and len(model.digest) == 64
    assert model.details is not None
    running = await asyncio.to_thread(client.ps)
    assert all(m.model == "m" for m in running.models)
    shown = await asyncio.to_thread(client.show, "m:latest")
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 8192
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.capabilities is not None and {"completion", "tools", "embedding"} <= set(shown.capabilities)
    version = await asyncio.to_thread(client._request_raw, "GET", "/api/version")
    assert version.json() == {"version": "0.12.6"}


async def test_chat_whole_with_a_tool_call(node: tuple[ScriptedEngine, ollama.Client]) -> None:
    engine, client = node
    engine.script = Script(content="", tool_calls=[ToolCall("call_7", "get_weather", '{"city": "Paris"}')],
                           finish_reason="tool_calls")
    reply = await asyncio.to_thread(client.chat, model="m", messages=[{"role": "user", "content": "Paris?"}],
                                    tools=[WEATHER], stream=False,
                                    options={"temperature": 0.2, "num_predict": 32, "stop": ["\n\n"], "seed": 3,
                                             "top_k": 20, "num_ctx": 100000})
    assert reply.done and reply.done_reason == "stop" and reply.eval_count == 1 and reply.prompt_eval_count == 7
    [call] = reply.message.tool_calls or []
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    sent = engine.last("chat")
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert (sent["temperature"], sent["max_tokens"], sent["stop"], sent["seed"], sent["top_k"]) == \
        (0.2, 32, ["\n\n"], 3, 20)
    assert "hybridd" not in sent and sent["stream"] is False

    # the follow-up: the tool's answer reaches the engine tied to the call it answers
    engine.script = Script(content="Sunny.")
    await asyncio.to_thread(client.chat, model="m", stream=False, messages=[
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny"}])
    assistant, tool = engine.last("chat")["messages"][1:]
    assert assistant["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": assistant["tool_calls"][0]["id"]}


async def test_chat_streams_by_default(node: tuple[ScriptedEngine, ollama.Client]) -> None:
    engine, client = node
    engine.script = Script(content="The sky is blue.", reasoning="look up")
    parts = await asyncio.to_thread(lambda: list(client.chat(model="m", messages=[{"role": "user", "content": "?"}],
                                                             stream=True, format="json")))
    assert "".join(p.message.content or "" for p in parts) == "The sky is blue."
    assert "".join(p.message.thinking or "" for p in parts) == "look up"
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == 6  # no usage chunk: the deltas counted
    assert parts[-1].total_duration is not None and parts[-1].total_duration > 0
    assert engine.last("chat")["response_format"] == {"type": "json_object"}

    engine.script = Script(content="", tool_calls=[ToolCall("c1", "get_weather", '{"city": "Oslo"}')])
    parts = await asyncio.to_thread(lambda: list(client.chat(model="m", messages=[{"role": "user", "content": "?"}],
                                                             tools=[WEATHER], stream=True)))
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert engine.last("chat")["stream"] is True

    # Ollama streams unless told not to (the client library always says which)
    raw = await asyncio.to_thread(client._request_raw, "POST", "/api/chat",
                                  json={"model": "m", "messages": [{"role": "user", "content": "?"}]})
    assert raw.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in raw.text.splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["message"] == {"role": "assistant", "content": ""}


async def test_generate_fill_in_the_middle_and_plain(node: tuple[ScriptedEngine, ollama.Client]) -> None:
    engine, client = node
    engine.script = Script(content="return a + b")
    reply = await asyncio.to_thread(client.generate, model="m", prompt="def add(a, b):\n    ",
                                    suffix="\n\nprint(add(1, 2))", stream=False, options={"num_predict": 16})
    assert reply.response == "return a + b" and reply.done
    sent = engine.last("completion")
    assert sent["prompt"] == "def add(a, b):\n    " and sent["suffix"] == "\n\nprint(add(1, 2))"
    assert sent["max_tokens"] == 16

    parts = await asyncio.to_thread(lambda: list(client.generate(model="m", prompt="Hi", system="Be kind.",
                                                                 stream=True)))
    assert "".join(p.response or "" for p in parts) == "return a + b" and parts[-1].done
    assert engine.last("chat")["messages"] == [{"role": "system", "content": "Be kind."},
                                               {"role": "user", "content": "Hi"}]
    loaded = await asyncio.to_thread(client.generate, model="m", prompt="", stream=False)
    assert loaded.done_reason == "load"


async def test_embed(node: tuple[ScriptedEngine, ollama.Client]) -> None:
    engine, client = node
    reply = await asyncio.to_thread(client.embed, model="m", input=["a", "b"])
    assert [list(v) for v in reply.embeddings] == [[0.0, 0.5], [1.0, 0.5]] and reply.prompt_eval_count == 3
    single = await asyncio.to_thread(client.embed, model="m", input="a")
    assert len(single.embeddings) == 1
    legacy = await asyncio.to_thread(client.embeddings, model="m", prompt="a")
    assert list(legacy.embedding) == [0.0, 0.5]
    assert engine.last("embedding")["input"] == ["a"]


async def test_errors_read_as_response_errors(node: tuple[ScriptedEngine, ollama.Client]) -> None:
    engine, client = node
    with pytest.raises(ollama.ResponseError) as caught:
        await asyncio.to_thread(client.chat, model="nope", messages=[{"role": "user", "content": "?"}])
    assert caught.value.status_code == 404 and "model 'nope' does not exist here" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        await asyncio.to_thread(client.chat, model="m", messages=[{"role": "user", "content": "?"}],
                                options={"temperature": "hot"}, stream=False)
    assert caught.value.status_code == 400 and caught.value.error == "'options.temperature' must be a number, " \
                                                                     "got a string"
    engine.script = Script(status=400, error="prompt too long")
    with pytest.raises(ollama.ResponseError) as caught:
        await asyncio.to_thread(client.generate, model="m", prompt="x", stream=False)
    assert caught.value.status_code == 400 and "prompt too long" in caught.value.error
    engine.script = Script(content="one two three four", break_after=2)
    with pytest.raises(ollama.ResponseError, match="broke"):
        await asyncio.to_thread(lambda: list(client.chat(model="m", messages=[{"role": "user", "content": "?"}],
                                                         stream=True)))


def test_format_schema_maps_per_engine() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "format": schema}
    assert chat_request(body, engine="llama-cpp-python", max_ctx=4096).body["response_format"] == \
        {"type": "json_object", "schema": schema}
    assert chat_request(body, engine="external", max_ctx=4096).body["response_format"] == \
        {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
    sized = chat_request({**body, "options": {"num_ctx": 99999}}, "llama-cpp-python", 4096)
    assert sized.body["hybridd"] == {"min_ctx": 4096}  # num_ctx asks for at most the model's context
    raw = generate_request({"model": "m", "prompt": "<s>x", "raw": True, "system": "ignored"}, "llama-cpp-python",
                           4096)
    assert (raw.endpoint, raw.body["prompt"]) == ("completion", "<s>x")


def test_translator_counts_and_durations_come_from_its_clock() -> None:
    ticks = iter([100.0, 100.5, 101.0, 102.0])
    translator = OllamaTranslator("m", "chat", lambda: next(ticks))
    line = translator.chunk({"choices": [{"index": 0, "delta": {"content": "hi"}}]})
    assert json.loads(line)["created_at"] == "1970-01-01T00:01:40.500000Z"
    translator.chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    final = json.loads(translator.end())
    assert (final["done_reason"], final["eval_count"]) == ("length", 1)
    assert (final["total_duration"], final["prompt_eval_duration"], final["eval_duration"]) == \
        (2_000_000_000, 500_000_000, 1_500_000_000)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                         st.sampled_from(["role", "content", "tool_calls", "function", "name", "arguments",
                                          "images", "tool_name"]), inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_json, st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": st.text(max_size=8)})),
    max_size=6), _json, _json)
def test_any_chat_maps_or_is_a_bad_request(messages: Any, options: Any, fmt: Any) -> None:
    try:
        mapped = chat_request({"model": "m", "messages": messages, "options": options, "format": fmt}, "external", 4096)
    except BadRequest as exc:
        assert exc.message and exc.status == 400
        return
    texts = [m["content"] for m in messages if isinstance(m, dict)]
    if not mapped.load_only:
        assert [m["content"] or "" for m in mapped.body["messages"]] == [t or "" for t in texts]


# --- the real tiny engine through a daemon ---------------------------------------------------------------------

def test_ollama_client_on_the_tiny_engine(daemon_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import http
    from tests.test_serve_e2e import tiny_config

    daemon = daemon_factory(tiny_config(tiny_model))
    reply = http("POST", daemon.url + "/api/chat", {"model": "tiny", "stream": False, "options": {"num_predict": 3},
                                                    "messages": [{"role": "user", "content": "hello"}]})
    assert reply.status == 200 and reply.headers["x-hybridd-placement"] == "local"
    answer = reply.json()
    assert answer["done"] is True and answer["message"]["role"] == "assistant" and answer["eval_count"] <= 3
    client = ollama.Client(host=daemon.url, timeout=60)
    parts = list(client.generate(model="tiny", prompt="once upon", raw=True, options={"num_predict": 3},
                                 stream=True))
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert [m.model for m in client.ps().models] == ["tiny"]
    assert len(client.embed(model="tiny", input=["alpha", "beta"]).embeddings[0]) == 64
