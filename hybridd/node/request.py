"""An OpenAI inference request, checked before it costs an engine load: endpoint, model, stream, hints. Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from hybridd.errors import BadRequest

Endpoint = Literal["chat", "completion", "embedding"]
PATHS: dict[Endpoint, str] = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "embedding": "/v1/embeddings",
}


PLACEMENT_HINTS = ("auto", "local", "peer")


@dataclass(frozen=True)
class Hints:
    """What the client asked of placement: where (auto, local, peer) and a context floor."""

    placement: str = "auto"
    min_ctx: int = 0


@dataclass(frozen=True)
class InferenceRequest:
    """A validated inference request: which endpoint, which model, streamed or not, and its JSON body."""

    endpoint: Endpoint
    model: str
    stream: bool
    body: dict[str, Any]
    hints: Hints = Hints()
    had_hints: bool = False  # the body carried a `hybridd` object, which engines must not see

    @property
    def max_tokens(self) -> int | None:
        """The completion budget the client set, if any."""
        value = self.body.get("max_completion_tokens") or self.body.get("max_tokens")
        return int(value) if value else None

    def engine_body(self) -> dict[str, Any]:
        """The body without hybridd's own hints."""
        return {k: v for k, v in self.body.items() if k != "hybridd"}


def parse_hints(body: Mapping[str, Any], headers: Mapping[str, str]) -> Hints:
    """Hints from the body's `hybridd` object (OpenAI clients send it via extra_body) or x-hybridd-* headers."""
    raw = body.get("hybridd", {})
    if not isinstance(raw, dict):
        raise BadRequest(f"'hybridd' must be an object, got {_kind(raw)}")
    unknown = sorted(set(raw) - {"placement", "min_ctx"})
    if unknown:
        raise BadRequest(f"'hybridd.{unknown[0]}' is not a hint (valid: min_ctx, placement)")
    placement = raw.get("placement", headers.get("x-hybridd-placement", "auto"))
    if placement not in PLACEMENT_HINTS:
        raise BadRequest(f"placement hint must be one of {', '.join(PLACEMENT_HINTS)}, got {placement!r}")
    min_ctx: Any = raw.get("min_ctx", headers.get("x-hybridd-min-ctx", 0))
    if isinstance(min_ctx, str) and min_ctx.isdigit():
        min_ctx = int(min_ctx)
    if isinstance(min_ctx, bool) or not isinstance(min_ctx, int) or min_ctx < 0:
        raise BadRequest(f"min_ctx hint must be a non-negative integer, got {min_ctx!r}")
    return Hints(placement, min_ctx)


def parse_inference(endpoint: Endpoint, raw: bytes, headers: Mapping[str, str] | None = None) -> InferenceRequest:
    """Decode and check raw; raise BadRequest saying exactly which field is wrong."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {_kind(body)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string" if model is None
                         else f"'model' must be a non-empty string, got {_kind(model)}")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be a boolean, got {_kind(stream)}")
    _CHECKS[endpoint](body)
    if endpoint == "embedding" and stream:
        raise BadRequest("'stream' is not supported for embeddings")
    for name in ("max_tokens", "max_completion_tokens", "n", "top_k", "seed"):
        _optional_int(body, name, minimum=1 if name in ("max_tokens", "max_completion_tokens", "n") else None)
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise BadRequest(f"'{name}' must be a number, got {_kind(value)}")
    hints = parse_hints(body, {k.lower(): v for k, v in (headers or {}).items()})
    return InferenceRequest(endpoint, model, stream, body, hints, "hybridd" in body)


def _check_chat(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array of message objects"
                         if messages is None or isinstance(messages, list)
                         else f"'messages' must be an array, got {_kind(messages)}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"'messages[{i}]' must be an object, got {_kind(message)}")
        if not isinstance(message.get("role"), str):
            raise BadRequest(f"'messages[{i}].role' must be a string")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise BadRequest(f"'messages[{i}].content' must be a string or an array of parts, got {_kind(content)}")


def _check_completion(body: dict[str, Any]) -> None:
    prompt = body.get("prompt")
    if not _text_or_list(prompt):
        raise BadRequest(f"'prompt' must be a string or an array of strings or token ids, got {_kind(prompt)}")


def _check_embedding(body: dict[str, Any]) -> None:
    value = body.get("input")
    if not _text_or_list(value) or value == []:
        raise BadRequest(f"'input' must be a string or a non-empty array, got {_kind(value)}")


def _text_or_list(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(
        isinstance(item, str) or (isinstance(item, int) and not isinstance(item, bool))
        or (isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item))
        for item in value
    )


def _optional_int(body: dict[str, Any], name: str, minimum: int | None) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{name}' must be an integer, got {_kind(value)}")
    if minimum is not None and value < minimum:
        raise BadRequest(f"'{name}' must be >= {minimum}, got {value}")


_CHECKS = {"chat": _check_chat, "completion": _check_completion, "embedding": _check_embedding}


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
