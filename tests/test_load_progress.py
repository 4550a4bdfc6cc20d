"""Engine-load progress: the pool records a load while it runs (phase, seconds, bytes of the model read) and shows
it in its status rows; a managed engine measures the bytes in a real process through /proc; idle engines unload on
request, busy ones stay."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from hybridd.config import ModelEntry
from hybridd.engine.base import EngineState, LoadProgress
from hybridd.engine.managed import ManagedEngine
from hybridd.engine.pool import EnginePool
from hybridd.proc.mapped import mapped_bytes
from tests.conftest import wait_for

MiB = 2**20


class Controlled:
    """An engine whose load waits for `release` (and fails if `fail` is set), reporting progress as told."""

    kind = "fake"
    base_url = "http://127.0.0.1:9"
    pid = 4242

    def __init__(self, started: asyncio.Event, release: asyncio.Event, fail: bool = False) -> None:
        self.state = EngineState.STOPPED
        self.started, self.release, self.fail = started, release, fail
        self.progress = LoadProgress("reading weights", 512 * MiB, 2048 * MiB)

    def load_progress(self) -> LoadProgress:
        return self.progress

    def is_alive(self) -> bool:
        return self.state is EngineState.READY

    async def start(self) -> None:
        self.state = EngineState.STARTING
        self.started.set()
        await self.release.wait()
        if self.fail:
            self.state = EngineState.FAILED
            raise RuntimeError("the model file is not a GGUF")
        self.state = EngineState.READY

    async def stop(self) -> None:
        self.state = EngineState.STOPPED

    async def healthy(self, timeout_s: float) -> bool:
        return True

    def kill_now(self) -> None:
        self.state = EngineState.STOPPED


class Mute(Controlled):
    """An engine that cannot say how far its load got."""

    load_progress = None  # type: ignore[assignment]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_load_in_progress_shows_in_status_with_phase_seconds_and_bytes() -> None:
    started, release, clock = asyncio.Event(), asyncio.Event(), Clock()
    pool = EnginePool(lambda model: Controlled(started, release), clock=clock)  # type: ignore[arg-type,return-value]
    model = ModelEntry(name="big")
    slot = pool.slot("big@4096", model)

    async def request() -> None:
        async with pool.lease(slot):
            pass

    task = asyncio.create_task(request())
    await asyncio.wait_for(started.wait(), 10)
    clock.now += 2.5
    row = pool.describe((model,))[0]
    assert row["state"] == "starting" and not row["loaded"] and row["pid"] == 4242
    assert row["engines"][0]["load"] == {"phase": "reading weights", "elapsed_s": 2.5, "bytes_read": 512 * MiB,
                                         "bytes_total": 2048 * MiB}
    release.set()
    await asyncio.wait_for(task, 10)
    row = pool.describe((model,))[0]
    assert row["state"] == "ready" and row["engines"][0]["load"] is None


async def test_an_engine_that_cannot_measure_its_load_shows_its_phase_and_seconds() -> None:
    started, release, clock = asyncio.Event(), asyncio.Event(), Clock()
    pool = EnginePool(lambda model: Mute(started, release), clock=clock)  # type: ignore[arg-type,return-value]
    model = ModelEntry(name="m")
    slot = pool.slot("m", model)

    async def request() -> None:
        async with pool.lease(slot):
            pass

    task = asyncio.create_task(request())
    await asyncio.wait_for(started.wait(), 10)
    assert pool.describe((model,))[0]["engines"][0]["load"] == {"phase": "starting", "elapsed_s": 0.0,
                                                                "bytes_read": None, "bytes_total": None}
    release.set()
    await asyncio.wait_for(task, 10)


async def test_a_failed_load_leaves_no_load_record_and_says_why() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    pool = EnginePool(lambda model: Controlled(started, release, fail=True))  # type: ignore[arg-type,return-value]
    model = ModelEntry(name="m")
    slot = pool.slot("m", model)

    async def request() -> None:
        async with pool.lease(slot):
            pass

    task = asyncio.create_task(request())
    await asyncio.wait_for(started.wait(), 10)
    assert pool.describe((model,))[0]["state"] == "starting"
    release.set()
    with pytest.raises(RuntimeError, match="the model file is not a GGUF"):
        await asyncio.wait_for(task, 10)
    row = pool.describe((model,))[0]
    assert row["state"] == "failed" and row["engines"][0]["load"] is None
    assert row["last_error"] == "the model file is not a GGUF"


async def test_unload_idle_stops_idle_engines_and_keeps_busy_ones() -> None:
    release = asyncio.Event()
    release.set()
    stopped: list[str] = []
    pool = EnginePool(lambda model: Controlled(asyncio.Event(), release),  # type: ignore[arg-type,return-value]
                      on_stopped=stopped.append)
    idle, busy, never = (pool.slot(k, ModelEntry(name=k)) for k in ("idle", "busy", "never"))
    async with pool.lease(idle):
        pass
    holding, done = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with pool.lease(busy):
            holding.set()
            await done.wait()

    task = asyncio.create_task(hold())
    await asyncio.wait_for(holding.wait(), 10)
    assert await pool.unload_idle("asked to") == (["idle"], ["busy"])
    assert stopped == ["idle"]
    assert (idle.state, busy.state, never.state) == (EngineState.STOPPED, EngineState.READY, EngineState.STOPPED)
    done.set()
    await asyncio.wait_for(task, 10)
    assert await pool.unload_idle("asked to") == (["busy"], [])
    assert await pool.unload_idle("asked to") == ([], [])


# --- bytes of the model read, measured in a real process -----------------------------------------------------

# Maps the file named in argv[1], touches its first argv[2] bytes, says so, and waits to be killed.
TOUCHER = """
import mmap, sys, time
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
n = int(sys.argv[2])
sum(m[i] for i in range(0, n, 4096))
print("touched", flush=True)
time.sleep(600)
"""


def model_file(path: Path, size: int) -> Path:
    path.write_bytes(b"\x01" * size)
    return path


def test_mapped_bytes_counts_the_pages_of_the_file_a_process_touched(tmp_path: Path) -> None:
    weights = model_file(tmp_path / "weights.bin", 8 * MiB)
    other = model_file(tmp_path / "other.bin", MiB)
    proc = subprocess.Popen([sys.executable, "-c", TOUCHER, str(weights), str(2 * MiB)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"touched\n"
        read = mapped_bytes(proc.pid, weights)
        # The pages touched are resident; the kernel may map a few neighbours with them (fault-around), never all.
        assert read is not None and 2 * MiB <= read < 8 * MiB
        assert mapped_bytes(proc.pid, other) is None  # not mapped
    finally:
        proc.kill()
        proc.wait()
    assert mapped_bytes(proc.pid, weights) is None  # gone


class Toucher(ManagedEngine):
    """A managed engine whose process maps its model and touches half of it, and never becomes ready."""

    kind = "toucher"

    async def command(self, port: int) -> tuple[list[str], dict[str, str]]:
        assert self.model.path is not None
        half = self.model.path.stat().st_size // 2
        return [sys.executable, "-c", TOUCHER, str(self.model.path), str(half)], dict(os.environ)


async def test_a_managed_engine_reports_how_much_of_its_model_its_process_has_read(tmp_path: Path) -> None:
    weights = model_file(tmp_path / "model.gguf", 8 * MiB)
    async with aiohttp.ClientSession() as http:
        engine = Toucher(ModelEntry(name="m", path=weights, load_timeout_s=120), http)
        assert engine.load_progress() == LoadProgress("starting", None, 8 * MiB)
        start = asyncio.create_task(engine.start())
        try:
            def halfway() -> LoadProgress | None:
                progress = engine.load_progress()
                return progress if (progress.bytes_read or 0) >= 4 * MiB else None

            progress = await asyncio.to_thread(wait_for, halfway, 30, 0.05, "the engine to read half its model")
            assert progress.phase == "reading weights" and progress.bytes_total == 8 * MiB
            assert progress.bytes_read is not None and progress.bytes_read < 8 * MiB
        finally:
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
        assert not engine.process.is_running()


async def test_a_lora_load_reads_into_its_own_buffers_so_no_bytes_are_claimed(tmp_path: Path) -> None:
    weights = model_file(tmp_path / "model.gguf", MiB)
    async with aiohttp.ClientSession() as http:
        engine = Toucher(ModelEntry(name="m", path=weights, lora_path=tmp_path / "a.gguf", load_timeout_s=120), http)
        start = asyncio.create_task(engine.start())
        try:
            await asyncio.to_thread(wait_for, lambda: engine.process.pid, 30, 0.02, "the process")
            assert engine.load_progress() == LoadProgress("loading model", None, MiB)
        finally:
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)


# --- a real daemon loading a real engine ---------------------------------------------------------------------


def test_a_real_engine_load_shows_in_status_while_it_runs(daemon_factory, tiny_model: Path) -> None:
    from hybridd.cli.statusbar import bar_view
    from tests.conftest import http

    daemon = daemon_factory(f'[server]\nlisten = "127.0.0.1:0"\n[[models]]\nname = "tiny"\npath = "{tiny_model}"\n'
                            'ctx = 512\n')
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(http, "POST", daemon.url + "/v1/completions",
                            {"model": "tiny", "prompt": "x", "max_tokens": 1})

        def loading() -> dict | None:  # type: ignore[type-arg]
            status = daemon.status()
            engines = status["models"][0]["engines"]
            if engines and engines[0]["load"] is not None:
                return status
            assert not reply.done(), "the request was answered before a status read saw its engine load"
            return None

        # The engine's process takes a second or more to import llama_cpp and map the model: a poll sees it.
        status = wait_for(loading, timeout=60, interval=0.01, what="a status showing the load")
        assert reply.result(timeout=60).status == 200
    model = status["models"][0]
    load = model["engines"][0]["load"]
    assert model["state"] == "starting" and not model["loaded"]
    assert load["phase"] in ("starting", "starting engine", "reading weights") and load["elapsed_s"] >= 0
    assert load["bytes_total"] == tiny_model.stat().st_size
    assert load["bytes_read"] is None or 0 <= load["bytes_read"] <= load["bytes_total"]
    assert bar_view(status).cls == "loading" and bar_view(status).text.startswith("hybridd loading tiny ")
    after = wait_for(lambda: (m := daemon.model_status("tiny"))["in_flight"] == 0 and m, what="the request to end")
    assert after["state"] == "ready" and after["engines"][0]["load"] is None
