"""The OpenAI error envelope, and the middleware that makes every failure one (never a traceback)."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from hybridd.errors import HybriddError, error_body

log = logging.getLogger("hybridd.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_TYPE_FOR_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
                    429: "rate_limit_error"}


def error_response(status: int, message: str, error_type: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None, param: str | None = None) -> web.Response:
    """A JSON error response in the OpenAI envelope."""
    kind = error_type or _TYPE_FOR_STATUS.get(status, "server_error")
    return web.json_response(error_body(message, kind, code, param), status=status, headers=headers)


def response_for(exc: HybriddError, headers: dict[str, str] | None = None) -> web.Response:
    """The envelope for one of our own errors."""
    return error_response(exc.status, exc.message, exc.error_type, exc.code, headers, getattr(exc, "param", None))


class _MalformedAnswered(web.Request):
    """A request whose answer, when aiohttp itself made it, is rewritten into the envelope."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        # aiohttp answers a request it cannot parse (a bad header, a line too long) with plain text before any
        # route or middleware runs; such a request alone has no match info.
        if self._match_info is None and isinstance(response, web.Response) and response.status >= 400 \
                and isinstance(response.body, bytes):
            lines = response.body.decode("utf-8", "replace").splitlines()
            detail = " ".join(line.strip() for line in lines if line.strip().strip("^"))[:500]
            kind = _TYPE_FOR_STATUS.get(response.status, "server_error")
            code = "malformed_request" if response.status < 500 else "internal_error"
            message = f"malformed HTTP request: {detail}" if response.status < 500 else \
                "internal error in hybridd (see the daemon log)"
            response.body = json.dumps(error_body(message, kind, code)).encode()
            response.content_type = "application/json"
            response.headers["Content-Length"] = str(len(response.body))
        await super()._prepare_hook(response)


def envelope_malformed_requests(app: web.Application) -> None:
    """Make aiohttp's own answers to requests it cannot parse OpenAI envelopes too. Its request factory is the one
    place they pass through in this app: they never reach a route or a middleware."""
    app._make_request = functools.partial(app._make_request, _cls=_MalformedAnswered)  # type: ignore[method-assign]


def sse_error_event(message: str, code: str = "upstream_error") -> bytes:
    """An OpenAI-shaped error as a server-sent event, for a stream that broke after its first byte."""
    return b"data: " + json.dumps(error_body(message, "server_error", code)).encode() + b"\n\n"


# Anthropic's error types by status (docs.anthropic.com, "Errors"); Ollama's envelope is {"error": "..."}.
_ANTHROPIC_TYPE_FOR_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                              404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                              503: "overloaded_error", 529: "overloaded_error"}


def dialect(path: str) -> str:
    """Which API's error envelope a path answers in: "anthropic" (/v1/messages), "ollama" (/api/) or "openai"."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path.startswith("/api/"):
        return "ollama"
    return "openai"


def error_in_dialect(kind: str, status: int, message: str) -> bytes:
    """An error body in the envelope of `kind` (see dialect)."""
    if kind == "anthropic":
        error_type = _ANTHROPIC_TYPE_FOR_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return json.dumps({"type": "error", "error": {"type": error_type, "message": message}}).encode()
    if kind == "ollama":
        return json.dumps({"error": message}).encode()
    kind_name = _TYPE_FOR_STATUS.get(status, "server_error")
    return json.dumps(error_body(message, kind_name, None)).encode()


def _in_dialect(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """An OpenAI-envelope error answer rewritten into the envelope of the API the path belongs to."""
    kind = dialect(request.path)
    if kind == "openai" or response.status < 400 or not isinstance(response, web.Response) \
            or not isinstance(response.body, bytes) or response.content_type != "application/json":
        return response
    try:
        message = json.loads(response.body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response  # already in its own envelope
    response.body = error_in_dialect(kind, response.status, str(message))
    return response


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into an envelope with an honest status: OpenAI's, or on /v1/messages Anthropic's and on
    /api/ Ollama's."""
    return _in_dialect(request, await _enveloped(request, handler))


async def _enveloped(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HybriddError as exc:
        retry = getattr(exc, "retry_after_s", None)
        return response_for(exc, {"Retry-After": str(max(1, round(retry)))} if retry else None)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, f"request body is too large (limit {request.app._client_max_size} bytes)",
                              code="request_too_large")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {404: f"no route for {request.method} {request.path}",
                   405: f"method {request.method} is not allowed on {request.path}"}.get(exc.status, exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, message, code=exc.reason.lower().replace(" ", "_"), headers=headers)
    except (ConnectionResetError, TimeoutError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(500, "internal error in hybridd (see the daemon log)", code="internal_error")
