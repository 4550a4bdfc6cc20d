"""The Anthropic Messages API: the official anthropic SDK against the app with a scripted engine, the mapping's
properties, and a real daemon with the tiny llama-cpp-python engine."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hybridd.api.app import make_app
from hybridd.api.translate.anthropic import MessagesTranslator, message_from_chat, to_chat
from hybridd.config import Config, ModelEntry
from hybridd.errors import BadRequest
from hybridd.node.catalog import Catalog
from hybridd.node.sizing import guess_tokens
from tests.fake_chat_engine import ScriptedChatEngine, chunk, start_scripted, text_chunks
from tests.test_serve_e2e import tiny_config

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
HI: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def engine() -> AsyncIterator[ScriptedChatEngine]:
    yield ScriptedChatEngine()


@pytest.fixture
async def client(engine: ScriptedChatEngine) -> AsyncIterator[anthropic.AsyncAnthropic]:
    upstream = await start_scripted(engine)
    base = str(upstream.make_url("/")).rstrip("/")
    models = (ModelEntry(name="m", engine="external", base_url=base, aliases=("claude-test",)),)
    server = TestServer(make_app(Config(), Catalog(models)), host="127.0.0.1")
    await server.start_server()
    async with anthropic.AsyncAnthropic(base_url=str(server.make_url("/")).rstrip("/"), api_key="unused",
                                        max_retries=0, timeout=20) as api:
        yield api
    await server.close()
    await upstream.close()


async def test_a_text_message_round_trips(client: anthropic.AsyncAnthropic, engine: ScriptedChatEngine) -> None:
    engine.message = {"role": "assistant", "content": "Hello there"}
    engine.usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    raw = await client.messages.with_raw_response.create(
        model="claude-test", max_tokens=50, system=[{"type": "text", "text": "Be brief."},
                                                    {"type": "text", "text": "Be kind."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}},
                                               {"type": "text", "text": "there"}]}],
        stop_sequences=["END"], metadata={"user_id": "u1"}, extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 20},
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    assert raw.headers["x-hybridd-placement"] == "local"
    message = await raw.parse()
    assert message.id.startswith("msg_") and message.role == "assistant" and message.model == "claude-test"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", "Hello there")]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 3)
    sent = engine.requests[0]
    assert sent["messages"] == [{"role": "system", "content": "Be brief.\nBe kind."},
                                {"role": "user", "content": "hi\nthere"}]
    assert (sent["max_tokens"], sent["stop"], sent["temperature"], sent["top_p"], sent["top_k"]) == \
        (50, ["END"], 0.2, 0.9, 20)
    assert "stream" not in sent and "metadata" not in sent


async def test_a_streamed_message_comes_as_anthropic_events(client: anthropic.AsyncAnthropic,
                                                            engine: ScriptedChatEngine) -> None:
    engine.chunks = text_chunks(["Hel", "lo", "!"], finish="length")
    async with client.messages.stream(model="m", max_tokens=3, messages=HI) as stream:
        events = [event async for event in stream]
        message = await stream.get_final_message()
    raw = [e.type for e in events if e.type not in ("text",)]
    assert raw == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                   "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert [e.delta.text for e in events if e.type == "content_block_delta"] == ["Hel", "lo", "!"]
    assert message.content[0].type == "text" and message.content[0].text == "Hello!"
    assert message.stop_reason == "max_tokens"
    # llama-cpp-python sends no usage chunk: output counts the deltas, input the prompt as placement sizes it
    expected_input = guess_tokens("chat", to_chat({"model": "m", "max_tokens": 3, "messages": HI})).tokens
    assert (message.usage.input_tokens, message.usage.output_tokens) == (expected_input, 3)
    assert engine.requests[0]["stream"] is True
    assert engine.requests[0]["stream_options"] == {"include_usage": True}


async def test_a_usage_chunk_gives_the_streamed_counts(client: anthropic.AsyncAnthropic,
                                                       engine: ScriptedChatEngine) -> None:
    engine.chunks = [*text_chunks(["a"]), {"id": "c", "choices": [], "usage": {"prompt_tokens": 40,
                                                                              "completion_tokens": 7}}]
    async with client.messages.stream(model="m", max_tokens=9, messages=HI) as stream:
        message = await stream.get_final_message()
    assert (message.usage.input_tokens, message.usage.output_tokens) == (40, 7)


async def test_a_tool_round_trip(client: anthropic.AsyncAnthropic, engine: ScriptedChatEngine) -> None:
    engine.message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    engine.finish_reason = "tool_calls"
    question: Any = {"role": "user", "content": "Weather in Paris?"}
    first = await client.messages.create(model="m", max_tokens=64, messages=[question], tools=[WEATHER],
                                         tool_choice={"type": "tool", "name": "get_weather"})
    assert first.stop_reason == "tool_use"
    (use,) = first.content
    assert use.type == "tool_use" and (use.id, use.name, use.input) == ("call_1", "get_weather", {"city": "Paris"})
    sent = engine.requests[0]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER["input_schema"]}}]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}

    engine.message, engine.finish_reason = {"role": "assistant", "content": "18 C and sunny."}, "stop"
    second = await client.messages.create(model="m", max_tokens=64, tools=[WEATHER], messages=[
        question, {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": [{"type": "text", "text": "18 C, sun"}]},
                                     {"type": "text", "text": "Summarise."}]}])
    assert second.content[0].type == "text" and second.content[0].text == "18 C and sunny."
    assert engine.requests[1]["messages"][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sun"},
        {"role": "user", "content": "Summarise."}]
    assert "tool_choice" not in engine.requests[1]


async def test_streamed_tool_arguments_come_as_input_json_deltas(client: anthropic.AsyncAnthropic,
                                                                 engine: ScriptedChatEngine) -> None:
    pieces = ['{"ci', 'ty": "Pa', 'ris"}']
    call = {"index": 0, "id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    engine.chunks = [chunk({"role": "assistant", "content": None}), chunk({"tool_calls": [call]}),
                     *(chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces),
                     chunk(finish="tool_calls")]
    async with client.messages.stream(model="m", max_tokens=64, messages=HI, tools=[WEATHER],
                                      tool_choice={"type": "any"}) as stream:
        events = [event async for event in stream]
        message = await stream.get_final_message()
    partial = [e.delta.partial_json for e in events if e.type == "content_block_delta"]
    assert partial == pieces and json.loads("".join(partial)) == {"city": "Paris"}
    start = next(e for e in events if e.type == "content_block_start")
    assert start.content_block.type == "tool_use" and start.content_block.id == "call_7"
    (use,) = message.content
    assert use.type == "tool_use" and use.input == {"city": "Paris"} and message.stop_reason == "tool_use"
    # `any` over one tool forces it: the choice llama-cpp-python's server turns into tool calls
    assert engine.requests[0]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


async def test_reasoning_content_comes_as_thinking(client: anthropic.AsyncAnthropic,
                                                   engine: ScriptedChatEngine) -> None:
    engine.chunks = [chunk({"role": "assistant"}), chunk({"reasoning_content": "Let me"}),
                     chunk({"reasoning_content": " think."}), chunk({"content": "42"}), chunk(finish="stop")]
    async with client.messages.stream(model="m", max_tokens=64, messages=HI,
                                      thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        events = [event async for event in stream]
        message = await stream.get_final_message()
    kinds = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert kinds == ["thinking_delta", "thinking_delta", "text_delta"]
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Let me think." and message.content[1].text == "42"

    engine.message = {"role": "assistant", "content": "42", "reasoning_content": "Hmm."}
    whole = await client.messages.create(model="m", max_tokens=64, messages=[
        {"role": "user", "content": "q"}, {"role": "assistant", "content": message.content},
        {"role": "user", "content": "again"}])
    assert [b.type for b in whole.content] == ["thinking", "text"] and whole.content[0].thinking == "Hmm."
    # the earlier turn's thinking is dropped, its text kept
    assert engine.requests[1]["messages"][1] == {"role": "assistant", "content": "42"}


async def test_count_tokens_answers_the_prompt_size(client: anthropic.AsyncAnthropic) -> None:
    body: dict[str, Any] = {"model": "m", "messages": HI, "system": "You code.", "tools": [WEATHER]}
    counted = await client.messages.count_tokens(**body)
    # the external model has no GGUF here: the byte estimate placement uses
    assert counted.input_tokens == guess_tokens("chat", to_chat(body, count_only=True)).tokens > 0


async def test_errors_come_in_anthropics_envelope(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(model="m", max_tokens=0, messages=HI)
    assert bad.value.status_code == 400
    assert bad.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                         "message": "'max_tokens' must be >= 1, got 0"}}
    with pytest.raises(anthropic.BadRequestError, match="images are not supported"):
        await client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="nope", max_tokens=5, messages=HI)
    assert isinstance(missing.value.body, dict) and missing.value.body["error"]["type"] == "not_found_error"
    assert "model 'nope' does not exist here" in missing.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.count_tokens(model="nope", messages=HI)


# -- the mapping alone


def test_a_system_message_among_the_messages_stays_where_it_stands() -> None:
    # What Claude Code sends: its reminders as system messages between turns, with adaptive thinking and effort.
    body = {"model": "m", "max_tokens": 32000, "system": [{"type": "text", "text": "You are Claude Code."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                         {"role": "system", "content": "Available agent types: claude, Explore"},
                         {"role": "system", "content": [{"type": "text", "text": ""}]}],
            "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}}
    assert to_chat(body)["messages"] == [{"role": "system", "content": "You are Claude Code."},
                                         {"role": "user", "content": "hi"},
                                         {"role": "system", "content": "Available agent types: claude, Explore"}]


@pytest.mark.parametrize(("body", "fragment"), [
    ({"model": "m", "messages": HI}, "'max_tokens' is required"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]},
     "'messages[0].role': unknown value 'tool' (valid: user, assistant, system)"),
    ({"model": "m", "max_tokens": 5, "messages": [*HI, {"role": "system", "content": [{"type": "tool_use"}]}]},
     "'messages[1].content[0].type': unknown value 'tool_use' (valid: text)"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
     "'messages[0].content[0].type': unknown value 'video'"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]},
     "a tool_use block cannot be in a user message"),
    ({"model": "m", "max_tokens": 5, "messages": HI, "tools": [{"type": "web_search_20250305", "name": "s"}]},
     "'tools[0].type': 'web_search_20250305' is a tool Anthropic's servers run"),
    ({"model": "m", "max_tokens": 5, "messages": HI, "tools": [WEATHER], "tool_choice": {"type": "tool",
                                                                                         "name": "other"}},
     "'tool_choice.name': no tool is named 'other' (valid: get_weather)"),
    ({"model": "m", "max_tokens": 5, "messages": HI, "thinking": {"type": "enabled"}},
     "'thinking.budget_tokens' must be an integer, got null"),
])
def test_bad_requests_name_the_field(body: dict[str, Any], fragment: str) -> None:
    with pytest.raises(BadRequest) as raised:
        to_chat(body)
    assert fragment in raised.value.message


def test_a_stop_sequence_is_told_when_the_engine_names_it() -> None:
    chat = {"choices": [{"message": {"content": "a"}, "finish_reason": "stop", "stop_reason": "END"}]}
    message = message_from_chat(chat, "m", stop_sequences=["END"])
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "END")


def _events(data: bytes) -> list[dict[str, Any]]:
    out = []
    for event in data.decode().split("\n\n"):
        if event:
            name, payload = event.split("\n")
            assert name == "event: " + json.loads(payload.removeprefix("data: "))["type"]
            out.append(json.loads(payload.removeprefix("data: ")))
    return out


def test_a_broken_stream_ends_with_an_error_event_and_nothing_after() -> None:
    translator = MessagesTranslator("m", 5)
    started = _events(translator.chunk(chunk({"content": "x"})))
    assert [e["type"] for e in started] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert _events(translator.failed("engine died", "upstream_failed")) == [
        {"type": "error", "error": {"type": "api_error", "message": "engine died"}}]
    assert translator.end() == b"" and translator.chunk(chunk({"content": "y"})) == b""


def test_interleaved_tool_calls_keep_their_own_blocks() -> None:
    translator = MessagesTranslator("m")
    data = translator.chunk(chunk({"tool_calls": [
        {"index": 0, "id": "a", "function": {"name": "f", "arguments": "{"}},
        {"index": 1, "id": "b", "function": {"name": "g", "arguments": "{"}}]}))
    data += translator.chunk(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "}"}},
                                                   {"index": 1, "function": {"arguments": "}"}}]}))
    data += translator.end()
    events = _events(data)
    starts = [(e["index"], e["content_block"]["name"]) for e in events if e["type"] == "content_block_start"]
    assert starts == [(0, "f"), (1, "g")]
    joined: dict[int, str] = {}
    for e in events:
        if e["type"] == "content_block_delta":
            joined[e["index"]] = joined.get(e["index"], "") + e["delta"]["partial_json"]
    assert joined == {0: "{}", 1: "{}"}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


# -- properties

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                 max_size=3), max_leaves=6)
_id = st.text(min_size=1, max_size=4)
_text_block = st.builds(lambda t: {"type": "text", "text": t, "cache_control": {"type": "ephemeral"}},
                        st.text(max_size=12))
_tool_use = st.builds(lambda i, n, x: {"type": "tool_use", "id": i, "name": n, "input": x},
                      _id, _id, st.dictionaries(st.text(max_size=4), _json, max_size=3))
_tool_result = st.builds(lambda i, c, e: {"type": "tool_result", "tool_use_id": i, "content": c, "is_error": e},
                         _id, st.one_of(st.text(max_size=6), st.lists(_text_block, max_size=2), st.none()),
                         st.one_of(st.none(), st.booleans()))
_thinking = st.builds(lambda t: {"type": "thinking", "thinking": t, "signature": ""}, st.text(max_size=6))
# Well-formed requests (the text property bites on these), and ones with anything anywhere (only BadRequest).
_good_message = st.one_of(
    st.builds(lambda c: {"role": "user", "content": c},
              st.one_of(st.text(max_size=10), st.lists(st.one_of(_text_block, _tool_result, _thinking), max_size=4))),
    st.builds(lambda c: {"role": "assistant", "content": c},
              st.one_of(st.text(max_size=10), st.lists(st.one_of(_text_block, _tool_use, _thinking), max_size=4))))
_good_body = st.fixed_dictionaries(
    {"model": st.just("m"), "max_tokens": st.integers(1, 100), "messages": st.lists(_good_message, min_size=1,
                                                                                      max_size=4)},
    optional={"system": st.one_of(st.text(max_size=8), st.lists(_text_block, max_size=2)),
              "tools": st.lists(st.just(WEATHER), max_size=2),
              "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"},
                                              {"type": "tool", "name": "get_weather"}]),
              "stream": st.booleans(), "stop_sequences": st.lists(st.text(max_size=3), max_size=2),
              "thinking": st.just({"type": "enabled", "budget_tokens": 2048})})
_block = st.one_of(_text_block, _tool_use, _tool_result, _thinking, _json,
                   st.builds(lambda t: {"type": t}, st.sampled_from(["image", "document", "video", "tool_use"])))
_message = st.builds(lambda r, c: {"role": r, "content": c}, st.sampled_from(["user", "assistant", "system"]),
                     st.one_of(st.text(max_size=10), st.lists(_block, max_size=4), _json))
_any_body = st.fixed_dictionaries(
    {"model": st.one_of(st.just("m"), _json), "max_tokens": st.one_of(st.just(8), _json),
     "messages": st.one_of(st.lists(_message, max_size=4), _json)},
    optional={"system": st.one_of(st.text(max_size=8), st.lists(_text_block, max_size=2), _json),
              "tools": st.one_of(st.lists(st.one_of(st.just(WEATHER), _json), max_size=2), _json),
              "tool_choice": st.one_of(st.fixed_dictionaries(
                  {"type": st.sampled_from(["auto", "any", "tool", "none", "x"])},
                  optional={"name": st.text(max_size=4), "disable_parallel_tool_use": _json}), _json),
              "stream": _json, "thinking": _json, "stop_sequences": _json, "temperature": _json,
              "top_k": _json, "metadata": _json})
_body = st.one_of(_good_body, _any_body)


def _texts_in_order(body: dict[str, Any]) -> list[str]:
    """Every text block's text (and string content) in the request, in order."""
    system = body.get("system")
    texts = [system] if isinstance(system, str) else [b["text"] for b in system or []]
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
            continue
        for block in content:
            if block["type"] == "text":
                texts.append(block["text"])
            elif block["type"] == "tool_result":
                inner = block.get("content")
                texts += [inner] if isinstance(inner, str) else [b["text"] for b in inner or []]
    return [t for t in texts if t]


@settings(max_examples=400, deadline=None)
@given(_body)
@example({"model": "m", "max_tokens": 8, "messages": [{"role": "system", "content": None}]})  # found by Hypothesis
def test_to_chat_refuses_only_with_bad_request_and_keeps_every_text_in_order(body: dict[str, Any]) -> None:
    try:
        chat = to_chat(body)
    except BadRequest:
        return
    rendered = "\x00".join(m["content"] for m in chat["messages"] if m["content"])
    pos = 0
    for text in _texts_in_order(body):
        found = rendered.find(text, pos)
        assert found >= 0, (text, rendered)
        pos = found + len(text)
    json.dumps(chat)  # what the route sends on: always JSON


# -- a real daemon, the real tiny engine


def test_the_sdk_against_a_daemon_with_the_tiny_engine(daemon_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(tiny_config(tiny_model))
    api = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0, timeout=60)
    raw = api.messages.with_raw_response.create(model="tiny", max_tokens=4, system="Be brief.", messages=HI)
    assert raw.headers["x-hybridd-placement"] == "local"
    message = raw.parse()
    assert message.model == "tiny" and message.stop_reason in ("end_turn", "max_tokens")
    assert all(block.type == "text" for block in message.content)
    # (llama-cpp-python counts completion tokens by re-tokenizing the text: with the tiny byte vocabulary that
    # can pass max_tokens)
    assert message.usage.output_tokens > 0
    # the model's tokenizer and chat template count the prompt as the engine does
    counted = api.messages.count_tokens(model="tiny", messages=HI, system="Be brief.")
    assert counted.input_tokens == message.usage.input_tokens > 0

    streamed = api.messages.with_raw_response.create(model="tiny-alias", max_tokens=4, system="Be brief.",
                                                     messages=HI, stream=True)
    assert streamed.headers["x-hybridd-placement"] == "local"
    events = list(streamed.parse())
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") <= 1
    start, stop = events[0], events[-2]
    assert start.type == "message_start" and start.message.usage.input_tokens == counted.input_tokens
    assert start.message.model == "tiny-alias"
    assert stop.type == "message_delta" and stop.delta.stop_reason in ("end_turn", "max_tokens")
    assert 0 < stop.usage.output_tokens <= 4

    # `any` over one tool forces it, which llama-cpp-python's server answers with tool-call chunks (random weights:
    # the arguments need not be valid JSON, so the raw events are read, not the SDK's accumulated message)
    tool = api.messages.create(model="tiny", max_tokens=12, messages=HI, tools=[WEATHER],
                               tool_choice={"type": "any"}, stream=True)
    events = list(tool)
    (start,) = [e for e in events if e.type == "content_block_start"]
    assert start.content_block.type == "tool_use" and start.content_block.name == "get_weather"
    assert {e.delta.type for e in events if e.type == "content_block_delta"} == {"input_json_delta"}
    assert events[-2].type == "message_delta" and events[-2].delta.stop_reason in ("tool_use", "max_tokens")


def test_the_mapping_is_pure() -> None:
    code = ("import sys, hybridd.api.translate.anthropic\n"
            "print(','.join(m for m in ('asyncio', 'aiohttp', 'logging', 'socket') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
