"""What llama-cpp-python's server lacks of the chat completions agents send, filled in honestly (pure).

    max_completion_tokens        -> max_tokens (it reads only the older name)
    response_format json_schema  -> {"type": "json_object", "schema": ...} (its grammar-constrained form)
    stream_options.include_usage -> a usage chunk before [DONE], counted here: the completion as the content,
                                    reasoning and tool-call deltas it streamed (one a token, empty ones for the
                                    bytes of a character not yet whole included; at most the request's budget),
                                    the prompt with the model's own tokenizer

Tool calls with tool_choice "auto" it cannot parse (it returns them as text); /v1/models says so per model
(`capabilities.tools`), and a llama-server engine parses them.
"""

from __future__ import annotations

import json
from typing import Any

from hybridd.errors import error_body


def for_llama_cpp_python(body: dict[str, Any]) -> dict[str, Any]:
    """The chat body as llama-cpp-python's server takes it."""
    out = dict(body)
    if "max_completion_tokens" in out:
        limit = out.pop("max_completion_tokens")
        out.setdefault("max_tokens", limit)
    fmt = out.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        schema = fmt["json_schema"].get("schema")
        out["response_format"] = {"type": "json_object", **({"schema": schema} if isinstance(schema, dict) else {})}
    return out


def wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class UsageFiller:
    """Passes a chat stream through and, when the engine sent no usage, adds OpenAI's usage chunk before [DONE]."""

    stream_content_type = "text/event-stream"

    def __init__(self, prompt_tokens: int, budget: int | None = None) -> None:
        self.prompt_tokens = prompt_tokens
        self.budget = budget
        self.completion_tokens = 0
        self.had_usage = False
        self.last: dict[str, Any] = {}

    def whole(self, payload: bytes) -> bytes:
        return payload

    def chunk(self, event: dict[str, Any]) -> bytes:
        if event.get("usage"):
            self.had_usage = True
        for choice in event.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and ("content" in delta or "reasoning_content" in delta
                                            or "tool_calls" in delta):
                self.completion_tokens += 1
        self.last = event
        return _event(event)

    def end(self) -> bytes:
        tail = b""
        if not self.had_usage:
            completion = min(self.completion_tokens, self.budget) if self.budget else self.completion_tokens
            usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                     "total_tokens": self.prompt_tokens + completion}
            tail = _event({"id": self.last.get("id", "chatcmpl-hybridd"), "object": "chat.completion.chunk",
                           "created": self.last.get("created", 0), "model": self.last.get("model", ""),
                           "choices": [], "usage": usage})
        return tail + b"data: [DONE]\n\n"

    def failed(self, message: str, code: str) -> bytes:
        return _event(error_body(message, "server_error", code))


def _event(value: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(value, separators=(",", ":")).encode() + b"\n\n"
