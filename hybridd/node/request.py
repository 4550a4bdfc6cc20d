"""An OpenAI inference request, checked before it costs an engine load: endpoint, model, stream, hints. Pure."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from hybridd.errors import BadRequest
from hybridd.validate import json_kind as _kind
from hybridd.validate import shown as _shown

Endpoint = Literal["chat", "completion", "embedding"]
PATHS: dict[Endpoint, str] = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "embedding": "/v1/embeddings",
}


PLACEMENT_HINTS = ("auto", "local", "peer")
MAX_CTX_HINT = 1 << 31
# Deeper JSON is refused: nothing OpenAI defines nests near this, and the JSON codecs and templates that see a body
# later recurse once per level.
MAX_DEPTH = 100
PATH_SHOWN = 48  # characters of a field's path that an error message shows
_DECIMAL = re.compile(r"[0-9]{1,10}")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SPACE = re.compile(r"[ \t\n\r]*")


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

    @property
    def calls_tools(self) -> bool:
        """Whether the model may call the request's tools as it sees fit (tool_choice "auto", the default, or
        "required"): the engine must parse tool calls out of free output. One forced function, or "none", is not."""
        tools = self.body.get("tools")
        return bool(tools) and isinstance(tools, list) and self.body.get("tool_choice", "auto") in ("auto", "required")

    def engine_body(self) -> dict[str, Any]:
        """The body without hybridd's own hints."""
        return {k: v for k, v in self.body.items() if k != "hybridd"}


def check_llama_cpp_input(inference: InferenceRequest, model: str, logits_all: bool) -> None:
    """Refuse the valid OpenAI input that llama-cpp-python's server, as hybridd runs it, cannot take: token ids (it
    reads text), more than one prompt per completion, and log-probabilities unless the model's options keep
    logits_all. The engine would answer each with HTTP 500."""
    engine = f"model '{model}' runs on llama-cpp-python's server"
    body = inference.body
    if inference.endpoint != "chat":
        field = "prompt" if inference.endpoint == "completion" else "input"
        value = body.get(field)
        items = value if isinstance(value, list) else []
        if items and all(isinstance(item, int) for item in items):
            raise BadRequest(f"'{field}' is an array of token ids; {engine}, which takes text only", field)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                what = "a token id" if isinstance(item, int) else "an array of token ids"
                raise BadRequest(f"'{field}[{i}]' is {what}; {engine}, which takes text only", f"{field}[{i}]")
        if field == "prompt" and len(items) > 1:
            raise BadRequest(f"'prompt' holds {len(items)} prompts; {engine}, which takes one per request", field)
    # Completions ask for log-probabilities with any logprobs; chat with logprobs and top_logprobs together.
    asks = body.get("logprobs") is not None if inference.endpoint == "completion" else \
        bool(body.get("logprobs")) and body.get("top_logprobs") is not None
    if asks and not logits_all:
        raise BadRequest(f"'logprobs': {engine} without logits_all (set options = {{ logits_all = true }} in its "
                         "[[models]] entry; it costs memory and prompt speed)", "logprobs")


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
    field = "hybridd.min_ctx" if "min_ctx" in raw else "x-hybridd-min-ctx"
    min_ctx: Any = raw.get("min_ctx", headers.get("x-hybridd-min-ctx", 0))
    if isinstance(min_ctx, str) and _DECIMAL.fullmatch(min_ctx):  # ASCII digits only: int() takes '٣', not '²'
        min_ctx = int(min_ctx)
    if isinstance(min_ctx, bool) or not isinstance(min_ctx, int) or not 0 <= min_ctx <= MAX_CTX_HINT:
        raise BadRequest(f"'{field}' must be an integer from 0 to {MAX_CTX_HINT}, got {_shown(min_ctx)}", field)
    return Hints(placement, min_ctx)


def parse_inference(endpoint: Endpoint, raw: bytes, headers: Mapping[str, str] | None = None) -> InferenceRequest:
    """Decode and check raw; raise BadRequest saying exactly which field is wrong."""
    body = read_json(raw)
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
    _check_logit_bias(body.get("logit_bias"))
    hints = parse_hints(body, {k.lower(): v for k, v in (headers or {}).items()})
    return InferenceRequest(endpoint, model, stream, body, hints, "hybridd" in body)


def _check_logit_bias(bias: Any) -> None:
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise BadRequest(f"'logit_bias' must be an object of token ids and biases, got {_kind(bias)}", "logit_bias")
    for key, value in bias.items():
        if not _DECIMAL.fullmatch(key):
            raise BadRequest(f"'logit_bias' keys must be token ids (decimal integers), got {_shown(key)}",
                             "logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"'logit_bias.{key}' must be a number, got {_kind(value)}", f"logit_bias.{key}")


def read_json(raw: bytes) -> Any:
    """The JSON value in raw, checked for what would break whoever reads it next: nesting deeper than MAX_DEPTH,
    numbers too long for an int, text that is not Unicode (a lone surrogate from a \\ud800 escape)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    except (RecursionError, ValueError) as exc:
        # Valid JSON that Python's decoder refuses: nesting past its stack, or an integer of over 4300 digits.
        where = _short(_failing_member(raw))
        what = f"'{where}'" if where else "request body"
        if isinstance(exc, RecursionError):
            raise BadRequest(f"{what} nests arrays and objects deeper than {MAX_DEPTH} levels", where or None) \
                from exc
        raise BadRequest(f"{what} holds a number too long to read ({str(exc).split(';')[0]})", where or None) \
            from exc
    # Both walks are skipped, at C speed, for bodies that cannot hold what they look for.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        _check_depth(body)
    if _SURROGATE_ESCAPE.search(raw):
        _check_unicode(body)
    return body


def _check_depth(body: Any) -> None:
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"'{_short(path)}' nests arrays and objects deeper than {MAX_DEPTH} levels",
                             _short(path))
        if isinstance(value, dict):
            stack += [(item, _join(path, key), depth + 1) for key, item in value.items()
                      if isinstance(item, dict | list)]
        elif isinstance(value, list) and not set(map(type, value)).isdisjoint((dict, list)):
            stack += [(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)
                      if isinstance(item, dict | list)]


def _check_unicode(body: Any) -> None:
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found:
                raise BadRequest(f"'{path}' holds a lone surrogate (U+{ord(found.group()):04X}) at character "
                                 f"{found.start()}: text must be valid Unicode", path)
        elif isinstance(value, dict):
            for key, item in value.items():
                found = _SURROGATE.search(key)
                if found:
                    raise BadRequest(f"a key in '{path or 'the request body'}' holds a lone surrogate "
                                     f"(U+{ord(found.group()):04X}): text must be valid Unicode", path or None)
                stack.append((item, _join(path, key)))
        elif isinstance(value, list) and not set(map(type, value)).isdisjoint((str, dict, list)):
            stack += [(item, f"{path}[{i}]") for i, item in enumerate(value) if isinstance(item, str | dict | list)]


def _failing_member(raw: bytes) -> str:
    """The path of the member json cannot decode, found by decoding member after member and going into the one
    that fails ('' when raw is not UTF-8 or not an object or array)."""
    decoder = json.JSONDecoder()
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return ""
    path, pos = "", _skip_space(text, 0)
    while len(path) <= PATH_SHOWN and text[pos:pos + 1] in ("{", "["):
        in_object = text[pos] == "{"
        pos, index, failing = _skip_space(text, pos + 1), 0, ""
        while not failing and text[pos:pos + 1] not in ("}", "]", ""):
            member = f"{path}[{index}]"
            if in_object:
                key, pos = decoder.raw_decode(text, pos)
                member = _join(path, key)
                pos = _skip_space(text, _skip_space(text, pos) + 1)  # past the colon
            try:
                _, end = decoder.raw_decode(text, pos)
            except (RecursionError, ValueError):
                failing = member
                continue
            pos = _skip_space(text, end)
            pos = _skip_space(text, pos + 1) if text[pos:pos + 1] == "," else pos
            index += 1
        if not failing:
            break
        path = failing
    return path


def _skip_space(text: str, pos: int) -> int:
    match = _SPACE.match(text, pos)
    return match.end() if match else pos


def _short(path: str) -> str:
    """path, or its first parts and '...' when it is longer than PATH_SHOWN."""
    if len(path) <= PATH_SHOWN:
        return path
    cut = max(path.rfind("[", 1, PATH_SHOWN), path.rfind(".", 1, PATH_SHOWN))
    return path[:cut if cut > 0 else PATH_SHOWN] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


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
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if not isinstance(part, dict):
                raise BadRequest(f"'messages[{i}].content[{j}]' must be an object, got {_kind(part)}",
                                 f"messages[{i}].content[{j}]")
            for name in ("type", "text"):
                if name in part and not isinstance(part[name], str):
                    field = f"messages[{i}].content[{j}].{name}"
                    raise BadRequest(f"'{field}' must be a string, got {_kind(part[name])}", field)


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


