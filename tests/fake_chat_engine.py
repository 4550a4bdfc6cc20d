"""A scripted OpenAI chat engine: a real aiohttp server on port 0 that answers each request with the next reply
the test queued, whole or as the chunks given, and keeps every request it got."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class ScriptedChatEngine:
    """`whole` answers non-streamed requests (a chat.completion message and finish reason); `chunks` streamed ones
    (the chat.completion.chunk dicts to send before [DONE])."""

    message: dict[str, Any] = field(default_factory=lambda: {"role": "assistant", "content": "ok"})
    finish_reason: str = "stop"
    usage: dict[str, int] | None = None
    chunks: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if not body.get("stream"):
            answer: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                                      "choices": [{"index": 0, "message": self.message,
                                                   "finish_reason": self.finish_reason}]}
            if self.usage is not None:
                answer["usage"] = self.usage
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in self.chunks:
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    """One chat.completion.chunk with one choice."""
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], **extra}


def text_chunks(pieces: Iterable[str], finish: str = "stop") -> list[dict[str, Any]]:
    """A text answer as llama.cpp streams it: the role, a chunk per piece, the finish."""
    return [chunk({"role": "assistant"}), *(chunk({"content": p}) for p in pieces), chunk(finish=finish)]


async def start_scripted(engine: ScriptedChatEngine) -> TestServer:
    """Serve engine on 127.0.0.1, port 0."""
    server = TestServer(engine.app(), host="127.0.0.1")
    await server.start_server()
    return server
