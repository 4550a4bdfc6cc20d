"""An engine's or peer's error answer, as the client gets it: the OpenAI envelope, the status that says whose mistake
it was (the client's 4xx, an engine fault 502), and never a file path or a stack frame from inside the engine."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from hybridd.errors import error_body

# llama-cpp-python's server answers a body its schema refuses with HTTP 500 and FastAPI's validation text, then the
# frame that raised: "1 validation error:\n  {'type': ..., 'loc': ('body', 'top_k'), 'msg': '...', ...}\n\n  File ..."
_VALIDATION = re.compile(
    r"(\d+) validation errors?:\s*\{.*?'loc': (\([^)]*\)), 'msg': ('(?:[^'\\]|\\.)*'|\"[^\"]*\")", re.S)
_TRACE = re.compile(r"(?:\A|\n)\s*(?:File \"|Traceback \(most recent call last\))")
# An absolute path of two parts or more, not an API route and not inside a URL.
_PATH = re.compile(r"(?<![\w.:/])/(?!v1/|hybridd/)(?:[\w.+-]+/)+[\w.+-]*")
MESSAGE_CHARS = 500


def upstream_error(status: int, payload: bytes) -> tuple[int, bytes]:
    """The status and envelope to answer the client with, for an upstream that answered status with payload."""
    try:
        data = json.loads(payload)
    except ValueError:
        data = None
    error: dict[str, Any] = {}
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and isinstance(data["error"].get("message"), str):
        error = data["error"]
        message = error["message"]
    elif isinstance(data, dict) and isinstance(data.get("detail"), str | list):
        message = data["detail"] if isinstance(data["detail"], str) else json.dumps(data["detail"])
    else:
        message = payload.decode("utf-8", "replace")
    refused = _validation(message)
    if refused is not None:  # the client's mistake, whatever status the engine put on it
        field, why = refused
        return 400, _envelope(f"engine refused '{field}': {why}", "invalid_request_error", "invalid_request", field)
    text = _scrubbed(message)
    if status == 500:  # the engine broke (an unexpected exception inside it): to the client, a bad gateway
        return 502, _envelope(f"engine error: {text or 'HTTP 500 without a message'}", "server_error",
                              "engine_failed", None)
    if error:  # already an envelope (a peer's hybridd, llama.cpp's own 4xx): its type, code and param stand
        kind = error.get("type")
        return status, _envelope(text, kind if isinstance(kind, str) else "server_error", _str(error.get("code")),
                                 _str(error.get("param")))
    kind = "invalid_request_error" if status < 500 else "server_error"
    return status, _envelope(f"engine error: {text or f'HTTP {status}'}", kind, "engine_error", None)


def _validation(message: str) -> tuple[str, str] | None:
    """(field, why) of a FastAPI validation error's first complaint about the body; None for any other message."""
    found = _VALIDATION.match(message)
    if found is None:
        return None
    try:
        loc, why = ast.literal_eval(found.group(2)), ast.literal_eval(found.group(3))
    except (ValueError, SyntaxError):
        return None
    if not isinstance(loc, tuple) or loc[:1] != ("body",) or len(loc) < 2 or not isinstance(why, str):
        return None
    field = ""
    for part in loc[1:]:
        if isinstance(part, int) and field:
            field += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part[0].islower() and part not in _TYPE_TAGS:
            field += f".{part}" if field else part
        else:
            # pydantic names the member of a union it tried ('str', 'list[str]', a class): the field ends before
            # it, and each member has its own complaint
            if int(found.group(1)) > 1:
                why = f"it is none of the forms the engine takes (for the first: {why})"
            break
    return (field, why) if field else None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _scrubbed(message: str) -> str:
    """message on one line, cut before any stack frame, file paths hidden."""
    trace = _TRACE.search(message)
    if trace is not None:
        message = message[:trace.start()]
    return " ".join(_PATH.sub("<path>", message).split())[:MESSAGE_CHARS]


def _envelope(message: str, kind: str, code: str | None, param: str | None) -> bytes:
    return json.dumps(error_body(message, kind, code, param)).encode()


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
