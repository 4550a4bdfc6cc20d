"""Guards for a loopback API: DNS-rebinding (Host), cross-site browser requests (Origin), body size, and bodies
that arrive too slowly."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from hybridd.api.envelope import Handler, error_response
from hybridd.config import is_loopback_host

# A body must arrive within this, plus a second for each BODY_MIN_BYTES_S of it: a client on loopback or a LAN
# sends 16 MiB in well under a second, while one that trickles its body would hold its connection (and the
# descriptor under it) for as long as it likes, since a connection reading a body counts as busy.
BODY_GRACE_S = 10.0
BODY_MIN_BYTES_S = 256 * 1024
# Bodies a handler streams itself, under its own size cap and deadline (an upload to disk): the guard leaves their
# length to the handler and body_deadline does not read them into memory.
STREAMED_BODIES = frozenset({("POST", "/v1/files")})


def streams_its_body(request: web.Request) -> bool:
    """Whether request's handler reads its body itself (see STREAMED_BODIES)."""
    return (request.method, request.path) in STREAMED_BODIES or (
        request.method == "PUT" and request.path.startswith("/hybridd/v1/files/"))  # a dataset from a paired node


def body_deadline_s(size: int) -> float:
    """How long a body of `size` bytes may take to arrive."""
    return BODY_GRACE_S + size / BODY_MIN_BYTES_S


async def body_timed_out(request: web.Request, deadline_s: float) -> web.StreamResponse:
    """Answer 408 for a body that did not arrive within deadline_s, and close the connection now."""
    response = error_response(408, f"the request body did not arrive within {deadline_s:.0f} s", code="body_timeout")
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    # Closed now, not after aiohttp's lingering read of the rest of a body that may never come.
    request.protocol.force_close()
    return response


def host_of(value: str) -> str:
    """The host part of a Host header value ('[::1]:11435' → '::1')."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def make_guard(extra_hosts: tuple[str, ...], listen_host: str, max_body_bytes: int) -> Middleware:
    """Middleware refusing foreign Host and Origin headers and bodies declared larger than the cap."""
    allowed = {h.lower() for h in extra_hosts}
    allowed.add(listen_host.lower())

    def host_ok(host: str) -> bool:
        return is_loopback_host(host) or host in allowed

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = host_of(request.headers.get("Host", ""))
        if not host_ok(host):
            # A page on evil.example that rebinds its DNS name to 127.0.0.1 still sends its own Host.
            return error_response(403, f"Host '{host}' is not allowed; this API answers on loopback names only",
                                  code="forbidden_host")
        origin = request.headers.get("Origin")
        if origin is not None:
            try:
                origin_host = urlsplit(origin).hostname if origin != "null" else None
            except ValueError as exc:  # a bracketed host that is not an IPv6 address, or brackets left open
                return error_response(400, f"'Origin' header {origin[:100]!r} is not a valid origin: {exc}",
                                      code="invalid_origin")
            if origin_host is None or not host_ok(origin_host):
                return error_response(403, f"Origin '{origin}' is not allowed; browsers may call this API only "
                                      "from loopback pages", code="forbidden_origin")
        length = request.content_length
        if length is not None and length > max_body_bytes and not streams_its_body(request):
            return error_response(413, f"request body is too large ({length} bytes; limit {max_body_bytes})",
                                  code="request_too_large")
        return await handler(request)

    return guard


@web.middleware
async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read a request's body within BODY_GRACE_S plus a second per BODY_MIN_BYTES_S of it, else answer 408 and
    close the connection; the handler then reads the body from memory."""
    if not request.body_exists or streams_its_body(request):
        return await handler(request)
    size = request.content_length if request.content_length is not None else request.client_max_size
    deadline_s = body_deadline_s(size)
    try:
        async with asyncio.timeout(deadline_s):
            await request.read()
    except TimeoutError:
        return await body_timed_out(request, deadline_s)
    return await handler(request)
