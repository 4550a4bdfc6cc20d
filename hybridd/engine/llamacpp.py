"""llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`) as a managed engine."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import aiohttp

from hybridd.config import KV_CACHE_TYPES, ModelEntry
from hybridd.engine.base import EngineState
from hybridd.errors import EngineLoadFailed
from hybridd.proc.process import ManagedProcess, free_loopback_port

HEALTH_PATH = "/v1/models"  # ready: the model is loaded and served
# Alive: llama_cpp.server holds its model lock for a whole completion and /v1/models waits on that lock, so a long
# generation would look hung there; FastAPI's docs page is answered by the event loop alone, busy or not.
LIVENESS_PATH = "/docs"
ENGINE_ENV_DROPPED = frozenset({"HOST", "PORT"})


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """True when the CPU advertises AMX tiles (Sapphire Rapids and later Xeons)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    return " amx_int8" in cpuinfo or " amx_tile" in cpuinfo


def repack_setting(model: ModelEntry, has_amx: bool) -> str:
    """'on' or 'off': weight repacking (extra CPU buffer types) is off on AMX CPUs unless asked for."""
    if model.repack == "auto":
        return "off" if has_amx else "on"
    return model.repack


def llama_cpp_argv(model: ModelEntry, port: int, python: str = "", has_amx: bool = False) -> list[str]:
    """The command line that serves model on 127.0.0.1:port."""
    assert model.path is not None
    argv = [
        python or sys.executable, "-m", "hybridd.engine.llamacpp_main",
        "--repack", repack_setting(model, has_amx),
        "--model", str(model.path),
        "--model_alias", model.name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(model.ctx),
        "--n_gpu_layers", str(model.n_gpu_layers),
        "--type_k", str(KV_CACHE_TYPES[model.type_k]),
        "--type_v", str(KV_CACHE_TYPES[model.type_v]),
        "--flash_attn", str(model.flash_attn),
        "--embedding", str(model.embeddings),
        # llama_cpp.server otherwise ends a running stream when another request arrives.
        "--interrupt_requests", "False",
        # Its default (True) keeps logits for every context position in host RAM: n_ctx x n_vocab x 4 bytes, 32 GiB
        # for Gemma 3 at 32k, and computes them for every prompt token. Logprobs users can set it in options.
        "--logits_all", "False",
    ]
    if model.lora_path is not None:  # a fine-tuned model: its adapter over the base GGUF (mmap goes off with it)
        argv += ["--lora_path", str(model.lora_path)]
    for key, value in model.options.items():
        argv += [f"--{key}", str(value)]
    return argv


class LlamaCppEngine:
    """One llama_cpp.server process on a free loopback port, health-checked before it gets traffic."""

    kind = "llama-cpp-python"

    def __init__(self, model: ModelEntry, http: aiohttp.ClientSession, python: str = "") -> None:
        self.model = model
        self.http = http
        self.python = python
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

    async def start(self) -> None:
        """Spawn the server and wait until it answers, or fail with its last log lines."""
        self.state = EngineState.STARTING
        self.port = free_loopback_port()
        started = time.monotonic()
        # llama_cpp.server reads HOST and PORT from the environment ahead of its flags: the engine must not inherit
        # them, or `HOST=0.0.0.0 hybridd serve` would put an unauthenticated engine on every interface.
        env = {k: v for k, v in os.environ.items() if k.upper() not in ENGINE_ENV_DROPPED}
        env["PYTHONUNBUFFERED"] = "1"
        try:
            argv = llama_cpp_argv(self.model, self.port, self.python, _HAS_AMX)
            await self.process.spawn(argv, env)
            await self._wait_healthy(started + self.model.load_timeout_s)
        except BaseException:
            self.state = EngineState.FAILED
            await self.process.stop(grace_s=2.0)
            raise
        self.load_seconds = time.monotonic() - started
        self.state = EngineState.READY

    async def _wait_healthy(self, deadline: float) -> None:
        delay = 0.02
        while True:
            if not self.process.is_running():
                await self.process.wait_exit(1.0)
                raise EngineLoadFailed(
                    f"engine for model '{self.model.name}' exited with code {self.process.returncode} while "
                    f"loading: {self.process.summary()}"
                )
            if await self._answers(HEALTH_PATH, 2.0):
                return
            if time.monotonic() > deadline:
                raise EngineLoadFailed(
                    f"engine for model '{self.model.name}' was not ready after {self.model.load_timeout_s:g} s "
                    f"(engine.load_timeout_s): {self.process.summary()}"
                )
            await asyncio.sleep(delay)  # polling the engine's port: the backoff is the deadline's step
            delay = min(delay * 1.5, 0.25)

    async def healthy(self, timeout_s: float) -> bool:
        return await self._answers(LIVENESS_PATH, timeout_s)

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


_HAS_AMX = cpu_has_amx()
