"""`hybridd jobs`: fine-tuning jobs listed, one shown (and followed until it finishes), one cancelled.

Each action takes `ask(path, body)`, which returns the daemon's JSON or raises SystemExit with its message, and the
stream it writes to; so the tests drive them with a fake daemon and a StringIO, and the command with the real ones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO
from urllib.parse import quote

from hybridd.cli.views import render_event, render_job, render_jobs, render_progress

Ask = Callable[[str, Any], Any]

FINISHED = ("succeeded", "failed", "cancelled")
EXIT_OK, EXIT_ERROR = 0, 1
PAGE = 100  # the events route's largest page
_CLEAR = "\r\033[K"  # back to the line's start and erase it: the progress bar is redrawn in place


def _job_path(job_id: str) -> str:
    return "/v1/fine_tuning/jobs/" + quote(job_id, safe="")


def list_jobs(ask: Ask, out: TextIO, as_json: bool) -> int:
    """Print the newest jobs."""
    listing = ask(f"/v1/fine_tuning/jobs?limit={PAGE}", None)
    print(json.dumps(listing, indent=2) if as_json else render_jobs(listing), file=out)
    return EXIT_OK


def events_after(ask: Ask, job_id: str, after: str | None) -> Iterator[dict[str, Any]]:
    """A job's events oldest first, those after event `after` (all of them when None), page by page."""
    while True:
        mark = f"&after={quote(after, safe='')}" if after else ""
        page = ask(f"{_job_path(job_id)}/events?order=asc&limit={PAGE}{mark}", None)
        data = page.get("data") or []
        yield from data
        if not page.get("has_more") or not data:
            return
        after = data[-1]["id"]


def show_job(ask: Ask, out: TextIO, job_id: str, as_json: bool, now: Callable[[], float] = time.time) -> int:
    """Print a job and its story: its message events, and its last progress line (every metrics event with
    --json)."""
    job = ask(_job_path(job_id), None)
    events = list(events_after(ask, job_id, None))
    if as_json:
        print(json.dumps({"job": job, "events": events}, indent=2), file=out)
        return EXIT_OK
    print(render_job(job, now()), file=out)
    if events:
        print("events:", file=out)
    metrics = None
    for event in events:
        if event.get("type") == "metrics":
            metrics = event.get("data") or {}
        else:
            print(render_event(event), file=out)
    if metrics:
        print(render_progress(metrics, job.get("estimated_finish"), now()), file=out)
    return EXIT_OK


def follow_job(ask: Ask, out: TextIO, job_id: str, as_json: bool, tty: bool, poll_s: float = 0.5,
               now: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> int:
    """Print a job's events as they come, with a progress bar (redrawn in place on a terminal, one line per update
    elsewhere), until it finishes: 0 when it succeeded, 1 when it failed or was cancelled.

    With as_json: each event as one JSON line, then the finished job as the last line."""
    job = ask(_job_path(job_id), None)
    if not as_json:
        print(render_job(job, now()), file=out, flush=True)
    last: str | None = None
    bar = ""  # the progress line now on the terminal (tty only)
    metrics: dict[str, Any] | None = None
    while True:
        for event in events_after(ask, job_id, last):
            last = event["id"]
            if as_json:
                print(json.dumps(event), file=out, flush=True)
            elif event.get("type") == "metrics":
                metrics = event.get("data") or {}
                if not tty:
                    print(render_progress(metrics, job.get("estimated_finish"), now()), file=out, flush=True)
            else:
                # A message goes above the bar: erase the bar, print the message; the bar comes back below it.
                print((_CLEAR if bar else "") + render_event(event), file=out, flush=True)
                bar = ""
        if tty and metrics is not None and not as_json:
            bar = render_progress(metrics, job.get("estimated_finish"), now())
            print(_CLEAR + bar, end="", file=out, flush=True)
        if job["status"] in FINISHED:
            break
        sleep(poll_s)
        # The job first, then its events: a job seen finished has every event it wrote before finishing.
        job = ask(_job_path(job_id), None)
    if as_json:
        print(json.dumps(job), file=out)
    else:
        if bar:
            print(file=out)
        print(_outcome(job), file=out)
    return EXIT_OK if job["status"] == "succeeded" else EXIT_ERROR


def _outcome(job: dict[str, Any]) -> str:
    if job["status"] == "succeeded":
        return f"job {job['id']} succeeded: {job.get('fine_tuned_model')}"
    if job["status"] == "failed":
        return f"job {job['id']} failed: {(job.get('error') or {}).get('message', 'no reason given')}"
    return f"job {job['id']} {job['status']}"


def cancel_job(ask: Ask, out: TextIO, job_id: str, as_json: bool) -> int:
    """Cancel a job; a job on a peer is cancelled there, so its status changes a moment later."""
    job = ask(_job_path(job_id) + "/cancel", {})
    if as_json:
        print(json.dumps(job, indent=2), file=out)
    elif job["status"] == "cancelled":
        print(f"job {job['id']} cancelled", file=out)
    else:
        where = (job.get("hybridd") or {}).get("placement") or "its node"
        print(f"job {job['id']}: cancelling (it is {job['status']} on {where}; 'hybridd jobs show {job['id']} "
              "--follow' shows when it stops)", file=out)
    return EXIT_OK
