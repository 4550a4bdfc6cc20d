"""Ollama's API (/api/*, what Open WebUI and Continue's Ollama provider speak), served by hybridd's models.

Model management (pull, push, create, copy, delete) is not served: models come from hybridd's config."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from hybridd.api import keys
from hybridd.api.routes_openai import _peer_models, resolve_model, serve
from hybridd.api.translate.ollama import (
    Kind,
    OllamaMapping,
    OllamaTranslator,
    chat_request,
    embed_request,
    generate_request,
    timestamp,
)
from hybridd.config import ModelEntry
from hybridd.errors import BadRequest, ModelNotFound
from hybridd.node.request import parse_inference, read_json

# The Ollama version clients are told: they gate features (tools, structured outputs, /api/embed) on it.
OLLAMA_VERSION = "0.12.6"


def add_routes(app: web.Application) -> None:
    """Register Ollama's read routes and its inference routes."""
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", running)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/chat", _inference("chat", "/api/chat"))
    app.router.add_post("/api/generate", _inference("generate", "/api/generate"))
    app.router.add_post("/api/embed", _inference("embed", "/api/embed"))
    app.router.add_post("/api/embeddings", _inference("embeddings", "/api/embeddings"))


async def version(request: web.Request) -> web.Response:
    """The Ollama version hybridd answers as."""
    return web.json_response({"version": OLLAMA_VERSION})


def _resolve(request: web.Request, name: str) -> ModelEntry:
    """The model for an Ollama name; "name:latest" is name (Ollama's default tag)."""
    try:
        return resolve_model(request, name)
    except ModelNotFound:
        if name.endswith(":latest"):
            return resolve_model(request, name.removesuffix(":latest"))
        raise


def _models(request: web.Request) -> list[ModelEntry]:
    catalog = request.app[keys.NODE].catalog
    known = {m.name for m in catalog.models}
    return list(catalog.models) + [ModelEntry(name=n, engine="peer-only") for n in sorted(_peer_models(request))
                                   if n not in known]


def _file_facts(request: web.Request, model: ModelEntry) -> tuple[int, float]:
    """The model file's size and modification time; 0 and the node's start for a model without a local file."""
    try:
        stat = Path(model.path).stat() if model.path is not None else None
    except OSError:
        stat = None
    if stat is None:
        return 0, request.app[keys.NODE].started_wall
    return stat.st_size, stat.st_mtime


def _details(model: ModelEntry) -> dict[str, Any]:
    family = model.profile or ""
    return {"parent_model": "", "format": "gguf" if model.path is not None else "", "family": family,
            "families": [family] if family else None, "parameter_size": "", "quantization_level": model.quant or ""}


def _tag(request: web.Request, model: ModelEntry) -> dict[str, Any]:
    size, modified = _file_facts(request, model)
    # Not the file's sha256 (hashing gigabytes per listing is too slow): a digest of what identifies this version.
    digest = hashlib.sha256(f"{model.name}\0{model.path}\0{size}\0{modified}".encode()).hexdigest()
    return {"name": model.name, "model": model.name, "modified_at": timestamp(modified), "size": size,
            "digest": digest, "details": _details(model)}


async def tags(request: web.Request) -> web.Response:
    """Every model this node or its peers serve."""
    return web.json_response({"models": [_tag(request, m) for m in _models(request)]})


async def running(request: web.Request) -> web.Response:
    """The models loaded in a local engine now, with the context each runs with and when it would be unloaded."""
    pool = request.app[keys.POOL]
    now_wall, now = time.time(), time.monotonic()
    loaded = []
    for model in request.app[keys.NODE].catalog.models:
        for slot in pool.for_model(model.name):
            if not slot.live:
                continue
            idle_left = max(0.0, slot.run.idle_ttl_s - (now - slot.last_used)) if slot.last_used else \
                slot.run.idle_ttl_s
            tag = _tag(request, model)
            loaded.append({**tag, "expires_at": timestamp(now_wall + idle_left), "size_vram": tag["size"],
                           "context_length": slot.run.ctx})
    return web.json_response({"models": loaded})


async def show(request: web.Request) -> web.Response:
    """One model's details, context length and capabilities."""
    body = read_json(await request.read())
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    name = body.get("model", body.get("name"))
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' is required and must be a non-empty string", "model")
    model = _resolve(request, name)
    architecture = model.profile or "llama"
    capabilities = ["completion", "tools", "insert"] + (["embedding"] if model.embeddings else [])
    _, modified = _file_facts(request, model)
    return web.json_response({
        "modelfile": f"# served by hybridd\nFROM {model.path or model.name}\n", "parameters": "", "template": "",
        "details": _details(model), "modified_at": timestamp(modified), "capabilities": capabilities,
        "model_info": {"general.architecture": architecture, f"{architecture}.context_length": model.ctx},
    })


def _inference(kind: Kind, path: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = read_json(raw)
        name = body.get("model", body.get("name")) if isinstance(body, dict) else None
        model = _resolve(request, name) if isinstance(name, str) and name else None
        engine, ctx = (model.engine, model.ctx) if model is not None else ("", 0)
        mapping: OllamaMapping
        if kind == "chat":
            mapping = chat_request(body, engine, ctx)
        elif kind == "generate":
            mapping = generate_request(body, engine, ctx)
        else:
            mapping = embed_request(body, legacy=kind == "embeddings")
        assert model is not None  # the mappers refuse a body without a model name
        if mapping.load_only:
            loaded = OllamaTranslator(mapping.body["model"], kind, time.time).loaded()
            return web.Response(body=loaded, content_type="application/json")
        openai_body = dict(mapping.body)
        openai_body["model"] = model.name
        hints = body.get("hybridd") if isinstance(body, dict) else None
        if hints is not None:  # the client's own hints win over those num_ctx implies
            openai_body["hybridd"] = hints
        openai_raw = json.dumps(openai_body).encode()
        inference = parse_inference(mapping.endpoint, openai_raw, request.headers)
        translator = OllamaTranslator(mapping.body["model"], kind, time.time, budget=inference.max_tokens)
        return await serve(request, inference, openai_raw, translator, native=(path, raw))

    handle.__name__ = f"ollama_{kind}_handler"
    return handle
