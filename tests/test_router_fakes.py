"""The app in-process with real routing, placement and ledger, and fake engines the test steers: requests that
arrive while an engine is being stopped (its stop held open, as a process that takes a while to exit), and clients
that leave as soon as they have read what they wanted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from hybridd.api import keys
from hybridd.api.app import make_app
from hybridd.config import ModelEntry, parse_config
from hybridd.demo.tiny_gguf import TinyLlama, write_tiny_llama
from hybridd.engine.base import EngineState
from hybridd.node.catalog import Catalog
from hybridd.node.resources import configured_peers, local_hardware
from hybridd.node.router import Router
from hybridd.place.breaker import Breaker
from tests.conftest import wait_for
from tests.fake_upstream import FakeEngine, sse, start_fake
from tests.test_placement_e2e import chat, config, need_bytes

KEY_A, KEY_B = "a@4096", "b@4096"


@dataclass
class Lab:
    """What the fake engines share: one upstream to answer, the stops the test lets finish, what ran when."""

    upstream: FakeEngine
    url: str
    permits: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))  # one per stop let through
    starts: list[str] = field(default_factory=list)
    stops_begun: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)  # engines whose process exists (started, not yet fully stopped)
    overlaps: list[tuple[str, set[str]]] = field(default_factory=list)  # an engine started while others existed


class SlowStopEngine:
    """An engine whose process lingers after stop() begins until the test gives the lab a permit."""

    kind = "fake"

    def __init__(self, model: ModelEntry, lab: Lab) -> None:
        self.model, self.lab = model, lab
        self.state = EngineState.STOPPED

    @property
    def base_url(self) -> str:
        return self.lab.url

    @property
    def pid(self) -> int | None:
        return None

    def is_alive(self) -> bool:
        return self.state is EngineState.READY

    async def start(self) -> None:
        if self.lab.running:
            self.lab.overlaps.append((self.model.name, set(self.lab.running)))
        self.lab.starts.append(self.model.name)
        self.lab.running.add(self.model.name)
        self.state = EngineState.READY

    async def stop(self) -> None:
        self.state = EngineState.STOPPING
        self.lab.stops_begun.append(self.model.name)
        await self.lab.permits.acquire()
        self.lab.running.discard(self.model.name)
        self.state = EngineState.STOPPED

    async def healthy(self, timeout_s: float) -> bool:
        return True

    def kill_now(self) -> None:
        self.state = EngineState.STOPPED


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("stop-race")
    return write_tiny_llama(folder / "a.gguf", TinyLlama()), write_tiny_llama(folder / "b.gguf", TinyLlama(seed=1))


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    upstream = FakeEngine()
    server = await start_fake(upstream)
    yield Lab(upstream, str(server.make_url("/")).rstrip("/"))
    await server.close()


@dataclass
class Node:
    """The app under test, served on a loopback port."""

    url: str
    app: web.Application

    @property
    def router(self) -> Router:
        return self.app[keys.ROUTER]


@pytest.fixture
async def node_factory(lab: Lab) -> AsyncIterator[Callable[[str], Awaitable[Node]]]:
    servers: list[TestServer] = []

    async def make(text: str) -> Node:
        config = parse_config(text)
        app = make_app(config, Catalog(config.models), lambda model, http: SlowStopEngine(model, lab),
                       hardware=local_hardware(config), peers=configured_peers(config))
        server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        servers.append(server)
        return Node(str(server.make_url("/")).rstrip("/"), app)

    yield make
    for _ in range(100):  # let every stop still to come (shutdown's) finish
        lab.permits.release()
    for server in servers:
        await server.close()


async def until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    await asyncio.to_thread(wait_for, predicate, 10.0, what=what)


async def test_a_request_while_the_reaper_stops_its_engine_waits_and_reloads(models, lab, node_factory) -> None:  # type: ignore[no-untyped-def]
    one = need_bytes(models[0], 4096)
    node = await node_factory(config(models, one * 4, None, idle_ttl_a=0.2))
    assert (await chat(node.url, "a"))[0] == 200
    held = dict(node.router.state.ledger.held(KEY_A))
    assert held

    await until(lambda: lab.stops_begun, "the reaper to begin stopping a's engine")
    # a's request arrives while the old process is still exiting: it waits for the stop, then a loads again.
    request = asyncio.ensure_future(chat(node.url, "a"))
    await until(lambda: node.router.pool.slots[KEY_A].waiting, "a's request to wait for a's engine")
    assert dict(node.router.state.ledger.held(KEY_A)) == held  # the exiting process keeps its bytes
    assert "engine a@4096 loading (" in node.router.decisions[-1]["reason"]  # a load to wait for, not "loaded"
    assert lab.starts == ["a"]  # nothing starts before the old process is gone
    lab.permits.release()
    code, headers, reply = await request
    assert code == 200 and headers["x-hybridd-placement"] == "local", reply
    assert lab.starts == ["a", "a"] and not lab.overlaps
    # The engine that replaced it holds the same reservation (its stop did not take the new engine's bytes).
    assert dict(node.router.state.ledger.held(KEY_A)) == held
    assert node.router.state.ledger.keys == (KEY_A,)


async def test_another_model_waits_until_the_stopping_engine_is_gone(models, lab, node_factory) -> None:  # type: ignore[no-untyped-def]
    one = need_bytes(models[0], 4096)
    node = await node_factory(config(models, one + one // 2, None, idle_ttl_a=0.2))  # room for one engine only
    assert (await chat(node.url, "a"))[0] == 200

    await until(lambda: lab.stops_begun, "the reaper to begin stopping a's engine")
    request = asyncio.ensure_future(chat(node.url, "b"))
    await until(lambda: node.router.decisions[-1]["model"] == "b", "b's request to be placed")
    # a's process still holds the memory b needs: b must not load beside it.
    assert lab.starts == ["a"]
    lab.permits.release()
    code, headers, reply = await request
    assert code == 200 and headers["x-hybridd-placement"] == "local", reply
    assert lab.starts == ["a", "b"] and not lab.overlaps
    assert node.router.state.ledger.keys == (KEY_B,)



async def stream_until(url: str, model: str, last: bytes, events: list[bytes],
                       hints: dict | None = None) -> None:  # type: ignore[type-arg]
    """Stream a chat completion into `events` and hang up as soon as an event starting with `last` arrives, as
    clients do once they have [DONE] (before the engine has ended its response)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000, "stream": True}
    if hints:
        body["hybridd"] = hints
    async with aiohttp.ClientSession() as session, session.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b"data: "):
                events.append(line.strip())
                if line.startswith(last):
                    return


async def test_a_client_that_hangs_up_at_done_still_teaches_speed_and_length(models, lab, node_factory) -> None:  # type: ignore[no-untyped-def]
    node = await node_factory(config(models, need_bytes(models[0], 4096) * 4, None, idle_ttl_a=600))
    events: list[bytes] = []
    await lab.upstream.release.put(sse("first"))
    request = asyncio.ensure_future(stream_until(node.url, "a", b"data: [DONE]", events))
    # the rest comes in later reads than the first event, so the stream can be timed; the engine then holds its
    # response open: the client has [DONE] and goes, and hybridd's handler is cancelled before the stream's end
    await until(lambda: events, "the first event to reach the client")
    for word in range(30):
        await lab.upstream.release.put(sse(str(word)))
    await lab.upstream.release.put(b"data: [DONE]\n\n")
    await request
    assert len(events) == 32 and events[-1] == b"data: [DONE]"
    await until(lambda: "a" in node.router.state.lengths.models, "the stream's length to be learned")
    assert node.router.state.lengths.tokens["a"] == 30  # 32 events, less what llama.cpp adds: a finish event, [DONE]
    assert set(node.router.state.calibration.ratios) == {("desk", "a"), ("desk", "*")}


async def test_a_stream_cut_short_by_its_client_teaches_no_length(models, lab, node_factory) -> None:  # type: ignore[no-untyped-def]
    node = await node_factory(config(models, need_bytes(models[0], 4096) * 4, None, idle_ttl_a=600))
    for word in range(20):  # one answer quotes the end of a stream: that is text, not the end
        await lab.upstream.release.put(sse("data: [DONE]" if word == 10 else str(word)))
    events: list[bytes] = []
    await stream_until(node.url, "a", sse("19").strip(), events)
    assert len(events) == 20
    await until(lambda: lab.upstream.disconnected.is_set(), "hybridd to drop the engine's stream")
    assert "a" not in node.router.state.lengths.models  # where the client stopped reading, not the answer's length


async def test_a_forwarded_stream_teaches_its_length_though_the_client_hangs_up(models, lab, node_factory) -> None:  # type: ignore[no-untyped-def]
    node = await node_factory(config(models, need_bytes(models[0], 4096) * 4, lab.url, '["b"]', idle_ttl_a=600))
    for word in range(12):
        await lab.upstream.release.put(sse(str(word)))
    await lab.upstream.release.put(b"data: [DONE]\n\n")
    events: list[bytes] = []
    await stream_until(node.url, "b", b"data: [DONE]", events, hints={"placement": "peer"})
    assert len(events) == 13 and node.router.decisions[-1]["placement"] == "peer:spark"
    assert lab.upstream.headers[-1]["x-hybridd-forwarded"] == "1"
    await until(lambda: "b" in node.router.state.lengths.models, "the forwarded stream's length to be learned")
    assert node.router.state.lengths.tokens["b"] == 11


async def test_a_probe_answered_closes_the_breaker_though_the_client_hangs_up(models, lab, node_factory) -> None:  # type: ignore[no-untyped-def]
    node = await node_factory(config(models, need_bytes(models[0], 4096) * 4, lab.url, '["b"]', idle_ttl_a=600))
    router = node.router
    failed_long_ago = Breaker(failures=3, opened_at=router.clock() - 100)  # open, and due for one probe
    router.state = replace(router.state, breakers={"spark": failed_long_ago})
    await lab.upstream.release.put(sse("x"))
    await lab.upstream.release.put(b"data: [DONE]\n\n")
    events: list[bytes] = []
    await stream_until(node.url, "b", b"data: [DONE]", events, hints={"placement": "peer"})
    assert events[-1] == b"data: [DONE]" and lab.upstream.requests
    # the peer answered: closed, not stuck open with a probe that never reported back
    await until(lambda: router.state.breaker("spark").state(router.clock()) == "closed", "the breaker to close")



@pytest.mark.parametrize("embeddings", [False, True])
async def test_a_llama_server_model_reserves_one_output_row_where_llama_cpp_python_reserves_a_batch(
        gemma_model, lab, node_factory, embeddings: bool) -> None:  # type: ignore[no-untyped-def]
    # llama-server sizes its logits for one row a slot, llama-cpp-python for n_batch rows (512 x Gemma 3's 262,144
    # tokens x 4 bytes = 512 MiB): the router plans each model for its own engine, so a's load holds less than b's
    # otherwise identical one. With embeddings on, llama-server reserves n_batch rows as well.
    models = (gemma_model, gemma_model)
    server = 'engine = "llama-server"\n' + ("embeddings = true\n" if embeddings else "")
    text = (config(models, need_bytes(gemma_model, 4096) * 4, None)
            .replace('name = "a"\n', 'name = "a"\n' + server)
            .replace("ram_bytes = 200_000", "ram_bytes = 2_000_000_000"))  # Gemma's embedding table stays in RAM
    node = await node_factory(text)
    assert (await chat(node.url, "a"))[0] == 200 and (await chat(node.url, "b"))[0] == 200
    held_a = sum(dict(node.router.state.ledger.held(KEY_A)).values())
    held_b = sum(dict(node.router.state.ledger.held(KEY_B)).values())
    if embeddings:
        assert held_a == held_b
    else:  # most of the 511 rows' 511 MiB (the rest of the graph overlaps the logits in llama.cpp's buffer plan)
        assert 400 * 2**20 < held_b - held_a < 512 * 2**20, (held_a, held_b)
