"""An OpenAI-compatible server hybridd forwards to but does not run (llama-server, vLLM, Ollama...)."""

from __future__ import annotations

from hybridd.config import ModelEntry
from hybridd.engine.base import EngineState


class ExternalEngine:
    """A base URL someone else keeps running; always 'ready', failures surface per request."""

    kind = "external"

    def __init__(self, model: ModelEntry) -> None:
        if model.base_url is None:
            raise ValueError(f"model {model.name!r} has no base_url")
        url = model.base_url.rstrip("/")
        self._base_url = url.removesuffix("/v1")
        self.state = EngineState.READY

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def pid(self) -> int | None:
        return None

    def is_alive(self) -> bool:
        return True

    async def start(self) -> None:
        self.state = EngineState.READY

    async def healthy(self, timeout_s: float) -> bool:
        return True  # not ours to restart: its failures surface per request

    async def stop(self) -> None:
        self.state = EngineState.STOPPED

    def kill_now(self) -> None:
        self.state = EngineState.STOPPED
