"""/v1/fine_tuning/jobs as OpenAI serves it, and the routes paired nodes use to train for each other."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from hybridd.api import keys
from hybridd.api.guards import body_deadline_s, body_timed_out
from hybridd.api.routes_files import read_limit
from hybridd.errors import BadRequest, BodyTooLarge, FileNotFound, JobNotFound
from hybridd.jobs.dataset import MAX_LINE_BYTES, check_chat_jsonl
from hybridd.jobs.files import Upload
from hybridd.node.request import read_json
from hybridd.node.training import Trainings
from hybridd.validate import JSON, Reader

MAX_PAGE = 100
DEFAULT_PAGE = 20
_SHA256 = "{sha256:[0-9a-f]{64}}"


def add_routes(app: web.Application) -> None:
    """The fine-tuning API (both listeners) and the result download."""
    app.router.add_post("/v1/fine_tuning/jobs", create)
    app.router.add_get("/v1/fine_tuning/jobs", list_jobs)
    app.router.add_get("/v1/fine_tuning/jobs/{job_id}", retrieve)
    app.router.add_post("/v1/fine_tuning/jobs/{job_id}/cancel", cancel)
    app.router.add_get("/v1/fine_tuning/jobs/{job_id}/events", events)
    app.router.add_get("/v1/fine_tuning/jobs/{job_id}/checkpoints", checkpoints)
    app.router.add_get("/hybridd/v1/fine_tuning/jobs/{job_id}/result", result)


def add_peer_routes(app: web.Application) -> None:
    """What a paired desktop uses to send a dataset by its sha256 (the LAN listener only)."""
    app.router.add_get(f"/hybridd/v1/files/{_SHA256}", file_by_sha256)
    app.router.add_put(f"/hybridd/v1/files/{_SHA256}", put_file)


def _jobs(request: web.Request) -> Trainings:
    return request.app[keys.TRAININGS]


def _page(request: web.Request) -> tuple[str | None, int]:
    query = Reader(dict(request.query), BadRequest, JSON).table()
    return query.at("after").of(str, None), read_limit(query, DEFAULT_PAGE, MAX_PAGE)


def _listing(items: list[Any], limit: int, shape: Any) -> web.Response:
    page = items[:limit]
    return web.json_response({"object": "list", "data": [shape(item) for item in page],
                              "has_more": len(items) > limit})


async def create(request: web.Request) -> web.Response:
    """A new job: 200 with the job queued where it will train, or an error naming the field or the numbers."""
    body = read_json(await request.read())
    key = request.headers.get("Idempotency-Key")
    if key is not None and (len(key) > 256 or not key.isprintable()):
        raise BadRequest("Idempotency-Key: up to 256 printable characters", "Idempotency-Key")
    from_node = request.app[keys.PEER].authorize(request) if keys.PEER in request.app else None
    job = await _jobs(request).create(body, key, from_node)
    return web.json_response(job.as_json())


async def list_jobs(request: web.Request) -> web.Response:
    after, limit = _page(request)
    return _listing(_jobs(request).store.list_jobs(after, limit + 1), limit, lambda j: j.as_json())


async def retrieve(request: web.Request) -> web.Response:
    return web.json_response(_jobs(request).get(request.match_info["job_id"]).as_json())


async def cancel(request: web.Request) -> web.Response:
    job = await _jobs(request).cancel(request.match_info["job_id"])
    return web.json_response(job.as_json())


async def events(request: web.Request) -> web.Response:
    """Newest first, as OpenAI lists them; `order=asc` (hybridd's) lists them oldest first."""
    jobs = _jobs(request)
    job = jobs.get(request.match_info["job_id"])
    after, limit = _page(request)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest(f"'order' is asc or desc, got {order[:20]!r}", "order")
    found = jobs.store.events(job.id, after, limit + 1, newest_first=order == "desc")
    return _listing(found, limit, lambda e: e.as_json())


async def checkpoints(request: web.Request) -> web.Response:
    jobs = _jobs(request)
    job = jobs.get(request.match_info["job_id"])
    after, limit = _page(request)
    found = jobs.store.checkpoints(job.id, after, limit + 1)
    return _listing(found, limit, lambda c: c.as_json(job.fine_tuned_model))


async def result(request: web.Request) -> web.StreamResponse:
    """What a succeeded job made (an adapter or model GGUF), with its sha256 in X-Hybridd-Sha256."""
    job = _jobs(request).get(request.match_info["job_id"])
    if job.status != "succeeded" or job.result is None:
        raise JobNotFound(f"job {job.id} has no result ({job.status})")
    return web.FileResponse(job.result["path"], headers={"Content-Type": "application/octet-stream",
                                                         "X-Hybridd-Sha256": job.result["sha256"]})


async def file_by_sha256(request: web.Request) -> web.Response:
    """The file object holding this content, if one does (the sender then sends nothing)."""
    found = request.app[keys.FILES].by_sha256(request.match_info["sha256"])
    if found is None:
        raise FileNotFound("no file with this content here")
    return web.json_response(found.as_json())


async def put_file(request: web.Request) -> web.StreamResponse:
    """Keep the body as a fine-tune file if its sha256 is the one in the path; streamed to disk under files.max_bytes
    and the body deadline."""
    store = request.app[keys.FILES]
    sha256 = request.match_info["sha256"]
    found = store.by_sha256(sha256)
    if found is not None:
        return web.json_response(found.as_json())
    limit = request.app[keys.NODE].config.files.max_bytes
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"the file is too large ({declared} bytes; files.max_bytes is {limit})")
    upload = store.start_upload()
    deadline_s = body_deadline_s(declared if declared is not None else limit)
    try:
        async with asyncio.timeout(deadline_s):
            await _receive(request, upload, limit)
        got = await asyncio.to_thread(upload.seal)
        if got != sha256:
            raise BadRequest(f"the body's sha256 is {got}, not the {sha256} its path names")
        await asyncio.to_thread(check_chat_jsonl, upload.lines(MAX_LINE_BYTES))
        stored = store.add(upload, sha256, f"{sha256[:16]}.jsonl", "fine-tune", time.time())
    except TimeoutError:
        return await body_timed_out(request, deadline_s)
    finally:
        upload.discard()
    return web.json_response(stored.as_json(), status=201)


async def _receive(request: web.Request, upload: Upload, limit: int) -> None:
    while chunk := await request.content.read(1 << 20):
        if upload.size + len(chunk) > limit:
            raise BodyTooLarge(f"the file is larger than files.max_bytes ({limit} bytes)")
        await asyncio.to_thread(upload.write, chunk)
