"""OpenAI's Responses API (POST /v1/responses, what Codex CLI speaks), served as chat completions."""

from __future__ import annotations

import json
import logging
import time
import uuid

from aiohttp import web

from hybridd.api.routes_openai import resolve_model, serve
from hybridd.api.translate.responses import ResponsesTranslator, to_chat
from hybridd.node.request import parse_inference, read_json

log = logging.getLogger("hybridd.api")

PATH = "/v1/responses"


def add_routes(app: web.Application) -> None:
    """Register POST /v1/responses."""
    app.router.add_post(PATH, create_response)


async def create_response(request: web.Request) -> web.StreamResponse:
    """Map the request to a chat completion, place it, and answer as a response object or Responses events."""
    raw = await request.read()
    body = read_json(raw)
    name = body.get("model") if isinstance(body, dict) else None
    model = resolve_model(request, name) if isinstance(name, str) and name else None
    mapping = to_chat(body, model.engine if model is not None else "")
    if mapping.notes:
        log.info("%s: %s", PATH, "; ".join(mapping.notes))
    chat = mapping.chat
    if isinstance(body, dict) and "hybridd" in body:
        chat["hybridd"] = body["hybridd"]
    chat_raw = json.dumps(chat).encode()
    inference = parse_inference("chat", chat_raw, request.headers)
    translator = ResponsesTranslator(f"resp_{uuid.uuid4().hex}", int(time.time()), inference.model, mapping)
    return await serve(request, inference, chat_raw, translator, native=(PATH, raw))
