"""Fine-tuning job requests checked field by field, and the job store on real SQLite: idempotency, paging, restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hybridd.errors import BadRequest, JobNotFound
from hybridd.jobs.request import parse_job_request, trainer_spec
from hybridd.jobs.store import Job, JobStore, new_id
from hybridd.model.training import TrainMethod

BASE = {"model": "tiny", "training_file": "file-abc"}


def test_defaults_are_auto_and_say_so() -> None:
    request = parse_job_request(BASE)
    assert (request.n_epochs, request.batch_size, request.learning_rate_multiplier) == (3, 1, 1.0)
    assert request.auto == ("n_epochs", "batch_size", "learning_rate_multiplier")
    assert request.adapter is None and 0 <= request.seed < 2**31


def test_method_hyperparameters_and_hybridd_fields_are_read() -> None:
    request = parse_job_request({**BASE, "seed": 7, "suffix": "my-model_1.0", "metadata": {"team": "a"},
                                 "method": {"type": "supervised", "supervised": {"hyperparameters": {
                                     "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}}},
                                 "hybridd": {"adapter": "qlora", "rank": 8, "max_seq": 512, "max_steps": 20}})
    assert (request.n_epochs, request.batch_size, request.learning_rate_multiplier) == (2, 1, 0.5)
    assert request.auto == ("batch_size",) and request.seed == 7 and request.metadata == {"team": "a"}
    assert (request.adapter, request.rank, request.max_seq, request.max_steps) == ("qlora", 8, 512, 20)


@pytest.mark.parametrize(("body", "message"), [
    ({"training_file": "file-abc"}, "model"),
    ({**BASE, "suffix": "a b"}, "suffix"),
    ({**BASE, "suffix": "x" * 65}, "suffix"),
    ({**BASE, "method": {"type": "dpo"}}, "supervised"),
    ({**BASE, "hyperparameters": {"n_epochs": 0}}, "n_epochs"),
    ({**BASE, "hyperparameters": {"n_epochs": "many"}}, "n_epochs"),
    ({**BASE, "hyperparameters": {"learning_rate_multiplier": -1}}, "learning_rate_multiplier"),
    ({**BASE, "hyperparameters": {"n_epochs": 1}, "method": {"supervised": {"hyperparameters": {}}}}, "once"),
    ({**BASE, "hybridd": {"adapter": "dora"}}, "adapter"),
    ({**BASE, "hybridd": {"use_dora": True}}, "DoRA"),
    ({**BASE, "hybridd": {"modules_to_save": ["lm_head"]}}, "modules_to_save"),
    ({**BASE, "hybridd": {"added_tokens": ["<x>"]}}, "add tokens"),
    ({**BASE, "hybridd": {"sneaky": 1}}, "sneaky"),
    ({**BASE, "integrations": [{"type": "wandb"}]}, "integrations"),
    ({**BASE, "extra": 1}, "extra"),
    ([1, 2], "object"),
])
def test_bad_requests_name_the_field(body: Any, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_job_request(body)


def test_the_trainer_spec_resolves_the_learning_rate_and_alpha() -> None:
    spec = trainer_spec(job_id="ftjob-1", base_model_dir="/m", training_file="/t", validation_file=None,
                        method=TrainMethod.FULL, n_epochs=1, batch_size=2, learning_rate_multiplier=2.0,
                        max_steps=None, rank=8, alpha=None, target_modules=None, seed=1, max_seq=128,
                        output_dir="/o", resume_from=None, checkpoint_every=5, events_path="/o/e.jsonl")
    assert spec["hyperparameters"]["learning_rate"] == pytest.approx(4e-5)
    assert spec["lora"]["alpha"] == 16 and spec["method"] == "full" and spec["version"] == 1


def job(**changes: Any) -> Job:
    fields: dict[str, Any] = {"id": new_id("ftjob"), "created_at": 100, "model": "tiny", "training_file": "file-a",
                              "validation_file": None, "suffix": None, "seed": 1, "n_epochs": 1, "batch_size": 1,
                              "learning_rate_multiplier": 1.0, "adapter": "lora", "rank": 8, "max_seq": 128}
    return Job(**{**fields, **changes})


def test_an_idempotency_key_makes_one_job_however_often_it_is_sent(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    first = store.add(job(idempotency_key="desk-job-1"))
    again = store.add(job(idempotency_key="desk-job-1"))
    assert again.id == first.id and [j.id for j in store.list_jobs()] == [first.id]
    store.close()


def test_jobs_events_and_checkpoints_page_and_survive_a_restart(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    made = [store.add(job(created_at=100 + i)) for i in range(5)]
    assert [j.id for j in store.list_jobs(limit=2)] == [made[4].id, made[3].id]
    assert [j.id for j in store.list_jobs(after=made[3].id, limit=2)] == [made[2].id, made[1].id]
    with pytest.raises(JobNotFound):
        store.list_jobs(after="ftjob-nope")
    events = [store.add_event(made[0].id, 200 + i, "info", f"step {i}") for i in range(4)]
    assert store.add_event(made[0].id, 300, "info", "copied", event_id=events[0].id).id == events[0].id
    assert [e.message for e in store.events(made[0].id)] == ["step 3", "step 2", "step 1", "step 0"]
    assert [e.message for e in store.events(made[0].id, after=events[1].id, newest_first=False)] == \
        ["step 2", "step 3"]
    store.add_checkpoint(made[0].id, 250, 10, "/ckpt/10", {"loss": 1.5})
    store.update(made[0].id, status="running", step=10, total_steps=20)
    store.close()

    reopened = JobStore(tmp_path)
    kept = reopened.get(made[0].id)
    assert (kept.status, kept.step, kept.total_steps) == ("running", 10, 20)
    assert [j.id for j in reopened.active()] == [j.id for j in made]  # oldest first: the order they queue in
    (point,) = reopened.checkpoints(made[0].id)
    assert (point.step, point.path, point.metrics) == (10, "/ckpt/10", {"loss": 1.5})
    assert point.as_json("ft:x")["fine_tuned_model_checkpoint"] == "ft:x:ckpt-step-10"
    shaped = kept.as_json()
    assert shaped["object"] == "fine_tuning.job" and shaped["method"]["type"] == "supervised"
    assert shaped["hybridd"]["step"] == 10
    reopened.close()
