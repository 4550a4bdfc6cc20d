"""Ollama's API (what Open WebUI and Continue speak) as OpenAI requests, and OpenAI answers back as Ollama's. Pure.

/api/chat maps to a chat completion; /api/generate to a chat completion of one user turn (Ollama applies the
model's template), or with `raw` or a `suffix` (fill-in-the-middle) to a completion; /api/embed and the older
/api/embeddings to embeddings. Streams are NDJSON: one object a line, the last with `done: true` and the counts."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from hybridd.errors import BadRequest
from hybridd.validate import json_kind as _kind
from hybridd.validate import shown as _shown

ROLES = ("system", "user", "assistant", "tool")
NUMBER_OPTIONS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty")
INT_OPTIONS = ("top_k", "seed")
LLAMA_CPP_PYTHON = "llama-cpp-python"
LLAMA_CPP_ENGINES = ("llama-cpp-python", "llama-server")
Kind = Literal["chat", "generate", "embed", "embeddings"]


@dataclass(frozen=True)
class OllamaMapping:
    """An Ollama request as the OpenAI request it maps to: the endpoint and its body."""

    endpoint: Literal["chat", "completion", "embedding"]
    body: dict[str, Any]
    load_only: bool = False  # nothing to generate: Ollama answers "loaded" (done_reason "load")


def chat_request(body: Any, engine: str, max_ctx: int) -> OllamaMapping:
    """The chat completion for an /api/chat body. `engine`: the kind that serves the model; `max_ctx`: the
    model's context (num_ctx asks for at most that much)."""
    body = _object(body)
    model = _model(body)
    messages_value = body.get("messages")
    if messages_value is None or messages_value == []:
        return OllamaMapping("chat", {"model": model}, load_only=True)
    if not isinstance(messages_value, list):
        raise BadRequest(f"'messages' must be an array, got {_kind(messages_value)}", "messages")
    messages = chat_messages(messages_value)
    chat: dict[str, Any] = {"model": model, "messages": messages, "stream": _stream(body)}
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise BadRequest("'tools' must be an array of tool objects", "tools")
        for i, tool in enumerate(tools):
            function = tool.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise BadRequest(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                 "\"parameters\": ...}}", f"tools[{i}]")
        if tools:
            chat["tools"] = tools  # Ollama's tools are OpenAI's: {type: function, function: {...}}
    chat.update(_options(body, engine, max_ctx))
    return OllamaMapping("chat", chat)


def chat_messages(value: list[Any]) -> list[dict[str, Any]]:
    """Chat-completion messages for Ollama's; a tool's answer is matched to the call it answers by name, else in
    order (Ollama's calls carry no ids)."""
    messages: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (call id, function name) of calls not yet answered
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"'{where}' must be an object, got {_kind(message)}", where)
        role = message.get("role")
        if role not in ROLES:
            raise BadRequest(f"'{where}.role' must be one of {', '.join(ROLES)}, got {_shown(role)}",
                             f"{where}.role")
        content = message.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"'{where}.content' must be a string, got {_kind(content)}", f"{where}.content")
        mapped: dict[str, Any] = {"role": role, "content": content}
        images = message.get("images")
        if images:
            if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
                raise BadRequest(f"'{where}.images' must be an array of base64 strings", f"{where}.images")
            mapped["content"] = [{"type": "text", "text": content}] + [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}} for image in images]
        calls = message.get("tool_calls")
        if calls and role == "assistant":
            mapped["tool_calls"] = [_call(call, f"{where}.tool_calls[{j}]", f"call_{i}_{j}")
                                    for j, call in enumerate(calls if isinstance(calls, list) else [calls])]
            pending += [(c["id"], c["function"]["name"]) for c in mapped["tool_calls"]]
            if not content:
                mapped["content"] = None
        if role == "tool":
            call_id = message.get("tool_call_id")
            name = message.get("tool_name") or message.get("name")
            if not isinstance(call_id, str):
                match = next((p for p in pending if p[1] == name), pending[0] if pending else None)
                call_id = match[0] if match else f"call_{i}"
            pending = [p for p in pending if p[0] != call_id]
            mapped["tool_call_id"] = call_id
        messages.append(mapped)
    return messages


def _call(call: Any, where: str, default_id: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest(f"'{where}.function.name' must be a string", f"{where}.function.name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments)
    elif not isinstance(arguments, str):
        raise BadRequest(f"'{where}.function.arguments' must be an object, got {_kind(arguments)}",
                         f"{where}.function.arguments")
    call_id = call.get("id") if isinstance(call.get("id"), str) else default_id
    return {"id": call_id, "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def generate_request(body: Any, engine: str, max_ctx: int) -> OllamaMapping:
    """The OpenAI request for an /api/generate body: a completion with `raw` or a `suffix`, else a chat turn."""
    body = _object(body)
    model = _model(body)
    prompt = body.get("prompt", "")
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise BadRequest(f"'prompt' must be a string, got {_kind(prompt)}", "prompt")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise BadRequest(f"'suffix' must be a string, got {_kind(suffix)}", "suffix")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise BadRequest(f"'system' must be a string, got {_kind(system)}", "system")
    raw = body.get("raw", False)
    if not isinstance(raw, bool):
        raise BadRequest(f"'raw' must be a boolean, got {_kind(raw)}", "raw")
    if not prompt and not suffix:
        return OllamaMapping("completion", {"model": model}, load_only=True)
    options = _options(body, engine, max_ctx)
    images = body.get("images")
    if raw or suffix:
        if images:
            raise BadRequest("'images' cannot go with 'raw' or 'suffix': a raw completion takes text only", "images")
        completion: dict[str, Any] = {"model": model, "prompt": prompt, "stream": _stream(body)}
        if suffix:
            completion["suffix"] = suffix
        return OllamaMapping("completion", {**completion, **options})
    turn: dict[str, Any] = {"role": "user", "content": prompt}
    if images:
        turn["images"] = images
    messages = chat_messages(([{"role": "system", "content": system}] if system else []) + [turn])
    return OllamaMapping("chat", {"model": model, "messages": messages, "stream": _stream(body), **options})


def embed_request(body: Any, legacy: bool = False) -> OllamaMapping:
    """The embeddings request for /api/embed (`input`: a string or strings) or /api/embeddings (`prompt`)."""
    body = _object(body)
    model = _model(body)
    field = "prompt" if legacy else "input"
    value = body.get(field)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise BadRequest(f"'{field}' must be a string{'' if legacy else ' or a non-empty array of strings'}",
                         field)
    request: dict[str, Any] = {"model": model, "input": value}
    if isinstance(body.get("dimensions"), int) and not isinstance(body.get("dimensions"), bool):
        request["dimensions"] = body["dimensions"]
    return OllamaMapping("embedding", request)


def _options(body: dict[str, Any], engine: str, max_ctx: int) -> dict[str, Any]:
    """Sampling and length settings from Ollama's `options` and `format`, as chat-completion fields. Options that
    set how Ollama loads a model (num_gpu, num_thread, ...) are hybridd's config's business and are ignored."""
    out: dict[str, Any] = {}
    options = body.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise BadRequest(f"'options' must be an object, got {_kind(options)}", "options")
    for name in NUMBER_OPTIONS:
        value = options.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadRequest(f"'options.{name}' must be a number, got {_kind(value)}", f"options.{name}")
            out[name] = value
    for name in (*INT_OPTIONS, "num_predict", "num_ctx"):
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise BadRequest(f"'options.{name}' must be an integer, got {_kind(value)}", f"options.{name}")
    out.update({name: options[name] for name in INT_OPTIONS if options.get(name) is not None})
    if isinstance(options.get("num_predict"), int) and options["num_predict"] > 0:
        out["max_tokens"] = options["num_predict"]  # -1 (no limit) and -2 (fill the context): no max_tokens
    repeat_penalty = options.get("repeat_penalty")
    if engine in LLAMA_CPP_ENGINES and isinstance(repeat_penalty, int | float) \
            and not isinstance(repeat_penalty, bool):
        out["repeat_penalty"] = repeat_penalty  # llama.cpp's servers take it; OpenAI's API has none
    stop = options.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("'options.stop' must be an array of strings", "options.stop")
        if stop:
            out["stop"] = stop
    num_ctx = options.get("num_ctx")
    if isinstance(num_ctx, int) and num_ctx > 0:
        # Ollama loads the model with num_ctx; hybridd places it on an engine with at least that much, up to the
        # context the model is configured with.
        out["hybridd"] = {"min_ctx": min(num_ctx, max_ctx)}
    if _stream(body) and engine != LLAMA_CPP_PYTHON:
        out["stream_options"] = {"include_usage": True}  # llama-cpp-python's server has no such option
    response_format = _format(body.get("format"), engine == LLAMA_CPP_PYTHON)
    if response_format is not None:
        out["response_format"] = response_format
    return out


def _format(value: Any, llama_cpp_python: bool) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        if llama_cpp_python:  # its server refuses json_schema; it constrains json_object to a schema
            return {"type": "json_object", "schema": value}
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": value}}
    raise BadRequest(f"'format' must be \"json\" or a JSON schema object, got {_shown(value)}", "format")


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {_kind(body)}")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model", body.get("name"))
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string", "model")
    return model


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", True)  # Ollama streams unless told not to
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be a boolean, got {_kind(stream)}", "stream")
    return stream


# --- answers -------------------------------------------------------------------------------------------------


def timestamp(wall_s: float) -> str:
    """Ollama's created_at: RFC 3339 in UTC."""
    return datetime.fromtimestamp(wall_s, UTC).isoformat().replace("+00:00", "Z")


def _done_reason(finish_reason: str | None) -> str:
    return "length" if finish_reason == "length" else "stop"  # a tool call ends with "stop" in Ollama


def _arguments(text: str) -> Any:
    """A call's arguments as the object Ollama sends; text that is not a JSON object is kept under "arguments"."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {"arguments": text}
    return value if isinstance(value, dict) else {"arguments": value}


def _ollama_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**({"id": call["id"]} if call.get("id") else {}),
             "function": {"index": i, "name": call.get("name", ""), "arguments": _arguments(call.get("arguments", ""))}}
            for i, call in enumerate(calls)]


class OllamaTranslator:
    """An engine's OpenAI answer as Ollama's: whole, or streamed as NDJSON (Translator). `clock` gives wall
    seconds: created_at and the durations come from it."""

    stream_content_type = "application/x-ndjson"

    def __init__(self, model: str, kind: Kind, clock: Callable[[], float], prompt_tokens: int = 0,
                 budget: int | None = None) -> None:
        self.model, self.kind, self.clock = model, kind, clock
        self.budget = budget  # max_tokens: the streamed tokens are counted up to it
        self.prompt_tokens = prompt_tokens  # the prompt's count when the stream sends no usage
        self.started = clock()
        self._first: float | None = None
        self._calls: dict[int, dict[str, Any]] = {}
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._deltas = 0
        self._finished = False

    def _head(self, now: float) -> dict[str, Any]:
        return {"model": self.model, "created_at": timestamp(now)}

    def _counts(self, now: float, usage: dict[str, Any] | None, first: float | None) -> dict[str, Any]:
        first = self.started if first is None else first
        usage = usage or {}
        return {"total_duration": int((now - self.started) * 1e9), "load_duration": 0,
                "prompt_eval_count": int(usage.get("prompt_tokens") or self.prompt_tokens),
                "prompt_eval_duration": int((first - self.started) * 1e9),
                # without a usage chunk (llama-cpp-python streams none) the deltas count the tokens: one a token
                "eval_count": int(usage.get("completion_tokens") or
                                  (min(self._deltas, self.budget) if self.budget else self._deltas)),
                "eval_duration": int((now - first) * 1e9)}

    def _message(self, content: str, thinking: str | None = None,
                 calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if self.kind == "generate":
            out: dict[str, Any] = {"response": content}
            if thinking:
                out["thinking"] = thinking
            return out
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = _ollama_calls(calls)
        return {"message": message}

    def loaded(self) -> bytes:
        """The answer to a request with nothing to generate (Ollama's way to load a model)."""
        now = self.clock()
        return json.dumps({**self._head(now), **self._message(""), "done": True, "done_reason": "load"}).encode()

    def whole(self, payload: bytes) -> bytes:
        try:
            answer = json.loads(payload)
        except ValueError:
            return payload
        if not isinstance(answer, dict):
            return payload
        now = self.clock()
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else None
        if self.kind in ("embed", "embeddings"):
            data = sorted((d for d in answer.get("data") or [] if isinstance(d, dict)),
                          key=lambda d: d.get("index", 0))
            vectors = [d.get("embedding") for d in data]
            if self.kind == "embeddings":
                return json.dumps({"embedding": vectors[0] if vectors else []}).encode()
            counts = self._counts(now, usage, now)
            return json.dumps({"model": self.model, "embeddings": vectors,
                               "total_duration": counts["total_duration"], "load_duration": 0,
                               "prompt_eval_count": counts["prompt_eval_count"]}).encode()
        try:
            choice = answer["choices"][0]
        except (KeyError, IndexError, TypeError):
            return payload
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        assert isinstance(message, dict)
        content = message.get("content") if "message" in choice else choice.get("text")
        calls = [{"id": c.get("id"), "name": (c.get("function") or {}).get("name", ""),
                  "arguments": (c.get("function") or {}).get("arguments", "")}
                 for c in message.get("tool_calls") or [] if isinstance(c, dict)]
        self._deltas = int((usage or {}).get("completion_tokens") or 0)
        reply = {**self._head(now), **self._message(content or "", message.get("reasoning_content"), calls),
                 "done": True, "done_reason": _done_reason(choice.get("finish_reason")),
                 **self._counts(now, usage, self.started)}
        return json.dumps(reply).encode()

    def chunk(self, event: dict[str, Any]) -> bytes:
        now = self.clock()
        if self._first is None:
            self._first = now
        if isinstance(event.get("usage"), dict):
            self._usage = event["usage"]
        choices = event.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        if choice.get("finish_reason"):
            self._finish_reason = str(choice["finish_reason"])
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        assert isinstance(delta, dict)
        text = delta.get("content") if "delta" in choice else choice.get("text")
        thinking = delta.get("reasoning_content")
        calls = delta.get("tool_calls")
        # One delta a token (llama.cpp's servers), an empty one for the bytes of a character not yet whole too;
        # a completion's last chunk carries the finish reason and no token.
        self._deltas += (text is not None and not (choice.get("finish_reason") and not text)) or \
            thinking is not None or calls is not None
        for call in calls if isinstance(calls, list) else []:
            if isinstance(call, dict):
                slot = self._calls.setdefault(call.get("index", len(self._calls)), {"name": "", "arguments": ""})
                function = call.get("function") if isinstance(call.get("function"), dict) else {}
                assert isinstance(function, dict)
                if call.get("id"):
                    slot["id"] = call["id"]
                slot["name"] += function.get("name") or ""
                slot["arguments"] += function.get("arguments") or ""
        if not (isinstance(text, str) and text) and not (isinstance(thinking, str) and thinking):
            return b""
        line = {**self._head(now), **self._message(text if isinstance(text, str) else "",
                                                   thinking if isinstance(thinking, str) else None),
                "done": False}
        return json.dumps(line).encode() + b"\n"

    def end(self) -> bytes:
        if self._finished:
            return b""
        self._finished = True
        now = self.clock()
        out = b""
        if self._calls:  # Ollama sends a call whole, arguments as an object, in a line of its own
            calls = [self._calls[k] for k in sorted(self._calls)]
            out += json.dumps({**self._head(now), **self._message("", None, calls), "done": False}).encode() + b"\n"
        final = {**self._head(now), **self._message(""), "done": True,
                 "done_reason": _done_reason(self._finish_reason), **self._counts(now, self._usage, self._first)}
        return out + json.dumps(final).encode() + b"\n"

    def failed(self, message: str, code: str) -> bytes:
        if self._finished:
            return b""
        self._finished = True
        return json.dumps({"error": message}).encode() + b"\n"


