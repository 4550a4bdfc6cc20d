"""One scripted engine answers one tool call (tool_choice "auto"); every API a coding agent speaks gets it as its
own kind of tool call, whole and streamed: tool_calls (chat), tool_use (Messages), a function_call item
(Responses), message.tool_calls (Ollama)."""

from __future__ import annotations

import asyncio
import json

import anthropic
import ollama
import openai

from tests.scripted_engine import Script, ScriptedEngine, ToolCall, hybridd_with

ARGS = {"path": "src/main.py", "line": 42}
CALL = ToolCall("call_7", "read_file", json.dumps(ARGS))
TOOL = {"name": "read_file", "description": "read a file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}, "line": {"type": "integer"}}}}


def ask_every_api(url: str, stream: bool) -> dict[str, object]:
    """The tool call as each client library reads it: name and parsed arguments."""
    seen: dict[str, object] = {}
    chat = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "read it"}]
    tools = [{"type": "function", "function": TOOL}]
    if stream:
        pieces: list[str] = []
        name = ""
        for chunk in chat.chat.completions.create(model="m", messages=messages, tools=tools,  # type: ignore[arg-type]
                                                  tool_choice="auto", stream=True):
            for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                name = name or (call.function.name or "") if call.function else name
                pieces.append(call.function.arguments or "" if call.function else "")
        seen["chat"] = (name, json.loads("".join(pieces)))
    else:
        reply = chat.chat.completions.create(model="m", messages=messages, tools=tools,  # type: ignore[arg-type]
                                             tool_choice="auto")
        call = reply.choices[0].message.tool_calls[0]  # type: ignore[index]
        seen["chat"] = (call.function.name, json.loads(call.function.arguments))  # type: ignore[union-attr]

    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    anthropic_tool = {"name": TOOL["name"], "description": TOOL["description"], "input_schema": TOOL["parameters"]}
    if stream:
        with claude.messages.stream(model="m", max_tokens=64, messages=messages, tools=[anthropic_tool],  # type: ignore[arg-type, list-item]
                                    tool_choice={"type": "auto"}) as events:
            message = events.get_final_message()
    else:
        message = claude.messages.create(model="m", max_tokens=64, messages=messages,  # type: ignore[arg-type]
                                         tools=[anthropic_tool], tool_choice={"type": "auto"})  # type: ignore[list-item]
    (use,) = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use"
    seen["messages"] = (use.name, use.input)

    function = {"type": "function", **TOOL}
    if stream:
        items = []
        for event in chat.responses.create(model="m", input="read it", tools=[function],  # type: ignore[list-item]
                                           tool_choice="auto", stream=True, store=False):
            if event.type == "response.output_item.done":
                items.append(event.item)
    else:
        items = list(chat.responses.create(model="m", input="read it", tools=[function],  # type: ignore[list-item]
                                           tool_choice="auto", store=False).output)
    (item,) = [i for i in items if i.type == "function_call"]
    seen["responses"] = (item.name, json.loads(item.arguments))  # type: ignore[union-attr]

    local = ollama.Client(host=url)
    if stream:
        calls = [c for part in local.chat(model="m", messages=messages, tools=tools, stream=True)
                 for c in part.message.tool_calls or []]
    else:
        calls = list(local.chat(model="m", messages=messages, tools=tools, stream=False).message.tool_calls
                     or [])
    (ollama_call,) = calls
    seen["ollama"] = (ollama_call.function.name, dict(ollama_call.function.arguments))
    return seen


async def test_one_tool_call_reaches_every_api_as_its_own_kind() -> None:
    engine = ScriptedEngine(Script(content=None, tool_calls=[CALL], finish_reason="tool_calls"))
    async with hybridd_with(engine) as url:
        for stream in (False, True):
            seen = await asyncio.to_thread(ask_every_api, url, stream)
            assert seen == {api: ("read_file", ARGS) for api in ("chat", "messages", "responses", "ollama")}, stream
    # Each request reached the engine as a chat completion with the tool and tool_choice "auto".
    chats = [body for kind, body in engine.requests if kind == "chat"]
    assert len(chats) == 8
    assert all(body["tools"][0]["function"]["name"] == "read_file" for body in chats)
    assert all(body.get("tool_choice", "auto") == "auto" for body in chats)
