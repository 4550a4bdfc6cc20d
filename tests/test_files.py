"""/v1/files driven by the official openai client against the in-process app on port 0 (and a real daemon), over
real SQLite and disk."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import openai
import pytest
from aiohttp.test_utils import TestServer

from hybridd.api.app import make_app
from hybridd.config import Config, FilesConfig, ServerConfig
from hybridd.errors import BadRequest
from hybridd.jobs.dataset import check_chat_jsonl
from hybridd.node.catalog import Catalog
from tests.conftest import start_daemon, stop_daemon

Serve = Callable[..., "contextlib.AbstractAsyncContextManager[openai.AsyncOpenAI]"]


def example(*turns: tuple[str, object]) -> bytes:
    return json.dumps({"messages": [{"role": role, "content": text} for role, text in turns]}).encode() + b"\n"


GOOD = example(("user", "hi"), ("assistant", "hello")) + example(("system", "terse"), ("user", "2+2"),
                                                                  ("assistant", [{"type": "text", "text": "4"}]))


@pytest.fixture
def serve(tmp_path: Path) -> Serve:
    """An async context: a daemon app on port 0 with its state in tmp_path/state, and an openai client for it."""

    @contextlib.asynccontextmanager
    async def start(max_bytes: int = FilesConfig.max_bytes,
                    max_body_bytes: int = ServerConfig.max_body_bytes) -> AsyncIterator[openai.AsyncOpenAI]:
        config = Config(server=ServerConfig(max_body_bytes=max_body_bytes), state_dir=tmp_path / "state",
                        files=FilesConfig(max_bytes=max_bytes))
        server = TestServer(make_app(config, Catalog(())), host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="unused", max_retries=0,
                                    timeout=30)
        try:
            yield client
        finally:
            await client.close()
            await server.close()

    return start


def stored_blobs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "state" / "files").iterdir())


async def test_upload_list_retrieve_content_delete(serve: Serve, tmp_path: Path) -> None:
    async with serve() as client:
        before = int(time.time())
        created = await client.files.create(file=("train.jsonl", GOOD), purpose="fine-tune")
        assert created.id.startswith("file-") and created.object == "file" and created.status == "processed"
        assert (created.bytes, created.filename, created.purpose) == (len(GOOD), "train.jsonl", "fine-tune")
        assert before <= created.created_at <= time.time()
        listed = await client.files.list(purpose="fine-tune")
        assert [f.id for f in listed.data] == [created.id] and listed.has_more is False
        assert (await client.files.list(purpose="batch")).data == []
        assert await client.files.retrieve(created.id) == created
        assert (await client.files.content(created.id)).read() == GOOD
        deleted = await client.files.delete(created.id)
        assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
        for call in (client.files.retrieve, client.files.content, client.files.delete):
            with pytest.raises(openai.NotFoundError) as caught:
                await call(created.id)
            assert caught.value.code == "file_not_found"
            assert f"no file '{created.id}' here" in caught.value.message
        assert (await client.files.list()).data == []
        with pytest.raises(openai.NotFoundError) as long_id:
            await client.files.retrieve("file-" + "x" * 5000)
        assert long_id.value.body["message"] == f"no file {'file-' + 'x' * 95!r} here"
    assert (tmp_path / "state" / "jobs.db").is_file() and stored_blobs(tmp_path) == []


async def test_the_list_pages_as_the_sdk_walks_it(serve: Serve) -> None:
    async with serve() as client:
        ids = [(await client.files.create(file=(f"{i}.jsonl", GOOD), purpose="fine-tune")).id for i in range(5)]
        page = await client.files.list(limit=2, order="asc")
        assert [f.id for f in page.data] == ids[:2] and page.has_more
        assert [f.id async for f in client.files.list(limit=2, order="asc")] == ids
        assert [f.id async for f in client.files.list(limit=3)] == ids[::-1]


@pytest.mark.parametrize(("lines", "message"), [
    (GOOD + b'{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}\n',
     'line 3: messages[1].role: unknown value "robot" (valid: system, user, assistant, tool)'),
    (GOOD + b"\n" + b"{not json}\n",
     "line 4: not valid JSON: Expecting property name enclosed in double quotes at column 2"),
    (b'{"messages": "\xff"}', "line 1: not UTF-8 text (byte 15)"),
    (b'{"messages": [{"role": "user", "content": "a"}]}\n', "line 1: messages: has no assistant message"),
    (b'{"messages": []}', "line 1: messages: must not be empty"),
    (b'{"mesages": []}', 'line 1: mesages: unknown key (valid: messages, parallel_tool_calls, tools)'),
    (b'[1]', "line 1: expected an object, got an array"),
    (GOOD + b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
     "line 3: messages[0].content: expected a string or an array of text parts, got an integer"),
    (b'{"messages": [{"role": "assistant", "content": [{"type": "image_url"}]}]}',
     'line 1: messages[0].content[0].type: unknown value "image_url" (valid: text)'),
    (b'{"messages": [{"role": "assistant", "content": "x"}], "tools": [{"type": "function", "function": {}}]}',
     "line 1: tools[0].function.name: missing"),
    (b"\n\n", "the file holds no training examples"),
])
def test_a_bad_line_is_named_with_its_field(lines: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        check_chat_jsonl(lines.splitlines(keepends=True))
    assert caught.value.message.startswith(message) and caught.value.param == "file"


def test_tool_calls_and_tools_pass() -> None:
    line = {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny.", "weight": 1}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}
    assert check_chat_jsonl([json.dumps(line).encode(), b"\n", *GOOD.splitlines()]) == 3


async def test_a_bad_line_is_400_naming_line_and_field_and_nothing_is_kept(serve: Serve, tmp_path: Path) -> None:
    bad = GOOD + b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}\n'
    async with serve() as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
        assert caught.value.body["message"] == "line 3: messages[0].content: missing" and caught.value.param == "file"
        with pytest.raises(openai.BadRequestError) as purpose:
            await client.files.create(file=("t.jsonl", GOOD), purpose="batch")
        assert purpose.value.body["message"] == "'purpose' must be one of fine-tune, got 'batch'"
        assert (await client.files.list()).data == []
    assert stored_blobs(tmp_path) == []


async def test_an_upload_over_files_max_bytes_is_413_and_leaves_nothing(serve: Serve, tmp_path: Path) -> None:
    big = GOOD * 200  # about 25 KB, over a 4 KB cap yet within files.max_bytes + the multipart slack
    async with serve(max_bytes=4096) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.files.create(file=("big.jsonl", big), purpose="fine-tune")
        assert caught.value.status_code == 413
        assert "larger than files.max_bytes (4096 bytes)" in caught.value.message
        # Declared far past the cap: refused before a byte of it is read.
        with pytest.raises(openai.APIStatusError) as early:
            await client.files.create(file=("huge.jsonl", GOOD * 2000), purpose="fine-tune")
        assert early.value.status_code == 413 and "files.max_bytes is 4096" in early.value.message
        # Under the cap (and over nothing else: server.max_body_bytes does not apply to uploads).
        assert (await client.files.create(file=("ok.jsonl", GOOD), purpose="fine-tune")).bytes == len(GOOD)
    assert len(stored_blobs(tmp_path)) == 1


async def test_an_upload_is_not_held_to_server_max_body_bytes(serve: Serve) -> None:
    big = GOOD * 100  # about 12 KB
    async with serve(max_body_bytes=1024) as client:
        created = await client.files.create(file=("big.jsonl", big), purpose="fine-tune")
        assert (await client.files.content(created.id)).read() == big
        with pytest.raises(openai.APIStatusError) as caught:  # other bodies still are
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 2000}])
        assert caught.value.status_code == 413


async def test_uploads_of_the_same_content_share_one_blob(serve: Serve, tmp_path: Path) -> None:
    async with serve() as client:
        first = await client.files.create(file=("a.jsonl", GOOD), purpose="fine-tune")
        second = await client.files.create(file=("b.jsonl", GOOD), purpose="fine-tune")
        assert first.id != second.id
        assert len(stored_blobs(tmp_path)) == 1
        await client.files.delete(first.id)
        assert (await client.files.content(second.id)).read() == GOOD
        await client.files.delete(second.id)
    assert stored_blobs(tmp_path) == []


async def test_the_store_survives_a_restart(serve: Serve, tmp_path: Path) -> None:
    async with serve() as client:
        created = await client.files.create(file=("keep.jsonl", GOOD), purpose="fine-tune")
    # What a crash would strand: a partial upload, and content no file object names.
    (tmp_path / "state" / "files" / ".upload-0123456789abcdef").write_bytes(b"partial")
    (tmp_path / "state" / "files" / ("0" * 64)).write_bytes(b"orphan")
    async with serve() as client:
        assert [f.id for f in (await client.files.list()).data] == [created.id]
        assert await client.files.retrieve(created.id) == created
        assert (await client.files.content(created.id)).read() == GOOD
    assert len(stored_blobs(tmp_path)) == 1


async def test_an_upload_trickled_is_cut_with_408_and_leaves_nothing(serve: Serve, tmp_path: Path) -> None:
    async with serve() as client:
        url = client.base_url
        reader, writer = await asyncio.open_connection(url.host, url.port)
        head = (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{url.port}\r\nContent-Length: 4000\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n\r\n").encode()
        writer.write(head + b'--b\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n')
        started = time.monotonic()
        reply = b""
        while not reply and time.monotonic() - started < 30:
            writer.write(b" ")
            with contextlib.suppress(TimeoutError):
                reply = await asyncio.wait_for(reader.read(65536), 0.5)
        took = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b'"code": "body_timeout"' in reply
        assert 9.5 <= took < 15, took  # 10 s and a second per 256 KiB of the declared 4000 bytes
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and the connection is closed with it
        writer.close()
        assert (await client.files.list()).data == []
    assert stored_blobs(tmp_path) == []


def test_a_real_daemon_keeps_files_under_xdg_state_home_across_a_restart(tmp_path: Path) -> None:
    config = '[server]\nlisten = "127.0.0.1:0"\n[[models]]\nname = "ext"\nbase_url = "http://127.0.0.1:9"\n'
    daemon = start_daemon(config, tmp_path)
    try:
        client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        created = client.files.create(file=("train.jsonl", GOOD), purpose="fine-tune")
    finally:
        stop_daemon(daemon)
    state = tmp_path / "state" / "hybridd"
    assert (state / "jobs.db").is_file() and [p.name for p in (state / "files").iterdir()] == [created_sha(GOOD)]
    daemon = start_daemon(config, tmp_path)
    try:
        client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        assert [f.id for f in client.files.list()] == [created.id]
        assert client.files.content(created.id).read() == GOOD
    finally:
        stop_daemon(daemon)


def created_sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()
