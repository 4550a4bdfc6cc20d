"""The one seam to upstreams: send a request along its route (an engine or a peer), pass the answer to the client
(streams chunk by chunk), and return the response with one observation of the answer for placement to learn from."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from hybridd.api.envelope import error_body, sse_error_event
from hybridd.errors import EngineFailed, UpstreamUnreachable
from hybridd.node.router import Answer, Route
from hybridd.place.state import Observation

log = logging.getLogger("hybridd.api")


@dataclass
class StreamTally:
    """What this module counts while a stream passes: server-sent events and when the first and last arrived."""

    events: int = 0
    first_events: int = 0  # those that came in the first read: they mark when decoding was under way
    first_at: float = 0.0
    last_at: float = 0.0
    done: bool = False  # the [DONE] event came

    def decode_tok_s(self) -> float | None:
        """Events per second after the first read (llama.cpp servers send one per token); None when fewer than 8
        came after it: too short, or read all at once (a proxy that fell behind its engine cannot time it)."""
        after = self.events - self.first_events - 1  # the last read also carries [DONE]
        if after < 8 or self.last_at <= self.first_at:
            return None
        return after / (self.last_at - self.first_at)

    def observation(self) -> Observation:
        """The stream as placement learns from it; its length is about, since llama.cpp servers send one event per
        token, then the finish reason and [DONE]."""
        return Observation(responded=True, complete=self.done, completion_tokens=max(0, self.events - 2),
                           decode_tok_s=self.decode_tok_s())


class OpenStreams:
    """The upstream streams being passed to clients now, so that a shutdown can end them at its grace."""

    def __init__(self) -> None:
        self._open: set[aiohttp.ClientResponse] = set()
        self.ending: str | None = None  # why every stream is being ended, once that has begun

    def __len__(self) -> int:
        return len(self._open)

    def add(self, upstream: aiohttp.ClientResponse) -> None:
        self._open.add(upstream)

    def discard(self, upstream: aiohttp.ClientResponse) -> None:
        self._open.discard(upstream)

    def end_all(self, why: str) -> int:
        """Drop every upstream connection: each stream then tells its client why in an error event and ends."""
        self.ending = why
        for upstream in list(self._open):
            upstream.close()
        return len(self._open)


OPEN_STREAMS = web.AppKey("open_streams", OpenStreams)

# Hop-by-hop and framing headers are ours to set, not the engine's.
_DROP_RESPONSE_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding",
                          "date", "server"}


async def forward(http: aiohttp.ClientSession, route: Route, client: web.Request, path: str, body: bytes,
                  stream: bool, upstream_headers: dict[str, str] | None = None) -> Answer[web.StreamResponse]:
    """POST body to the route's upstream at path; answer the client with its response plus the placement headers.

    The route's first-byte timeout bounds the wait for the response headers (a peer may be loading a model), its
    idle timeout each wait between chunks (a hung peer). UpstreamUnreachable means nothing was sent to the client
    yet, so the caller may retry elsewhere. A client that goes away once the answer has begun ends it early: the
    answer then says `cancelled`, with what was observed until then.
    """
    url = route.base_url + path
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", **(upstream_headers or {})}
    if route.api_key:
        headers["Authorization"] = f"Bearer {route.api_key}"
    try:
        async with asyncio.timeout(route.first_byte_timeout_s):
            upstream = await http.post(url, data=body, headers=headers, ssl=route.ssl)
    except (aiohttp.ClientError, OSError) as exc:
        raise _unreachable(route, f"{url} could not be reached: {exc}") from exc
    except TimeoutError as exc:
        raise _unreachable(route, f"{url} sent nothing within {route.first_byte_timeout_s:g} s") from exc
    try:
        if not stream or upstream.status != 200:
            return await _whole(upstream, url, _reply_headers(route))
        return await _stream(client, upstream, url, _reply_headers(route), route.idle_timeout_s)
    finally:
        # Closing (not releasing) an unfinished response drops the connection: the engine sees the
        # disconnect and stops generating for a client that is gone.
        upstream.close()


def _unreachable(route: Route, message: str) -> UpstreamUnreachable:
    error = UpstreamUnreachable(message)
    error.peer = route.peer
    return error


def _reply_headers(route: Route) -> dict[str, str]:
    reason = route.reason
    if route.cold_start_s is not None:
        reason += f"; engine loaded in {route.cold_start_s:.1f} s"
    return {"x-hybridd-placement": route.placement, "x-hybridd-reason": _header_safe(reason)}


def _header_safe(text: str) -> str:
    """One line of printable ASCII: an HTTP header value cannot carry more."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:1000]


async def _whole(upstream: aiohttp.ClientResponse, url: str,
                 extra_headers: dict[str, str]) -> Answer[web.StreamResponse]:
    try:
        payload = await upstream.read()
    except aiohttp.ClientError as exc:
        raise EngineFailed(f"engine at {url} failed mid-response: {exc}") from exc
    except asyncio.CancelledError:
        return Answer(web.Response(status=499), Observation(responded=True), cancelled=True)
    seen = Observation(responded=True)
    if upstream.status == 200:
        seen = Observation(responded=True, complete=True, completion_tokens=_usage_tokens(payload) or 0)
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}
    headers.update(extra_headers)
    if upstream.status >= 400:
        payload = _as_envelope(upstream.status, payload)
        headers["Content-Type"] = "application/json"
    return Answer(web.Response(body=payload, status=upstream.status, headers=headers), seen)


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


async def _stream(client: web.Request, upstream: aiohttp.ClientResponse, url: str, extra_headers: dict[str, str],
                  idle_timeout_s: float | None = None) -> Answer[web.StreamResponse]:
    response = web.StreamResponse(status=200)
    response.content_type = "text/event-stream"
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.headers.update(extra_headers)
    tally = StreamTally()
    streams = client.app.get(OPEN_STREAMS)
    if streams is None:  # an app without a shutdown to end its streams
        streams = OpenStreams()
    streams.add(upstream)
    try:
        await response.prepare(client)
        await _pump(upstream, response, url, tally, idle_timeout_s, streams)
    except asyncio.CancelledError:
        # The client went away (its handler is cancelled): what passed until then is still an observation.
        return Answer(response, tally.observation(), cancelled=True)
    except ConnectionResetError:
        return Answer(response, tally.observation())
    finally:
        streams.discard(upstream)
    return Answer(response, tally.observation())


async def _pump(upstream: aiohttp.ClientResponse, response: web.StreamResponse, url: str, tally: StreamTally,
                idle_timeout_s: float | None, streams: OpenStreams) -> None:
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
            if streams.ending is not None:
                await response.write(sse_error_event(streams.ending, "shutting_down"))
                break
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
        if not tally.events:
            tally.first_at, tally.first_events = now, events
        tally.events += events
        tally.last_at = now
        # [DONE] as an event of its own (JSON text cannot hold a raw newline, so a model writing it cannot match)
        tally.done = tally.done or chunk.startswith(b"data: [DONE]") or b"\ndata: [DONE]" in chunk
        # A client that went away makes this raise ConnectionResetError; forward() then drops the engine's
        # connection, which cancels its work.
        await response.write(chunk)
    await response.write_eof()
