"""What every engine hybridd runs itself has in common: a child process on 127.0.0.1 and a free port, polled until
it is ready (or failed with its last log lines), asked whether it is alive, stopped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from hybridd.config import ModelEntry
from hybridd.engine.base import EngineState, LoadProgress
from hybridd.errors import EngineLoadFailed
from hybridd.proc.mapped import mapped_bytes
from hybridd.proc.process import ManagedProcess, free_loopback_port


class ManagedEngine:
    """One engine process; a kind says how it is started (`command`) and which pages say ready and alive."""

    kind = ""
    ready_path = "/health"  # 200 once the model is loaded
    alive_path = "/health"  # 200 while its event loop runs, busy or not

    def __init__(self, model: ModelEntry, http: aiohttp.ClientSession) -> None:
        self.model = model
        self.http = http
        self.state = EngineState.STOPPED
        self.port: int | None = None
        self.process = ManagedProcess(model.name)
        self.load_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.state is EngineState.READY and self.process.is_running()

    async def command(self, port: int) -> tuple[list[str], Mapping[str, str]]:
        """The argv and environment that serve the model on 127.0.0.1:port (EngineLoadFailed if it cannot)."""
        raise NotImplementedError

    async def start(self) -> None:
        """Spawn the engine and wait until it is ready, or fail with its last log lines."""
        self.state = EngineState.STARTING
        self.port = free_loopback_port()
        started = time.monotonic()
        try:
            argv, env = await self.command(self.port)
            await self.process.spawn(argv, env)
            await self._wait_ready(started + self.model.load_timeout_s)
        except BaseException:
            self.state = EngineState.FAILED
            await self.process.stop(grace_s=2.0)
            raise
        self.load_seconds = time.monotonic() - started
        self.state = EngineState.READY

    def load_progress(self) -> LoadProgress:
        """The load's phase and how much of the model file the process has brought into memory (mapped loads only:
        a load that reads the file into its own buffers, as with a LoRA adapter, tells its phase alone)."""
        path = self.model.path
        total = _size(path)
        pid = self.process.pid
        if pid is None or not self.process.is_running():
            return LoadProgress("starting", None, total)
        maps = self.model.lora_path is None and str(self.model.options.get("use_mmap", True)).lower() not in (
            "false", "0", "no", "off")
        if path is None or not maps:
            return LoadProgress("loading model", None, total)
        done = mapped_bytes(pid, path)
        if done is None:  # the engine's own start-up (a Python server imports for a second or two)
            return LoadProgress("starting engine", 0, total)
        return LoadProgress("reading weights", done if total is None else min(done, total), total)

    async def _wait_ready(self, deadline: float) -> None:
        delay = 0.02
        while True:
            if not self.process.is_running():
                await self.process.wait_exit(1.0)
                raise EngineLoadFailed(
                    f"engine for model '{self.model.name}' exited with code {self.process.returncode} while "
                    f"loading: {self.process.summary()}"
                )
            if await self._answers(self.ready_path, 2.0):
                return
            if time.monotonic() > deadline:
                raise EngineLoadFailed(
                    f"engine for model '{self.model.name}' was not ready after {self.model.load_timeout_s:g} s "
                    f"(engine.load_timeout_s): {self.process.summary()}"
                )
            await asyncio.sleep(delay)  # polling the engine's port: the backoff is the deadline's step
            delay = min(delay * 1.5, 0.25)

    async def healthy(self, timeout_s: float) -> bool:
        return await self._answers(self.alive_path, timeout_s)

    async def _answers(self, path: str, timeout_s: float) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self.http.get(self.base_url + path, timeout=timeout) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def stop(self) -> None:
        self.state = EngineState.STOPPING
        await self.process.stop()
        self.state = EngineState.STOPPED

    def kill_now(self) -> None:
        self.process.kill_now()
        self.state = EngineState.STOPPED


def _size(path: Path | None) -> int | None:
    try:
        return path.stat().st_size if path is not None else None
    except OSError:
        return None
