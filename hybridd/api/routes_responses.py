"""OpenAI's Responses API (POST /v1/responses, what Codex CLI speaks), served as chat completions."""

from __future__ import annotations

import json
import logging
import time
import uuid

from aiohttp import web

from hybridd.api import keys
from hybridd.api.routes_openai import resolve_model, serve
from hybridd.api.translate.responses import LLAMA_CPP_PYTHON, ResponsesTranslator, to_chat
from hybridd.config import ModelEntry
from hybridd.node.request import InferenceRequest, parse_inference, read_json

log = logging.getLogger("hybridd.api")

PATH = "/v1/responses"


def add_routes(app: web.Application) -> None:
    """Register POST /v1/responses."""
    app.router.add_post(PATH, create_response)


async def prompt_tokens(request: web.Request, inference: InferenceRequest, model: ModelEntry | None) -> int:
    """The prompt's tokens where the engine's stream will not say (llama-cpp-python's server sends no usage);
    0 where it will, or for a whole answer, which always carries its usage."""
    if not inference.stream or model is None or model.engine != LLAMA_CPP_PYTHON:
        return 0
    return (await request.app[keys.ROUTER].size(inference, model)).tokens


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
    translator = ResponsesTranslator(f"resp_{uuid.uuid4().hex}", int(time.time()), inference.model, mapping,
                                     await prompt_tokens(request, inference, model))
    return await serve(request, inference, chat_raw, translator, native=(PATH, raw))
