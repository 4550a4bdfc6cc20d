"""One engine per model: started on first use (once, however many requests race), leased, reaped when idle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from hybridd.config import ModelEntry
from hybridd.engine.base import Engine, EngineState
from hybridd.errors import EngineLoadFailed
from hybridd.place.idle import LoadedEngine, idle_expired, next_expiry

log = logging.getLogger("hybridd.engine")

EngineFactory = Callable[[ModelEntry], Engine]


@dataclass
class ModelSlot:
    """The pool's record of one model: its engine (if any) and how it is being used."""

    model: ModelEntry
    engine: Engine | None = None
    running: ModelEntry | None = None  # the settings the live engine was started with (ctx may exceed model.ctx)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    requests: int = 0
    last_used: float = 0.0
    loaded_at: float | None = None
    load_seconds: float | None = None
    restarts: int = 0
    last_error: str | None = None

    @property
    def state(self) -> EngineState:
        if self.engine is None:
            return EngineState.FAILED if self.last_error else EngineState.STOPPED
        if self.engine.state is EngineState.READY and not self.engine.is_alive():
            return EngineState.FAILED
        return self.engine.state


@dataclass(frozen=True)
class Lease:
    """A request's hold on a ready engine; the engine is not reaped while any lease is out."""

    engine: Engine
    cold_start_s: float | None


class EnginePool:
    """Owns every engine of this node; the only place that starts or stops one."""

    def __init__(
        self, models: tuple[ModelEntry, ...], factory: EngineFactory, clock: Callable[[], float] = time.monotonic,
        on_stopped: Callable[[str], None] | None = None,
    ) -> None:
        self.slots = {model.name: ModelSlot(model) for model in models if model.local}
        for slot in self.slots.values():
            slot.idle.set()
        self.factory = factory
        self.clock = clock
        self.on_stopped = on_stopped or (lambda name: None)
        self._wake = asyncio.Event()
        self._closed = False

    @contextlib.asynccontextmanager
    async def lease(self, model: ModelEntry, run: ModelEntry | None = None) -> AsyncIterator[Lease]:
        """Hold a ready engine for model, started with the settings run (default: model's own), for one request."""
        slot = self.slots[model.name]
        cold_start = await self._ensure_ready(slot, run or slot.model)
        assert slot.engine is not None
        slot.in_flight += 1
        slot.requests += 1
        slot.idle.clear()
        try:
            yield Lease(slot.engine, cold_start)
        finally:
            slot.in_flight -= 1
            slot.last_used = self.clock()
            if not slot.in_flight:
                slot.idle.set()
            self._wake.set()

    def serves(self, slot: ModelSlot, run: ModelEntry) -> bool:
        """True if the live engine can take a request that needs the settings run."""
        live = slot.running
        return (slot.engine is not None and slot.engine.is_alive() and live is not None
                and live.ctx >= run.ctx and live.n_gpu_layers == run.n_gpu_layers)

    async def _ensure_ready(self, slot: ModelSlot, run: ModelEntry) -> float | None:
        async with slot.lock:
            if self._closed:
                raise EngineLoadFailed("hybridd is shutting down; no new engine starts")
            if self.serves(slot, run):
                return None
            engine = slot.engine
            if engine is not None and engine.is_alive():
                # It runs with too small a context (or other layers): let its requests finish, then reload.
                log.info("reloading %s at ctx %d (was %d)", slot.model.name, run.ctx, slot.running.ctx if slot.running
                         else 0)
                await slot.idle.wait()
                await self._stop(slot)
            elif engine is not None:
                log.warning("engine for %s died (state %s); restarting it", slot.model.name, slot.state)
                slot.restarts += 1
                await self._stop(slot)
            engine = self.factory(run)
            started = self.clock()
            try:
                await engine.start()
            except Exception as exc:
                slot.last_error = str(exc)
                log.error("%s", exc)
                self.on_stopped(slot.model.name)
                raise
            slot.engine, slot.running = engine, run
            slot.last_error = None
            slot.loaded_at = slot.last_used = self.clock()
            slot.load_seconds = slot.loaded_at - started
            log.info("engine for %s ready in %.2f s at %s", slot.model.name, slot.load_seconds, engine.base_url)
            return slot.load_seconds

    async def unload(self, name: str, reason: str) -> bool:
        """Stop the engine of model name if it has no request in flight; True if it was stopped."""
        slot = self.slots[name]
        async with slot.lock:
            if slot.engine is None or slot.in_flight:
                return False
            log.info("unloading %s: %s", name, reason)
            await self._stop(slot)
            return True

    async def _stop(self, slot: ModelSlot) -> None:
        engine, slot.engine, slot.running, slot.loaded_at = slot.engine, None, None, None
        if engine is not None:
            await engine.stop()
        self.on_stopped(slot.model.name)

    def _loaded(self) -> list[LoadedEngine]:
        return [
            LoadedEngine(name, slot.in_flight, slot.last_used, slot.model.idle_ttl_s)
            for name, slot in self.slots.items()
            if slot.engine is not None and slot.engine.kind != "external"
        ]

    async def reap_forever(self) -> None:
        """Unload engines that sat idle past their TTL; runs until cancelled."""
        while True:
            now = self.clock()
            for name in idle_expired(self._loaded(), now):
                await self.unload(name, f"idle for {self.slots[name].model.idle_ttl_s:g} s (idle_ttl_s)")
            wait = next_expiry(self._loaded(), self.clock())
            self._wake.clear()
            # Sleep until the next expiry or until a lease ends (which may start a new idle clock).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=None if wait is None else wait + 0.01)

    async def stop_all(self) -> None:
        """Stop every engine; no new engine starts after this."""
        self._closed = True
        await asyncio.gather(*(self._stop(slot) for slot in self.slots.values() if slot.engine is not None),
                             return_exceptions=True)

    def kill_all_now(self) -> None:
        """SIGKILL every engine synchronously (last-resort exit path)."""
        for slot in self.slots.values():
            if slot.engine is not None:
                slot.engine.kill_now()

    def describe(self) -> list[dict[str, Any]]:
        """Per model: state, engine, pid, idle time, in-flight and request counts, for status."""
        now = self.clock()
        rows = []
        for name, slot in self.slots.items():
            engine = slot.engine
            loaded = engine is not None and slot.state is EngineState.READY
            rows.append({
                "name": name,
                "aliases": list(slot.model.aliases),
                "engine": slot.model.engine,
                "state": slot.state.value,
                "loaded": loaded,
                "ctx": slot.running.ctx if slot.running else slot.model.ctx,
                "type_k": slot.model.type_k,
                "type_v": slot.model.type_v,
                "path": str(slot.model.path) if slot.model.path else None,
                "base_url": engine.base_url if engine is not None and loaded else slot.model.base_url,
                "pid": engine.pid if engine is not None else None,
                "in_flight": slot.in_flight,
                "requests": slot.requests,
                "idle_s": round(now - slot.last_used, 1) if loaded and not slot.in_flight else None,
                "loaded_for_s": round(now - slot.loaded_at, 1) if loaded and slot.loaded_at else None,
                "load_seconds": round(slot.load_seconds, 2) if slot.load_seconds is not None else None,
                "idle_ttl_s": slot.model.idle_ttl_s,
                "restarts": slot.restarts,
                "last_error": slot.last_error,
            })
        return rows
