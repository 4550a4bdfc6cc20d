"""The trainer boundary: a subprocess started from a command with a JSON spec, telling its progress in JSON lines.

    argv      the configured command ([train] command), "{spec}" replaced by the spec file, "{python}" by the
              daemon's interpreter; the built-in trainer is `{python} -m hybridd.jobs.hf_trainer {spec}`
    spec      job id, base model folder, dataset, method, hyperparameters, output folder, resume-from, where to
              write events (plugins/trainers.md has every key)
    events    appended to `events_path`, one JSON object a line: message, metrics, checkpoint, result
    exit      0: the result exists; anything else: it failed (its last error event, else its log, says why)
    cancel    SIGTERM to its process group, SIGKILL after the grace

It runs in its own process group through the parent-death launcher, so it dies with the daemon (a restart resumes
it from its last checkpoint) and a cancel reaches every process it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridd.proc.process import ManagedProcess

BUILT_IN = ("{python}", "-m", "hybridd.jobs.hf_trainer", "{spec}")
POLL_S = 0.2  # how often a running trainer's events file is read
MAX_EVENT_BYTES = 1 << 20  # a longer line is not an event: skipped


def trainer_argv(command: Sequence[str], spec_path: Path) -> list[str]:
    """The command with its placeholders filled in (the built-in trainer when `command` is empty)."""
    return [part.replace("{spec}", str(spec_path)).replace("{python}", sys.executable)
            for part in (command or BUILT_IN)]


@dataclass
class EventTail:
    """Reads the lines a trainer appends to its events file, each once, never a half-written one."""

    path: Path
    offset: int = 0
    bad_lines: int = 0

    def read(self) -> list[dict[str, Any]]:
        """The complete events written since the last read (blocking: call it off the loop)."""
        try:
            with self.path.open("rb") as file:
                file.seek(self.offset)
                chunk = file.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # a line without its newline yet is read next time
        self.offset += end
        events = []
        for line in chunk[:end].splitlines():
            if not line.strip():
                continue
            try:
                event = json.loads(line) if len(line) <= MAX_EVENT_BYTES else None
            except ValueError:
                event = None
            if isinstance(event, dict) and isinstance(event.get("type"), str):
                events.append(event)
            else:
                self.bad_lines += 1
        return events


class TrainerProcess:
    """One run of a trainer: start it, read its events as they come, cancel it."""

    def __init__(self, argv: Sequence[str], events_path: Path, label: str,
                 env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.tail = EventTail(events_path)
        self.process = ManagedProcess(label)
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.cancelled = False

    async def start(self) -> None:
        self.process = self.process if self.process.proc is None else ManagedProcess(self.process.label)
        await self.process.spawn(self.argv, self.env)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every event until the process has exited and its file is read to the end."""
        while True:
            exited = not self.process.is_running()
            for event in await asyncio.to_thread(self.tail.read):
                yield event
            if exited:
                await self.process.wait_exit(1.0)  # reap it, so returncode is set
                return
            await self.process.wait_exit(POLL_S)

    async def cancel(self, grace_s: float) -> None:
        """SIGTERM to its process group; SIGKILL after `grace_s`."""
        self.cancelled = True
        await self.process.stop(grace_s)

    def kill_now(self) -> None:
        self.process.kill_now()

    def log_summary(self) -> str:
        return self.process.summary(lines=8)
