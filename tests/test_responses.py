"""OpenAI's Responses API (what Codex CLI speaks) driven by the official `openai` SDK against a scripted engine, the
mapper's properties, and one answer from the real tiny engine through a daemon."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import openai
import pytest
from hypothesis import given, settings

from hybridd.api.translate.responses import ResponsesTranslator, to_chat
from hybridd.errors import BadRequest
from tests.scripted_engine import Script, ScriptedEngine, ToolCall, hybridd_with

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ARGS = '{"city": "Paris", "unit": "celsius"}'


@pytest.fixture
async def node() -> AsyncIterator[tuple[ScriptedEngine, openai.OpenAI]]:
    engine = ScriptedEngine()
    async with hybridd_with(engine) as url:
        yield engine, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


async def test_function_call_whole(node: tuple[ScriptedEngine, openai.OpenAI]) -> None:
    engine, client = node
    engine.script = Script(content=None, tool_calls=[ToolCall("call_1", "get_weather", ARGS)],
                           finish_reason="tool_calls")
    raw = await asyncio.to_thread(client.responses.with_raw_response.create, model="m", input="Weather in Paris?",
                                  instructions="Be brief.", store=False,
                                  tools=[WEATHER, {"type": "web_search"}], max_output_tokens=64)
    assert raw.headers["x-hybridd-placement"] == "local"
    response = raw.parse()
    assert response.status == "completed" and response.store is False
    [call] = response.output
    assert call.type == "function_call"
    assert (call.call_id, call.name, call.arguments) == ("call_1", "get_weather", ARGS)
    assert response.usage is not None and response.usage.input_tokens == 7
    assert response.metadata == {"hybridd_notes": "tool 'web_search' of type web_search skipped: hybridd serves "
                                                  "function tools only"}
    sent = engine.last("chat")
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Weather in Paris?"}]
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]
    assert sent["max_tokens"] == 64 and sent["stream"] is False


async def test_function_call_streamed(node: tuple[ScriptedEngine, openai.OpenAI]) -> None:
    engine, client = node
    engine.script = Script(content="Let me look.", tool_calls=[ToolCall("call_9", "get_weather", ARGS)],
                           finish_reason="tool_calls")
    events = await asyncio.to_thread(lambda: list(client.responses.create(
        model="m", input=[{"role": "user", "content": [{"type": "input_text", "text": "Paris?"}]}],
        tools=[WEATHER], stream=True)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Let me look."
    arguments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(arguments) == 3 and "".join(arguments) == ARGS
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == ARGS
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["message", "function_call"]
    final = events[-1].response
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert final.output[1].call_id == "call_9" and final.output[1].arguments == ARGS
    assert final.usage is not None and final.usage.output_tokens == 3 + 1 + 3  # no usage chunk: each delta counted
    assert engine.last("chat")["stream"] is True


async def test_function_call_output_reaches_engine_as_tool_message(
        node: tuple[ScriptedEngine, openai.OpenAI]) -> None:
    engine, client = node
    engine.script = Script(content="It is sunny.")
    response = await asyncio.to_thread(client.responses.create, model="m", tools=[WEATHER], input=[
        {"type": "message", "role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "think"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": ARGS},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
    ])
    assert response.output_text == "It is sunny."
    assert engine.last("chat")["messages"] == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]


async def test_reasoning_content_becomes_reasoning(node: tuple[ScriptedEngine, openai.OpenAI]) -> None:
    engine, client = node
    engine.script = Script(content="42", reasoning="six times seven", stream_usage=True)
    events = await asyncio.to_thread(lambda: list(client.responses.create(model="m", input="?", stream=True)))
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert thought == "six times seven"
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "six times seven" and final.output_text == "42"
    assert final.usage.output_tokens == 4 and final.usage.input_tokens == 7  # the usage chunk's

    whole = await asyncio.to_thread(client.responses.create, model="m", input="?")
    assert [item.type for item in whole.output] == ["reasoning", "message"]


async def test_refusals_name_the_field(node: tuple[ScriptedEngine, openai.OpenAI]) -> None:
    engine, client = node
    with pytest.raises(openai.BadRequestError, match="hybridd stores no responses") as caught:
        await asyncio.to_thread(client.responses.create, model="m", input="hi", previous_response_id="resp_1")
    assert caught.value.status_code == 400 and caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="forces tool 'web_search'"):
        await asyncio.to_thread(client.responses.create, model="m", input="hi", tools=[{"type": "web_search"}],
                                tool_choice={"type": "web_search"})
    with pytest.raises(openai.NotFoundError, match="model 'nope' does not exist"):
        await asyncio.to_thread(client.responses.create, model="nope", input="hi")
    assert engine.requests == []


async def test_broken_stream_ends_in_response_failed(node: tuple[ScriptedEngine, openai.OpenAI]) -> None:
    engine, client = node
    engine.script = Script(content="one two three four", break_after=2)
    events = await asyncio.to_thread(lambda: list(client.responses.create(model="m", input="?", stream=True)))
    assert events[-1].type == "response.failed"
    assert events[-1].response.error is not None and "broke" in events[-1].response.error.message


def test_text_format_schema_maps_per_engine() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = {"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "out", "schema": schema,
                                                            "strict": True}}}
    assert to_chat(body, engine="llama-cpp-python").chat["response_format"] == {"type": "json_object", "schema": schema}
    assert to_chat(body, engine="external").chat["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    choice = to_chat({**body, "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}},
                     engine="llama-cpp-python").chat["tool_choice"]
    assert choice == {"type": "function", "function": {"name": "get_weather"}}


def test_translator_failed_before_any_chunk_still_opens_the_response() -> None:
    translator = ResponsesTranslator("resp_x", 0, "m", to_chat({"model": "m", "input": "x"}, engine="llama-cpp-python"))
    events = [json.loads(line[6:]) for line in translator.failed("engine gone", "upstream_failed").decode()
              .splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.failed"]
    assert events[-1]["response"]["error"] == {"code": "upstream_failed", "message": "engine gone"}
    assert translator.end() == b""


# --- properties of the mapper ----------------------------------------------------------------------------------

_text = st.text(max_size=12)
_part = st.builds(lambda kind, text: {"type": kind, "text": text}, st.sampled_from(["input_text", "output_text"]),
                  _text)
_message = st.builds(lambda role, content: {"type": "message", "role": role, "content": content},
                     st.sampled_from(["user", "system", "developer", "assistant"]),
                     st.one_of(_text, st.lists(_part, max_size=3)))
_call = st.builds(lambda cid, args: {"type": "function_call", "call_id": cid, "name": "f", "arguments": args},
                  _text, _text)
_output = st.builds(lambda cid, out: {"type": "function_call_output", "call_id": cid, "output": out}, _text, _text)
_reasoning = st.just({"type": "reasoning", "id": "rs", "summary": []})
_items = st.lists(st.one_of(_message, _call, _output, _reasoning), max_size=8)
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                         st.sampled_from(["type", "role", "content", "text", "call_id", "name", "arguments",
                                          "output", "image_url"]), inner, max_size=4), max_leaves=12)


def _input_texts(items: list[dict[str, Any]]) -> list[str]:
    texts = []
    for item in items:
        if item["type"] == "message":
            content = item["content"]
            texts.append(content if isinstance(content, str) else "".join(p["text"] for p in content))
        elif item["type"] == "function_call":
            texts.append(item["arguments"])
        elif item["type"] == "function_call_output":
            texts.append(item["output"])
    return texts


def _chat_texts(messages: list[dict[str, Any]]) -> list[str]:
    texts = []
    for message in messages:
        if message["content"] is not None:
            texts.append(message["content"])
        texts += [call["function"]["arguments"] for call in message.get("tool_calls", [])]
    return texts


@settings(max_examples=200, deadline=None)
@given(_items)
def test_text_survives_in_order(items: list[dict[str, Any]]) -> None:
    try:
        chat = to_chat({"model": "m", "input": items}, engine="llama-cpp-python").chat
    except BadRequest as exc:
        assert not _input_texts(items) and "at least one message" in exc.message
        return
    assert _chat_texts(chat["messages"]) == _input_texts(items)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_json, st.lists(st.one_of(_message, _call, _output, _json), max_size=5)),
       st.one_of(st.none(), _json), st.one_of(st.none(), _json))
def test_any_input_maps_or_is_a_bad_request(value: Any, tools: Any, text: Any) -> None:
    body = {"model": "m", "input": value, "tools": tools, "text": text}
    try:
        to_chat(body, engine="external")
    except BadRequest as exc:
        assert exc.message and exc.status == 400


# --- the real tiny engine through a daemon ---------------------------------------------------------------------

def test_codex_shaped_request_on_the_tiny_engine(daemon_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.test_serve_e2e import NO_EOS, tiny_config

    daemon = daemon_factory(tiny_config(tiny_model))
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    raw = client.responses.with_raw_response.create(
        model="tiny", instructions="You are a coding agent.", store=False, max_output_tokens=4,
        input=[{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}],
        tools=[WEATHER, {"type": "local_shell"}], extra_body={"logit_bias": NO_EOS})
    assert raw.headers["x-hybridd-placement"] == "local"
    response = raw.parse()
    assert response.status == "incomplete" and response.usage is not None and response.usage.output_tokens == 4
    assert response.output[0].type == "message" and response.output_text
    events = list(client.responses.create(model="tiny", input="hi", max_output_tokens=3, stream=True,
                                          extra_body={"logit_bias": NO_EOS}))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    usage = events[-1].response.usage  # no usage chunk from the engine: the prompt counted, the deltas counted
    assert usage is not None and usage.input_tokens > 0 and usage.output_tokens == 3
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == \
        events[-1].response.output_text
