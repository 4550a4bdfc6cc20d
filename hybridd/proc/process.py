"""A child process in its own process group that dies with the daemon, with the tail of its log kept."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence

log = logging.getLogger("hybridd.engine")

LOG_TAIL_LINES = 200


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ManagedProcess:
    """One engine process: started through the parent-death launcher, its output drained into a ring buffer."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Start argv in a new session, armed to die when this process dies."""
        launcher = [sys.executable, "-m", "hybridd.proc.launch", str(os.getpid()), "--", *argv]
        self.proc = await asyncio.create_subprocess_exec(
            *launcher,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )
        self._reader = asyncio.create_task(self._drain(self.proc), name=f"log:{self.label}")

    async def _drain(self, proc: asyncio.subprocess.Process) -> None:
        # Always drain: an engine that fills its pipe blocks forever.
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self.tail.append(text)
                log.debug("[%s] %s", self.label, text)

    async def wait_exit(self, within_s: float) -> bool:
        """Wait up to within_s for the process to exit; True if it did."""
        if self.proc is None:
            return True
        try:
            await asyncio.wait_for(self.proc.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it after grace_s, and reap."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            if not await self.wait_exit(grace_s):
                self._signal_group(signal.SIGKILL)
                await self.wait_exit(grace_s)
        # The engine is gone but a child of it may still hold the pipe; don't wait on it forever.
        self._signal_group(signal.SIGKILL)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def kill_now(self) -> None:
        """SIGKILL the whole process group, without waiting."""
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        # start_new_session made the engine its own group leader: pgid == pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def summary(self, lines: int = 6, limit: int = 700) -> str:
        """The last meaningful log lines as one line, for an error message."""
        picked = [line for line in self.tail if not line.startswith(("llama_model_loader: - ", "load_tensors: "))]
        text = " | ".join(picked[-lines:]) or "(no output)"
        return text if len(text) <= limit else "…" + text[-limit:]
