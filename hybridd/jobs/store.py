"""Fine-tuning jobs on disk: each job, its events and checkpoints, and the fine-tuned models they made, in SQLite
(`state_dir/jobs.db`, beside the files). Every change is one transaction, so a crash leaves a job as it was before
the change or after it, never half of it.

A job is kept whole as one JSON document (its fields change together and are read together); the events and
checkpoints are rows of their own, since they only grow and are listed in pages.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hybridd.errors import JobNotFound

DB_FILE = "jobs.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    idempotency_key TEXT UNIQUE,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS job_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, seq);
CREATE TABLE IF NOT EXISTS job_checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    step INTEGER NOT NULL,
    path TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_checkpoints_by_job ON job_checkpoints (job_id, seq);
CREATE TABLE IF NOT EXISTS fine_tuned_models (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    doc TEXT NOT NULL
);
"""

ACTIVE = ("validating_files", "queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Job:
    """One fine-tuning job as this node keeps it. `placement` is where it trains ("local", "peer:<name>" or None
    while it waits); a job placed on a peer also has the peer's node id and its job id there."""

    id: str
    created_at: int
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    adapter: str  # lora, qlora or full
    rank: int
    max_seq: int
    alpha: int | None = None
    max_steps: int | None = None
    target_modules: list[str] | None = None
    status: str = "validating_files"
    error: dict[str, Any] | None = None
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    step: int = 0
    total_steps: int | None = None
    placement: str | None = None
    reason: str = ""
    peer_node_id: str | None = None
    peer_job_id: str | None = None
    training_sha256: str = ""
    validation_sha256: str | None = None
    need_bytes: int = 0
    device: str | None = None
    result_files: tuple[str, ...] = ()
    metadata: dict[str, str] | None = None
    auto: tuple[str, ...] = ()  # the hyperparameters the client left "auto"
    idempotency_key: str | None = None
    from_node: str | None = None  # the paired node that asked for this job (set on the peer that trains it)
    base: dict[str, Any] = field(default_factory=dict)  # what it trained over: model id, architecture, sha256
    result: dict[str, Any] | None = None  # the trainer's result: kind (lora, full), path, sha256
    attempts: int = 0  # trainer starts; a restart resumes from the last checkpoint
    cancel_requested: bool = False  # a peer's job: the peer is still to be told

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def as_json(self) -> dict[str, Any]:
        """The OpenAI fine_tuning.job object, with hybridd's own fields under "hybridd"."""
        hyper: dict[str, Any] = {"n_epochs": self.n_epochs, "batch_size": self.batch_size,
                                 "learning_rate_multiplier": self.learning_rate_multiplier}
        return {
            "object": "fine_tuning.job", "id": self.id, "created_at": self.created_at, "model": self.model,
            "training_file": self.training_file, "validation_file": self.validation_file,
            "status": self.status, "error": self.error, "fine_tuned_model": self.fine_tuned_model,
            "finished_at": self.finished_at, "hyperparameters": hyper, "organization_id": "org-hybridd",
            "result_files": list(self.result_files), "seed": self.seed, "trained_tokens": self.trained_tokens,
            "estimated_finish": self.estimated_finish, "integrations": [], "metadata": self.metadata,
            "user_provided_suffix": self.suffix,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
            "hybridd": {"adapter": self.adapter, "rank": self.rank if self.adapter != "full" else None,
                        "max_seq": self.max_seq, "placement": self.placement, "reason": self.reason,
                        "step": self.step, "total_steps": self.total_steps, "need_bytes": self.need_bytes,
                        "device": self.device, "peer_job_id": self.peer_job_id, "base": self.base or None,
                        "result_sha256": self.result["sha256"] if self.result else None,
                        "result_path": self.result["path"] if self.result else None},
        }


@dataclass(frozen=True)
class JobEvent:
    """One line of a job's story: a message, or metrics (with `data`)."""

    id: str
    job_id: str
    created_at: int
    level: str
    message: str
    type: str = "message"
    data: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {"object": "fine_tuning.job.event", "id": self.id, "created_at": self.created_at,
                "level": self.level, "message": self.message, "type": self.type, "data": self.data or {}}


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint a trainer reported: the step, where it lies, the metrics then."""

    id: str
    job_id: str
    created_at: int
    step: int
    path: str
    metrics: dict[str, Any]

    def as_json(self, fine_tuned_model: str | None) -> dict[str, Any]:
        return {"object": "fine_tuning.job.checkpoint", "id": self.id, "created_at": self.created_at,
                "fine_tuning_job_id": self.job_id, "step_number": self.step, "metrics": self.metrics,
                "fine_tuned_model_checkpoint": f"{fine_tuned_model or self.job_id}:ckpt-step-{self.step}"}


@dataclass(frozen=True)
class FineTunedModel:
    """A model a job made: its id (ft:...), the base it trained over, and the file this node serves it from."""

    id: str
    job_id: str
    base_model: str
    kind: str  # lora (an adapter over the base's GGUF) or full (a model GGUF of its own)
    path: str
    sha256: str
    architecture: str
    base_sha256: str
    created_at: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class JobStore:
    """Jobs, their events and checkpoints, and fine-tuned models. Use it from one thread."""

    def __init__(self, state_dir: Path) -> None:
        self._db = sqlite3.connect(state_dir / DB_FILE, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A trainer reports every step: in WAL mode NORMAL syncs at checkpoints, not at each commit, so a step costs
        # no fsync. A power cut may lose the last few steps' events, never leave a job half-changed; the trainer's
        # checkpoints, which a resume starts from, are its own files, synced by it.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- jobs
    def add(self, job: Job) -> Job:
        """Keep a new job; with an idempotency key already used, the job made then (and nothing new)."""
        if job.idempotency_key is not None:
            row = self._db.execute("SELECT doc FROM jobs WHERE idempotency_key = ?", (job.idempotency_key,)).fetchone()
            if row is not None:
                return _job(row[0])
        self._db.execute("INSERT INTO jobs VALUES (?, ?, ?, ?)",
                         (job.id, job.created_at, job.idempotency_key, _dump(asdict(job))))
        return job

    def by_idempotency_key(self, key: str) -> Job | None:
        row = self._db.execute("SELECT doc FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
        return _job(row[0]) if row is not None else None

    def get(self, job_id: str) -> Job:
        row = self._db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no fine-tuning job {job_id[:100]!r} here")
        return _job(row[0])

    def update(self, job_id: str, **changes: Any) -> Job:
        """Change fields of a job at once; the job as it is now."""
        with self._transaction() as db:
            job = replace(self.get(job_id), **changes)
            db.execute("UPDATE jobs SET doc = ? WHERE id = ?", (_dump(asdict(job)), job_id))
        return job

    def list_jobs(self, after: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs newest first, optionally after one id."""
        where, args = "1", []
        if after is not None:
            mark = self._db.execute("SELECT created_at, rowid FROM jobs WHERE id = ?", (after,)).fetchone()
            if mark is None:
                raise JobNotFound(f"no fine-tuning job {after[:100]!r} here (the list's 'after')")
            where, args = "(created_at, rowid) < (?, ?)", list(mark)
        query = f"SELECT doc FROM jobs WHERE {where} ORDER BY created_at DESC, rowid DESC"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        return [_job(row[0]) for row in self._db.execute(query, args)]

    def active(self) -> list[Job]:
        """Jobs not finished, oldest first (the order they queue in)."""
        return [j for j in reversed(self.list_jobs()) if j.active]

    # -- events
    def add_event(self, job_id: str, created_at: float, level: str, message: str, type_: str = "message",
                  data: dict[str, Any] | None = None, event_id: str | None = None) -> JobEvent:
        """Append an event; one with an id already kept (a mirrored one seen again) is not added twice."""
        event = JobEvent(event_id or new_id("ftevent"), job_id, int(created_at), level, message, type_, data)
        self._db.execute("INSERT OR IGNORE INTO job_events (job_id, id, created_at, level, message, type, data) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (job_id, event.id, event.created_at, level, message, type_,
                          _dump(data) if data is not None else None))
        return event

    def events(self, job_id: str, after: str | None = None, limit: int | None = None,
               newest_first: bool = True) -> list[JobEvent]:
        """A job's events, newest first as OpenAI lists them (or oldest first), optionally after one id."""
        order = "DESC" if newest_first else "ASC"
        where, args = ["job_id = ?"], [job_id]
        if after is not None:
            mark = self._db.execute("SELECT seq FROM job_events WHERE id = ? AND job_id = ?",
                                    (after, job_id)).fetchone()
            if mark is None:
                raise JobNotFound(f"no event {after[:100]!r} in job {job_id[:100]!r} (the list's 'after')")
            where.append("seq < ?" if newest_first else "seq > ?")
            args.append(mark[0])
        query = f"SELECT id, job_id, created_at, level, message, type, data FROM job_events " \
                f"WHERE {' AND '.join(where)} ORDER BY seq {order}"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        return [JobEvent(*row[:6], data=json.loads(row[6]) if row[6] else None)  # type: ignore[misc]
                for row in self._db.execute(query, args)]

    # -- checkpoints
    def add_checkpoint(self, job_id: str, created_at: float, step: int, path: str, metrics: dict[str, Any],
                       checkpoint_id: str | None = None) -> Checkpoint:
        point = Checkpoint(checkpoint_id or new_id("ftckpt"), job_id, int(created_at), step, path, metrics)
        self._db.execute("INSERT OR IGNORE INTO job_checkpoints (job_id, id, created_at, step, path, metrics) "
                         "VALUES (?, ?, ?, ?, ?, ?)",
                         (job_id, point.id, point.created_at, step, path, _dump(metrics)))
        return point

    def checkpoints(self, job_id: str, after: str | None = None, limit: int | None = None) -> list[Checkpoint]:
        """A job's checkpoints, newest first."""
        where, args = ["job_id = ?"], [job_id]
        if after is not None:
            mark = self._db.execute("SELECT seq FROM job_checkpoints WHERE id = ? AND job_id = ?",
                                    (after, job_id)).fetchone()
            if mark is None:
                raise JobNotFound(f"no checkpoint {after[:100]!r} in job {job_id[:100]!r} (the list's 'after')")
            where.append("seq < ?")
            args.append(mark[0])
        query = f"SELECT id, job_id, created_at, step, path, metrics FROM job_checkpoints " \
                f"WHERE {' AND '.join(where)} ORDER BY seq DESC"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        return [Checkpoint(*row[:5], metrics=json.loads(row[5]))  # type: ignore[misc]
                for row in self._db.execute(query, args)]

    # -- fine-tuned models
    def add_model(self, model: FineTunedModel) -> None:
        self._db.execute("INSERT OR REPLACE INTO fine_tuned_models VALUES (?, ?, ?)",
                         (model.id, model.job_id, _dump(asdict(model))))

    def models(self) -> list[FineTunedModel]:
        return [FineTunedModel(**json.loads(row[0]))
                for row in self._db.execute("SELECT doc FROM fine_tuned_models ORDER BY rowid")]

    def remove_model(self, model_id: str) -> None:
        self._db.execute("DELETE FROM fine_tuned_models WHERE id = ?", (model_id,))


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _job(doc: str) -> Job:
    fields = json.loads(doc)
    fields["result_files"] = tuple(fields.get("result_files", ()))
    fields["auto"] = tuple(fields.get("auto", ()))
    return Job(**fields)
