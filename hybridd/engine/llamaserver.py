"""llama.cpp's own `llama-server` as a managed engine: tool calls (--jinja), json_schema, parallel slots, LoRA."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from hybridd.config import ModelEntry
from hybridd.engine import build
from hybridd.engine.llamacpp import cpu_has_amx, repack_setting
from hybridd.engine.managed import ManagedEngine
from hybridd.errors import EngineLoadFailed

# 200 once the model is loaded, 503 while loading. llama-server answers it on its HTTP threads without queueing a
# task, so a busy engine still answers: it serves as both readiness and liveness.
HEALTH_PATH = "/health"
# llama-server reads LLAMA_ARG_<FLAG> from the environment (LLAMA_ARG_HOST, LLAMA_ARG_PORT, LLAMA_ARG_API_KEY...),
# and a flag on the command line does not always win: the engine inherits none of them.
ENGINE_ENV_DROPPED_PREFIX = "LLAMA_ARG_"
ENGINE_ENV_DROPPED = frozenset({"HOST", "PORT"})
HELP_TIMEOUT_S = 30.0


def llama_server_argv(model: ModelEntry, port: int, binary: str | Path, has_amx: bool = False,
                      flags: frozenset[str] = frozenset({"--no-webui", "--fit"})) -> list[str]:
    """The command line that serves model on 127.0.0.1:port; flags: the optional flags this binary knows."""
    assert model.path is not None
    argv = [
        str(binary),
        "--host", "127.0.0.1",
        "--port", str(port),
        "-m", str(model.path),
        "--alias", model.name,
        "--jinja",  # the model's chat template, and tool calls parsed out of its output
        "-c", str(model.ctx),  # shared by the slots unless --kv-unified is in options
        "-np", str(getattr(model, "slots", 1)),
        # hybridd's -1 is llama-cpp-python's "every layer"; llama-server's -1 is "auto" (fit to free memory).
        "-ngl", "all" if model.n_gpu_layers < 0 else str(model.n_gpu_layers),
        "-ctk", model.type_k,
        "-ctv", model.type_v,
        "-fa", "on" if model.flash_attn else "off",
    ]
    if "--fit" in flags:  # hybridd sized the context and layers already; the engine must not shrink them
        argv += ["--fit", "off"]
    if "--no-webui" in flags:
        argv.append("--no-webui")
    if repack_setting(model, has_amx) == "off":
        argv.append("--no-repack")
    if model.embeddings:
        argv.append("--embeddings")
    if model.adapters:  # fine-tunes of this base: loaded now, each applied only to the requests that name it
        argv.append("--lora-init-without-apply")
        for adapter in model.adapters:
            argv += ["--lora", str(adapter)]
    elif model.lora_path is not None:
        argv += ["--lora", str(model.lora_path)]
    for key, value in model.options.items():
        flag = key if key.startswith("-") else "--" + key.replace("_", "-")
        if value is True:  # a switch: `kv-unified = true` is --kv-unified
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


def find_llama_server(config_value: str, env: dict[str, str] | None = None,
                      version: str | None = None) -> Path | None:
    """The llama-server to run: engine.llama_server if set, else one on PATH, else `hybridd engines build`'s.

    The built one must match the installed llama-cpp-python version; a CUDA build is preferred over a CPU one.
    A configured path that is not an executable file gives None: the caller names the key.
    """
    env = dict(os.environ) if env is None else env
    if config_value:
        path = Path(config_value).expanduser()
        return path if is_executable(path) else None
    on_path = shutil.which(build.BINARY, path=env.get("PATH"))
    if on_path:
        return Path(on_path)
    version = version or build.installed_version()
    if version is None:
        return None
    built = build.built_binaries(build.cache_root(env), version)
    return built[0] if built else None


_flags_cache: dict[tuple[str, float], frozenset[str]] = {}


async def binary_flags(binary: str | Path) -> frozenset[str]:
    """The optional flags (of those llama_server_argv may pass) that this binary's --help lists, cached per file."""
    key = _file_key(Path(binary))
    if key is None:
        return frozenset()
    if key in _flags_cache:
        return _flags_cache[key]
    try:
        proc = await asyncio.create_subprocess_exec(
            str(binary), "--help", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(proc.communicate(), HELP_TIMEOUT_S)
    except (OSError, TimeoutError):
        return frozenset()  # the start that follows fails with the real reason, in the engine's log
    text = output.decode("utf-8", "replace")
    flags = frozenset(flag for flag in ("--no-webui", "--fit") if f"{flag} " in text or f"{flag}," in text)
    _flags_cache[key] = flags
    return flags


def _file_key(path: Path) -> tuple[str, float] | None:
    """The file's real path and modification time (a rebuilt binary is asked again), or None when it is not there."""
    try:
        return str(path.resolve()), path.stat().st_mtime
    except OSError:
        return None


def is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


class LlamaServerEngine(ManagedEngine):
    """One llama-server process on a free loopback port, health-checked before it gets traffic."""

    kind = "llama-server"
    ready_path = alive_path = HEALTH_PATH

    def __init__(self, model: ModelEntry, http: aiohttp.ClientSession, binary: str | Path) -> None:
        super().__init__(model, http)
        self.binary = Path(binary)

    async def command(self, port: int) -> tuple[list[str], Mapping[str, str]]:
        if not is_executable(self.binary):
            raise EngineLoadFailed(f"engine for model '{self.model.name}': llama-server binary {self.binary} is "
                                   "not an executable file (engine.llama_server, or `hybridd engines build`)")
        env = {k: v for k, v in os.environ.items()
               if k.upper() not in ENGINE_ENV_DROPPED and not k.upper().startswith(ENGINE_ENV_DROPPED_PREFIX)}
        flags = await binary_flags(self.binary)
        return llama_server_argv(self.model, port, self.binary, _HAS_AMX, flags), env


_HAS_AMX = cpu_has_amx()
