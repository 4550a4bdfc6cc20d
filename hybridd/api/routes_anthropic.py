"""Anthropic's Messages API (what Claude Code speaks): each request served as the chat completion it maps to
(hybridd/api/translate/anthropic.py), placed like any chat request."""

from __future__ import annotations

import json

from aiohttp import web

from hybridd.api import keys
from hybridd.api.routes_openai import resolve_model, serve
from hybridd.api.translate.anthropic import MessagesTranslator, to_chat
from hybridd.node.request import parse_inference, read_json

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"


def add_routes(app: web.Application) -> None:
    """Register POST /v1/messages and /v1/messages/count_tokens. The anthropic-version and anthropic-beta headers,
    and x-api-key, are accepted and not read: one version is spoken."""
    app.router.add_post(MESSAGES, create_message)
    app.router.add_post(COUNT_TOKENS, count_tokens)


async def create_message(request: web.Request) -> web.StreamResponse:
    """A message, whole or streamed as Anthropic's server-sent events; a paired hybridd peer gets it as it came."""
    raw = await request.read()
    body = read_json(raw)
    chat = to_chat(body)
    chat_raw = json.dumps(chat).encode()
    inference = parse_inference("chat", chat_raw, request.headers)
    # message_start goes out before the engine's usage: it says what the prompt counts as placement counted it.
    translator = MessagesTranslator(chat["model"], stop_sequences=chat.get("stop", ()))
    return await serve(request, inference, chat_raw, translator, native=(MESSAGES, raw))


async def count_tokens(request: web.Request) -> web.Response:
    """{"input_tokens": N}: the prompt counted with the model's own tokenizer and chat template where its GGUF is
    here, else the byte estimate placement uses."""
    chat = to_chat(read_json(await request.read()), count_only=True)
    inference = parse_inference("chat", json.dumps(chat).encode(), request.headers)
    model = resolve_model(request, inference.model)
    size = await request.app[keys.ROUTER].size(inference, model)
    return web.json_response({"input_tokens": size.tokens})
