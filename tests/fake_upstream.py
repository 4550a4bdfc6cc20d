"""A fake OpenAI-compatible engine: a real aiohttp server on port 0 whose streams the test steers."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class FakeEngine:
    """Streams chunks only when the test releases them; records whether the client went away."""

    release: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[dict] = field(default_factory=list)  # type: ignore[type-arg]
    headers: list[dict[str, str]] = field(default_factory=list)
    status: int = 200
    error_body: bytes = b""
    break_stream: bool = False  # drop the connection at the next released chunk

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        return web.json_response({"object": "list", "data": [{"object": "embedding", "index": 0,
                                                              "embedding": [0.5, 0.25]}], "model": body["model"]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        if self.status != 200:
            return web.Response(status=self.status, body=self.error_body, content_type="application/json")
        if not body.get("stream"):
            return web.json_response({"id": "x", "object": "chat.completion", "model": body["model"],
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                                   "finish_reason": "stop"}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while (chunk := await self.release.get()) is not None:
                if self.break_stream:
                    assert request.transport is not None
                    if chunk:
                        await response.write(chunk)
                        request.transport.close()  # flushes chunk, then ends mid-stream (no final chunk)
                    else:
                        request.transport.abort()  # the engine dies mid-stream
                    return response
                await response.write(chunk)
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response


def sse(content: str) -> bytes:
    """One chat-completion chunk as a server-sent event."""
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": content}}]}).encode() + b"\n\n"


async def start_fake(engine: FakeEngine) -> TestServer:
    """Serve engine on 127.0.0.1, port 0; cancel handlers whose client left, as real engines notice."""
    server = TestServer(engine.app(), host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    return server
