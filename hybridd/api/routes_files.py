"""/v1/files as OpenAI serves it: multipart upload streamed to disk, list, retrieve, content, delete."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import BodyPartReader, web

from hybridd.api import keys
from hybridd.api.envelope import error_response
from hybridd.api.guards import body_deadline_s, body_timed_out
from hybridd.errors import BadRequest, BodyTooLarge, HybriddError
from hybridd.jobs.dataset import MAX_LINE_BYTES, check_chat_jsonl
from hybridd.jobs.files import FileStore, Upload
from hybridd.validate import JSON, Reader

log = logging.getLogger("hybridd.files")

PURPOSES = ("fine-tune",)
MAX_LIST = 10_000
MAX_FIELD_BYTES = 1024  # a form field other than the file (purpose)
MAX_FILENAME_CHARS = 1024
# Multipart framing around the file: boundaries and part headers. A body declared longer than the file cap and
# this cannot hold an allowed file.
MULTIPART_SLACK = 64 * 1024
_WRITE_BYTES = 1024 * 1024  # disk writes are batched to this, each off the event loop


def add_routes(app: web.Application) -> None:
    """Register /v1/files and /v1/files/{file_id}[/content]."""
    app.router.add_post("/v1/files", upload)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", retrieve)
    app.router.add_delete("/v1/files/{file_id}", delete)
    app.router.add_get("/v1/files/{file_id}/content", content)


def _store(request: web.Request) -> FileStore:
    return request.app[keys.FILES]


async def upload(request: web.Request) -> web.StreamResponse:
    """Stream the `file` part to disk under files.max_bytes and its own deadline, check it, keep it."""
    store = _store(request)
    limit = request.app[keys.NODE].config.files.max_bytes
    declared = request.content_length
    if declared is not None and declared > limit + MULTIPART_SLACK:
        raise BodyTooLarge(f"the upload is too large ({declared} bytes; files.max_bytes is {limit})")
    if request.content_type != "multipart/form-data":
        raise BadRequest(f"an upload is multipart/form-data with 'file' and 'purpose', got {request.content_type}")
    # The rule every body follows (guards.body_deadline), over the whole upload: a trickled one is cut.
    deadline_s = body_deadline_s(declared if declared is not None else limit + MULTIPART_SLACK)
    staged: list[Upload] = []
    try:
        async with asyncio.timeout(deadline_s):
            fields, filename = await _read_form(request, store, limit, staged)
    except TimeoutError:
        _discard(staged)
        return await body_timed_out(request, deadline_s)
    except HybriddError as exc:
        _discard(staged)
        if isinstance(exc, BodyTooLarge):
            # The rest of the body is not read here; aiohttp drains it before the close so that the client,
            # still sending, reads this answer rather than a reset.
            response = error_response(exc.status, exc.message, code=exc.code)
            response.force_close()
            return response
        raise
    except BaseException:
        _discard(staged)
        raise
    try:
        form = Reader(fields, BadRequest, JSON).table()
        purpose = form.at("purpose").choice(PURPOSES)
        if not staged:
            raise BadRequest("'file' is required", "file")
        sha256 = await asyncio.to_thread(staged[0].seal)
        await asyncio.to_thread(check_chat_jsonl, staged[0].lines(MAX_LINE_BYTES))
        stored = store.add(staged[0], sha256, filename, purpose, time.time())
    finally:
        _discard(staged)  # a kept upload has been renamed away: nothing left to remove
    log.info("file %s: %d bytes for %s kept (sha256 %s)", stored.id, stored.bytes, purpose, sha256[:16])
    return web.json_response(stored.as_json())


async def _read_form(request: web.Request, store: FileStore, limit: int,
                     staged: list[Upload]) -> tuple[dict[str, str], str]:
    """The form's text fields and the file's name; the file part is written to an upload appended to `staged`."""
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from exc
    fields: dict[str, str] = {}
    filename = ""
    while True:
        try:
            part = await reader.next()
        except ValueError as exc:
            raise BadRequest(f"malformed multipart body: {exc}") from exc
        if part is None:
            return fields, filename
        if not isinstance(part, BodyPartReader):
            raise BadRequest("a nested multipart part is not a form field")
        name = part.name or ""
        if name == "file":
            if staged:
                raise BadRequest("'file' is given twice", "file")
            filename = part.filename or "file"
            if len(filename) > MAX_FILENAME_CHARS or not filename.isprintable():
                raise BadRequest(f"'file' has a file name of over {MAX_FILENAME_CHARS} characters or with control "
                                 "characters", "file")
            staged.append(store.start_upload())
            await _write_part(part, staged[0], limit)
        else:
            fields[name] = await _read_field(part, name)


async def _write_part(part: BodyPartReader, target: Upload, limit: int) -> None:
    """Copy the part to target in batches written off the loop; BodyTooLarge once it passes `limit` bytes."""
    batch = bytearray()
    size = 0
    while chunk := await part.read_chunk(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the uploaded file is larger than files.max_bytes ({limit} bytes)")
        batch += chunk
        if len(batch) >= _WRITE_BYTES:
            await asyncio.to_thread(target.write, bytes(batch))
            batch.clear()
    if batch:
        await asyncio.to_thread(target.write, bytes(batch))


async def _read_field(part: BodyPartReader, name: str) -> str:
    value = bytearray()
    while chunk := await part.read_chunk(MAX_FIELD_BYTES):
        value += chunk
        if len(value) > MAX_FIELD_BYTES:
            raise BadRequest(f"form field {name!r} is longer than {MAX_FIELD_BYTES} bytes", name)
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise BadRequest(f"form field {name!r} is not UTF-8 text", name) from exc


def _discard(staged: list[Upload]) -> None:
    for item in staged:
        item.discard()


def read_limit(query: Reader, default: int, maximum: int) -> int:
    """A list's `limit` query parameter: an integer from 1 to maximum; BadRequest naming it otherwise."""
    text = query.at("limit").of(str, str(default))
    if not text.isdecimal() or not 1 <= int(text) <= maximum:
        raise BadRequest(f"'limit' must be an integer from 1 to {maximum}, got {text[:20]!r}", "limit")
    return int(text)


async def list_files(request: web.Request) -> web.Response:
    """The file objects, newest first unless order=asc; `purpose`, `after` and `limit` as OpenAI takes them."""
    query = Reader(dict(request.query), BadRequest, JSON).table()
    order = query.at("order").choice(("asc", "desc"), "desc")
    limit = read_limit(query, MAX_LIST, MAX_LIST)
    found = _store(request).list_files(query.at("purpose").of(str, None), newest_first=order == "desc",
                                       after=query.at("after").of(str, None), limit=limit + 1)
    page = found[:limit]
    return web.json_response({
        "object": "list",
        "data": [item.as_json() for item in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(found) > limit,
    })


async def retrieve(request: web.Request) -> web.Response:
    """One file object."""
    return web.json_response(_store(request).get(request.match_info["file_id"]).as_json())


async def content(request: web.Request) -> web.StreamResponse:
    """The file's bytes, exactly as uploaded."""
    store = _store(request)
    stored = store.get(request.match_info["file_id"])
    return web.FileResponse(store.content_path(stored.sha256),
                            headers={"Content-Type": "application/octet-stream"})


async def delete(request: web.Request) -> web.Response:
    """Delete the file object (its content too, once no other file object names it)."""
    stored = _store(request).delete(request.match_info["file_id"])
    log.info("file %s deleted", stored.id)
    return web.json_response({"id": stored.id, "object": "file", "deleted": True})
