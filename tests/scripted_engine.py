"""A scripted OpenAI-compatible engine: a real aiohttp server on port 0 answering chat, completions and embeddings
with what the test set, whole or streamed one piece a chunk as llama.cpp servers do, recording every request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from hybridd.api.app import make_app
from hybridd.config import Config, ModelEntry
from hybridd.node.catalog import Catalog


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class Script:
    """What the engine answers next."""

    content: str | None = "ok"
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    stream_usage: bool = False  # llama-cpp-python's server sends no usage chunk
    status: int = 200
    error: str = ""
    break_after: int | None = None  # drop the connection after this many chunks


@dataclass
class ScriptedEngine:
    script: Script = field(default_factory=Script)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (endpoint, body)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completion)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    def last(self, endpoint: str) -> dict[str, Any]:
        return next(body for kind, body in reversed(self.requests) if kind == endpoint)

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(("embedding", body))
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return web.json_response({"object": "list", "model": body["model"], "usage": {"prompt_tokens": 3,
                                                                                      "total_tokens": 3},
                                  "data": [{"object": "embedding", "index": i, "embedding": [float(i), 0.5]}
                                           for i in range(len(inputs))]})

    async def completion(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(("completion", body))
        return await self._answer(request, body, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(("chat", body))
        return await self._answer(request, body, chat=True)

    async def _answer(self, request: web.Request, body: dict[str, Any], chat: bool) -> web.StreamResponse:
        script = self.script
        if script.status != 200:
            return web.json_response({"error": {"message": script.error, "type": "invalid_request_error"}},
                                     status=script.status)
        tokens = len((script.content or "").split()) + len((script.reasoning or "").split()) + len(script.tool_calls)
        usage = {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens}
        if not body.get("stream"):
            if not chat:
                return web.json_response({"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                                          "choices": [{"index": 0, "text": script.content,
                                                       "finish_reason": script.finish_reason}], "usage": usage})
            message: dict[str, Any] = {"role": "assistant", "content": script.content}
            if script.reasoning:
                message["reasoning_content"] = script.reasoning
            if script.tool_calls:
                message["tool_calls"] = [{"id": c.id, "type": "function",
                                          "function": {"name": c.name, "arguments": c.arguments}}
                                         for c in script.tool_calls]
            return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                                      "choices": [{"index": 0, "message": message,
                                                   "finish_reason": script.finish_reason}], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, chunk in enumerate(self._chunks(chat)):
            if script.break_after is not None and i == script.break_after:
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if script.stream_usage:
            await response.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    def _chunks(self, chat: bool) -> list[dict[str, Any]]:
        script = self.script
        deltas: list[dict[str, Any]] = []
        for key, text in (("reasoning_content", script.reasoning), ("content", script.content)):
            deltas += [{key: word} for word in _pieces(text)]
        for index, call in enumerate(script.tool_calls):
            cut = max(1, len(call.arguments) // 3)
            parts = [call.arguments[:cut], call.arguments[cut:2 * cut], call.arguments[2 * cut:]]
            deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                           "function": {"name": call.name, "arguments": ""}}]})
            deltas += [{"tool_calls": [{"index": index, "function": {"arguments": part}}]} for part in parts if part]
        if not chat:
            return [{"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": d["content"],
                                                                           "finish_reason": None}]}
                    for d in deltas if "content" in d] + [
                {"id": "c", "object": "text_completion",
                 "choices": [{"index": 0, "text": "", "finish_reason": script.finish_reason}]}]
        return [{"id": "c", "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas] + [
            {"id": "c", "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": {}, "finish_reason": script.finish_reason}]}]


def _pieces(text: str | None) -> list[str]:
    """text in word-sized pieces that join back to it exactly."""
    if not text:
        return []
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


@asynccontextmanager
async def hybridd_with(engine: ScriptedEngine, **model_keys: Any) -> AsyncIterator[str]:
    """hybridd in-process serving model "m" (and alias "m-alias") on the scripted engine; yields its base URL."""
    upstream = TestServer(engine.app(), host="127.0.0.1")
    await upstream.start_server()
    base = str(upstream.make_url("/")).rstrip("/")
    model = ModelEntry(name="m", engine="external", base_url=base, aliases=("m-alias",), **model_keys)
    server = TestServer(make_app(Config(), Catalog((model,))), host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    try:
        yield str(server.make_url("/")).rstrip("/")
    finally:
        await server.close()
        await upstream.close()
