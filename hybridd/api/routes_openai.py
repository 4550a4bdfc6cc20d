"""OpenAI routes: list models, and chat / completions / embeddings passed through to the model's engine."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from hybridd.api import keys
from hybridd.api.proxy import forward
from hybridd.api.schema import PATHS, Endpoint, parse_inference
from hybridd.config import ModelEntry
from hybridd.engine.base import Engine
from hybridd.errors import BadRequest


def add_routes(app: web.Application) -> None:
    """Register the OpenAI-compatible routes."""
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post(PATHS["chat"], _inference("chat"))
    app.router.add_post(PATHS["completion"], _inference("completion"))
    app.router.add_post(PATHS["embedding"], _inference("embedding"))


def _model_object(request: web.Request, model: ModelEntry) -> dict[str, Any]:
    node = request.app[keys.NODE]
    slot = request.app[keys.POOL].slots.get(model.name)
    state = slot.state.value if slot else "remote"
    return {
        "id": model.name,
        "object": "model",
        "created": int(node.started_wall),
        "owned_by": "hybridd",
        "context_length": model.ctx,
        "aliases": list(model.aliases),
        "hybridd": {"placement": "local" if model.local else "peer", "engine": model.engine, "state": state,
                    "loaded": state == "ready"},
    }


async def list_models(request: web.Request) -> web.Response:
    """Every model this node serves, with its context length and whether it is loaded."""
    catalog = request.app[keys.NODE].catalog
    return web.json_response({"object": "list", "data": [_model_object(request, m) for m in catalog.models]})


async def get_model(request: web.Request) -> web.Response:
    """One model by id or alias."""
    model = request.app[keys.NODE].catalog.resolve(request.match_info["model"])
    return web.json_response(_model_object(request, model))


def _inference(endpoint: Endpoint) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        inference = parse_inference(endpoint, raw)
        model = request.app[keys.NODE].catalog.resolve(inference.model)
        if endpoint == "embedding" and model.managed and not model.embeddings:
            raise BadRequest(f"model '{model.name}' is not configured for embeddings (set embeddings = true in "
                             "its [[models]] entry; it costs generation speed)")
        body = raw
        if model.upstream_model:
            body = json.dumps({**inference.body, "model": model.upstream_model}).encode()
        async with request.app[keys.POOL].lease(model) as lease:
            headers = {"x-hybridd-placement": "local", "x-hybridd-reason": _reason(model, lease.engine,
                                                                                   lease.cold_start_s)}
            url = lease.engine.base_url + PATHS[endpoint]
            return await forward(request, request.app[keys.HTTP], url, body, inference.stream, headers,
                                 model.api_key)

    handle.__name__ = f"{endpoint}_handler"
    return handle


def _reason(model: ModelEntry, engine: Engine, cold_start_s: float | None) -> str:
    """One line a person understands: where the request runs and why."""
    if engine.kind == "external":
        return f"local: '{model.name}' is served by the external server at {engine.base_url}"
    loaded = f"loaded in {cold_start_s:.1f} s" if cold_start_s is not None else "already loaded"
    return (f"local: '{model.name}' runs in a {engine.kind} engine on this node "
            f"(ctx {model.ctx}, KV {model.type_k}/{model.type_v}; {loaded})")
