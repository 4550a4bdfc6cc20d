"""`hybridd jobs` and the fine-tuning part of `hybridd status`, against a real daemon training the tiny Llama on the
CPU; and the --follow view's terminal drawing, driven by a scripted daemon."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hybridd.cli.jobs import follow_job
from hybridd.cli.views import render_event, render_progress
from hybridd.demo.tiny_hf import write_tiny_llama_pair
from tests.conftest import Daemon, wait_for
from tests.test_jobs_e2e import client, config, dataset

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_llama_pair(tmp_path_factory.mktemp("tiny"))


def jobs(daemon: Daemon, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`hybridd jobs ARGS` against the daemon, its output captured (so not a TTY)."""
    return subprocess.run([sys.executable, "-m", "hybridd", "jobs", *args, "--url", daemon.url], capture_output=True,
                          text=True, timeout=timeout)


def create(daemon: Daemon, **fields: Any) -> str:
    api = client(daemon)
    upload = api.files.create(file=("train.jsonl", dataset()), purpose="fine-tune")
    return api.fine_tuning.jobs.create(model="tiny", training_file=upload.id, suffix="cli", **fields).id


def test_jobs_lists_follows_shows_and_refuses_to_cancel_a_finished_job(daemon_factory,  # type: ignore[no-untyped-def]
                                                                        tiny: tuple[Path, Path]) -> None:
    desk = daemon_factory(config(tiny, "desk", "desktop", trains=True))
    job_id = create(desk, extra_body={"hybridd": {"max_steps": 12}})

    # Followed from the start: the job's head, its events, one progress line per step, then how it ended.
    followed = jobs(desk, "show", job_id, "--follow")
    assert followed.returncode == 0, followed.stdout + followed.stderr
    out = followed.stdout
    assert out.startswith(f"job {job_id}: ") and "  where:      local on budget0" in out, out
    assert re.search(r"^  \d\d:\d\d:\d\d  info   Fine-tuning job started on budget0$", out, re.MULTILINE), out
    steps = re.findall(r"^\[[#.]{24}\] (\d+)/12 +\d+%  loss \d+\.\d{4}  \d+ tok/s  ETA \S+$", out, re.MULTILINE)
    assert steps == [str(n) for n in range(1, 13)], out
    model = client(desk).fine_tuning.jobs.retrieve(job_id).fine_tuned_model
    assert out.rstrip().splitlines()[-1] == f"job {job_id} succeeded: {model}"
    assert "\r" not in out and "\033" not in out  # no terminal drawing when the output is not a terminal

    listing = jobs(desk, "--json")
    assert listing.returncode == 0, listing.stderr
    (row,) = json.loads(listing.stdout)["data"]
    assert row["id"] == job_id and row["status"] == "succeeded" and row["fine_tuned_model"] == model
    text = jobs(desk).stdout.splitlines()
    assert text[0].split() == ["JOB", "MODEL", "STATUS", "WHERE", "STEP", "FINE-TUNED", "MODEL"]
    assert text[1].split() == [job_id, "tiny", "succeeded", "local", "12/12", model]

    shown = jobs(desk, "show", job_id)
    assert shown.returncode == 0 and f"  model made: {model}" in shown.stdout
    assert "The job has successfully completed" in shown.stdout and "Step " not in shown.stdout  # metrics: the bar
    bar = r"^\[#{24}\] 12/12  100%  loss \d\.\d{4}  \d+ tok/s  ETA -$"
    assert re.search(bar, shown.stdout, re.MULTILINE), shown.stdout
    whole = json.loads(jobs(desk, "show", job_id, "--json").stdout)
    assert whole["job"]["id"] == job_id
    assert [e["data"]["step"] for e in whole["events"] if e["type"] == "metrics"] == list(range(1, 13))
    lines = [json.loads(line) for line in jobs(desk, "show", job_id, "--follow", "--json").stdout.splitlines()]
    assert lines[-1]["status"] == "succeeded" and [e["id"] for e in lines[:-1]] == [e["id"] for e in whole["events"]]

    # Errors are the daemon's own words, on one line, exit 1.
    again = jobs(desk, "cancel", job_id)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr == (f"hybridd: job {job_id} has already succeeded; only a job not finished can be "
                            "cancelled\n")
    unknown = jobs(desk, "show", "ftjob-nope", "--follow")
    assert unknown.returncode == 1 and unknown.stderr == "hybridd: no fine-tuning job 'ftjob-nope' here\n"
    assert jobs(desk, "cancel").returncode == 2 and jobs(desk, "list", "--follow").returncode == 2


def test_status_shows_a_running_job_and_cancel_stops_it(daemon_factory,  # type: ignore[no-untyped-def]
                                                         tiny: tuple[Path, Path]) -> None:
    desk = daemon_factory(config(tiny, "desk", "desktop", trains=True))
    job_id = create(desk, hyperparameters={"n_epochs": 50})  # 1000 steps: still training when cancelled

    row = wait_for(lambda: next((j for j in desk.status()["fine_tuning_jobs"] if j["status"] == "running"
                                 and j["step"] > 0), None), timeout=120, interval=0.1, what="the job to train")
    assert row["id"] == job_id and row["model"] == "tiny" and row["placement"] == "local"
    assert row["total_steps"] == 1000 and row["reason"]
    status = subprocess.run([sys.executable, "-m", "hybridd", "status", "--url", desk.url], capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    (line,) = [line for line in status.stdout.splitlines() if line.startswith(job_id)]
    cells = re.split(r"\s{2,}", line)
    assert cells[:4] == [job_id, "tiny", "running", "local"] and re.fullmatch(r"\d+/1000", cells[4]), line
    assert cells[5] == row["reason"][:70], line
    assert "FINE-TUNING JOB" in status.stdout

    cancelled = jobs(desk, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout == f"job {job_id} cancelled\n"
    assert client(desk).fine_tuning.jobs.retrieve(job_id).status == "cancelled"
    assert desk.status()["fine_tuning_jobs"] == []
    followed = jobs(desk, "show", job_id, "--follow")
    assert followed.returncode == 1 and followed.stdout.rstrip().endswith(f"job {job_id} cancelled")


def test_jobs_without_a_daemon_says_so() -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        result = subprocess.run([sys.executable, "-m", "hybridd", "jobs", "--url", url], capture_output=True,
                                text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"hybridd: the daemon is not running at {url} (")


class ScriptedDaemon:
    """Answers the follow view's questions from a script: the job's states in turn, and events appearing."""

    def __init__(self, states: list[tuple[str, list[dict[str, Any]]]]) -> None:
        self.states = states
        self.turn = -1
        self.events: list[dict[str, Any]] = []

    def ask(self, path: str, body: Any) -> Any:
        assert body is None
        if "/events?" not in path:  # the job: the next state, and the events it has written by then
            self.turn = min(self.turn + 1, len(self.states) - 1)
            status, new = self.states[self.turn]
            self.events += new
            return {"id": "ftjob-1", "model": "m", "status": status, "estimated_finish": 1030.0 if status ==
                    "running" else None, "fine_tuned_model": "ft:m::x:1" if status == "succeeded" else None,
                    "hyperparameters": {"n_epochs": 1}, "hybridd": {"placement": "local", "step": 0}}
        after = re.search(r"after=([^&]+)", path)
        start = next(i + 1 for i, e in enumerate(self.events) if e["id"] == after[1]) if after else 0
        return {"data": self.events[start:], "has_more": False}


def _metrics(n: int) -> dict[str, Any]:
    return {"id": f"e{n}", "created_at": 0, "level": "info", "message": f"Step {n}/4", "type": "metrics",
            "data": {"step": n, "total_steps": 4, "train_loss": 2.0 / n, "tokens_per_s": 100.0}}


def test_follow_redraws_the_bar_in_place_on_a_terminal() -> None:
    note = {"id": "n1", "created_at": 0, "level": "info", "message": "Checkpoint saved at step 2", "type": "message"}
    daemon = ScriptedDaemon([("running", [_metrics(1), _metrics(2)]), ("running", [note, _metrics(3)]),
                             ("succeeded", [_metrics(4)])])
    out = io.StringIO()
    code = follow_job(daemon.ask, out, "ftjob-1", as_json=False, tty=True, now=lambda: 1000.0, sleep=lambda s: None)
    assert code == 0
    text = out.getvalue()
    clear = "\r\033[K"
    bar = [render_progress(_metrics(n)["data"], 1030.0 if n < 4 else None, 1000.0) if n else "" for n in range(5)]
    assert bar[2].endswith("ETA 30s") and bar[4].endswith("ETA -")
    # After each poll the bar is redrawn over itself; a message erases it, takes its line, and the bar comes back
    # below. Metrics are never printed as lines of their own, and the outcome starts on a fresh line.
    drawn = (f"{clear}{bar[2]}{clear}{render_event(note)}\n{clear}{bar[3]}{clear}{bar[4]}\n"
             "job ftjob-1 succeeded: ft:m::x:1\n")
    assert text.startswith("job ftjob-1: running\n") and text.endswith(drawn), repr(text)
    assert clear not in text.removesuffix(drawn)
