"""What the pool needs from an engine: start, stop, a base URL, and whether it is still alive."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class EngineState(enum.StrEnum):
    """Lifecycle of one engine: stopped → starting → ready → stopping → stopped; failed when a load fails."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass(frozen=True)
class LoadProgress:
    """How far an engine's load has got: its phase and, where the engine can tell, bytes of its model read."""

    phase: str
    bytes_read: int | None = None
    bytes_total: int | None = None


class Engine(Protocol):
    """An OpenAI-compatible server that serves one model."""

    kind: str
    state: EngineState

    @property
    def base_url(self) -> str:
        """Root URL of the engine's OpenAI API, without the /v1 suffix."""
        ...

    @property
    def pid(self) -> int | None:
        """The engine process id, or None when hybridd does not manage a process."""
        ...

    def is_alive(self) -> bool:
        """True while the engine can take requests (its process has not exited)."""
        ...

    async def start(self) -> None:
        """Start and health-check the engine; raise EngineLoadFailed and leave nothing behind on failure."""
        ...

    async def healthy(self, timeout_s: float) -> bool:
        """True when the engine answers a health check within timeout_s (a stopped or wedged process does not)."""
        ...

    async def stop(self) -> None:
        """Stop the engine and free everything it held."""
        ...

    def kill_now(self) -> None:
        """Kill the engine at once, synchronously (exit paths)."""
        ...
