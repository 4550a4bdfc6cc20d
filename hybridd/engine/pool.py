"""The node's engines, keyed by engine key (a model at a context): started on first use (once, however many
requests race), leased per request, reloaded when they died, reaped when idle."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from hybridd.config import ModelEntry
from hybridd.engine.base import Engine, EngineState, LoadProgress
from hybridd.errors import EngineLoadFailed
from hybridd.place.idle import LoadedEngine, idle_expired, next_expiry

log = logging.getLogger("hybridd.engine")

# An engine that misses this many health checks in a row is hung (a stopped or wedged process).
HEALTH_STRIKES = 3

EngineFactory = Callable[[ModelEntry], Engine]


@dataclass
class EngineSlot:
    """The pool's record of one engine key: the engine (if any), its settings, how it is being used."""

    key: str
    model: ModelEntry  # the catalog entry
    run: ModelEntry  # the settings the engine runs with (its ctx may exceed model.ctx)
    placement: str = "local"
    engine: Engine | None = None
    stopping: bool = False  # its engine is being stopped: the process may still hold its memory
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while nothing is in flight or waiting
    in_flight: int = 0
    waiting: int = 0
    requests: int = 0
    last_used: float = 0.0
    loaded_at: float | None = None
    load_seconds: float | None = None
    restarts: int = 0
    last_error: str | None = None
    loading: Engine | None = None  # the engine being started, until it is ready or failed
    load_started: float | None = None

    @property
    def state(self) -> EngineState:
        if self.stopping:
            return EngineState.STOPPING
        if self.engine is None and self.loading is not None:
            return EngineState.STARTING
        if self.engine is None:
            return EngineState.FAILED if self.last_error else EngineState.STOPPED
        if self.engine.state is EngineState.READY and not self.engine.is_alive():
            return EngineState.FAILED
        return self.engine.state

    @property
    def live(self) -> bool:
        """True while the engine can take requests."""
        return self.engine is not None and self.engine.is_alive()

    def settle(self) -> None:
        """Bring the idle event in line with the counts (call after changing them)."""
        if self.in_flight or self.waiting:
            self.idle.clear()
        else:
            self.idle.set()


@dataclass(frozen=True)
class Lease:
    """A request's hold on a ready engine; the engine is not reaped while any lease is out."""

    engine: Engine
    cold_start_s: float | None


class EnginePool:
    """Owns every engine of this node; the only place that starts or stops one."""

    def __init__(
        self, factory: EngineFactory, clock: Callable[[], float] = time.monotonic,
        on_stopped: Callable[[str], None] | None = None, on_loaded: Callable[[str], None] | None = None,
        health_interval_s: float = 10.0,
    ) -> None:
        self.slots: dict[str, EngineSlot] = {}
        self.factory = factory
        self.clock = clock
        # Told when an engine's process is gone and nothing waits for it (or its start failed), and when one is up.
        self.on_stopped = on_stopped or (lambda key: None)
        self.on_loaded = on_loaded or (lambda key: None)
        # Told when a hung engine is killed: (its base URL, why), so its clients can be told.
        self.on_hung: Callable[[str, str], None] = lambda base_url, why: None
        self.health_interval_s = health_interval_s
        self._wake = asyncio.Event()
        # (model, event) -> count, for /metrics: "load", "load_failed", and each unload by its cause
        self.tally: collections.Counter[tuple[str, str]] = collections.Counter()
        self._closing = asyncio.Event()
        self._closed = False

    def slot(self, key: str, model: ModelEntry, run: ModelEntry | None = None, placement: str = "local") -> EngineSlot:
        """The slot for key, made on first use; a stopped slot takes the new settings."""
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = EngineSlot(key, model, run or model, placement)
            slot.idle.set()
        elif slot.engine is None and run is not None:
            slot.run, slot.placement = run, placement
        return slot

    def for_model(self, name: str) -> list[EngineSlot]:
        """Slots of one model, most recently used first."""
        return sorted((s for s in self.slots.values() if s.model.name == name), key=lambda s: -s.last_used)

    @contextlib.asynccontextmanager
    async def lease(self, slot: EngineSlot) -> AsyncIterator[Lease]:
        """Hold slot's engine, started if needed, for the duration of one request."""
        slot.waiting += 1
        slot.settle()
        try:
            cold_start = await self._ensure_ready(slot)
        finally:
            slot.waiting -= 1
            slot.settle()
        assert slot.engine is not None
        slot.in_flight += 1
        slot.requests += 1
        slot.settle()
        try:
            yield Lease(slot.engine, cold_start)
        finally:
            slot.in_flight -= 1
            slot.last_used = self.clock()
            slot.settle()
            self._wake.set()

    async def wait_idle(self, key: str) -> None:
        """Until the engine of key has no request in flight or waiting for it (at once when there is none)."""
        slot = self.slots.get(key)
        while slot is not None and (slot.in_flight or slot.waiting):
            await slot.idle.wait()

    async def _ensure_ready(self, slot: EngineSlot) -> float | None:
        async with slot.lock:
            if self._closed:
                raise EngineLoadFailed("hybridd is shutting down; no new engine starts")
            if slot.live:
                return None
            if slot.engine is not None:
                log.warning("engine %s died (state %s); restarting it", slot.key, slot.state)
                slot.restarts += 1
                await self._stop(slot)
            engine = self.factory(slot.run)
            started = self.clock()
            slot.loading, slot.load_started = engine, started
            try:
                await engine.start()
            except Exception as exc:
                slot.last_error = str(exc)
                self.tally[slot.model.name, "load_failed"] += 1
                log.error("%s", exc)
                self.on_stopped(slot.key)
                raise
            finally:
                slot.loading = slot.load_started = None
            slot.engine = engine
            slot.last_error = None
            slot.loaded_at = slot.last_used = self.clock()
            slot.load_seconds = slot.loaded_at - started
            self.tally[slot.model.name, "load"] += 1
            log.info("engine %s ready in %.2f s at %s", slot.key, slot.load_seconds, engine.base_url)
            self.on_loaded(slot.key)
            return slot.load_seconds

    async def unload(self, key: str, reason: str, cause: str = "requested") -> bool:
        """Stop the engine of key once it has no request in flight; True if it was stopped. `cause` counts it for
        /metrics (evicted, drained, idle_ttl, requested, reload); `reason` is for the log."""
        slot = self.slots.get(key)
        if slot is None:
            return False
        async with slot.lock:
            if slot.engine is None or slot.in_flight:
                return False
            log.info("unloading %s: %s", key, reason)
            await self._stop(slot)
            self.tally[slot.model.name, cause] += 1
            return True

    async def unload_idle(self, reason: str) -> tuple[list[str], list[str]]:
        """Stop every engine hybridd runs that no request holds or waits for; (keys stopped, keys kept busy)."""
        stopped, busy = [], []
        for key, slot in list(self.slots.items()):
            if slot.engine is None or slot.engine.kind == "external":
                continue
            if slot.in_flight or slot.waiting or slot.stopping:
                busy.append(key)
            elif await self.unload(key, reason):
                stopped.append(key)
            elif slot.engine is not None:  # a request took it while another engine was being stopped
                busy.append(key)
        return stopped, busy

    async def _stop(self, slot: EngineSlot) -> None:
        """Stop slot's engine (the caller holds slot.lock). on_stopped runs once its process is gone, and only if
        no request waits for the slot: one that does starts the engine again in its place (and reservation)."""
        engine, slot.engine, slot.loaded_at = slot.engine, None, None
        slot.stopping = engine is not None
        try:
            if engine is not None:
                await engine.stop()
        finally:
            slot.stopping = False
        if not slot.waiting:
            self.on_stopped(slot.key)

    def _loaded(self) -> list[LoadedEngine]:
        return [
            LoadedEngine(key, slot.in_flight + slot.waiting, slot.last_used, slot.model.idle_ttl_s)
            for key, slot in self.slots.items()
            if slot.engine is not None and slot.engine.kind != "external"
        ]

    async def reap_forever(self) -> None:
        """Unload engines that sat idle past their TTL; returns once the pool is closed."""
        while not self._closed:
            now = self.clock()
            for key in idle_expired(self._loaded(), now):
                await self.unload(key, f"idle for {self.slots[key].model.idle_ttl_s:g} s (idle_ttl_s)", "idle_ttl")
            wait = next_expiry(self._loaded(), self.clock())
            self._wake.clear()
            if self._closed:
                break
            # Sleep until the next expiry, a lease's end (which may start a new idle clock) or close(). Not
            # asyncio.wait_for: on Python 3.11 it can swallow a cancellation that races its inner wait.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if wait is None else wait + 0.01):
                    await self._wake.wait()

    async def watch_health(self) -> None:
        """Ask each live engine whether it still answers, every health_interval_s; kill one that misses
        HEALTH_STRIKES checks in a row (the next request starts it again). Returns once the pool is closed."""
        misses: dict[str, int] = {}
        while not self._closed:
            for slot in list(self.slots.values()):
                engine = slot.engine
                if engine is None or slot.stopping or not slot.live or self._closed:
                    continue
                if await engine.healthy(self.health_interval_s):
                    misses.pop(slot.key, None)
                    continue
                missed = misses[slot.key] = misses.get(slot.key, 0) + 1
                if slot.engine is engine and missed >= HEALTH_STRIKES:
                    misses.pop(slot.key)
                    self._kill_hung(slot, engine, missed)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.health_interval_s):
                    await self._closing.wait()

    def _kill_hung(self, slot: EngineSlot, engine: Engine, missed: int) -> None:
        why = (f"engine {slot.key} stopped answering ({missed} health checks in a row, "
               f"{missed * self.health_interval_s:g} s); it was killed and starts again on the next request")
        log.warning("%s", why)
        slot.last_error = why
        self.on_hung(engine.base_url, why)
        engine.kill_now()  # SIGKILL: a stopped process cannot act on SIGTERM

    def close(self) -> None:
        """No engine starts from now on, and the reaper returns once it has done what it is doing."""
        self._closed = True
        self._wake.set()
        self._closing.set()

    async def stop_all(self) -> None:
        """Stop every engine; no new engine starts after this."""
        self.close()
        await asyncio.gather(*(self._stop(slot) for slot in self.slots.values() if slot.engine is not None),
                             return_exceptions=True)

    def kill_all_now(self) -> None:
        """SIGKILL every engine synchronously (last-resort exit path)."""
        for slot in self.slots.values():
            if slot.engine is not None:
                slot.engine.kill_now()

    def describe_engine(self, slot: EngineSlot, now: float) -> dict[str, Any]:
        """One engine for status."""
        loaded = slot.state is EngineState.READY
        engine = slot.engine if slot.engine is not None else slot.loading
        return {
            "key": slot.key,
            "placement": slot.placement,
            "state": slot.state.value,
            "ctx": slot.run.ctx,
            "n_gpu_layers": slot.run.n_gpu_layers,
            "base_url": engine.base_url if engine is not None and loaded else None,
            "pid": engine.pid if engine is not None else None,
            "in_flight": slot.in_flight,
            "waiting": slot.waiting,
            "requests": slot.requests,
            "idle_s": round(now - slot.last_used, 1) if loaded and not slot.in_flight else None,
            "load_seconds": round(slot.load_seconds, 2) if slot.load_seconds is not None else None,
            "restarts": slot.restarts,
            "last_error": slot.last_error,
            "load": self._load_progress(slot, now),
        }

    @staticmethod
    def _load_progress(slot: EngineSlot, now: float) -> dict[str, Any] | None:
        """A loading engine's phase, seconds so far and bytes of its model read (where its engine can tell);
        None when no load is under way."""
        if slot.loading is None or slot.load_started is None:
            return None
        report = getattr(slot.loading, "load_progress", None)  # engines that cannot tell have no such method
        progress = report() if callable(report) else LoadProgress("starting")
        return {"phase": progress.phase, "elapsed_s": round(now - slot.load_started, 1),
                "bytes_read": progress.bytes_read, "bytes_total": progress.bytes_total}

    def describe(self, models: tuple[ModelEntry, ...]) -> list[dict[str, Any]]:
        """Per model: its state, the most recently used engine's figures, and every engine, for status."""
        now = self.clock()
        rows = []
        for model in models:
            engines = [self.describe_engine(s, now) for s in self.for_model(model.name)]
            main = next((e for e in engines if e["state"] == "ready"), engines[0] if engines else None)
            state = main["state"] if main else ("remote" if not model.local else "stopped")
            rows.append({
                "name": model.name,
                "aliases": list(model.aliases),
                "engine": model.engine,
                "state": state,
                "loaded": state == "ready",
                "ctx": main["ctx"] if main else model.ctx,
                "type_k": model.type_k,
                "type_v": model.type_v,
                "path": str(model.path) if model.path else None,
                "pid": main["pid"] if main else None,
                "in_flight": sum(e["in_flight"] for e in engines),
                "requests": sum(e["requests"] for e in engines),
                "idle_s": main["idle_s"] if main else None,
                "idle_ttl_s": model.idle_ttl_s,
                "restarts": sum(e["restarts"] for e in engines),
                "last_error": main["last_error"] if main else None,
                "engines": engines,
            })
        return rows
