"""Fine-tuning end to end, on real daemons: the official openai SDK uploads chat JSONL and creates a job; a real
trainer (transformers + peft, on the CPU) trains a tiny Llama built in the test; the adapter is served by a real
llama.cpp engine under the job's ft: id. Once on one node, once sent to a paired peer and brought back."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from hybridd.demo.tiny_hf import write_tiny_llama_pair
from hybridd.engine.llamaserver import find_llama_server
from hybridd.engine.quantize import quantize
from hybridd.probe.gguf_file import read_gguf_header
from hybridd.proc.process import free_loopback_port
from tests.conftest import Daemon, start_daemon, stop_daemon, wait_for
from tests.test_peer_e2e import cli

pytestmark = pytest.mark.timeout(300)

FINISHED = ("succeeded", "failed", "cancelled")
Q8_0 = 7  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny Llama as an HF checkpoint (to train) and as a GGUF (to serve)."""
    return write_tiny_llama_pair(tmp_path_factory.mktemp("tiny"))


def dataset(n: int = 20) -> bytes:
    lines = [{"messages": [{"role": "user", "content": f"count to {i}"},
                           {"role": "assistant", "content": " ".join(str(k) for k in range(i + 1))}]}
             for i in range(n)]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def config(tiny: tuple[Path, Path], name: str, role: str, *, trains: bool, extra: str = "") -> str:
    hf, gguf = tiny
    lan = 'lan_listen = "127.0.0.1:0"' if role == "peer" else ""
    train_path = f'train_path = "{hf}"' if trains else ""
    return f"""
[server]
listen = "127.0.0.1:0"
{lan}
[node]
name = "{name}"
role = "{role}"
hardware = "dgx-spark"
ram_bytes = 200_000
[[node.devices]]
name = "budget0"
memory_bytes = 8_000_000_000
[train]
checkpoint_every = 5
[[models]]
name = "tiny"
path = "{gguf}"
ctx = 1024
{train_path}
{extra}"""


def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def finished(api: openai.OpenAI, job_id: str, timeout: float = 180) -> Any:
    return wait_for(lambda: (job := api.fine_tuning.jobs.retrieve(job_id)).status in FINISHED and job,
                    timeout=timeout, interval=0.2, what=f"job {job_id} to finish")


def messages(api: openai.OpenAI, job_id: str) -> list[str]:
    """Every event's message, oldest first (the SDK pages through them with `after`)."""
    return [e.message for e in api.fine_tuning.jobs.list_events(job_id, limit=100)][::-1]


def trainers(daemon: Daemon) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(daemon.pid).children(recursive=True):
        try:
            if "hybridd.jobs.hf_trainer" in child.cmdline():
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def answer_locally(api: openai.OpenAI, model: str) -> None:
    raw = api.chat.completions.with_raw_response.create(model=model, max_tokens=4,
                                                        messages=[{"role": "user", "content": "count to 3"}])
    assert raw.http_response.status_code == 200
    assert raw.headers["x-hybridd-placement"] == "local"
    assert raw.parse().usage.completion_tokens >= 1


def test_fine_tune_here_survives_a_killed_trainer_and_serves_the_adapter(tmp_path: Path,
                                                                       tiny: tuple[Path, Path]) -> None:
    checkpoint = Path(shutil.copytree(tiny[0], tmp_path / "hf"))  # this test changes it at the end
    text = config((checkpoint, tiny[1]), "desk", "desktop", trains=True)
    desk = start_daemon(text, tmp_path / "desk")
    try:
        api = client(desk)
        trained_here(desk, api)
        # The base checkpoint changes under the adapter: after a restart the model is refused, not served wrong.
        (model,) = [m.id for m in api.models.list().data if m.id.startswith("ft:")]
        stop_daemon(desk)
        with (checkpoint / "config.json").open("a") as file:
            file.write("\n")
        desk = start_daemon(text, tmp_path / "desk")
        api = client(desk)
        assert model not in {m.id for m in api.models.list().data}
        with pytest.raises(openai.ConflictError, match="base checkpoint has changed since it was trained"):
            api.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    finally:
        stop_daemon(desk)


def trained_here(desk: Daemon, api: openai.OpenAI) -> None:
    upload = api.files.create(file=("train.jsonl", dataset()), purpose="fine-tune")
    job = api.fine_tuning.jobs.create(model="tiny", training_file=upload.id, suffix="count", seed=3,
                                      method={"type": "supervised", "supervised": {"hyperparameters": {
                                          "n_epochs": 10, "batch_size": 1, "learning_rate_multiplier": 2}}})
    assert job.status == "queued" and job.model_extra["hybridd"]["placement"] == "local"
    assert job.hyperparameters.n_epochs == 10 and job.method.type == "supervised"

    # Kill the trainer once it has a checkpoint: the job resumes from it rather than failing.
    wait_for(lambda: api.fine_tuning.jobs.checkpoints.list(job.id).data, timeout=120, interval=0.05,
             what="the first checkpoint")
    (trainer,) = wait_for(lambda: trainers(desk), timeout=10, what="the trainer process")
    trainer.kill()
    done = finished(api, job.id)
    assert done.status == "succeeded", done.error
    story = messages(api, job.id)
    assert any("restarting it from its last checkpoint" in m for m in story), story
    assert any(m.startswith("Resumed from the checkpoint at step") for m in story), story
    assert done.model_extra["hybridd"]["step"] == done.model_extra["hybridd"]["total_steps"] == 200
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at >= done.created_at

    model = done.fine_tuned_model
    assert model == f"ft:tiny:desk:count:{job.id.removeprefix('ftjob-')}"
    assert model in {m.id for m in api.models.list().data}
    points = api.fine_tuning.jobs.checkpoints.list(job.id).data
    assert points and points[0].step_number == 200
    answer_locally(api, model)
    listed = api.fine_tuning.jobs.list(limit=5)
    assert [j.id for j in listed.data] == [job.id] and listed.has_more is False


def pair(desk: Daemon, peer: Daemon) -> None:
    code = json.loads(cli("pair", "--url", peer.url, "--json").stdout)["code"]
    paired = cli("pair", peer.lan_url.removeprefix("https://"), code, "--url", desk.url)
    assert paired.returncode == 0, paired.stderr


def test_fine_tune_goes_to_the_peer_and_the_model_comes_back(daemon_factory, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                            tiny: tuple[Path, Path]) -> None:
    peer = daemon_factory(config(tiny, "spark", "peer", trains=True))
    desk_text = config(tiny, "desk", "desktop", trains=False)
    desk = start_daemon(desk_text, tmp_path / "desk")
    try:
        pair(desk, peer)
        api = client(desk)
        wait_for(lambda: (peers := json.loads(cli("peers", "--url", desk.url, "--json").stdout)["paired"])
                 and peers[0]["link"] == "up", timeout=30, what="the link to the peer")
        def peer_free() -> int:
            return sum(json.loads(cli("peers", "--url", desk.url, "--json").stdout)["paired"][0]["free_bytes"].values())

        free_before = wait_for(peer_free, timeout=30, what="the peer's first capacity report")
        # The desktop has only the GGUF; the peer has the checkpoint, and the desktop offers its training.
        (listed,) = [m for m in api.models.list().data if m.id == "tiny"]
        assert listed.model_extra["hybridd"]["trainable_on"] == ["peer:spark"]
        upload = api.files.create(file=("train.jsonl", dataset()), purpose="fine-tune")
        job = api.fine_tuning.jobs.create(model="tiny", training_file=upload.id, suffix="far",
                                          hyperparameters={"n_epochs": 15}, extra_body={"hybridd": {"adapter": "lora"}})
        assert job.model_extra["hybridd"]["placement"] == "peer:spark", job.model_extra
        remote = wait_for(lambda: api.fine_tuning.jobs.retrieve(job.id).model_extra["hybridd"]["peer_job_id"],
                          timeout=30, what="the job to reach the peer")
        far = client(peer)
        wait_for(lambda: far.fine_tuning.jobs.retrieve(remote).status == "running", timeout=60,
                 what="training on the peer")
        # The peer reserved the job's bytes in its ledger: what it offers for inference shrank by as much.
        need = far.fine_tuning.jobs.retrieve(remote).model_extra["hybridd"]["need_bytes"]
        wait_for(lambda: peer_free() <= free_before - need, timeout=10, what="the peer's free memory to shrink")

        # Restart the desktop mid-run: it re-attaches to the job on the peer.
        stop_daemon(desk)
        desk = start_daemon(desk_text, tmp_path / "desk")
        assert far.fine_tuning.jobs.retrieve(remote).status == "running"  # 300 steps: well past the restart
        api = client(desk)
        done = finished(api, job.id)
        assert done.status == "succeeded", (done.error, messages(api, job.id))
        assert far.fine_tuning.jobs.retrieve(remote).status == "succeeded"
        story = messages(api, job.id)
        assert any(m.startswith("Step ") for m in story) and any("Fetched the result from spark" in m for m in story)
        answer_locally(api, done.fine_tuned_model)

        # A second job on the same file sends nothing twice: the peer holds one copy, under one file object.
        again = api.fine_tuning.jobs.create(model="tiny", training_file=upload.id,
                                            extra_body={"hybridd": {"max_steps": 2}})
        assert finished(api, again.id).status == "succeeded"
        assert len(far.files.list().data) == 1
        # Cancel on the desktop reaches the trainer on the peer.
        long = api.fine_tuning.jobs.create(model="tiny", training_file=upload.id, hyperparameters={"n_epochs": 50})
        there = wait_for(lambda: api.fine_tuning.jobs.retrieve(long.id).model_extra["hybridd"]["peer_job_id"],
                         timeout=30, what="the long job to reach the peer")
        wait_for(lambda: far.fine_tuning.jobs.retrieve(there).status == "running", timeout=60, what="it to train")
        assert api.fine_tuning.jobs.cancel(long.id).status in ("running", "queued")  # the peer is being told
        assert finished(api, long.id, timeout=60).status == "cancelled"
        assert far.fine_tuning.jobs.retrieve(there).status == "cancelled"
        wait_for(lambda: not trainers(peer), timeout=30, what="the peer's trainer to exit")
        # The peer made the job once per desktop job, however often it was asked (Idempotency-Key).
        assert len(far.fine_tuning.jobs.list().data) == 3
    finally:
        stop_daemon(desk)


def test_bad_jobs_get_clear_errors(daemon_factory, tiny: tuple[Path, Path]) -> None:  # type: ignore[no-untyped-def]
    small = config(tiny, "desk", "desktop", trains=True).replace("8_000_000_000", "600_000_000")
    desk = daemon_factory(small)
    api = client(desk)
    upload = api.files.create(file=("train.jsonl", dataset(2)), purpose="fine-tune")

    def refused(call: Callable[[], object], kind: type[openai.APIStatusError]) -> str:
        with pytest.raises(kind) as caught:
            call()
        return str(caught.value.message)

    create = api.fine_tuning.jobs.create
    assert "does not exist here" in refused(lambda: create(model="nope", training_file=upload.id),
                                            openai.NotFoundError)
    assert "no file 'file-x' here" in refused(lambda: create(model="tiny", training_file="file-x"),
                                              openai.BadRequestError)
    assert "DoRA" in refused(lambda: create(model="tiny", training_file=upload.id,
                                            extra_body={"hybridd": {"use_dora": True}}), openai.BadRequestError)
    assert "supervised" in refused(lambda: create(model="tiny", training_file=upload.id, method={"type": "dpo"}),
                                   openai.BadRequestError)
    assert "n_epochs" in refused(lambda: create(model="tiny", training_file=upload.id,
                                                hyperparameters={"n_epochs": 0}), openai.BadRequestError)
    # It can never fit this node's 0.6 GB: refused now, with the numbers, rather than queued forever.
    text = refused(lambda: create(model="tiny", training_file=upload.id), openai.APIStatusError)
    assert "fits nowhere" in text and "GiB" in text
    with pytest.raises(openai.NotFoundError):
        api.fine_tuning.jobs.retrieve("ftjob-nope")
    assert api.fine_tuning.jobs.list().data == []


@pytest.mark.skipif(find_llama_server("") is None and not os.environ.get("CI"),
                    reason="no llama-server built (scripts/build_engines.sh builds it)")
def test_fine_tunes_of_a_llama_server_base_share_its_engine(daemon_factory,  # type: ignore[no-untyped-def]
                                                            tiny: tuple[Path, Path]) -> None:
    text = config(tiny, "desk", "desktop", trains=True).replace(
        "ctx = 1024", 'ctx = 1024\nengine = "llama-server"').replace(
        "[train]", f'[engine]\nllama_server = "{find_llama_server("")}"\n[train]')
    desk = daemon_factory(text)
    api = client(desk)
    upload = api.files.create(file=("train.jsonl", dataset()), purpose="fine-tune")
    models = []
    for suffix in ("one", "two"):
        job = api.fine_tuning.jobs.create(model="tiny", training_file=upload.id, suffix=suffix,
                                          extra_body={"hybridd": {"max_steps": 5}})
        done = finished(api, job.id)
        assert done.status == "succeeded", done.error
        models.append(done.fine_tuned_model)
        answer_locally(api, done.fine_tuned_model)
    answer_locally(api, "tiny")
    answer_locally(api, models[0])
    # One llama-server holds the base and both adapters, each applied only to the requests that name it.
    engines = [p for p in psutil.Process(desk.pid).children(recursive=True)
               if p.cmdline() and p.cmdline()[0].endswith("llama-server")]
    assert len(engines) == 1
    line = engines[0].cmdline()
    assert "--lora-init-without-apply" in line and line.count("--lora") == 2


def test_a_full_fine_tune_comes_back_as_a_model_quantized_like_its_base(daemon_factory, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                       tiny: tuple[Path, Path]) -> None:
    base_q8 = quantize(tiny[1], tmp_path / "tiny-q8_0.gguf", Q8_0)
    desk = daemon_factory(config((tiny[0], base_q8), "desk", "desktop", trains=True))
    api = client(desk)
    upload = api.files.create(file=("train.jsonl", dataset(4)), purpose="fine-tune")
    job = api.fine_tuning.jobs.create(model="tiny", training_file=upload.id, suffix="whole",
                                      extra_body={"hybridd": {"adapter": "full", "max_steps": 3}})
    done = finished(api, job.id)
    assert done.status == "succeeded", (done.error, messages(api, job.id))
    assert any("Quantized the model as its base is" in m for m in messages(api, job.id))
    served = Path(done.model_extra["hybridd"]["result_path"])
    assert read_gguf_header(served).metadata["general.file_type"] == Q8_0
    answer_locally(api, done.fine_tuned_model)


def test_a_peer_that_goes_away_mid_job_is_a_warning_and_its_restart_resumes_the_job(
        daemon_factory, tmp_path: Path, tiny: tuple[Path, Path]) -> None:  # type: ignore[no-untyped-def]
    port = free_loopback_port()  # the peer comes back where the desktop paired with it
    peer_text = config(tiny, "spark", "peer", trains=True).replace('lan_listen = "127.0.0.1:0"',
                                                                   f'lan_listen = "127.0.0.1:{port}"')
    peer = start_daemon(peer_text, tmp_path / "peer")
    try:
        desk = daemon_factory(config(tiny, "desk", "desktop", trains=False))
        pair(desk, peer)
        api, far = client(desk), client(peer)
        wait_for(lambda: "peer:spark" in next(m for m in api.models.list().data if m.id == "tiny")
                 .model_extra["hybridd"]["trainable_on"], timeout=30, what="the peer's offer to train")
        upload = api.files.create(file=("train.jsonl", dataset()), purpose="fine-tune")
        job = api.fine_tuning.jobs.create(model="tiny", training_file=upload.id, hyperparameters={"n_epochs": 20})
        remote = wait_for(lambda: api.fine_tuning.jobs.retrieve(job.id).model_extra["hybridd"]["peer_job_id"],
                          timeout=30, what="the job to reach the peer")
        wait_for(lambda: far.fine_tuning.jobs.checkpoints.list(remote).data, timeout=60, interval=0.05,
                 what="a checkpoint on the peer")
        stop_daemon(peer)
        # The desktop keeps the job: the peer's absence is a warning, not a failure.
        wait_for(lambda: any("cannot be reached" in m for m in messages(api, job.id)), timeout=30,
                 what="the desktop's warning")
        assert api.fine_tuning.jobs.retrieve(job.id).status in ("running", "queued")
        peer = start_daemon(peer_text, tmp_path / "peer")
        done = finished(api, job.id)
        assert done.status == "succeeded", (done.error, messages(api, job.id))
        story = messages(api, job.id)
        assert any("resumes from its last checkpoint" in m or m.startswith("Resumed from the checkpoint")
                   for m in story), story
        answer_locally(api, done.fine_tuned_model)
    finally:
        stop_daemon(peer)
