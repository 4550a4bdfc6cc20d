"""A fast fake OpenAI engine for benchmarks: `python bench/fake_engine.py PORT_FILE`.

Non-streaming: a small chat.completion. Streaming: `n` chunks (from the request's max_tokens), each its own
write, as fast as the socket takes them: the proxy, not the engine, is what the benchmark measures.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from aiohttp import web

CHUNK = b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [
    {"index": 0, "delta": {"content": "token"}, "finish_reason": None}]}).encode() + b"\n\n"
REPLY = json.dumps({"id": "c", "object": "chat.completion", "model": "m", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        return web.Response(body=REPLY, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for _ in range(int(body.get("max_tokens", 100))):
        await response.write(CHUNK)
    await response.write(b"data: [DONE]\n\n")
    return response


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})


async def main(port_file: Path) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    port_file.write_text(str(port))  # noqa: ASYNC240 (once, at startup)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
