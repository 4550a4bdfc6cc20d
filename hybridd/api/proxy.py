"""Forward one inference request to an engine and pass its answer through, streams chunk by chunk."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from hybridd.api.envelope import error_body, sse_error_event
from hybridd.errors import EngineFailed, UpstreamUnreachable

log = logging.getLogger("hybridd.api")


@dataclass
class StreamStats:
    """What an answer looked like: server-sent events passed and when the first and last arrived, or for a whole
    answer the completion tokens its usage reported."""

    events: int = 0
    first_events: int = 0  # those that came in the first read: they mark when decoding was under way
    first_at: float = 0.0
    last_at: float = 0.0
    usage_tokens: int | None = None
    responded: bool = False  # the upstream answered (a status line came back), whatever followed
    complete: bool = False  # the engine's answer arrived whole: a 200 read to its end, or a stream up to [DONE]

    def decode_tok_s(self) -> float | None:
        """Events per second after the first read (llama.cpp servers send one per token); None when fewer than 8
        came after it: too short, or read all at once (a proxy that fell behind its engine cannot time it)."""
        after = self.events - self.first_events - 1  # the last read also carries [DONE]
        if after < 8 or self.last_at <= self.first_at:
            return None
        return after / (self.last_at - self.first_at)

    def completion_tokens(self) -> int:
        """The completion's tokens: exact from a whole answer's usage; about, for a stream, since llama.cpp
        servers send one event per token, then the finish reason and [DONE]; 0: none seen."""
        if self.usage_tokens is not None:
            return self.usage_tokens
        return max(0, self.events - 2)

# Hop-by-hop and framing headers are ours to set, not the engine's.
_DROP_RESPONSE_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding",
                          "date", "server"}


async def forward(
    request: web.Request,
    http: aiohttp.ClientSession,
    url: str,
    body: bytes,
    stream: bool,
    extra_headers: dict[str, str],
    api_key: str | None = None,
    upstream_headers: dict[str, str] | None = None,
    stats: StreamStats | None = None,
    first_byte_timeout_s: float | None = None,
    idle_timeout_s: float | None = None,
    ssl: Any = True,
) -> web.StreamResponse:
    """POST body to url; answer the client with the engine's response plus extra_headers.

    first_byte_timeout_s bounds the wait for the response headers (a peer may be loading a model);
    idle_timeout_s bounds each wait between chunks (a hung peer). UpstreamUnreachable means nothing was sent
    to the client yet, so the caller may retry elsewhere.
    """
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", **(upstream_headers or {})}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        async with asyncio.timeout(first_byte_timeout_s):
            upstream = await http.post(url, data=body, headers=headers, ssl=ssl)
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnreachable(f"{url} could not be reached: {exc}") from exc
    except TimeoutError as exc:
        raise UpstreamUnreachable(f"{url} sent nothing within {first_byte_timeout_s:g} s") from exc
    if stats is not None:
        stats.responded = True
    try:
        if not stream or upstream.status != 200:
            return await _whole(upstream, url, extra_headers, stats)
        return await _stream(request, upstream, url, extra_headers, stats or StreamStats(), idle_timeout_s)
    finally:
        # Closing (not releasing) an unfinished response drops the connection: the engine sees the
        # disconnect and stops generating for a client that is gone.
        upstream.close()


async def _whole(upstream: aiohttp.ClientResponse, url: str, extra_headers: dict[str, str],
                 stats: StreamStats | None = None) -> web.Response:
    try:
        payload = await upstream.read()
    except aiohttp.ClientError as exc:
        raise EngineFailed(f"engine at {url} failed mid-response: {exc}") from exc
    if stats is not None and upstream.status == 200:
        stats.usage_tokens, stats.complete = _usage_tokens(payload), True
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}
    headers.update(extra_headers)
    if upstream.status >= 400:
        payload = _as_envelope(upstream.status, payload)
        headers["Content-Type"] = "application/json"
    return web.Response(body=payload, status=upstream.status, headers=headers)


def _usage_tokens(payload: bytes) -> int | None:
    """usage.completion_tokens of an OpenAI answer; None when it has none (an embedding) or is not one."""
    try:
        tokens = json.loads(payload)["usage"]["completion_tokens"]
    except (ValueError, KeyError, TypeError):
        return None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0 else None


def _as_envelope(status: int, payload: bytes) -> bytes:
    """The engine's error, in the OpenAI envelope whatever shape the engine used."""
    try:
        data = json.loads(payload)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and "message" in data["error"]:
        return payload
    if isinstance(data, dict) and isinstance(data.get("detail"), str | list):
        message = data["detail"] if isinstance(data["detail"], str) else json.dumps(data["detail"])
    else:
        message = payload.decode("utf-8", "replace").strip()[:500] or f"engine answered HTTP {status}"
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps(error_body(f"engine error: {message}", kind, "engine_error")).encode()


async def _stream(
    request: web.Request, upstream: aiohttp.ClientResponse, url: str, extra_headers: dict[str, str],
    stats: StreamStats,
    idle_timeout_s: float | None = None,
) -> web.StreamResponse:
    response = web.StreamResponse(status=200)
    response.content_type = "text/event-stream"
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.headers.update(extra_headers)
    await response.prepare(request)
    # iter_any hands over whatever bytes have arrived: no line splitting, no waiting for more.
    chunks = upstream.content.iter_any()
    partial = b""  # the start of an event the engine has not finished yet
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            if partial:
                await response.write(partial)
            break
        except (aiohttp.ClientError, TimeoutError) as exc:
            # After the first byte there is no retry: tell the client in the stream's own format, then end it.
            # A half-sent event is dropped, so the error event is not glued onto truncated JSON.
            why = f"no data for {idle_timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
            log.warning("stream from %s broke: %s", url, why)
            await response.write(sse_error_event(f"upstream stream broke: {why}", "upstream_failed"))
            break
        # Pass every complete event on at once; hold back only an unfinished tail (engines rarely split events).
        data = partial + chunk if partial else chunk
        end = data.rfind(b"\n\n")
        if end < 0:  # no event finished yet: keep all of it
            partial = data
            continue
        chunk, partial = data[:end + 2], data[end + 2:]
        now = time.monotonic()
        events = chunk.count(b"data: ")
        if not stats.events:
            stats.first_at, stats.first_events = now, events
        stats.events += events
        stats.last_at = now
        # [DONE] as an event of its own (JSON text cannot hold a raw newline, so a model writing it cannot match)
        stats.complete = stats.complete or chunk.startswith(b"data: [DONE]") or b"\ndata: [DONE]" in chunk
        # A client that went away makes this raise ConnectionResetError; forward() then drops the engine's
        # connection, which cancels its work.
        await response.write(chunk)
    await response.write_eof()
    return response
