"""The API in-process against a fake engine: guards, error envelopes, streaming pass-through, cancellation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest
import yarl
from aiohttp.test_utils import TestServer

from hybridd.api.app import make_app
from hybridd.config import Config, ModelEntry, ServerConfig
from hybridd.node.catalog import Catalog
from tests.fake_upstream import FakeEngine, sse, start_fake

MAX_BODY = 64 * 1024


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeEngine, TestServer]]:
    engine = FakeEngine()
    server = await start_fake(engine)
    yield engine, server
    await engine.release.put(None)
    await server.close()


@pytest.fixture
async def hybridd(fake: tuple[FakeEngine, TestServer]) -> AsyncIterator[str]:
    _, upstream = fake
    base = str(upstream.make_url("/")).rstrip("/")
    models = (
        ModelEntry(name="m", engine="external", base_url=base, aliases=("alias-m",), upstream_model="fake"),
        ModelEntry(name="gguf", path=None, engine="external", base_url=base + "/v1"),
    )
    config = Config(server=ServerConfig(max_body_bytes=MAX_BODY))
    server = TestServer(make_app(config, Catalog(models)), host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    yield str(server.make_url("/")).rstrip("/")
    await server.close()


async def post(url: str, body: bytes | dict, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:  # type: ignore[type-arg]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(url, data=data, headers=headers) as response:
        return response.status, dict(response.headers), await response.json(content_type=None)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("body", "status", "fragment"), [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object, got an array"),
    ({"messages": []}, 400, "'model' is required"),
    ({"model": 7, "messages": []}, 400, "'model' must be a non-empty string, got an integer"),
    ({"model": "m", "messages": "hi"}, 400, "'messages' must be an array, got a string"),
    ({"model": "m", "messages": [{"content": "x"}]}, 400, "'messages[0].role' must be a string"),
    ({**CHAT, "stream": "yes"}, 400, "'stream' must be a boolean, got a string"),
    ({**CHAT, "max_tokens": 0}, 400, "'max_tokens' must be >= 1"),
    ({**CHAT, "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({**CHAT, "model": "nope"}, 404, "model 'nope' does not exist here (available: m, gguf)"),
])
async def test_bad_inputs_get_envelope_and_status(hybridd: str, body, status: int, fragment: str) -> None:  # type: ignore[no-untyped-def]
    code, _, reply = await post(hybridd + "/v1/chat/completions", body)
    assert code == status
    assert set(reply["error"]) >= {"message", "type", "code"}
    assert fragment in reply["error"]["message"]


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


@pytest.mark.parametrize(("raw", "param", "fragment"), [
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": ' + _deep(5000) + b"}",
     "tools" + "[0]" * 14 + "...", "nests arrays and objects deeper than 100 levels"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": ' + _deep(101) + b"}",
     "tools" + "[0]" * 14 + "...", "nests arrays and objects deeper than 100 levels"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": ' + b"7" * 5000 + b"}",
     "seed", "holds a number too long to read"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "hybridd": {"min_ctx": "\xc2\xb2"}}',
     "hybridd.min_ctx", "'hybridd.min_ctx' must be an integer from 0 to 2147483648, got '²'"),
    (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
     "messages[0].content[0].text", "'messages[0].content[0].text' must be a string, got an integer"),
    (b'{"model": "m", "messages": [{"role": "user", "content": [7]}]}',
     "messages[0].content[0]", "'messages[0].content[0]' must be an object, got an integer"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"abc": 1}}',
     "logit_bias", "'logit_bias' keys must be token ids (decimal integers), got 'abc'"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "ok \\ud83d\\ude00 then \\ud800 alone"}]}',
     "messages[0].content", "'messages[0].content' holds a lone surrogate (U+D800) at character 10"),
])
async def test_values_python_cannot_take_are_400_naming_the_field(hybridd: str, raw: bytes, param: str,
                                                                   fragment: str) -> None:
    code, _, reply = await post(hybridd + "/v1/chat/completions", raw)
    assert code == 400, reply
    assert reply["error"]["param"] == param
    assert fragment in reply["error"]["message"]


async def test_a_min_ctx_header_of_other_digits_is_400_naming_it(hybridd: str) -> None:
    code, _, reply = await post(hybridd + "/v1/chat/completions", CHAT, {"x-hybridd-min-ctx": "²"})
    assert code == 400 and reply["error"]["param"] == "x-hybridd-min-ctx"


async def test_a_malformed_origin_is_400_naming_the_header(hybridd: str) -> None:
    for origin in ("http://[::1", "http://[zz]:80"):
        code, _, reply = await post(hybridd + "/v1/chat/completions", CHAT, {"Origin": origin})
        assert code == 400 and reply["error"]["code"] == "invalid_origin"
        assert reply["error"]["message"].startswith(f"'Origin' header '{origin}' is not a valid origin")


@pytest.mark.parametrize("head", [
    b"X-Bad: a\x01b\r\n",  # a control character in a value
    b"no colon here\r\n",  # not a header line at all
    b"X-Long: " + b"a" * 9000 + b"\r\n",  # longer than aiohttp reads
])
async def test_requests_aiohttp_cannot_parse_get_the_envelope(hybridd: str, head: bytes) -> None:
    url = yarl.URL(hybridd)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n" + head + b"Content-Length: 0\r\n\r\n")
    reply = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    status_line, _, rest = reply.partition(b"\r\n")
    head_text, _, body = rest.partition(b"\r\n\r\n")
    assert status_line.split()[1] == b"400"
    assert b"content-type: application/json" in head_text.lower()
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "malformed_request"
    assert error["message"].startswith("malformed HTTP request: ")


async def test_oversize_body_is_413_declared_or_chunked(hybridd: str) -> None:
    big = json.dumps({**CHAT, "pad": "x" * MAX_BODY}).encode()
    code, _, reply = await post(hybridd + "/v1/chat/completions", big)
    assert code == 413 and reply["error"]["code"] == "request_too_large"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b" " * (MAX_BODY // 2)

    async with aiohttp.ClientSession() as session, \
            session.post(hybridd + "/v1/chat/completions", data=chunks()) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(("headers", "status"), [
    ({"Host": "evil.example"}, 403),
    ({"Host": "evil.example:11435"}, 403),
    ({"Host": "192.168.1.20:11435"}, 403),
    ({"Host": "localhost:11435"}, 200),
    ({"Host": "[::1]:11435"}, 200),
    ({"Origin": "https://evil.example"}, 403),
    ({"Origin": "null"}, 403),
    ({"Origin": "http://localhost:3000"}, 200),
    ({"Origin": "http://127.0.0.1:8080"}, 200),
])
async def test_host_and_origin_guards(hybridd: str, headers: dict[str, str], status: int) -> None:
    code, _, reply = await post(hybridd + "/v1/chat/completions", CHAT, headers)
    assert code == status
    if status == 403:
        assert reply["error"]["type"] == "permission_error"


async def test_wrong_path_and_method(hybridd: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(hybridd + "/v2/whatever") as response:
            assert response.status == 404
            assert "no route for GET /v2/whatever" in (await response.json())["error"]["message"]
        async with session.delete(hybridd + "/v1/chat/completions") as response:
            assert response.status == 405
            assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_non_streaming_pass_through_rewrites_upstream_model(hybridd: str, fake) -> None:  # type: ignore[no-untyped-def]
    engine, _ = fake
    code, headers, reply = await post(hybridd + "/v1/chat/completions", {**CHAT, "model": "alias-m"})
    assert code == 200 and reply["choices"][0]["message"]["content"] == "ok"
    assert headers["x-hybridd-placement"] == "local"
    assert "external server" in headers["x-hybridd-reason"]
    assert engine.requests[-1]["model"] == "fake"  # upstream_model replaces the client's id


async def test_upstream_error_is_enveloped_with_its_status(hybridd: str, fake) -> None:  # type: ignore[no-untyped-def]
    engine, _ = fake
    engine.status, engine.error_body = 422, b'{"detail": "context too long"}'
    code, _, reply = await post(hybridd + "/v1/chat/completions", CHAT)
    assert code == 422
    assert reply["error"]["message"] == "engine error: context too long"


# What llama-cpp-python's server answers for a body its schema refuses (`top_k: -100`): HTTP 500, FastAPI's
# validation text, and the frame that raised, path and all.
TOP_K_REFUSED = json.dumps({"error": {
    "message": "1 validation error:\n  {'type': 'greater_than_equal', 'loc': ('body', 'top_k'), 'msg': 'Input should "
               "be greater than or equal to 0', 'input': -100, 'ctx': {'ge': 0}}\n\n  File \"/srv/venv/lib/python3.11/"
               "site-packages/llama_cpp/server/app.py\", line 264, in create_completion\n    POST /v1/completions",
    "type": "internal_server_error", "param": None, "code": None}}).encode()
ENGINE_BROKE = json.dumps({"error": {
    "message": "could not open /srv/models/cache/x.bin\n\n  File \"/srv/venv/lib/python3.11/site-packages/llama_cpp/"
               "llama.py\", line 1321, in _create_completion\n    POST /v1/completions",
    "type": "internal_server_error", "param": None, "code": None}}).encode()


@pytest.mark.parametrize(("status", "payload", "answered", "param", "message"), [
    (500, TOP_K_REFUSED, 400, "top_k", "engine refused 'top_k': Input should be greater than or equal to 0"),
    (500, ENGINE_BROKE, 502, None, "engine error: could not open <path>"),
    (500, b"Traceback (most recent call last):\n  File \"/srv/x.py\", line 3\nKeyError: 'x'", 502, None,
     "engine error: HTTP 500 without a message"),
    (400, b'{"error": {"message": "/srv/models/a.gguf holds 512", "type": "invalid_request_error", '
          b'"param": "messages", "code": "context_length_exceeded"}}', 400, "messages", "<path> holds 512"),
])
async def test_engine_errors_say_whose_mistake_and_leak_no_path(hybridd: str, fake, status: int, payload: bytes,  # type: ignore[no-untyped-def]
                                                                answered: int, param: str | None,
                                                                message: str) -> None:
    engine, _ = fake
    engine.status, engine.error_body = status, payload
    for stream in (False, True):
        code, _, reply = await post(hybridd + "/v1/chat/completions", {**CHAT, "stream": stream})
        assert code == answered
        assert reply["error"]["message"] == message and reply["error"]["param"] == param
        assert "File" not in reply["error"]["message"] and "/srv" not in reply["error"]["message"]


async def test_unreachable_upstream_is_502(hybridd: str, fake) -> None:  # type: ignore[no-untyped-def]
    _, upstream = fake
    await upstream.close()
    code, _, reply = await post(hybridd + "/v1/chat/completions", CHAT)
    assert code == 502 and reply["error"]["code"] == "upstream_unreachable"


async def test_stream_chunks_arrive_before_the_engine_finishes(hybridd: str, fake) -> None:  # type: ignore[no-untyped-def]
    engine, _ = fake
    async with aiohttp.ClientSession() as session, \
            session.post(hybridd + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["x-hybridd-placement"] == "local"
        for word in ("one", "two", "three"):
            await engine.release.put(sse(word))
            # The engine has sent exactly this chunk and is waiting: hybridd must not hold it back.
            chunk = await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=5)
            assert json.loads(chunk[6:])["choices"][0]["delta"]["content"] == word
        await engine.release.put(None)
        assert (await response.content.read()).strip() == b"data: [DONE]"


async def test_client_disconnect_mid_stream_cancels_engine_work(hybridd: str, fake) -> None:  # type: ignore[no-untyped-def]
    engine, _ = fake
    async with aiohttp.ClientSession() as session:
        response = await session.post(hybridd + "/v1/chat/completions", json={**CHAT, "stream": True})
        await engine.release.put(sse("first"))
        await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=5)
        response.close()  # the client goes away mid-stream
    await asyncio.wait_for(engine.disconnected.wait(), timeout=5)


async def test_embeddings_pass_through(hybridd: str) -> None:
    code, _, reply = await post(hybridd + "/v1/embeddings", {"model": "m", "input": "hello"})
    assert code == 200 and reply["data"][0]["embedding"] == [0.5, 0.25]
    code, _, reply = await post(hybridd + "/v1/embeddings", {"model": "m", "input": "x", "stream": True})
    assert code == 400 and "not supported for embeddings" in reply["error"]["message"]


async def test_models_list_and_status(hybridd: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(hybridd + "/v1/models") as response:
            listing = await response.json()
        assert [m["id"] for m in listing["data"]] == ["m", "gguf", "alias-m"]
        assert listing["data"][0]["aliases"] == ["alias-m"] and listing["data"][2]["hybridd"]["alias_of"] == "m"
        async with session.get(hybridd + "/v1/models/alias-m") as response:
            assert (await response.json())["id"] == "m"
        async with session.get(hybridd + "/hybridd/v1/status") as response:
            status = await response.json()
        assert status["version"] and status["uptime_s"] >= 0
        assert {m["name"] for m in status["models"]} == {"m", "gguf"}


def test_config_unused_replace_guard() -> None:
    # ServerConfig is frozen: handlers can't mutate shared config by accident.
    server = ServerConfig()
    with pytest.raises(AttributeError):
        server.port = 1  # type: ignore[misc]
    assert replace(server, port=1).port == 1


async def test_a_stream_broken_mid_event_ends_with_a_clean_error_event(hybridd: str, fake) -> None:  # type: ignore[no-untyped-def]
    engine, _ = fake
    async with aiohttp.ClientSession() as session, \
            session.post(hybridd + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        await engine.release.put(sse("whole") + b'data: {"choices": [{"ind')  # one event and a half
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=5)
        assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "whole"
        engine.break_stream = True
        await engine.release.put(b"")
        rest = await asyncio.wait_for(response.content.read(), timeout=5)
    events = [e for e in rest.split(b"\n\n") if e]
    assert len(events) == 1 and json.loads(events[0][6:])["error"]["code"] == "upstream_failed"


async def test_a_stream_broken_inside_its_first_event_sends_only_the_error(hybridd: str, fake) -> None:  # type: ignore[no-untyped-def]
    engine, _ = fake
    async with aiohttp.ClientSession() as session, \
            session.post(hybridd + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        engine.break_stream = True  # send a piece with no event boundary at all, then end the stream there
        await engine.release.put(sse("never finished")[:10])
        body = await asyncio.wait_for(response.content.read(), timeout=5)
    assert body.startswith(b"data: {") and json.loads(body.strip()[6:])["error"]["code"] == "upstream_failed"


@pytest.mark.parametrize(("payload", "tokens"), [
    (b'{"usage": {"prompt_tokens": 5, "completion_tokens": 17}}', 17),
    (b'{"usage": {"prompt_tokens": 5, "total_tokens": 5}}', None),  # an embedding: nothing to learn
    (b'{"usage": {"completion_tokens": "lots"}}', None),  # a lying engine or peer teaches nothing
    (b'{"usage": {"completion_tokens": -3}}', None),
    (b'{"usage": {"completion_tokens": true}}', None),
    (b'{"usage": null}', None),
    (b"[1, 2]", None),
    (b"not json", None),
])
def test_a_whole_answer_reports_its_length_from_usage_only_when_it_is_a_count(payload: bytes, tokens) -> None:  # type: ignore[no-untyped-def]
    from hybridd.api.proxy import _usage_tokens

    assert _usage_tokens(payload) == tokens


def test_a_stream_is_timed_from_the_events_after_its_first_read() -> None:
    from hybridd.api.proxy import StreamTally

    # read all at once (a proxy that fell behind its engine): no speed, whatever the length
    assert StreamTally(events=300, first_events=300, first_at=1.0, last_at=1.0).decode_tok_s() is None
    # 10 events in the first read, 40 tokens + [DONE] after it over 2 s: 20 tok/s
    assert StreamTally(events=51, first_events=10, first_at=1.0, last_at=3.0).decode_tok_s() == 20.0
    assert StreamTally(events=12, first_events=4, first_at=1.0, last_at=3.0).decode_tok_s() is None  # too few
