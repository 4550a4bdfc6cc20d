"""A fine-tuning job trained on a peer, from the desktop's side: send it, mirror it, bring the model back.

    1. the dataset goes over the same mutual-TLS path as inference, addressed by its sha256: GET
       /hybridd/v1/files/<sha256> says whether the peer has it, PUT sends it (a retry, or a second job on the same
       file, sends nothing twice);
    2. the job is created there with this job's id as its Idempotency-Key, so no retry ever trains twice;
    3. its status, events and checkpoints are copied here whenever the peer's link says the job changed (a
       job_changed frame), and every POLL_S besides;
    4. once it has succeeded, its result (an adapter or model GGUF) is fetched, checked against the sha256 the peer
       reported, and served here.

Each step is safe to repeat, so a desktop restart simply starts this again for every job placed on a peer. A peer
that cannot be reached is a `warn` event, and the job waits for it; it does not fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from hybridd.errors import HybriddError
from hybridd.jobs.files import FileStore
from hybridd.jobs.store import FINISHED, Job, JobStore
from hybridd.node.router import PeerTarget

log = logging.getLogger("hybridd.jobs")

POLL_S = 5.0  # a job on a peer is looked at this often even when its link says nothing
UNREACHABLE_RETRY_S = (1.0, 30.0)  # backoff while a peer cannot be reached
JSON_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=10)
TRANSFER_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
_CHUNK = 1 << 20


class PeerJobError(HybriddError):
    """The peer answered, but not as a hybridd peer should (a status or body we cannot use)."""


class _Refused(PeerJobError):
    """The peer refused the request itself (a 4xx): retrying will not help."""


class Keeper(Protocol):
    """What this module needs from the node's job service (node/training.py)."""

    store: JobStore
    files: FileStore
    folder: Path

    def update(self, job_id: str, throttle: bool = False, **changes: Any) -> Job: ...
    def note(self, job_id: str, level: str, message: str) -> None: ...
    def finish(self, job_id: str, status: str, error: dict[str, Any] | None = None, **changes: Any) -> Job: ...
    async def adopt(self, job: Job, path: Path) -> None: ...


class PeerJobs:
    """The jobs this node placed on peers, followed until each is finished."""

    def __init__(self, keeper: Keeper, http: aiohttp.ClientSession,
                 targets: Callable[[], dict[str, PeerTarget]]) -> None:
        self.keeper = keeper
        self.http = http
        self.targets = targets
        self._changed: dict[str, asyncio.Event] = {}

    def changed(self, peer_job_id: str) -> None:
        """The peer says its job changed (a job_changed frame): look now."""
        event = self._changed.get(peer_job_id)
        if event is not None:
            event.set()

    async def follow(self, job: Job) -> None:
        """Submit `job` to its peer if it is not there yet, then mirror it until it is finished here."""
        peer = (job.placement or "").removeprefix("peer:")
        backoff = UNREACHABLE_RETRY_S[0]
        unreachable = False
        while job.status not in FINISHED:
            target = self.targets().get(peer)
            try:
                if target is None or not target.state.up:
                    raise ConnectionError(f"peer {peer} is not linked")
                if job.peer_job_id is None:
                    job = await self._submit(job, target)
                job = await self._mirror(job, target)
                if unreachable:
                    self.keeper.note(job.id, "info", f"Peer {peer} is reachable again")
                    unreachable = False
                backoff = UNREACHABLE_RETRY_S[0]
                wait_s = POLL_S
            except _Refused as exc:
                self.keeper.finish(job.id, "failed", {"code": "peer_refused", "message": str(exc)[:2000],
                                                      "param": None})
                return
            except (aiohttp.ClientError, OSError, TimeoutError, PeerJobError) as exc:
                if not unreachable:
                    self.keeper.note(job.id, "warn", f"Peer {peer} cannot be reached ({_short(exc)}); the job "
                                       "goes on there and is followed again once it answers")
                    log.warning("fine-tune %s: peer %s unreachable: %s", job.id, peer, _short(exc))
                    unreachable = True
                wait_s, backoff = backoff, min(backoff * 2, UNREACHABLE_RETRY_S[1])
            if job.status in FINISHED:
                return
            await self._wait(job.peer_job_id, wait_s)
            job = self.keeper.store.get(job.id)

    async def _wait(self, peer_job_id: str | None, seconds: float) -> None:
        if peer_job_id is None:
            await asyncio.sleep(seconds)
            return
        event = self._changed.setdefault(peer_job_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()
        event.clear()

    # -- the steps
    async def _submit(self, job: Job, target: PeerTarget) -> Job:
        training = await self._ensure_file(target, job.training_sha256)
        validation = await self._ensure_file(target, job.validation_sha256) if job.validation_sha256 else None
        body = {
            "model": job.model, "training_file": training, "validation_file": validation, "suffix": job.suffix,
            "seed": job.seed, "metadata": job.metadata,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": job.n_epochs, "batch_size": job.batch_size,
                "learning_rate_multiplier": job.learning_rate_multiplier}}},
            "hybridd": {"adapter": job.adapter, "rank": job.rank, "alpha": job.alpha, "max_seq": job.max_seq,
                        "max_steps": job.max_steps, "target_modules": job.target_modules},
        }
        remote = await self._json(target, "POST", "/v1/fine_tuning/jobs", json=body,
                                  headers={"Idempotency-Key": job.id})
        job = self.keeper.update(job.id, peer_job_id=_text(remote, "id"))
        self.keeper.note(job.id, "info", f"Sent to {target.state.name} as {job.peer_job_id}")
        return job

    async def _ensure_file(self, target: PeerTarget, sha256: str) -> str:
        """The peer's file id for this content, sending it only when the peer does not have it."""
        path = f"/hybridd/v1/files/{sha256}"
        async with self.http.get(target.base_url + path, ssl=target.tls(), timeout=JSON_TIMEOUT) as response:
            if response.status == 200:
                return _text(await _body(response), "id")
            if response.status != 404:
                raise PeerJobError(f"GET {path}: HTTP {response.status}")
        content = self.keeper.files.content_path(sha256)
        async with self.http.put(target.base_url + path, data=_chunks(content), ssl=target.tls(),
                                 timeout=TRANSFER_TIMEOUT) as response:
            return _text(await _body(response, path), "id")

    async def _mirror(self, job: Job, target: PeerTarget) -> Job:
        """Copy the peer's job, its new events and checkpoints; bring the result back once it succeeded."""
        assert job.peer_job_id is not None
        base = f"/v1/fine_tuning/jobs/{job.peer_job_id}"
        if job.cancel_requested:
            remote = await self._json(target, "POST", f"{base}/cancel")
            job = self.keeper.update(job.id, cancel_requested=False)
        remote = await self._json(target, "GET", base)
        await self._copy_events(job, target, base)
        for point in reversed((await self._json(target, "GET", f"{base}/checkpoints?limit=100")).get("data", [])):
            self.keeper.store.add_checkpoint(job.id, float(point.get("created_at", 0)),
                                             int(point.get("step_number", 0)), f"{target.state.name}:{base}",
                                             point.get("metrics") or {}, checkpoint_id=str(point.get("id")))
        own: dict[str, Any] = remote["hybridd"] if isinstance(remote.get("hybridd"), dict) else {}
        status = _text(remote, "status")
        changes: dict[str, Any] = {"step": own.get("step") or 0, "total_steps": own.get("total_steps"),
                   "trained_tokens": remote.get("trained_tokens"), "estimated_finish": remote.get("estimated_finish"),
                   "reason": f"on {target.state.name}: {own.get('reason') or status}"}
        if status == "succeeded":
            job = self.keeper.update(job.id, base=own.get("base") or {}, **changes)
            await self._bring_back(job, target, own)
            return self.keeper.store.get(job.id)
        if status in ("failed", "cancelled"):
            self.keeper.update(job.id, **changes)
            error = remote["error"] if isinstance(remote.get("error"), dict) else None
            return self.keeper.finish(job.id, status, error)
        return self.keeper.update(job.id, status=status if status in ("queued", "running") else job.status,
                                   **changes)

    async def _copy_events(self, job: Job, target: PeerTarget, base: str) -> None:
        """The peer's events since the last one copied, oldest first, under their own ids (so none twice)."""
        last = next((e.id for e in self.keeper.store.events(job.id) if e.id.startswith("ftevent-peer-")), None)
        after = f"&after={last.removeprefix('ftevent-peer-')}" if last else ""
        while True:
            page = await self._json(target, "GET", f"{base}/events?order=asc&limit=100{after}")
            data = page.get("data") or []
            for event in data:
                self.keeper.store.add_event(job.id, float(event.get("created_at", 0)), str(event.get("level", "info")),
                                            str(event.get("message", ""))[:2000], str(event.get("type", "message")),
                                            event.get("data") or None, event_id=f"ftevent-peer-{event.get('id')}")
            if not page.get("has_more") or not data:
                return
            after = f"&after={data[-1].get('id')}"

    async def _bring_back(self, job: Job, target: PeerTarget, own: dict[str, Any]) -> None:
        sha256 = own.get("result_sha256")
        if not isinstance(sha256, str) or len(sha256) != 64:
            raise PeerJobError(f"{target.state.name} reports the job succeeded but names no result sha256")
        folder = self.keeper.folder / job.id
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = folder / f"{sha256}.gguf"
        if not path.is_file():
            url = f"{target.base_url}/hybridd/v1/fine_tuning/jobs/{job.peer_job_id}/result"
            async with self.http.get(url, ssl=target.tls(), timeout=TRANSFER_TIMEOUT) as response:
                if response.status != 200:
                    raise PeerJobError(f"GET the result: HTTP {response.status}")
                await _download(response, path, sha256)
        kind = "full" if own.get("adapter") == "full" else "lora"
        job = self.keeper.update(job.id, result={"kind": kind, "path": str(path), "sha256": sha256})
        self.keeper.note(job.id, "info", f"Fetched the result from {target.state.name} ({path.stat().st_size} "
                           "bytes, sha256 checked)")
        await self.keeper.adopt(job, path)

    async def _json(self, target: PeerTarget, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        async with self.http.request(method, target.base_url + path, ssl=target.tls(), timeout=JSON_TIMEOUT,
                                     **kwargs) as response:
            return await _body(response, f"{method} {path.split('?')[0]}")


async def _body(response: aiohttp.ClientResponse, what: str = "") -> dict[str, Any]:
    try:
        body = await response.json(content_type=None)
    except ValueError as exc:
        raise PeerJobError(f"{what}: HTTP {response.status} with a body that is not JSON") from exc
    if response.status >= 400:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        if 400 <= response.status < 500 and response.status not in (404, 408, 429):
            raise _Refused(f"{what}: {message or f'HTTP {response.status}'}")
        raise PeerJobError(f"{what}: HTTP {response.status}: {message or ''}")
    if not isinstance(body, dict):
        raise PeerJobError(f"{what}: the answer is not a JSON object")
    return body


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise PeerJobError(f"the peer's answer has no {key!r}")
    return value


async def _chunks(path: Path) -> Any:
    """The file in chunks, each read off the event loop."""
    with path.open("rb") as file:
        while chunk := await asyncio.to_thread(file.read, _CHUNK):
            yield chunk


async def _download(response: aiohttp.ClientResponse, path: Path, sha256: str) -> None:
    """Stream the body to `path`, kept only when its sha256 is `sha256`."""
    partial = path.with_name(f".{path.name}.partial")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as file:
            async for chunk in response.content.iter_chunked(_CHUNK):
                digest.update(chunk)
                await asyncio.to_thread(file.write, chunk)
            await asyncio.to_thread(os.fsync, file.fileno())
        if digest.hexdigest() != sha256:
            raise PeerJobError(f"the result's sha256 is {digest.hexdigest()[:16]}…, the peer said {sha256[:16]}…")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "…"
