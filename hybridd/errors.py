"""One exception root for hybridd; every error knows the HTTP status and OpenAI error type it maps to.

    HybriddError
    ├── ConfigError                 bad config: names the dotted key and the valid choices (exit 3)
    │   └── ProfileError            unknown profile (lists the valid ones) or bad profile file (names the key)
    │       └── ModelProfileError   a model profile's; also a ValueError, like the GGUF reader's errors
    ├── StartupError                the daemon could not start: port taken, bad address (exit 3)
    ├── GgufFormatError             not a GGUF file this reader understands; also a ValueError
    ├── PeerError                   between nodes: identity, pairing, trust, links (drawn in hybridd/peer/errors.py)
    ├── RequestError                the client's mistake (4xx)
    │   ├── BadRequest              malformed JSON, wrong types (400, invalid_request_error)
    │   ├── ModelNotFound           unknown model id (404, model_not_found)
    │   ├── FileNotFound            unknown file id (404, file_not_found)
    │   ├── BodyTooLarge            body over the cap (413)
    │   ├── Forbidden               foreign Host or Origin (403)
    │   └── NotFoundRoute           no such path (404)
    ├── PlacementRefused            no option can serve the request: the scheduler's status (400, 429, 503, 507)
    └── UpstreamError               the engine's or peer's failure (5xx)
        ├── EngineLoadFailed        could not start or health-check an engine (503)
        └── EngineFailed            engine broke while serving (502)
            └── UpstreamUnreachable nothing came back at all: safe to retry elsewhere (502)
"""

from __future__ import annotations

from typing import Any


class HybriddError(Exception):
    """Base of every error hybridd raises on purpose."""

    status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(HybriddError):
    """The config text is invalid; the message is one line naming the dotted key."""


class ProfileError(ConfigError):
    """A hardware or model profile is unknown or its file is invalid."""


class ModelProfileError(ProfileError, ValueError):
    """A model profile is missing or malformed; a ValueError too, as callers catch it with a bad GGUF header."""


class StartupError(HybriddError):
    """The daemon could not start (port taken, bad address): exit code 3."""


class GgufFormatError(HybriddError, ValueError):
    """The file is not a GGUF file this reader understands (bad magic, version, truncated header)."""


class RequestError(HybriddError):
    """The client sent something we refuse."""

    status = 400
    error_type = "invalid_request_error"


class BadRequest(RequestError):
    """Malformed body or fields of the wrong type; param names the field, as the OpenAI envelope does."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFound(RequestError):
    """The requested model id is not served here."""

    status = 404
    code = "model_not_found"


class FileNotFound(RequestError):
    """The requested file id is not stored here."""

    status = 404
    code = "file_not_found"


class JobNotFound(RequestError):
    """The requested fine-tuning job (or its event, checkpoint) is not here."""

    status = 404
    code = "job_not_found"


class Conflict(RequestError):
    """The request is well formed but the thing it acts on is in a state that refuses it."""

    status = 409
    code = "conflict"


class BodyTooLarge(RequestError):
    """The request body is larger than the configured cap."""

    status = 413
    code = "request_too_large"


class Forbidden(RequestError):
    """The request came through a foreign Host or Origin."""

    status = 403
    error_type = "permission_error"
    code = "forbidden"


class NotFoundRoute(RequestError):
    """No route at this path."""

    status = 404
    code = "not_found"


class PlacementRefused(HybriddError):
    """No option can serve the request; status, code and Retry-After come from the scheduler's refusal."""

    def __init__(self, reason: str, status: int, code: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"hybridd cannot place this request: {reason}")
        self.status = status
        self.code = code
        self.error_type = "server_error" if status >= 500 else "invalid_request_error"
        self.retry_after_s = retry_after_s


class UpstreamError(HybriddError):
    """An engine or peer failed us."""

    status = 502
    error_type = "server_error"
    code = "upstream_error"


class EngineLoadFailed(UpstreamError):
    """The engine could not be started or never became healthy."""

    status = 503
    code = "engine_load_failed"


class EngineFailed(UpstreamError):
    """The engine failed while serving a request."""

    status = 502
    code = "engine_failed"


class UpstreamUnreachable(EngineFailed):
    """The engine or peer could not be reached, or sent nothing before its deadline: no byte reached the client."""

    code = "upstream_unreachable"
    peer: str | None = None  # set when the upstream was a peer, so the caller can retry without it


def error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object that every error answered over HTTP carries."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
