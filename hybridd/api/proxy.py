"""The one seam to upstreams: send a request along its route (an engine or a peer), pass the answer to the client
(streams chunk by chunk), and return the response with one observation of the answer for placement to learn from."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from hybridd.api.envelope import sse_error_event
from hybridd.api.upstream_errors import upstream_error
from hybridd.errors import EngineFailed, UpstreamUnreachable
from hybridd.node.router import Answer, Route
from hybridd.place.state import Observation

log = logging.getLogger("hybridd.api")


class Translator(Protocol):
    """Turns an engine's chat-completions answer into another API's, as it passes (hybridd/api/translate/).

    `whole` takes a complete 200 answer; `chunk` one streamed chat.completion.chunk (already parsed); `end` is
    called at the stream's [DONE], `failed` when it broke after its first byte. Each returns the bytes to send.
    `prompt_tokens` is set to the prompt as placement counted it before the request goes out: a stream that carries
    no usage (llama-cpp-python's) is answered with it, so the prompt is tokenized once per request."""

    stream_content_type: str
    prompt_tokens: int

    def whole(self, payload: bytes) -> bytes: ...
    def chunk(self, event: dict[str, Any]) -> bytes: ...
    def end(self) -> bytes: ...
    def failed(self, message: str, code: str) -> bytes: ...


@dataclass
class StreamTally:
    """What this module counts while a stream passes: server-sent events and when the first and last arrived."""

    events: int = 0
    first_events: int = 0  # those that came in the first read: they mark when decoding was under way
    sent_at: float = 0.0  # when the request went upstream
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
        first = self.first_at - self.sent_at if self.events and self.sent_at else None
        return Observation(responded=True, complete=self.done, completion_tokens=max(0, self.events - 2),
                           decode_tok_s=self.decode_tok_s(), first_token_s=first)


class OpenStreams:
    """The upstream streams being passed to clients now, so that a shutdown can end them at its grace and a hung
    engine's clients can be told why their answer stopped."""

    def __init__(self) -> None:
        self._open: dict[aiohttp.ClientResponse, str] = {}  # each stream and its upstream's base URL
        self.ending: str | None = None  # why every stream is being ended, once that has begun
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()  # base URL -> why it was cut

    def __len__(self) -> int:
        return len(self._open)

    def add(self, upstream: aiohttp.ClientResponse, base_url: str) -> None:
        self._open[upstream] = base_url

    def discard(self, upstream: aiohttp.ClientResponse) -> None:
        self._open.pop(upstream, None)

    def end_all(self, why: str) -> int:
        """Drop every upstream connection: each stream then tells its client why in an error event and ends."""
        self.ending = why
        for upstream in list(self._open):
            upstream.close()
        return len(self._open)

    def end_to(self, base_url: str, why: str) -> None:
        """The upstream at base_url is gone (a hung engine was killed): its streams and requests say why."""
        self._ended[base_url] = why
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)
        for upstream, url in list(self._open.items()):
            if url == base_url:
                upstream.close()

    def why_ended(self, base_url: str) -> str | None:
        """Why the upstream at base_url was cut off, if it was (engines restart on a new port)."""
        return self.ending or self._ended.get(base_url)


ENDED_KEPT = 64

OPEN_STREAMS = web.AppKey("open_streams", OpenStreams)

# Hop-by-hop and framing headers are ours to set, not the engine's.
_DROP_RESPONSE_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding",
                          "date", "server"}


async def forward(http: aiohttp.ClientSession, route: Route, client: web.Request, path: str, body: bytes,
                  stream: bool, upstream_headers: dict[str, str] | None = None,
                  translator: Translator | None = None, done_marker: bool = True) -> Answer[web.StreamResponse]:
    """POST body to the route's upstream at path; answer the client with its response plus the placement headers
    (through `translator` when the client speaks another API than the upstream). `done_marker`: the stream ends
    with OpenAI's [DONE]; another API's stream (passed through to a peer) is whole when it ends cleanly.

    The route's first-byte timeout bounds the wait for the response headers (a peer may be loading a model), its
    idle timeout each wait between chunks (a hung peer). UpstreamUnreachable means nothing was sent to the client
    yet, so the caller may retry elsewhere. A client that goes away once the answer has begun ends it early: the
    answer then says `cancelled`, with what was observed until then.
    """
    url = route.base_url + path
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", **(upstream_headers or {})}
    if route.api_key:
        headers["Authorization"] = f"Bearer {route.api_key}"
    streams = client.app.get(OPEN_STREAMS)
    if streams is None:  # an app without a shutdown or engine watch to end its streams
        streams = OpenStreams()
    sent_at = time.monotonic()
    try:
        async with asyncio.timeout(route.first_byte_timeout_s):
            try:
                upstream = await http.post(url, data=body, headers=headers, ssl=route.ssl)
            except aiohttp.ServerDisconnectedError:
                if route.forwarded:
                    raise
                # A kept-alive connection the engine had already closed (llama-server's HTTP server ends them
                # after a few requests): it never read the request, so it goes once more, on a new connection.
                upstream = await http.post(url, data=body, headers=headers, ssl=route.ssl)
    except (aiohttp.ClientError, OSError) as exc:
        why = streams.why_ended(route.base_url) or f"{url} could not be reached: {exc}"
        raise _unreachable(route, why) from exc
    except TimeoutError as exc:
        raise _unreachable(route, f"{url} sent nothing within {route.first_byte_timeout_s:g} s") from exc
    try:
        if not stream or upstream.status != 200:
            return await _whole(upstream, url, _reply_headers(route), translator)
        return await _stream(client, upstream, route.base_url, _reply_headers(route), route.idle_timeout_s,
                             streams, translator, done_marker, sent_at)
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


async def _whole(upstream: aiohttp.ClientResponse, url: str, extra_headers: dict[str, str],
                 translator: Translator | None = None) -> Answer[web.StreamResponse]:
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
    status = upstream.status
    if status >= 400:
        status, payload = upstream_error(status, payload)  # the error middleware puts it in the client's envelope
        headers["Content-Type"] = "application/json"
    elif translator is not None:
        payload = translator.whole(payload)
        headers["Content-Type"] = "application/json"
    return Answer(web.Response(body=payload, status=status, headers=headers), seen)


def _usage_tokens(payload: bytes) -> int | None:
    """usage.completion_tokens of an OpenAI answer; None when it has none (an embedding) or is not one."""
    try:
        tokens = json.loads(payload)["usage"]["completion_tokens"]
    except (ValueError, KeyError, TypeError):
        return None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0 else None


async def _stream(client: web.Request, upstream: aiohttp.ClientResponse, base_url: str,
                  extra_headers: dict[str, str], idle_timeout_s: float | None, streams: OpenStreams,
                  translator: Translator | None = None, done_marker: bool = True,
                  sent_at: float = 0.0) -> Answer[web.StreamResponse]:
    response = web.StreamResponse(status=200)
    response.content_type = translator.stream_content_type if translator is not None else "text/event-stream"
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.headers.update(extra_headers)
    tally = StreamTally(sent_at=sent_at)
    streams.add(upstream, base_url)
    try:
        await response.prepare(client)
        out = _Translated(response, translator) if translator is not None else response
        await _pump(upstream, out, base_url, tally, idle_timeout_s, streams, done_marker)
    except asyncio.CancelledError:
        # The client went away (its handler is cancelled): what passed until then is still an observation.
        return Answer(response, tally.observation(), cancelled=True)
    except ConnectionResetError:
        return Answer(response, tally.observation())
    finally:
        streams.discard(upstream)
    return Answer(response, tally.observation())


class _Translated:
    """Stands in for the client's response in _pump: complete server-sent events in, the translation out."""

    def __init__(self, response: web.StreamResponse, translator: Translator) -> None:
        self.response = response
        self.translator = translator

    async def write(self, data: bytes) -> None:
        out = bytearray()
        for line in data.split(b"\n"):
            if not line.startswith(b"data: "):
                continue  # blank separators, comments, event names: the chat stream carries all in data
            value = line[6:].strip()
            if value == b"[DONE]":
                out += self.translator.end()
                continue
            try:
                event = json.loads(value)
            except ValueError:
                continue  # not a chat chunk: nothing a translation could carry
            if isinstance(event, dict) and isinstance(event.get("error"), dict):  # the engine's, or _pump's own
                error = event["error"]
                out += self.translator.failed(str(error.get("message")), str(error.get("code")))
            elif isinstance(event, dict):
                out += self.translator.chunk(event)
        if out:
            await self.response.write(bytes(out))

    async def write_eof(self) -> None:
        await self.response.write_eof()


async def _pump(upstream: aiohttp.ClientResponse, response: web.StreamResponse | _Translated, base_url: str,
                tally: StreamTally, idle_timeout_s: float | None, streams: OpenStreams,
                done_marker: bool = True) -> None:
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
            tally.done = tally.done or not done_marker  # a clean end is the whole of a stream with no [DONE]
            if isinstance(response, _Translated) and not tally.done:  # its client waits for a closing event
                await response.response.write(response.translator.failed(
                    "the engine's stream ended before its last event", "upstream_failed"))
            break
        except (aiohttp.ClientError, TimeoutError) as exc:
            # After the first byte there is no retry: tell the client in the stream's own format, then end it.
            # A half-sent event is dropped, so the error event is not glued onto truncated JSON.
            ended = streams.why_ended(base_url)
            if ended is not None:
                await response.write(sse_error_event(ended, "shutting_down" if streams.ending else "engine_hung"))
                break
            why = f"no data for {idle_timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
            log.warning("stream from %s broke: %s", base_url, why)
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
