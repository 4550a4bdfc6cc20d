"""Fine-tuning jobs on this node: accepted through the API, placed where they fit, trained here or on a peer, and
the model they make served here.

    create ──▶ validating_files ──▶ queued ──▶ running ──▶ succeeded | failed | cancelled

A job's place is chosen when it is created (hybridd.place.train: the fastest device it fits on, never split), and
one that fits nowhere is refused then, with the numbers. A local job waits in the queue until the placement state
reserves its bytes on its device (idle engines are evicted for it; busy ones are waited for); then the trainer runs
(hybridd.jobs.trainer) and its events become the job's. A peer's job is sent there (node/training_peer.py) and
mirrored here. Every change is written to the job store first, so a restart picks each job up where it was: a
local one resumes from its last checkpoint, a peer's is re-attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from hybridd.config import Config, ModelEntry
from hybridd.engine.quantize import UNQUANTIZED, quantize
from hybridd.errors import BadRequest, Conflict, HybriddError, ModelNotFound, PlacementRefused
from hybridd.jobs.files import FileStore
from hybridd.jobs.gguf_export import checkpoint_sha256, file_sha256
from hybridd.jobs.request import JobRequest, parse_job_request, trainer_spec
from hybridd.jobs.store import FINISHED, FineTunedModel, Job, JobStore, new_id
from hybridd.jobs.trainer import TrainerProcess, trainer_argv
from hybridd.model.spec import model_spec
from hybridd.model.training import TrainMethod, TrainSettings, estimate_training
from hybridd.node.catalog import Catalog, entry_header
from hybridd.node.router import Router
from hybridd.node.training_peer import PeerJobs
from hybridd.place.hardware import Hardware
from hybridd.place.scheduler import TRAINING_PREFIX
from hybridd.place.train import TrainPlacement, place_training, training_device

log = logging.getLogger("hybridd.jobs")

PUMP_S = 2.0  # how often queued jobs ask for their memory again, besides when something frees it
MAX_ATTEMPTS = 3  # trainer starts per job before a crash fails it
GIB = 1024**3


class Trainings:
    """Every fine-tuning job of this node."""

    def __init__(self, config: Config, catalog: Catalog, router: Router, files: FileStore, store: JobStore,
                 state_dir: Path, peers: PeerJobs | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.catalog = catalog
        self.router = router
        self.files = files
        self.store = store
        self.folder = state_dir / "jobs"
        self.clock = clock
        self.peers = peers
        self.trainers: dict[str, TrainerProcess] = {}
        self.on_change: Callable[[Job], None] | None = None  # a peer tells the node that asked for the job
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._stopping = False
        self._hashes: dict[tuple[str, float], str] = {}
        self._last_told: dict[str, float] = {}

    # -- lifecycle
    async def start(self) -> None:
        """Serve the fine-tuned models kept here, pick up every unfinished job, and start placing."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for model in self.store.models():
            await self._serve_model(model)
        for job in self.store.active():
            if job.status == "running" and job.placement == "local":
                self.store.update(job.id, status="queued", reason="hybridd restarted; it resumes from its last "
                                  "checkpoint once its memory is reserved again")
                self.note(job.id, "warn", "hybridd restarted during training: the job resumes from its last "
                            "checkpoint")
        self._pump = asyncio.create_task(self._pump_forever(), name="fine-tuning jobs")

    async def stop(self) -> None:
        """Stop placing; end local trainers (the jobs stay running on disk and resume at the next start)."""
        self._stopping = True
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        await asyncio.gather(*(t.cancel(self.config.train.cancel_grace_s) for t in self.trainers.values()))
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def wake(self) -> None:
        """Something may have freed memory or changed a job: place again now."""
        self._wake.set()

    # -- the API
    async def create(self, body: Any, idempotency_key: str | None = None, from_node: str | None = None) -> Job:
        """Check and keep a new job; it is queued where it will train, or refused now if it fits nowhere. A job
        asked for by a paired node (`from_node`) trains here or nowhere."""
        request = parse_job_request(body)
        if idempotency_key is not None:
            found = self.store.by_idempotency_key(idempotency_key)
            if found is not None:
                return found
        training = self._dataset(request.training_file, "training_file")
        validation = self._dataset(request.validation_file, "validation_file") if request.validation_file else None
        entry = self._entry(request.model)
        method, plan, need, device = self._place(request, entry, training.bytes, local_only=from_node is not None)
        rank = request.rank or self.config.train.rank
        job = Job(
            id=new_id("ftjob"), created_at=int(self.clock()), model=request.model,
            training_file=request.training_file, validation_file=request.validation_file, suffix=request.suffix,
            seed=request.seed, n_epochs=request.n_epochs, batch_size=request.batch_size,
            learning_rate_multiplier=request.learning_rate_multiplier, adapter=str(method), rank=rank,
            max_seq=request.max_seq or self.config.train.max_seq, alpha=request.alpha, max_steps=request.max_steps,
            target_modules=list(request.target_modules) if request.target_modules else None,
            training_sha256=training.sha256, validation_sha256=validation.sha256 if validation else None,
            metadata=request.metadata, auto=request.auto, idempotency_key=idempotency_key, from_node=from_node,
            need_bytes=need, device=device,
        )
        kept = self.store.add(job)
        if kept.id != job.id:  # the same key raced in: the first job stands
            return kept
        self.note(job.id, "info", f"Validating training file: {job.training_file}")
        job = self.update(job.id, status="queued", placement=plan.placement, reason=plan.reason)
        where = "here" if plan.placement == "local" else f"on {plan.placement.removeprefix('peer:')}"
        self.note(job.id, "info", f"Files validated; job queued to train {where} ({plan.reason})")
        log.info("fine-tune %s of %s (%s): %s, %s", job.id, job.model, job.adapter, plan.placement, plan.reason)
        self.wake()
        return job

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job wherever it runs: its trainer gets SIGTERM (SIGKILL after the grace); a peer's is told."""
        job = self.store.get(job_id)
        if job.status in FINISHED:
            raise Conflict(f"job {job_id} has already {job.status}; only a job not finished can be cancelled")
        trainer = self.trainers.get(job_id)
        if trainer is not None:
            self.note(job_id, "info", "Cancelling: the trainer is asked to stop")
            await trainer.cancel(self.config.train.cancel_grace_s)
            task = self._tasks.get(job_id)
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(task)
            return self.store.get(job_id)
        if job.placement is not None and job.placement.startswith("peer:"):
            job = self.update(job_id, cancel_requested=True)
            self.note(job_id, "info", "Cancelling: the peer training it is told")
            if self.peers is not None:
                self.peers.changed(job.peer_job_id or "")
            return job
        return self.finish(job_id, "cancelled")

    # -- placing
    def _dataset(self, file_id: str, param: str) -> Any:
        try:
            stored = self.files.get(file_id)
        except HybriddError as exc:
            raise BadRequest(f"{param}: {exc}", param) from exc
        if stored.purpose != "fine-tune":
            raise BadRequest(f"{param}: file {file_id} was uploaded for '{stored.purpose}', not 'fine-tune'", param)
        return stored

    def _entry(self, name: str) -> ModelEntry | None:
        """The base model's entry here, or None when only a peer knows it (and can train it)."""
        try:
            return self.catalog.resolve(name)
        except ModelNotFound:
            if any(name in t.state.trainable for t in self.router.peer_targets().values()):
                return None
            raise

    def _place(self, request: JobRequest, entry: ModelEntry | None, dataset_bytes: int,
               local_only: bool) -> tuple[TrainMethod, TrainPlacement, int, str | None]:
        """The method (asked, else LoRA if it fits, else QLoRA), where it trains, its bytes and device."""
        peers = [] if local_only else [
            replace(t.state.hardware, name=name) for name, t in self.router.peer_targets().items()
            if t.state.up and request.model in t.state.trainable]
        why_not = "" if entry is not None and entry.train_path is not None else (
            f"this node has no checkpoint of '{request.model}' to train from (its [[models]] entry has no "
            "train_path)")
        if entry is None or (entry.path is None and entry.profile is None):
            if why_not and not peers:
                raise BadRequest(f"model: no node can fine-tune '{request.model}' ({why_not})", "model")
            return TrainMethod(request.adapter or "lora"), TrainPlacement(
                f"peer:{peers[0].name}", f"only {peers[0].name} can train it", ()), 0, None
        header = entry_header(entry)
        spec = self.router.specs.get(entry.name) or model_spec(header.metadata, header.tensors)
        hardware: Hardware = self.router.state.hardware
        dataset_tokens = dataset_bytes // 4  # about 4 bytes a token in chat JSON; a plan, not a count
        methods = [TrainMethod(request.adapter)] if request.adapter else [TrainMethod.LORA, TrainMethod.QLORA]
        plan: TrainPlacement | None = None
        for method in methods:
            settings = TrainSettings(method, seq=request.max_seq or self.config.train.max_seq,
                                     batch=request.batch_size, rank=request.rank or self.config.train.rank)
            estimate = estimate_training(spec, header.tensors, settings)
            plan = place_training(spec, estimate, hardware, peers, dataset_tokens, local_why_not=why_not)
            if plan.placement != "none":
                device = training_device(hardware)
                local = plan.placement == "local" and device is not None
                return method, plan, estimate.total_bytes, device.name if local and device else None
        assert plan is not None
        options = "; ".join(f"{o.placement}: {o.why_not}" for o in plan.options)
        raise PlacementRefused(f"fine-tuning {request.model} fits nowhere: {plan.reason} ({options})", 507,
                               "insufficient_memory", None)

    async def _pump_forever(self) -> None:
        while True:
            try:
                await self._place_queued()
            except Exception:  # one bad job must not stop every other
                log.exception("placing fine-tuning jobs failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PUMP_S):
                    await self._wake.wait()

    async def _place_queued(self) -> None:
        for job in self.store.active():
            if job.id in self._tasks or self._stopping:
                continue
            if job.placement is not None and job.placement.startswith("peer:"):
                if self.peers is not None:
                    self._spawn(job.id, self.peers.follow(job))
                continue
            if job.status != "queued" or len(self.trainers) >= self.config.train.max_running:
                continue
            assert job.device is not None, f"local job {job.id} without a device"
            reason = await self.router.hold_for_training(TRAINING_PREFIX + job.id, job.device, job.need_bytes)
            if reason is not None:
                if reason != job.reason:
                    self.update(job.id, reason=reason)
                continue
            self._spawn(job.id, self._run_local(job.id))

    def _spawn(self, job_id: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=f"fine-tune {job_id}")
        self._tasks[job_id] = task

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.pop(job_id, None)
            if not finished.cancelled() and finished.exception() is not None:
                log.error("fine-tune %s: %s", job_id, finished.exception())
            self.wake()

        task.add_done_callback(done)

    # -- training here
    async def _run_local(self, job_id: str) -> None:
        try:
            while await self._train_once(self.store.get(job_id)):
                pass
        except Exception as exc:
            log.exception("fine-tune %s failed", job_id)
            self.finish(job_id, "failed", {"code": "internal_error", "message": str(exc)[:500], "param": None})
        finally:
            self.router.release_training(TRAINING_PREFIX + job_id)

    async def _train_once(self, job: Job) -> bool:
        """One trainer run; True when it should run again (it crashed; it resumes from its checkpoint)."""
        if job.status in FINISHED:  # cancelled while its memory was being made free
            return False
        entry = self.catalog.resolve(job.model)
        if entry.train_path is None:
            self.finish(job.id, "failed", _error("model_not_trainable", f"'{job.model}' has no train_path here"))
            return False
        folder = self.folder / job.id
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        attempt = job.attempts + 1
        points = self.store.checkpoints(job.id, limit=5)
        kept = await asyncio.to_thread(lambda: [c for c in points if Path(c.path).is_dir()])
        last = kept[0] if kept else None
        spec = trainer_spec(
            job_id=job.id, base_model_dir=str(entry.train_path),
            training_file=str(self.files.content_path(job.training_sha256)),
            validation_file=str(self.files.content_path(job.validation_sha256)) if job.validation_sha256 else None,
            method=TrainMethod(job.adapter), n_epochs=job.n_epochs, batch_size=job.batch_size,
            learning_rate_multiplier=job.learning_rate_multiplier, max_steps=job.max_steps, rank=job.rank,
            alpha=job.alpha, target_modules=tuple(job.target_modules) if job.target_modules else None,
            seed=job.seed, max_seq=job.max_seq, output_dir=str(folder / "out"),
            resume_from=last.path if last else None, checkpoint_every=self.config.train.checkpoint_every,
            events_path=str(folder / f"events-{attempt}.jsonl"))
        spec_path = folder / f"spec-{attempt}.json"
        await asyncio.to_thread(_write_atomically, spec_path, json.dumps(spec, indent=2).encode())
        trainer = TrainerProcess(trainer_argv(self.config.train.command, spec_path), Path(spec["events_path"]),
                                 f"trainer {job.id}")
        job = self.update(job.id, status="running", attempts=attempt, placement="local")
        self.note(job.id, "info", f"Fine-tuning job started on {job.device}" if last is None else
                    f"Resumed from the checkpoint at step {last.step}")
        await trainer.start()
        self.trainers[job.id] = trainer
        run = _Run(self.clock(), job.step)
        try:
            async for event in trainer.events():
                self._on_trainer_event(job.id, event, run)
        finally:
            self.trainers.pop(job.id, None)
            if trainer.returncode is None:  # cancelled under us (shutdown): end it before releasing its memory
                await trainer.cancel(self.config.train.cancel_grace_s)
        code = trainer.returncode
        if self._stopping:
            return False  # it stays running on disk: the next start resumes it
        if trainer.cancelled:
            self.finish(job.id, "cancelled")
        elif code == 0 and run.result is not None:
            await self._succeeded(job.id, run.result)
        elif code is not None and code < 0 and attempt < MAX_ATTEMPTS:
            self.note(job.id, "warn", f"The trainer died (signal {-code}); restarting it from its last checkpoint")
            return True
        else:
            why = run.last_error or f"the trainer exited with code {code}: {trainer.log_summary()}"
            self.finish(job.id, "failed", _error("trainer_failed", why))
        return False

    def _on_trainer_event(self, job_id: str, event: dict[str, Any], run: _Run) -> None:
        kind = event.get("type")
        at = float(event.get("time") or self.clock())
        if kind == "message":
            level = str(event["level"]) if event.get("level") in ("info", "warn", "error") else "info"
            message = str(event.get("message", ""))[:2000]
            if level == "error":
                run.last_error = message
            self.store.add_event(job_id, at, level, message)
        elif kind == "metrics":
            self._on_metrics(job_id, event, at, run)
        elif kind == "checkpoint" and isinstance(event.get("path"), str) and isinstance(event.get("step"), int):
            metrics: dict[str, Any] = event["metrics"] if isinstance(event.get("metrics"), dict) else {}
            self.store.add_checkpoint(job_id, at, event["step"], event["path"], metrics)
            self.note(job_id, "info", f"Checkpoint saved at step {event['step']}")
        elif kind == "result":
            run.result = event

    def _on_metrics(self, job_id: str, event: dict[str, Any], at: float, run: _Run) -> None:
        step, total = event.get("step"), event.get("total_steps")
        if not isinstance(step, int) or not isinstance(total, int) or total <= 0:
            return
        loss = event.get("loss")
        data = {"step": step, "total_steps": total, "train_loss": loss, "learning_rate": event.get("learning_rate"),
                "tokens_per_s": event.get("tokens_per_s"), "trained_tokens": event.get("trained_tokens")}
        if event.get("valid_loss") is not None:
            data["valid_loss"] = event["valid_loss"]
        loss_text = f", training loss={loss:.4f}" if isinstance(loss, int | float) else ""
        self.store.add_event(job_id, at, "info", f"Step {step}/{total}{loss_text}", "metrics", data)
        done = step - run.first_step
        per_step = (self.clock() - run.started) / done if done > 0 else None
        finish = int(self.clock() + per_step * (total - step)) if per_step is not None else None
        trained = event.get("trained_tokens")
        self.update(job_id, step=step, total_steps=total, estimated_finish=finish,
                     trained_tokens=trained if isinstance(trained, int) else None, throttle=True)

    async def _succeeded(self, job_id: str, result: dict[str, Any]) -> None:
        path = Path(str(result.get("path", "")))
        if not await asyncio.to_thread(path.is_file):
            self.finish(job_id, "failed", _error("trainer_failed", f"the trainer's result {path} is not a file"))
            return
        sha256 = await asyncio.to_thread(file_sha256, path)
        if result.get("sha256") not in (None, sha256):
            self.finish(job_id, "failed", _error("trainer_failed", f"{path} does not match the sha256 the trainer "
                                                  "reported"))
            return
        base: dict[str, Any] = result["base"] if isinstance(result.get("base"), dict) else {}
        kind = "full" if result.get("kind") == "full" else "lora"
        if kind == "full":
            path, sha256 = await self._quantized_like_base(job_id, path, sha256)
        job = self.update(job_id, result={"kind": kind, "path": str(path), "sha256": sha256},
                           base={"model": self.store.get(job_id).model, **base})
        await self.adopt(job, path)

    async def _quantized_like_base(self, job_id: str, path: Path, sha256: str) -> tuple[Path, str]:
        """A full fine-tune comes back at 16 bits: quantize it as its base GGUF is, so it serves as fast and as
        small as the base did."""
        try:
            base = self.catalog.resolve(self.store.get(job_id).model)
        except ModelNotFound:
            return path, sha256
        if base.path is None:
            return path, sha256
        header = await asyncio.to_thread(entry_header, base)
        file_type = header.metadata.get("general.file_type")
        if not isinstance(file_type, int) or file_type in UNQUANTIZED:
            return path, sha256
        out = path.with_name(f"{path.stem}-as-base.gguf")
        try:
            await asyncio.to_thread(quantize, path, out, file_type)
        except RuntimeError as exc:
            self.note(job_id, "warn", f"{exc}; the model is served at 16 bits")
            return path, sha256
        self.note(job_id, "info", f"Quantized the model as its base is (llama.cpp file type {file_type})")
        return out, await asyncio.to_thread(file_sha256, out)

    async def adopt(self, job: Job, path: Path) -> None:
        """Serve what `job` made (at `path`) under its fine-tuned id, and finish the job."""
        assert job.result is not None
        model = FineTunedModel(
            id=self.fine_tuned_id(job), job_id=job.id, base_model=job.model, kind=job.result["kind"],
            path=str(path), sha256=job.result["sha256"], architecture=str(job.base.get("architecture", "")),
            base_sha256=str(job.base.get("checkpoint_sha256", "")), created_at=int(self.clock()))
        self.store.add_model(model)
        served = await self._serve_model(model)
        note = "" if served is None else f" (not served here: {served})"
        self.note(job.id, "info", f"New fine-tuned model created: {model.id}{note}")
        self.finish(job.id, "succeeded", fine_tuned_model=model.id)

    def fine_tuned_id(self, job: Job) -> str:
        """OpenAI's form, ft:<base>:<node>:<suffix>:<job>; looked up in the registry, never parsed."""
        return f"ft:{job.model}:{self.router.node_name}:{job.suffix or ''}:{job.id.removeprefix('ftjob-')}"

    async def _serve_model(self, model: FineTunedModel) -> str | None:
        """Add a fine-tuned model to the catalog; why not, when its base here is missing or is not the one it
        was trained over."""
        why = await self._base_mismatch(model)
        if why is not None:
            self.catalog.refuse(model.id, why)
            log.warning("fine-tuned model %s is not served: %s", model.id, why)
            return why
        base = self.catalog.resolve(model.base_model)
        adapter = Path(model.path)
        if model.kind == "full":
            entry = replace(base, name=model.id, aliases=(), path=adapter, lora_path=None, train_path=None,
                            adapters=())
        elif base.engine == "llama-server":
            # One engine for the base and all its fine-tunes: each request names its adapter (routes_openai).
            if adapter not in base.adapters:
                self.catalog.add(replace(base, adapters=(*base.adapters, adapter)))
            entry = replace(base, name=model.id, aliases=(), lora_path=adapter, train_path=None, adapters=(),
                            adapter_of=base.name)
        else:
            entry = replace(base, name=model.id, aliases=(), lora_path=adapter, train_path=None, adapters=())
        self.catalog.add(entry)
        return None

    async def _base_mismatch(self, model: FineTunedModel) -> str | None:
        if not await asyncio.to_thread(Path(model.path).is_file):
            return f"its file {model.path} is gone"
        try:
            base = self.catalog.resolve(model.base_model)
        except ModelNotFound:
            return f"its base model '{model.base_model}' is not configured here"
        if base.path is None:
            return f"its base model '{model.base_model}' has no GGUF here to serve it over"
        if model.kind == "full":
            return None
        header = await asyncio.to_thread(entry_header, base)
        architecture = header.metadata.get("general.architecture")
        if model.architecture and architecture != model.architecture:
            return f"it was trained over a {model.architecture} model; '{model.base_model}' here is {architecture}"
        if base.train_path is not None and model.base_sha256 and base.train_path.is_dir():
            here = await self._checkpoint_hash(base.train_path)
            if here != model.base_sha256:
                return (f"its base checkpoint has changed since it was trained (sha256 {model.base_sha256[:12]}, "
                        f"now {here[:12]})")
        return None

    async def _checkpoint_hash(self, folder: Path) -> str:
        key = (str(folder), await asyncio.to_thread(_newest_mtime, folder))
        if key not in self._hashes:
            self._hashes[key] = await asyncio.to_thread(checkpoint_sha256, folder)
        return self._hashes[key]

    # -- bookkeeping
    def update(self, job_id: str, throttle: bool = False, **changes: Any) -> Job:
        job = self.store.update(job_id, **changes)
        if self.on_change is not None and job.from_node is not None:
            self.on_change(job) if not throttle else self._throttled_change(job)
        return job

    def _throttled_change(self, job: Job) -> None:
        now = time.monotonic()
        if now - self._last_told.get(job.id, 0.0) >= 1.0:
            self._last_told[job.id] = now
            assert self.on_change is not None
            self.on_change(job)

    def note(self, job_id: str, level: str, message: str) -> None:
        self.store.add_event(job_id, self.clock(), level, message)

    def finish(self, job_id: str, status: str, error: dict[str, Any] | None = None, **changes: Any) -> Job:
        job = self.update(job_id, status=status, error=error, finished_at=int(self.clock()), estimated_finish=None,
                           **changes)
        text = {"succeeded": "The job has successfully completed", "cancelled": "The job was cancelled",
                "failed": f"The job failed: {error['message'] if error else 'unknown error'}"}[status]
        self.note(job_id, "error" if status == "failed" else "info", text)
        log.info("fine-tune %s %s%s", job_id, status, f": {error['message']}" if error else "")
        return job


class _Run:
    """What one trainer run has said so far."""

    def __init__(self, started: float, first_step: int) -> None:
        self.started = started
        self.first_step = first_step
        self.result: dict[str, Any] | None = None
        self.last_error: str | None = None


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message[:2000], "param": None}


def _newest_mtime(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.iterdir()), default=0.0)


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
