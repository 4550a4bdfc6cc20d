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


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into an OpenAI envelope with an honest status."""
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
