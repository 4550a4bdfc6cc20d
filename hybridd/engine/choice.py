"""Which engine runs the models whose config names none: llama-server where one is built, else llama-cpp-python."""

from __future__ import annotations

from hybridd.config import Config, with_default_engine
from hybridd.engine.llamaserver import find_llama_server


def default_engine(config: Config, override: str | None = None, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(engine kind, why): --engine, else [engine] kind, else llama-server when one is found (it parses tool calls,
    takes json_schema and runs parallel slots), else llama-cpp-python, which needs no build step."""
    if override:
        return override, "chosen by --engine (HYBRIDD_ENGINE)"
    if not config.engine.auto:
        return config.engine.kind, "engine.kind in the config"
    binary = find_llama_server(config.engine.llama_server, env)
    if binary is not None:
        return "llama-server", f"llama-server found at {binary}"
    if config.engine.llama_server:
        return "llama-cpp-python", f"engine.llama_server {config.engine.llama_server} is not an executable file"
    return "llama-cpp-python", "no llama-server is built ('hybridd engines build llama-server' builds one)"


def with_chosen_engine(config: Config, override: str | None = None,
                       env: dict[str, str] | None = None) -> tuple[Config, str]:
    """(config, why): `config` with default_engine's choice given to [engine] kind and every model that names
    none, as `hybridd serve` runs them."""
    kind, why = default_engine(config, override, env)
    return with_default_engine(config, kind), why
