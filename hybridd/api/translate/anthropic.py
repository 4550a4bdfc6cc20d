"""Anthropic's Messages API as chat completions, and chat-completion answers back as messages (pure: no I/O).

Request (`to_chat`): `system` becomes a system message; each message's text blocks one chat message's text;
`tool_use` blocks an assistant's `tool_calls`; each `tool_result` block a `tool` message in its place; thinking
blocks from earlier turns are dropped (chat templates have no place for them); images and documents are refused.
Answer (`message_from_chat`, `MessagesTranslator`): `reasoning_content` becomes a thinking block, `content` a text
block, `tool_calls` tool_use blocks, in that order; streams as Anthropic's server-sent events."""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hybridd.errors import BadRequest, EngineFailed
from hybridd.validate import json_kind as _kind
from hybridd.validate import shown as _shown

BLOCK_TYPES = ("text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking")
TOOL_CHOICES = ("auto", "any", "tool", "none")
# Kept as the engine's text: what a chat template can render (many print a list of parts as its repr).
TEXT_JOIN = "\n"
FINISH_TO_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                  "content_filter": "refusal"}


def to_chat(body: Any, *, count_only: bool = False) -> dict[str, Any]:
    """The chat-completions body that a Messages request (or, with count_only, a count_tokens request, which has no
    max_tokens) maps to. Raises BadRequest naming the field for what Anthropic's API would refuse or hybridd
    cannot carry."""
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {_kind(body)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string" if model is None
                         else f"'model' must be a non-empty string, got {_kind(model)}", "model")
    chat: dict[str, Any] = {"model": model}
    max_tokens = body.get("max_tokens")
    if max_tokens is not None or not count_only:
        if max_tokens is None:
            raise BadRequest("'max_tokens' is required", "max_tokens")
        chat["max_tokens"] = _integer(max_tokens, "max_tokens", minimum=1)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array of message objects"
                         if messages is None or isinstance(messages, list)
                         else f"'messages' must be an array, got {_kind(messages)}", "messages")
    out: list[dict[str, Any]] = []
    system = _system(body.get("system"))
    if system is not None:
        out.append({"role": "system", "content": system})
    for i, message in enumerate(messages):
        out += _message(message, f"messages[{i}]")
    chat["messages"] = out
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
        chat.update(_tool_choice(body.get("tool_choice"), [t["function"]["name"] for t in tools]))
    elif body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], [])  # checked, though without tools there is nothing to choose
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest(f"'stop_sequences' must be an array of strings, got {_kind(stop)}", "stop_sequences")
        if stop:
            chat["stop"] = stop
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadRequest(f"'{name}' must be a number, got {_kind(value)}", name)
            chat[name] = value
    if body.get("top_k") is not None:
        chat["top_k"] = _integer(body["top_k"], "top_k", minimum=0)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be a boolean, got {_kind(stream)}", "stream")
    if stream:
        # Asked for, though llama-cpp-python's server ignores it: its streams carry no usage (see MessagesTranslator).
        chat.update(stream=True, stream_options={"include_usage": True})
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadRequest(f"'metadata' must be an object, got {_kind(metadata)}", "metadata")
    _thinking(body.get("thinking"))
    if "hybridd" in body:  # placement hints, checked as a chat request's are
        chat["hybridd"] = body["hybridd"]
    return chat


def _system(system: Any, where: str = "system") -> str | None:
    if system is None:
        return None
    if isinstance(system, str):
        return system or None
    if not isinstance(system, list):
        raise BadRequest(f"'{where}' must be a string or an array of text blocks, got {_kind(system)}", where)
    texts = []
    for i, block in enumerate(system):
        field = f"{where}[{i}]"
        _block_type(block, field, ("text",))
        texts.append(_text(block, field))
    return TEXT_JOIN.join(texts) or None


def _message(message: Any, field: str) -> list[dict[str, Any]]:
    """The chat messages one Anthropic message becomes, in order."""
    if not isinstance(message, dict):
        raise BadRequest(f"'{field}' must be an object, got {_kind(message)}", field)
    role = message.get("role")
    if role == "system":
        # Not in Anthropic's reference, but Claude Code sends its reminders so (e.g. the agent types available): a
        # system message where it stands, so the conversation before it stays the prefix an engine has cached.
        if message.get("content") is None:  # as a user or assistant message's: required
            raise BadRequest(f"'{field}.content' must be a string or an array of text blocks, got null",
                             f"{field}.content")
        text = _system(message["content"], f"{field}.content")
        return [{"role": "system", "content": text}] if text else []
    if role not in ("user", "assistant"):
        raise BadRequest(f"'{field}.role': unknown value {_shown(role)} (valid: user, assistant, system)",
                         f"{field}.role")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"'{field}.content' must be a string or an array of content blocks, got {_kind(content)}",
                         f"{field}.content")
    return _assistant(content, field) if role == "assistant" else _user(content, field)


def _user(content: list[Any], field: str) -> list[dict[str, Any]]:
    # Each tool_result becomes a tool message where it stands; text between them a user message.
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, block in enumerate(content):
        where = f"{field}.content[{j}]"
        kind = _block_type(block, where, ("text", "tool_result", "thinking", "redacted_thinking"), "user")
        if kind == "text":
            texts.append(_text(block, where))
        elif kind == "tool_result":
            if texts:
                out.append({"role": "user", "content": TEXT_JOIN.join(texts)})
                texts = []
            out.append(_tool_result(block, where))
    if texts or not out:
        out.append({"role": "user", "content": TEXT_JOIN.join(texts)})
    return out


def _assistant(content: list[Any], field: str) -> list[dict[str, Any]]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        where = f"{field}.content[{j}]"
        kind = _block_type(block, where, ("text", "tool_use", "thinking", "redacted_thinking"), "assistant")
        if kind == "text":
            texts.append(_text(block, where))
        elif kind == "tool_use":
            calls.append(_tool_use(block, where))
        # thinking from an earlier turn is dropped: chat templates render no reasoning, and its signature is not ours
    if not texts and not calls:
        return []
    # An empty string rather than null beside tool_calls: templates print a null content as "None".
    message: dict[str, Any] = {"role": "assistant", "content": TEXT_JOIN.join(texts)}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _block_type(block: Any, field: str, valid: Sequence[str], role: str | None = None) -> str:
    if not isinstance(block, dict):
        raise BadRequest(f"'{field}' must be a content block object, got {_kind(block)}", field)
    kind = block.get("type")
    if kind in ("image", "document") and kind not in valid:
        raise BadRequest(f"'{field}': {kind}s are not supported (hybridd's engines read text only)", field)
    if kind not in valid:
        if kind in BLOCK_TYPES and role is not None:
            raise BadRequest(f"'{field}.type': a {kind} block cannot be in a {role} message "
                             f"(valid there: {', '.join(valid)})", f"{field}.type")
        raise BadRequest(f"'{field}.type': unknown value {_shown(kind)} (valid: {', '.join(valid)})",
                         f"{field}.type")
    return str(kind)


def _text(block: dict[str, Any], field: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise BadRequest(f"'{field}.text' must be a string, got {_kind(text)}", f"{field}.text")
    return text


def _tool_use(block: dict[str, Any], field: str) -> dict[str, Any]:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
    for key, value in (("id", call_id), ("name", name)):
        if not isinstance(value, str) or not value:
            raise BadRequest(f"'{field}.{key}' must be a non-empty string, got {_kind(value)}", f"{field}.{key}")
    if not isinstance(arguments, dict):
        raise BadRequest(f"'{field}.input' must be an object, got {_kind(arguments)}", f"{field}.input")
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _tool_result(block: dict[str, Any], field: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise BadRequest(f"'{field}.tool_use_id' must be a non-empty string, got {_kind(call_id)}",
                         f"{field}.tool_use_id")
    content = block.get("content", "")
    if content is None:
        content = ""
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            where = f"{field}.content[{k}]"
            _block_type(part, where, ("text",))
            texts.append(_text(part, where))
        content = TEXT_JOIN.join(texts)
    elif not isinstance(content, str):
        raise BadRequest(f"'{field}.content' must be a string or an array of text blocks, got {_kind(content)}",
                         f"{field}.content")
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise BadRequest(f"'{field}.is_error' must be a boolean, got {_kind(is_error)}", f"{field}.is_error")
    # A chat tool message has no error flag: the model learns it from the text.
    return {"role": "tool", "tool_call_id": call_id, "content": f"Error: {content}" if is_error else content}


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequest(f"'tools' must be an array, got {_kind(tools)}", "tools")
    out = []
    for i, tool in enumerate(tools):
        field = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise BadRequest(f"'{field}' must be an object, got {_kind(tool)}", field)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise BadRequest(f"'{field}.type': {_shown(kind)} is a tool Anthropic's servers run, which hybridd "
                             "cannot (valid: custom, with an input_schema)", f"{field}.type")
        name, description, schema = tool.get("name"), tool.get("description"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"'{field}.name' must be a non-empty string, got {_kind(name)}", f"{field}.name")
        if description is not None and not isinstance(description, str):
            raise BadRequest(f"'{field}.description' must be a string, got {_kind(description)}",
                             f"{field}.description")
        if not isinstance(schema, dict):
            raise BadRequest(f"'{field}.input_schema' must be a JSON schema object, got {_kind(schema)}",
                             f"{field}.input_schema")
        function: dict[str, Any] = {"name": name, "parameters": schema}
        if description:
            function["description"] = description
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, names: list[str]) -> dict[str, Any]:
    """The chat fields for tool_choice. `any` over a single tool forces that tool: the same choice, and the one
    llama-cpp-python's server turns into tool calls (with `auto` it answers in plain text)."""
    if choice is None:
        return {}
    if not isinstance(choice, dict):
        raise BadRequest(f"'tool_choice' must be an object, got {_kind(choice)}", "tool_choice")
    kind = choice.get("type")
    if kind not in TOOL_CHOICES:
        raise BadRequest(f"'tool_choice.type': unknown value {_shown(kind)} (valid: {', '.join(TOOL_CHOICES)})",
                         "tool_choice.type")
    out: dict[str, Any] = {}
    parallel = choice.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest(f"'tool_choice.disable_parallel_tool_use' must be a boolean, got {_kind(parallel)}",
                         "tool_choice.disable_parallel_tool_use")
    if parallel and kind != "none":
        out["parallel_tool_calls"] = False
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"'tool_choice.name' must be a non-empty string, got {_kind(name)}", "tool_choice.name")
        if names and name not in names:
            raise BadRequest(f"'tool_choice.name': no tool is named {_shown(name)} (valid: {', '.join(names)})",
                             "tool_choice.name")
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif kind == "any":
        out["tool_choice"] = {"type": "function", "function": {"name": names[0]}} if len(names) == 1 \
            else "required"
    else:
        out["tool_choice"] = kind
    return out


def _thinking(thinking: Any) -> None:
    """Checked only: an OpenAI chat request has no thinking budget, and a model that reasons without being asked
    sends reasoning_content, which comes back as thinking blocks."""
    if thinking is None:
        return
    if not isinstance(thinking, dict):
        raise BadRequest(f"'thinking' must be an object, got {_kind(thinking)}", "thinking")
    kind = thinking.get("type")
    if kind not in ("enabled", "disabled", "adaptive"):
        raise BadRequest(f"'thinking.type': unknown value {_shown(kind)} (valid: enabled, disabled, adaptive)",
                         "thinking.type")
    if kind == "enabled":
        _integer(thinking.get("budget_tokens"), "thinking.budget_tokens", minimum=1)


def _integer(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{field}' must be an integer, got {_kind(value)}", field)
    if value < minimum:
        raise BadRequest(f"'{field}' must be >= {minimum}, got {value}", field)
    return value


# -- answers


def new_message_id() -> str:
    """An id in Anthropic's shape: msg_ and 24 characters."""
    return "msg_" + secrets.token_hex(12)


def new_tool_use_id() -> str:
    return "toolu_" + secrets.token_hex(12)


def stop_reason(finish: Any, used_tools: bool, matched: Any = None,
                stop_sequences: Sequence[str] = ()) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a chat finish_reason. A stop sequence is told apart from the
    model's own end only where the engine says which one matched (vLLM's `stop_reason`); llama.cpp's servers do
    not, so theirs read end_turn."""
    if used_tools and finish in (None, "stop"):
        return "tool_use", None
    if finish == "stop" and isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return (FINISH_TO_STOP.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"), None


def message_from_chat(chat: dict[str, Any], model: str, *, message_id: str | None = None, input_tokens: int = 0,
                      stop_sequences: Sequence[str] = ()) -> dict[str, Any]:
    """The Messages API answer for a complete chat completion; input_tokens stands in where it has no usage."""
    choices = chat.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            continue
        function = call["function"]
        call_id = call.get("id")
        content.append({"type": "tool_use", "id": call_id if isinstance(call_id, str) and call_id else
                        new_tool_use_id(), "name": str(function.get("name") or ""),
                        "input": _arguments(function.get("arguments"))})
    used_tools = any(block["type"] == "tool_use" for block in content)
    reason, sequence = stop_reason(choice.get("finish_reason"), used_tools, choice.get("stop_reason"),
                                   stop_sequences)
    usage = chat.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return {"id": message_id or new_message_id(), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": reason, "stop_sequence": sequence,
            "usage": {"input_tokens": _count(usage.get("prompt_tokens"), input_tokens),
                      "output_tokens": _count(usage.get("completion_tokens"), 0)}}


def _arguments(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments as the object tool_use input must be; arguments that are not a JSON object (a
    model's malformed call) give an empty one, which the client's schema check then reports to the model."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _count(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def sse(event: dict[str, Any]) -> bytes:
    """One event as Anthropic streams it: its type named on the event line too."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


@dataclass
class _ToolCall:
    """A streamed tool call: its block once its name is known, and arguments that came before that."""

    call_id: str = ""
    name: str = ""
    block: int | None = None
    pending: str = ""


class MessagesTranslator:
    """Chat-completion answers to Messages API answers (the Translator of hybridd/api/proxy.py), whole or streamed.

    A stream opens with message_start and a ping, then content blocks in order, each started, given deltas, and
    stopped before the next one starts; then message_delta (stop_reason, usage) and message_stop."""

    stream_content_type = "text/event-stream"

    def __init__(self, model: str, input_tokens: int = 0, message_id: str | None = None,
                 stop_sequences: Sequence[str] = ()) -> None:
        self.model = model
        self.prompt_tokens = input_tokens  # the prompt as placement counted it, for message_start (before any usage)
        self.message_id = message_id or new_message_id()
        self.stop_sequences = tuple(stop_sequences)
        self._started = False
        self._finished = False
        self._blocks = 0
        self._open: tuple[str, int] | None = None  # the open block: its kind ("text", "thinking", "tool") and index
        self._tools: dict[int, _ToolCall] = {}  # by the chat tool call's index
        self._finish: Any = None
        self._matched: Any = None
        self._usage: dict[str, Any] = {}
        self._pieces = 0  # deltas with content seen: llama.cpp's servers send one per token

    def whole(self, payload: bytes) -> bytes:
        try:
            chat = json.loads(payload)
        except ValueError as exc:
            raise EngineFailed(f"the engine's answer is not JSON: {exc}") from exc
        if not isinstance(chat, dict):
            raise EngineFailed(f"the engine's answer is not a chat completion object but {_kind(chat)}")
        message = message_from_chat(chat, self.model, message_id=self.message_id, input_tokens=self.prompt_tokens,
                                    stop_sequences=self.stop_sequences)
        return json.dumps(message, ensure_ascii=False).encode()

    def chunk(self, event: dict[str, Any]) -> bytes:
        if self._finished:
            return b""
        out = bytearray(self._start())
        usage = event.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # Anthropic answers with one message; hybridd never asks for n > 1
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            for kind, key in (("thinking", "reasoning_content"), ("text", "content")):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    out += self._text(kind, text)
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    out += self._tool_delta(call)
            if choice.get("finish_reason") is not None:
                self._finish, self._matched = choice["finish_reason"], choice.get("stop_reason")
        return bytes(out)

    def end(self) -> bytes:
        if self._finished:
            return b""
        out = bytearray(self._start())
        for index in sorted(self._tools):  # calls whose name never came: a block still carries their arguments
            call = self._tools[index]
            if call.block is None:
                out += self._start_tool(call)
        out += self._close()
        reason, sequence = stop_reason(self._finish, bool(self._tools), self._matched, self.stop_sequences)
        usage: dict[str, Any] = {"output_tokens": _count(self._usage.get("completion_tokens"), self._pieces)}
        if isinstance(self._usage.get("prompt_tokens"), int):
            usage["input_tokens"] = _count(self._usage["prompt_tokens"], self.prompt_tokens)
        out += sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": usage})
        out += sse({"type": "message_stop"})
        self._finished = True
        return bytes(out)

    def failed(self, message: str, code: str) -> bytes:
        if self._finished:
            return b""
        self._finished = True
        kind = "overloaded_error" if code == "shutting_down" else "api_error"
        return sse({"type": "error", "error": {"type": kind, "message": message}})

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        message: dict[str, Any] = {"id": self.message_id, "type": "message", "role": "assistant",
                                   "model": self.model, "content": [], "stop_reason": None, "stop_sequence": None,
                                   "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0}}
        return sse({"type": "message_start", "message": message}) + sse({"type": "ping"})

    def _open_block(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        index, self._blocks = self._blocks, self._blocks + 1
        self._open = (kind, index)
        return out + sse({"type": "content_block_start", "index": index, "content_block": block})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        index = self._open[1]
        self._open = None
        return sse({"type": "content_block_stop", "index": index})

    def _text(self, kind: str, text: str) -> bytes:
        out = b""
        if self._open is None or self._open[0] != kind:
            out = self._open_block(kind, {"type": "text", "text": ""} if kind == "text"
                                   else {"type": "thinking", "thinking": "", "signature": ""})
        assert self._open is not None
        self._pieces += 1
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta",
                                                                                "thinking": text}
        return out + sse({"type": "content_block_delta", "index": self._open[1], "delta": delta})

    def _tool_delta(self, piece: dict[str, Any]) -> bytes:
        index = piece.get("index", 0)
        index = index if isinstance(index, int) else 0
        call = self._tools.setdefault(index, _ToolCall())
        function = piece.get("function")
        function = function if isinstance(function, dict) else {}
        # OpenAI sends the id and name once; llama-cpp-python repeats them in every chunk: the first counts.
        if not call.call_id and isinstance(piece.get("id"), str):
            call.call_id = piece["id"]
        if not call.name and isinstance(function.get("name"), str):
            call.name = function["name"]
        arguments = function.get("arguments")
        arguments = arguments if isinstance(arguments, str) else ""
        if arguments:
            self._pieces += 1
        if call.block is None:
            call.pending += arguments
            return self._start_tool(call) if call.name else b""
        # Arguments for a call whose block is closed (calls streamed interleaved) still go to its own index.
        return self._json_delta(call.block, arguments)

    def _start_tool(self, call: _ToolCall) -> bytes:
        out = self._open_block("tool", {"type": "tool_use", "id": call.call_id or new_tool_use_id(),
                                        "name": call.name, "input": {}})
        assert self._open is not None
        call.block = self._open[1]
        pending, call.pending = call.pending, ""
        return out + self._json_delta(call.block, pending)

    @staticmethod
    def _json_delta(index: int, partial: str) -> bytes:
        if not partial:
            return b""
        return sse({"type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": partial}})


