"""OpenAI routes: list models, and chat / completions / embeddings passed through to the model's engine."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

from aiohttp import web

from hybridd.api import keys
from hybridd.api.metrics import MODEL, OBSERVED
from hybridd.api.proxy import Translator, forward
from hybridd.api.translate.openai_fill import UsageFiller, for_llama_cpp_python, wants_usage
from hybridd.config import ModelEntry
from hybridd.errors import BadRequest, Conflict, ModelNotFound, UpstreamUnreachable
from hybridd.node.request import PATHS, Endpoint, InferenceRequest, check_llama_cpp_input, parse_inference
from hybridd.node.router import Answer, Route

# The other APIs a llama-server engine would serve itself (tools/server/server.cpp has /v1/messages and
# /v1/responses) and is given as chat completions instead: the llama.cpp that llama-cpp-python 0.3.36 vendors drops
# the message_start event of about one Messages stream in ten (measured here on the tiny model), which the
# Anthropic SDK cannot read. Its chat stream is sound, and the translation is hybridd's own.
LLAMA_SERVER_NATIVE: tuple[str, ...] = ()


def add_routes(app: web.Application) -> None:
    """Register the OpenAI-compatible routes."""
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post(PATHS["chat"], _inference("chat"))
    app.router.add_post(PATHS["completion"], _inference("completion"))
    app.router.add_post(PATHS["embedding"], _inference("embedding"))


def capabilities(model: ModelEntry) -> dict[str, Any] | None:
    """What agents can count on from the engine that serves the model here; None where hybridd cannot tell (an
    external server, a peer's model)."""
    if model.engine == "llama-server":  # --jinja: each template's tool calls and reasoning are parsed
        return {"tools": True, "tool_choice_auto": model.parses_tools, "json_schema": True, "reasoning": True,
                "stream_usage": True, "parallel_slots": model.slots}
    if model.engine == "llama-cpp-python":  # tool calls only when one function is forced (see translate/)
        return {"tools": True, "tool_choice_auto": model.parses_tools, "json_schema": True, "reasoning": False,
                "stream_usage": True, "parallel_slots": 1}
    return None


def _model_object(request: web.Request, model: ModelEntry, peers: dict[str, list[str]],
                  trainers: dict[str, list[str]] | None = None) -> dict[str, Any]:
    node = request.app[keys.NODE]
    slots = request.app[keys.POOL].for_model(model.name)
    state = next((s.state.value for s in slots if s.live), slots[0].state.value if slots else "stopped")
    if not model.local:
        state = "remote"
    where = (["local"] if model.local else []) + [f"peer:{p}" for p in peers.get(model.name, [])]
    trainable = (["local"] if model.train_path is not None else []) + [
        f"peer:{p}" for p in (trainers or {}).get(model.name, [])]
    return {
        "id": model.name,
        "object": "model",
        "created": int(node.started_wall),
        "owned_by": "hybridd",
        "context_length": model.ctx,
        "aliases": list(model.aliases),
        "hybridd": {"placement": "local" if model.local else "peer", "runs_on": where, "engine": model.engine,
                    "state": state, "loaded": state == "ready", "trainable_on": trainable,
                    "capabilities": capabilities(model)},
    }


def _peer_models(request: web.Request) -> dict[str, list[str]]:
    """Model id -> the peers that serve it now."""
    served: dict[str, list[str]] = {}
    for name, target in request.app[keys.ROUTER].peer_targets().items():
        for model in sorted(target.state.models):
            served.setdefault(model, []).append(name)
    return served


def resolve_model(request: web.Request, name: str) -> ModelEntry:
    """The catalog's entry for name, or one for a model only a linked peer serves."""
    try:
        return request.app[keys.NODE].catalog.resolve(name)
    except ModelNotFound:
        if name in _peer_models(request):
            return ModelEntry(name=name, engine="peer-only")
        raise


async def list_models(request: web.Request) -> web.Response:
    """Every model this node or its peers serve, with context length, where each runs, and loaded state."""
    catalog = request.app[keys.NODE].catalog
    peers, trainers = _peer_models(request), _peer_trainers(request)
    data = [_model_object(request, m, peers, trainers) for m in catalog.models]
    # Each alias is listed as a model of its own, so a client that picks from the list (or filters it by a
    # prefix it insists on) finds the name it wants; `hybridd.alias_of` says which model answers.
    for model in catalog.models:
        for alias in model.aliases:
            data.append({**_model_object(request, model, peers, trainers), "id": alias})
            data[-1]["hybridd"] = {**data[-1]["hybridd"], "alias_of": model.name}
    known = {m.name for m in catalog.models}
    data += [_model_object(request, ModelEntry(name=name, engine="peer-only"), peers, trainers)
             for name in sorted(peers) if name not in known]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """One model by id or alias."""
    model = resolve_model(request, request.match_info["model"])
    return web.json_response(_model_object(request, model, _peer_models(request), _peer_trainers(request)))


def _inference(endpoint: Endpoint) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        inference = parse_inference(endpoint, raw, request.headers)
        return await serve(request, inference, raw)

    handle.__name__ = f"{endpoint}_handler"
    return handle


async def serve(request: web.Request, inference: InferenceRequest, raw: bytes,
                translator: Translator | None = None, native: tuple[str, bytes] | None = None) -> web.StreamResponse:
    """Place `inference` and answer it. Another API's request comes here as the chat completion it maps to, with
    the `translator` of the answer and `native`, the request as it came (its path and body): a peer running hybridd
    gets that and translates itself; an engine gets the chat completion."""
    model = resolve_model(request, inference.model)
    request[MODEL] = model.name  # a model this node knows: a bounded label for /metrics
    if model.adapter_of is not None:  # a fine-tune served by its base's llama-server, its adapter named per request
        model, inference = await _on_base_engine(request, model, inference)
    if inference.endpoint == "embedding" and model.managed and not model.embeddings:
        raise BadRequest(f"model '{model.name}' is not configured for embeddings (set embeddings = true in "
                         "its [[models]] entry; it costs generation speed)")
    if model.engine == "llama-cpp-python":  # what its server would fail on, refused as the client's mistake
        check_llama_cpp_input(inference, model.name, str(model.options.get("logits_all")).lower() == "true")
    router = request.app[keys.ROUTER]
    excluded: frozenset[str] = frozenset()
    while True:
        try:
            return await _serve(request, raw, inference, model, excluded, translator, native)
        except UpstreamUnreachable as exc:
            peer = exc.peer
            if peer is None or peer in excluded:
                raise
            # Nothing reached the client yet: one retry on the next-best option, without that peer.
            router.peer_failed(peer, exc.message)
            excluded = excluded | {peer}


async def _on_base_engine(request: web.Request, tuned: ModelEntry,
                          inference: InferenceRequest) -> tuple[ModelEntry, InferenceRequest]:
    """The base model's entry, and the request with its adapter applied (llama-server's per-request `lora`: the
    adapters not named run at scale 0). A base engine started before this adapter was registered is reloaded."""
    base = request.app[keys.NODE].catalog.resolve(tuned.adapter_of or "")
    if tuned.lora_path not in base.adapters:
        raise Conflict(f"model '{tuned.name}': its adapter is not registered with '{base.name}'")
    pool = request.app[keys.POOL]
    for slot in pool.for_model(base.name):
        if slot.engine is not None and tuned.lora_path not in slot.run.adapters:
            await pool.wait_idle(slot.key)  # its requests finish on the adapters it has
            await pool.unload(slot.key, f"reloading with the adapter of {tuned.name}", "reload")
    body = {**inference.body, "lora": [{"id": base.adapters.index(tuned.lora_path), "scale": 1.0}]}
    # had_hints: the body differs from what the client sent, so it is sent as rebuilt, never as the raw bytes
    return base, replace(inference, body=body, had_hints=True)


async def _serve(request: web.Request, raw: bytes, inference: InferenceRequest, model: ModelEntry,
                 excluded: frozenset[str], translator: Translator | None,
                 native: tuple[str, bytes] | None) -> web.StreamResponse:
    """Route once and forward; an unreachable peer's error names the peer so the caller can retry elsewhere."""

    async def send(route: Route) -> Answer[web.StreamResponse]:
        # A forwarded request is served where it lands: the peer must not forward it again.
        upstream_headers = {}
        if route.forwarded:
            upstream_headers = {"x-hybridd-forwarded": "1", "x-hybridd-placement": "local",
                                "x-hybridd-min-ctx": str(inference.hints.min_ctx)}
        # A paired hybridd speaks every API hybridd serves, a llama-server engine Messages and Responses: they get
        # the request as it came.
        speaks = route.speaks_hybridd or (not route.forwarded and model.engine == "llama-server")
        if native is not None and speaks and (route.speaks_hybridd or native[0] in LLAMA_SERVER_NATIVE):
            native_path, native_body = native
            return await forward(request.app[keys.HTTP], route, request, native_path, native_body,
                                 inference.stream, upstream_headers, done_marker=native_path.startswith(
                                     ("/v1/chat/", "/v1/completions", "/v1/embeddings")))
        body = inference.engine_body()
        if route.max_tokens is not None:  # capped to what the model's context holds beside the prompt
            names = [key for key in ("max_tokens", "max_completion_tokens") if key in body] or ["max_tokens"]
            body.update(dict.fromkeys(names, route.max_tokens))
        if model.upstream_model and not route.forwarded:
            body["model"] = model.upstream_model
        through = translator
        if through is not None and route.prompt_tokens is not None:
            through.prompt_tokens = route.prompt_tokens
        if not route.forwarded and model.engine == "llama-cpp-python" and inference.endpoint == "chat":
            body = for_llama_cpp_python(body)
            if inference.stream and through is None and wants_usage(body):
                through = UsageFiller(route.prompt_tokens or 0, inference.max_tokens)  # counted for placement
        payload = json.dumps(body).encode() if body != inference.body or inference.had_hints else raw
        return await forward(request.app[keys.HTTP], route, request, PATHS[inference.endpoint], payload,
                             inference.stream, upstream_headers, through)

    answer = await request.app[keys.ROUTER].serve(inference, model, send, excluded)
    request[OBSERVED] = answer.observation  # for /metrics: tokens, time to first token
    if answer.cancelled:
        raise asyncio.CancelledError
    return answer.response


def _peer_trainers(request: web.Request) -> dict[str, list[str]]:
    """Model id -> the peers that can fine-tune it (they have its checkpoint)."""
    trainers: dict[str, list[str]] = {}
    for name, target in request.app[keys.ROUTER].peer_targets().items():
        for model in sorted(target.state.trainable):
            trainers.setdefault(model, []).append(name)
    return trainers
