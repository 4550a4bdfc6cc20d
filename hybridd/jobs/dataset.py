"""Chat JSONL for fine-tuning, checked line by line. Pure: the lines come from the caller.

Each line is one training example, a JSON object:
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "tools": [...]}
The first bad line fails the whole file with one message naming the line and the field:
    line 7: messages[2].role: unknown value "robot" (valid: system, user, assistant, tool)
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from hybridd.errors import BadRequest
from hybridd.validate import JSON, TOML, Reader, Wording

ROLES = ("system", "user", "assistant", "tool")
MAX_LINE_BYTES = 64 * 1024 * 1024  # one training example; far above any model's context
_EXAMPLE_KEYS = ("messages", "tools", "parallel_tool_calls")
_MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "weight")
# Dotted paths as in config errors, with JSON's names for the kinds of value ("an object", not "a table").
JSONL = Wording(line=TOML.line, names=JSON.names)


def check_chat_jsonl(lines: Iterable[bytes]) -> int:
    """The number of training examples in `lines`; BadRequest (param "file") naming the first bad line and field.

    Blank lines are skipped; a line longer than MAX_LINE_BYTES fails (the caller may cut it there)."""
    examples = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        check_chat_example(line, number)
        examples += 1
    if not examples:
        raise BadRequest("the file holds no training examples (chat JSONL: one JSON object a line)", "file")
    return examples


def check_chat_example(line: bytes, number: int) -> None:
    """One line of chat JSONL: BadRequest naming `line {number}` and the field when it is not a training example."""

    def error(text: str) -> BadRequest:
        return BadRequest(text, "file")

    prefix = f"line {number}: "
    if len(line) > MAX_LINE_BYTES:
        raise error(f"{prefix}longer than {MAX_LINE_BYTES} bytes; one training example is far shorter")
    try:
        value = json.loads(line)
    except UnicodeDecodeError as exc:
        raise error(f"{prefix}not UTF-8 text (byte {exc.start + 1})") from exc
    except json.JSONDecodeError as exc:  # its own "line 1" would read as the file's
        raise error(f"{prefix}not valid JSON: {exc.msg} at column {exc.colno}") from exc
    except RecursionError as exc:
        raise error(f"{prefix}nests arrays and objects too deep to read") from exc
    except ValueError as exc:  # an integer of over 4300 digits
        raise error(f"{prefix}holds a number too long to read") from exc
    example = Reader(value, error, JSONL, prefix=prefix).table(_EXAMPLE_KEYS)
    messages = example.at("messages").items()
    if not messages:
        raise example.at("messages").fail("must not be empty")
    roles = [_message(message) for message in messages]
    if "assistant" not in roles:
        raise example.at("messages").fail("has no assistant message (the model learns from the assistant's turns)")
    for tool in example.at("tools").items(optional=True):
        spec = tool.table()
        spec.at("type").choice(("function",), "function")
        spec.at("function").table().at("name").text()
    example.at("parallel_tool_calls").of(bool, None)


def _message(item: Reader) -> str:
    """The role of one message, after checking its fields."""
    message = item.table(_MESSAGE_KEYS)
    role: str = message.at("role").choice(ROLES)
    calls = message.at("tool_calls").items(optional=True)
    for call in calls:
        spec = call.table()
        spec.at("type").choice(("function",), "function")
        function = spec.at("function").table()
        function.at("name").text()
        function.at("arguments").of(str)
    content = message.at("content")
    if calls and role == "assistant" and (not content.present or content.value is None):
        pass  # an assistant turn that only calls tools
    elif isinstance(content.of((str, list), want="a string or an array of text parts"), list):
        for part in content.items():
            text_part = part.table(("type", "text"))
            text_part.at("type").choice(("text",))
            text_part.at("text").of(str)
    message.at("name").of(str, None)
    message.at("tool_call_id").of(str, None)
    weight = message.at("weight")
    if weight.present and weight.of(int) not in (0, 1):
        raise weight.fail(f"must be 0 or 1, got {weight.value}")
    return role
