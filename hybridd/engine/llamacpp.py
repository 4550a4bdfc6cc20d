"""llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`) as a managed engine."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import aiohttp

from hybridd.config import KV_CACHE_TYPES, ModelEntry
from hybridd.engine.managed import ManagedEngine

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


class LlamaCppEngine(ManagedEngine):
    """One llama_cpp.server process on a free loopback port, health-checked before it gets traffic."""

    kind = "llama-cpp-python"
    ready_path = HEALTH_PATH
    alive_path = LIVENESS_PATH

    def __init__(self, model: ModelEntry, http: aiohttp.ClientSession, python: str = "") -> None:
        super().__init__(model, http)
        self.python = python

    async def command(self, port: int) -> tuple[list[str], Mapping[str, str]]:
        # llama_cpp.server reads HOST and PORT from the environment ahead of its flags: the engine must not inherit
        # them, or `HOST=0.0.0.0 hybridd serve` would put an unauthenticated engine on every interface.
        env = {k: v for k, v in os.environ.items() if k.upper() not in ENGINE_ENV_DROPPED}
        env["PYTHONUNBUFFERED"] = "1"
        return llama_cpp_argv(self.model, port, self.python, _HAS_AMX), env


_HAS_AMX = cpu_has_amx()
