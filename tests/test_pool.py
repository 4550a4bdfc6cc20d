"""The engine pool's shutdown: the idle reaper is closed, not cancelled, so an engine it is stopping is stopped."""

from __future__ import annotations

import asyncio

from hybridd.config import ModelEntry
from hybridd.engine.base import EngineState
from hybridd.engine.pool import EnginePool


class SlowStop:
    """An engine whose stop takes a while (a process that exits slowly), recording whether it finished."""

    kind = "fake"
    base_url = "http://127.0.0.1:9"
    pid = None

    def __init__(self, stopping: asyncio.Event, release: asyncio.Event) -> None:
        self.state = EngineState.STOPPED
        self.stopping, self.release = stopping, release
        self.stopped = False

    def is_alive(self) -> bool:
        return self.state is EngineState.READY

    async def start(self) -> None:
        self.state = EngineState.READY

    async def stop(self) -> None:
        self.state = EngineState.STOPPING
        self.stopping.set()
        await self.release.wait()
        self.state = EngineState.STOPPED
        self.stopped = True

    async def healthy(self, timeout_s: float) -> bool:
        return True

    def kill_now(self) -> None:
        self.state = EngineState.STOPPED


async def test_closing_the_pool_lets_the_reaper_finish_the_stop_it_began() -> None:
    stopping, release = asyncio.Event(), asyncio.Event()
    engines: list[SlowStop] = []

    def make(model: ModelEntry) -> SlowStop:
        engines.append(SlowStop(stopping, release))
        return engines[-1]

    pool = EnginePool(make)  # type: ignore[arg-type]
    model = ModelEntry(name="m", idle_ttl_s=0.0)
    async with pool.lease(pool.slot("m", model)):
        pass
    reaper = asyncio.create_task(pool.reap_forever())
    await asyncio.wait_for(stopping.wait(), 10)  # the reaper is stopping the idle engine
    pool.close()  # shutdown begins while the engine is still exiting
    release.set()
    await asyncio.wait_for(reaper, 10)  # returns by itself once the stop is done
    assert engines[0].stopped and pool.slots["m"].engine is None


async def test_a_closed_pool_starts_no_engine_and_its_reaper_returns_at_once() -> None:
    pool = EnginePool(lambda model: SlowStop(asyncio.Event(), asyncio.Event()))  # type: ignore[arg-type,return-value]
    reaper = asyncio.create_task(pool.reap_forever())
    pool.close()
    await asyncio.wait_for(reaper, 5)
    assert reaper.done() and not reaper.cancelled()
