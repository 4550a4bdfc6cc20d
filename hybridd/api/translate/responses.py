"""OpenAI's Responses API (what Codex CLI speaks) as chat completions, and chat answers back as responses. Pure.

hybridd stores nothing: every request carries its whole conversation (Codex sends `store: false`), so
`previous_response_id` and item references are refused. Tool types other than `function` (web_search, local_shell,
custom, ...) are skipped with a note in the response's metadata, unless `tool_choice` forces one (400)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hybridd.errors import BadRequest
from hybridd.validate import json_kind as _kind
from hybridd.validate import shown as _shown

# Fields of a Responses request that a chat completion has no use for; they are accepted and ignored.
IGNORED = ("store", "metadata", "include", "user", "truncation", "service_tier", "prompt_cache_key",
           "safety_identifier", "top_logprobs", "stream_options", "prompt_cache_retention", "hybridd")
LLAMA_CPP_PYTHON = "llama-cpp-python"
ITEM_TYPES = ("message", "function_call", "function_call_output", "custom_tool_call", "custom_tool_call_output",
              "reasoning")
ROLES = ("user", "system", "developer", "assistant")
SAMPLING_EXTRAS = ("logit_bias", "seed", "stop", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repeat_penalty")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text")


@dataclass(frozen=True)
class ChatMapping:
    """A Responses request as the chat completion it maps to, with what was left out and why."""

    chat: dict[str, Any]
    notes: tuple[str, ...] = ()
    echo: dict[str, Any] = field(default_factory=dict)  # request fields a response object repeats back


def to_chat(body: Any, engine: str) -> ChatMapping:
    """The chat completion for a Responses request body; BadRequest names the field that cannot be mapped.
    `engine`: the kind that serves the model (llama-cpp-python's server takes a schema as json_object's `schema`
    and has no stream_options)."""
    llama_cpp_python = engine == LLAMA_CPP_PYTHON
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {_kind(body)}")
    if body.get("previous_response_id") is not None:
        raise BadRequest("'previous_response_id': hybridd stores no responses (it serves store: false only); send "
                         "the whole conversation in 'input'", "previous_response_id")
    if body.get("conversation") is not None:
        raise BadRequest("'conversation': hybridd stores no conversations; send the whole conversation in 'input'",
                         "conversation")
    if body.get("background"):
        raise BadRequest("'background': hybridd runs no background responses (it stores none)", "background")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string", "model")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest(f"'instructions' must be a string, got {_kind(instructions)}", "instructions")
        messages.append({"role": "system", "content": instructions})
    messages += input_messages(body.get("input"))
    if not messages:
        raise BadRequest("'input' must hold at least one message", "input")
    chat: dict[str, Any] = {"model": model, "messages": messages}
    notes: list[str] = []
    tools, skipped = _tools(body.get("tools"))
    notes += [f"tool '{name}' of type {kind} skipped: hybridd serves function tools only"
              for name, kind in skipped]
    if tools:
        chat["tools"] = tools
    choice = _tool_choice(body.get("tool_choice"), {t["function"]["name"] for t in tools}, skipped)
    if choice is not None:
        chat["tool_choice"] = choice
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be a boolean, got {_kind(stream)}", "stream")
    chat["stream"] = bool(stream)
    if stream and not llama_cpp_python:
        chat["stream_options"] = {"include_usage": True}  # llama-cpp-python's server has no such option
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("parallel_tool_calls", "parallel_tool_calls")):
        value = body.get(ours)
        if value is None:
            continue
        if ours == "parallel_tool_calls" and not isinstance(value, bool):
            raise BadRequest(f"'{ours}' must be a boolean, got {_kind(value)}", ours)
        if ours == "max_output_tokens" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BadRequest(f"'{ours}' must be an integer >= 1, got {_shown(value)}", ours)
        if ours in ("temperature", "top_p") and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise BadRequest(f"'{ours}' must be a number, got {_kind(value)}", ours)
        chat[theirs] = value
    # Chat sampling fields the Responses API lacks, as clients send them in extra_body: passed as they are.
    chat.update({name: body[name] for name in SAMPLING_EXTRAS if body.get(name) is not None})
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise BadRequest(f"'reasoning' must be an object, got {_kind(reasoning)}", "reasoning")
        if isinstance(reasoning.get("effort"), str) and not llama_cpp_python:
            chat["reasoning_effort"] = reasoning["effort"]
    response_format = _text_format(body.get("text"), llama_cpp_python)
    if response_format is not None:
        chat["response_format"] = response_format
    echo = {key: body[key] for key in ("instructions", "max_output_tokens", "temperature", "top_p",
                                       "parallel_tool_calls", "tool_choice", "reasoning", "text", "metadata")
            if body.get(key) is not None}
    echo["tools"] = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    return ChatMapping(chat, tuple(notes), echo)


def input_messages(value: Any) -> list[dict[str, Any]]:
    """Chat messages for a Responses `input`: a string, or a list of items (reasoning items are dropped)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise BadRequest(f"'input' must be a string or an array of items, got {_kind(value)}", "input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"'{where}' must be an object, got {_kind(item)}", where)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind in ("function_call", "custom_tool_call"):
            call = _call(item, where, kind)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # one assistant turn: its text and its calls
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                             "content": _output(item.get("output"), f"{where}.output")})
        elif kind == "reasoning":
            continue  # the model's earlier thinking: chat templates do not take it back
        elif kind == "item_reference":
            raise BadRequest(f"'{where}': item references need stored responses, and hybridd stores none",
                             f"{where}.type")
        else:
            raise BadRequest(f"'{where}.type': unknown or unsupported item type {_shown(kind)} (valid: "
                             f"{', '.join(ITEM_TYPES)})", f"{where}.type")
    return messages


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ROLES:
        raise BadRequest(f"'{where}.role' must be one of {', '.join(ROLES)}, got {_shown(role)}", f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        text: str | list[dict[str, Any]] = content
    elif isinstance(content, list):
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            parts.append(_part(part, f"{where}.content[{j}]"))
        images = any(p["type"] == "image_url" for p in parts)
        text = parts if images else "".join(p["text"] for p in parts)
    else:
        raise BadRequest(f"'{where}.content' must be a string or an array of parts, got {_kind(content)}",
                         f"{where}.content")
    # Chat templates know system, not developer (the role OpenAI's newer models take instructions in).
    return {"role": "system" if role == "developer" else role, "content": text}


def _part(part: Any, where: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise BadRequest(f"'{where}' must be an object, got {_kind(part)}", where)
    kind = part.get("type")
    if kind in TEXT_PARTS:
        return {"type": "text", "text": _string(part, "refusal" if kind == "refusal" else "text", where)}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise BadRequest(f"'{where}.image_url' must be a URL string (file ids need stored files)",
                             f"{where}.image_url")
        return {"type": "image_url", "image_url": {"url": url}}
    raise BadRequest(f"'{where}.type': unsupported content part {_shown(kind)} (valid: "
                     f"{', '.join(TEXT_PARTS)}, input_image)", f"{where}.type")


def _call(item: dict[str, Any], where: str, kind: str) -> dict[str, Any]:
    if kind == "custom_tool_call":  # a freeform tool's input is text: carry it as the one argument
        arguments = json.dumps({"input": _string(item, "input", where)})
    else:
        arguments = _string(item, "arguments", where)
    return {"id": _string(item, "call_id", where), "type": "function",
            "function": {"name": _string(item, "name", where), "arguments": arguments}}


def _output(value: Any, where: str) -> str:
    """A tool's output as text: a string, or the text of its parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_part(part, f"{where}[{j}]").get("text", "") for j, part in enumerate(value))
    raise BadRequest(f"'{where}' must be a string or an array of parts, got {_kind(value)}", where)


def _tools(value: Any) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Chat tools for the function tools, and (name, type) of each tool skipped."""
    if value is None:
        return [], []
    if not isinstance(value, list):
        raise BadRequest(f"'tools' must be an array, got {_kind(value)}", "tools")
    tools: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise BadRequest(f"'{where}' must be an object with a 'type'", where)
        if tool["type"] != "function":
            name = tool.get("name")
            skipped.append((name if isinstance(name, str) else tool["type"], tool["type"]))
            continue
        function: dict[str, Any] = {"name": _string(tool, "name", where)}
        description = tool.get("description")
        if description is not None:
            function["description"] = _string(tool, "description", where)
        parameters = tool.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise BadRequest(f"'{where}.parameters' must be an object", f"{where}.parameters")
            function["parameters"] = parameters
        tools.append({"type": "function", "function": function})
    return tools, skipped


def _tool_choice(value: Any, names: set[str], skipped: list[tuple[str, str]]) -> Any:
    if value is None or value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name")
        if not isinstance(name, str) or name not in names:
            raise BadRequest(f"'tool_choice.name': {_shown(name)} is not one of the function tools "
                             f"({', '.join(sorted(names)) or 'none given'})", "tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        forced = value.get("name") if isinstance(value.get("name"), str) else value["type"]
        if any(forced in (name, kind) for name, kind in skipped) or value["type"] != "allowed_tools":
            raise BadRequest(f"'tool_choice' forces tool {_shown(forced)} of type {value['type']}; hybridd serves "
                             "function tools only", "tool_choice")
        raise BadRequest("'tool_choice' of type allowed_tools is not supported: list only the allowed tools in "
                         "'tools'", "tool_choice")
    raise BadRequest(f"'tool_choice' must be auto, none, required or a tool object, got {_shown(value)}",
                     "tool_choice")


def _text_format(value: Any, llama_cpp_python: bool) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"'text' must be an object, got {_kind(value)}", "text")
    fmt = value.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("'text.format.schema' must be an object", "text.format.schema")
        if llama_cpp_python:  # its server refuses json_schema; it constrains json_object to a schema
            return {"type": "json_object", "schema": schema}
        schema_format: dict[str, Any] = {"name": fmt.get("name") or "response", "schema": schema}
        if fmt.get("strict") is not None:
            schema_format["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": schema_format}
    raise BadRequest(f"'text.format.type' must be text, json_object or json_schema, got {_shown(kind)}",
                     "text.format.type")


# --- answers -------------------------------------------------------------------------------------------------


def response_object(response_id: str, created_at: int, model: str, echo: dict[str, Any], notes: tuple[str, ...],
                    status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                    finish_reason: str | None = None, error: dict[str, str] | None = None) -> dict[str, Any]:
    """A `response` object as OpenAI's Responses API returns it (store is always false here)."""
    if status == "completed" and finish_reason == "length":
        status = "incomplete"
    metadata = dict(echo.get("metadata") or {})
    if notes:
        metadata["hybridd_notes"] = "; ".join(notes)[:512]  # OpenAI caps metadata values at 512 characters
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "error": error, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": echo.get("instructions"), "max_output_tokens": echo.get("max_output_tokens"),
        "model": model, "output": output, "parallel_tool_calls": echo.get("parallel_tool_calls", True),
        "previous_response_id": None, "reasoning": echo.get("reasoning") or {"effort": None, "summary": None},
        "store": False, "temperature": echo.get("temperature"), "top_p": echo.get("top_p"),
        "text": echo.get("text") or {"format": {"type": "text"}}, "tool_choice": echo.get("tool_choice", "auto"),
        "tools": echo.get("tools", []), "truncation": "disabled", "usage": usage, "metadata": metadata,
    }


def usage_object(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" \
        else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _reasoning_item(item_id: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


class ResponsesTranslator:
    """An engine's chat answer as a Responses answer: whole, or streamed as Responses events (Translator)."""

    stream_content_type = "text/event-stream"

    def __init__(self, response_id: str, created_at: int, model: str, mapping: ChatMapping,
                 prompt_tokens: int = 0) -> None:
        self.response_id, self.created_at, self.model, self.mapping = response_id, created_at, model, mapping
        self.prompt_tokens = prompt_tokens  # the input's count when the stream sends no usage
        self._suffix = response_id.removeprefix("resp_")
        self._sequence = 0
        self._started = False
        self._finished = False
        self._output: list[dict[str, Any]] = []  # the items closed so far
        self._open: dict[str, Any] | None = None  # the item being streamed: its kind, index, id and text so far
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> its open item
        self._usage: dict[str, Any] | None = None
        self._finish_reason: str | None = None
        self._deltas = 0

    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self._suffix}_{len(self._output) + (self._open is not None)}"

    # -- whole --

    def whole(self, payload: bytes) -> bytes:
        try:
            answer = json.loads(payload)
            choice = answer["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            return payload  # not a chat completion: nothing to translate
        output: list[dict[str, Any]] = []
        if isinstance(message.get("reasoning_content"), str) and message["reasoning_content"]:
            output.append(_reasoning_item(f"rs_{self._suffix}_{len(output)}", message["reasoning_content"]))
        if isinstance(message.get("content"), str) and (message["content"] or not message.get("tool_calls")):
            output.append(_message_item(f"msg_{self._suffix}_{len(output)}", message["content"]))
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            output.append(_call_item(f"fc_{self._suffix}_{len(output)}", str(call.get("id") or f"call_{len(output)}"),
                                     str(function.get("name") or ""), str(function.get("arguments") or "")))
        usage = answer.get("usage") or {}
        tokens = usage_object(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        return json.dumps(response_object(self.response_id, self.created_at, self.model, self.mapping.echo,
                                          self.mapping.notes, "completed", output, tokens,
                                          choice.get("finish_reason"))).encode()

    # -- streamed --

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        snapshot = response_object(self.response_id, self.created_at, self.model, self.mapping.echo,
                                   self.mapping.notes, "in_progress", [], None)
        return self._event("response.created", response=snapshot) + \
            self._event("response.in_progress", response=snapshot)

    def _open_item(self, kind: str) -> bytes:
        """Close the item being streamed unless it is of `kind`; open one of `kind` if none is."""
        out = b""
        if self._open is not None and self._open["kind"] == kind:
            return out
        out += self._close()
        index = len(self._output)
        if kind == "message":
            item = _message_item(self._item_id("msg"), "", "in_progress")
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = _reasoning_item(self._item_id("rs"), None)
            part = {"type": "reasoning_text", "text": ""}
        self._open = {"kind": kind, "index": index, "id": item["id"], "text": ""}
        out += self._event("response.output_item.added", output_index=index, item=item)
        out += self._event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                           part=part)
        return out

    def _close(self) -> bytes:
        current, self._open = self._open, None
        if current is None:
            return b""
        index, item_id, text = current["index"], current["id"], current["text"]
        if current["kind"] == "message":
            item = _message_item(item_id, text)
            out = self._event("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                              text=text, logprobs=[])
            out += self._event("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                               part=item["content"][0])
        elif current["kind"] == "reasoning":
            item = _reasoning_item(item_id, text)
            out = self._event("response.reasoning_text.done", item_id=item_id, output_index=index,
                              content_index=0, text=text)
            out += self._event("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                               part=item["content"][0])
        else:
            item = _call_item(item_id, current["call_id"], current["name"], text)
            out = self._event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                              name=current["name"], arguments=text)
        self._output.append(item)
        return out + self._event("response.output_item.done", output_index=index, item=item)

    def chunk(self, event: dict[str, Any]) -> bytes:
        out = self._start()
        if isinstance(event.get("usage"), dict):
            self._usage = event["usage"]
        choices = event.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        assert isinstance(delta, dict)
        if choice.get("finish_reason"):
            self._finish_reason = str(choice["finish_reason"])
        # One delta a token (llama.cpp's servers), an empty one for the bytes of a character not yet whole too.
        self._deltas += any(delta.get(key) is not None for key in ("content", "reasoning_content", "tool_calls"))
        for kind, key, event_name in (("reasoning", "reasoning_content", "response.reasoning_text.delta"),
                                      ("message", "content", "response.output_text.delta")):
            text = delta.get(key)
            if isinstance(text, str) and text:
                out += self._open_item(kind)
                assert self._open is not None
                self._open["text"] += text
                extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
                out += self._event(event_name, item_id=self._open["id"], output_index=self._open["index"],
                                   content_index=0, delta=text, **extra)
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else []:
            if isinstance(call, dict):
                out += self._call_delta(call)
        return out

    def _call_delta(self, call: dict[str, Any]) -> bytes:
        out = b""
        index = call.get("index", 0)
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        assert isinstance(function, dict)
        current = self._open
        if current is None or current["kind"] != "call" or current["call_index"] != index:
            out += self._close()
            item_id = self._item_id("fc")
            call_id = str(call.get("id") or f"call_{self._suffix}_{len(self._output)}")
            self._open = current = {"kind": "call", "index": len(self._output), "id": item_id, "text": "",
                                    "call_id": call_id, "name": str(function.get("name") or ""),
                                    "call_index": index}
            out += self._event("response.output_item.added", output_index=current["index"],
                               item=_call_item(item_id, call_id, current["name"], "", "in_progress"))
        elif function.get("name") and not current["name"]:
            current["name"] = str(function["name"])
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            current["text"] += arguments
            out += self._event("response.function_call_arguments.delta", item_id=current["id"],
                               output_index=current["index"], delta=arguments)
        return out

    def end(self) -> bytes:
        if self._finished:
            return b""
        self._finished = True
        out = self._start() + self._close()
        if self._usage is not None:
            usage = usage_object(int(self._usage.get("prompt_tokens") or 0),
                                 int(self._usage.get("completion_tokens") or 0))
        else:
            # llama-cpp-python's server sends no usage chunk: it sends one delta a token, so the deltas are the
            # output tokens (about); the prompt was counted with the model's tokenizer before it was sent.
            budget = self.mapping.chat.get("max_tokens")
            usage = usage_object(self.prompt_tokens, min(self._deltas, budget) if budget else self._deltas)
        final = response_object(self.response_id, self.created_at, self.model, self.mapping.echo,
                                self.mapping.notes, "completed", self._output, usage, self._finish_reason)
        return out + self._event(f"response.{final['status']}", response=final)

    def failed(self, message: str, code: str) -> bytes:
        if self._finished:
            return b""
        self._finished = True
        out = self._start()
        final = response_object(self.response_id, self.created_at, self.model, self.mapping.echo,
                                self.mapping.notes, "failed", self._output, None,
                                error={"code": code, "message": message})
        return out + self._event("response.failed", response=final)


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"'{where}.{key}' must be a string, got {_kind(value)}", f"{where}.{key}")
    return value


