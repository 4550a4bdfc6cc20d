"""Placement end to end: a real daemon with tiny-model engines under a configured memory budget and a fake
peer, so eviction, context tiering, 'does not fit' and the bounded queue run in CI without a GPU."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from hybridd.demo.tiny_gguf import TinyLlama, write_tiny_llama
from hybridd.model.memory import RunSettings, estimate_memory
from hybridd.model.spec import model_spec
from hybridd.probe.gguf_file import read_gguf_header
from tests.conftest import engine_processes, wait_for
from tests.fake_upstream import FakeEngine, sse, start_fake

NO_EOS = {"2": -100}
LONG_CTX = 131072


@pytest.fixture(scope="module")
def long_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny llamas trained (nominally) for 256k tokens, so long contexts are legal but cost KV."""
    folder = tmp_path_factory.mktemp("long")
    shape = TinyLlama(n_ctx_train=262144)
    return write_tiny_llama(folder / "a.gguf", shape), write_tiny_llama(folder / "b.gguf", TinyLlama(
        n_ctx_train=262144, seed=1))


def need_bytes(path: Path, ctx: int) -> int:
    header = read_gguf_header(path)
    spec = model_spec(header.metadata, header.tensors)
    return estimate_memory(spec, RunSettings(ctx=ctx, flash_attn=False)).total_bytes


@pytest.fixture
async def peer() -> AsyncIterator[tuple[FakeEngine, str]]:
    engine = FakeEngine()
    server = await start_fake(engine)
    yield engine, str(server.make_url("/")).rstrip("/")
    await engine.release.put(None)
    await server.close()


def config(models: tuple[Path, Path], budget: int, peer_url: str | None, peer_models: str = '["a"]',
           queue_limit: int = 16, idle_ttl_a: float | None = None) -> str:
    """Models a and b under a memory budget, and a peer "spark" serving peer_models at peer_url (None: no peer)."""
    a, b = models
    peer = f"""
[[peers]]
name = "spark"
base_url = "{peer_url}"
hardware = "dgx-spark"
models = {peer_models}
""" if peer_url else ""
    idle_ttl = f"idle_ttl_s = {idle_ttl_a}" if idle_ttl_a is not None else ""
    return peer + f"""
[server]
listen = "127.0.0.1:0"
[node]
name = "desk"
ram_bytes = 200_000  # room for the input layer (kept in RAM by llama.cpp), not for a layer and its KV
queue_limit = {queue_limit}
default_max_tokens = 64
[[node.devices]]
name = "budget0"
memory_bytes = {budget}
[[models]]
name = "a"
path = "{a}"
ctx = 4096
{idle_ttl}
[[models]]
name = "b"
path = "{b}"
ctx = 4096
"""


async def chat(url: str, model: str, max_tokens: int = 4, hints: dict | None = None,  # type: ignore[type-arg]
               stream: bool = False) -> tuple[int, dict[str, str], dict]:  # type: ignore[type-arg]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "logit_bias": NO_EOS, "stream": stream}
    if hints:
        body["hybridd"] = hints
    async with aiohttp.ClientSession() as session, session.post(url + "/v1/chat/completions", json=body) as r:
        text = await r.text()
        return r.status, dict(r.headers), json.loads(text) if not stream and text else {"raw": text}


async def status(url: str) -> dict:  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as session, session.get(url + "/hybridd/v1/status") as r:
        return await r.json()  # type: ignore[no-any-return]


def row(st: dict, name: str) -> dict:  # type: ignore[type-arg]
    return next(m for m in st["models"] if m["name"] == name)


async def test_long_context_is_forwarded_with_its_reason(daemon_factory, long_models, peer) -> None:  # type: ignore[no-untyped-def]
    fake, peer_url = peer
    # The budget holds model a at 4k context but not at 128k: the long request must go to the peer.
    budget = (need_bytes(long_models[0], 4096) + need_bytes(long_models[0], LONG_CTX)) // 2
    daemon = daemon_factory(config(long_models, budget, peer_url, '["a"]'))

    code, headers, reply = await chat(daemon.url, "a")
    assert code == 200 and headers["x-hybridd-placement"] == "local", reply
    assert reply["usage"]["completion_tokens"] >= 1
    assert not fake.requests  # nothing reached the peer

    code, headers, reply = await chat(daemon.url, "a", hints={"min_ctx": LONG_CTX})
    assert code == 200, reply
    assert headers["x-hybridd-placement"] == "peer:spark"
    reason = headers["x-hybridd-reason"]
    assert reason.startswith("peer:spark: ") and f"at {LONG_CTX} ctx" in reason and "tok/s" in reason
    assert reply["choices"][0]["message"]["content"] == "ok"  # the peer's answer, passed through
    assert fake.headers[-1]["x-hybridd-forwarded"] == "1"  # the peer will not forward it again
    assert "hybridd" not in fake.requests[-1]  # hints are ours, not the engine's

    # The decision is kept and shown by status.
    decisions = (await status(daemon.url))["decisions"]
    assert [d["placement"] for d in decisions[-2:]] == ["local", "peer:spark"]


async def test_streams_from_the_peer_pass_through(daemon_factory, long_models, peer) -> None:  # type: ignore[no-untyped-def]
    fake, peer_url = peer
    daemon = daemon_factory(config(long_models, 10**12, peer_url, '["a"]'))
    for word in ("x", "y"):
        await fake.release.put(sse(word))
    await fake.release.put(None)
    code, headers, reply = await chat(daemon.url, "a", stream=True, hints={"placement": "peer"})
    assert code == 200 and headers["x-hybridd-placement"] == "peer:spark"
    assert '"x"' in reply["raw"] and '"y"' in reply["raw"] and reply["raw"].rstrip().endswith("[DONE]")


async def test_budget_evicts_the_idle_engine(daemon_factory, long_models, peer) -> None:  # type: ignore[no-untyped-def]
    _, peer_url = peer
    one = need_bytes(long_models[0], 4096)
    daemon = daemon_factory(config(long_models, one + one // 2, peer_url, '["not-these"]'))  # room for one engine only
    assert (await chat(daemon.url, "a"))[0] == 200
    pid_a = row(await status(daemon.url), "a")["pid"]

    code, headers, _ = await chat(daemon.url, "b")
    assert code == 200 and headers["x-hybridd-placement"] == "local"
    assert "evicts a@4096" in headers["x-hybridd-reason"]
    st = await status(daemon.url)
    assert row(st, "a")["state"] == "stopped" and row(st, "b")["state"] == "ready"
    wait_for(lambda: pid_a not in [p.pid for p in engine_processes(daemon.pid)], what="evicted engine gone")


async def test_a_busy_engine_is_drained_before_eviction_queue_bounded(daemon_factory, long_models, peer) -> None:  # type: ignore[no-untyped-def]
    _, peer_url = peer
    one = need_bytes(long_models[0], 4096)
    daemon = daemon_factory(config(long_models, one + one // 2, peer_url, '["not-these"]', queue_limit=1))

    # A long stream keeps a's engine busy.
    async with aiohttp.ClientSession() as session:
        body = {"model": "a", "prompt": "x", "max_tokens": 300, "stream": True, "logit_bias": NO_EOS}
        async with session.post(daemon.url + "/v1/completions", json=body) as stream:
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")

            # a's engine serves one request at a time: one more may wait (queue_limit 1), the next gets 429.
            second = asyncio.ensure_future(chat(daemon.url, "a", max_tokens=1))
            await asyncio.to_thread(wait_for, lambda: row(asyncio.run(status(daemon.url)), "a")["in_flight"] == 2,
                                    10.0)
            code, headers, reply = await chat(daemon.url, "a", max_tokens=1)
            assert code == 429 and reply["error"]["code"] == "queue_full" and int(headers["Retry-After"]) >= 1

            # b does not fit beside a and cannot evict it while busy: b waits for a's requests to finish, then
            # a is unloaded and b loads. Nothing a had accepted is cut short.
            other = asyncio.ensure_future(chat(daemon.url, "b"))
            await asyncio.to_thread(wait_for, lambda: asyncio.run(status(daemon.url))["decisions"][-1]["model"] == "b",
                                    10.0)
            reason = (await status(daemon.url))["decisions"][-1]["reason"]
            assert reason.startswith("local: ") and "evicts a@4096 once they finish" in reason
            assert (await stream.read()).rstrip().endswith(b"[DONE]")
        assert (await second)[0] == 200
    code, headers, reply = await other
    assert code == 200 and headers["x-hybridd-placement"] == "local", reply
    assert headers["x-hybridd-reason"].startswith(reason)
    st = await status(daemon.url)
    assert row(st, "a")["state"] == "stopped" and row(st, "b")["state"] == "ready"


async def test_a_context_no_node_can_hold_is_refused_with_numbers(daemon_factory, long_models, peer) -> None:  # type: ignore[no-untyped-def]
    _, peer_url = peer
    daemon = daemon_factory(config(long_models, need_bytes(long_models[0], 4096) * 2, peer_url, '["not-these"]'))
    code, _, reply = await chat(daemon.url, "a", hints={"min_ctx": 262144})
    assert code in (400, 507), reply
    assert "GiB" in reply["error"]["message"] and "262144" in reply["error"]["message"]
    code, _, reply = await chat(daemon.url, "a", hints={"min_ctx": 10**7})
    assert code == 400 and reply["error"]["code"] == "context_length_exceeded"
    code, _, reply = await chat(daemon.url, "a", hints={"placement": "sideways"})
    assert code == 400 and "placement hint must be one of" in reply["error"]["message"]


async def test_unreachable_peer_falls_back_local_and_opens_its_breaker(daemon_factory, long_models) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:  # a port nobody listens on: the peer is down
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    # A slow local budget device makes the Spark the predicted winner, so requests try the peer first.
    text = config(long_models, 10**12, dead, '["a"]').replace("[[node.devices]]", "[[node.devices]]\n"
                                                             "bandwidth_bytes_s = 1.0e3")
    daemon = daemon_factory(text)
    for _ in range(3):
        code, headers, reply = await chat(daemon.url, "a")
        assert code == 200, reply
        assert headers["x-hybridd-placement"] == "local"  # retried here after the peer failed, before any byte
    decisions = (await status(daemon.url))["decisions"]
    assert decisions[0]["placement"] == "peer:spark" and decisions[1]["placement"] == "local"
    # Three failures open the breaker: the next request does not even try the peer.
    code, headers, _ = await chat(daemon.url, "a")
    assert code == 200 and headers["x-hybridd-placement"] == "local"
    last = (await status(daemon.url))["decisions"][-1]
    spark = next(o for o in last["options"] if o["placement"] == "peer:spark")
    assert not spark["feasible"] and "down" in spark["why_not"]


async def test_a_drain_goes_on_when_the_client_that_asked_for_it_leaves(daemon_factory, long_models, peer) -> None:  # type: ignore[no-untyped-def]
    _, peer_url = peer
    one = need_bytes(long_models[0], 4096)
    daemon = daemon_factory(config(long_models, one + one // 2, peer_url, '["not-these"]'))
    async with aiohttp.ClientSession() as session:
        body = {"model": "a", "prompt": "x", "max_tokens": 300, "stream": True, "logit_bias": NO_EOS}
        async with session.post(daemon.url + "/v1/completions", json=body) as stream:
            await stream.content.readuntil(b"\n\n")
            # b's client gives up while b waits for a to drain
            leaver = asyncio.ensure_future(chat(daemon.url, "b"))
            await asyncio.to_thread(wait_for, lambda: asyncio.run(status(daemon.url))["decisions"][-1]["model"] == "b",
                                    10.0)
            leaver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leaver
            assert (await stream.read()).rstrip().endswith(b"[DONE]")  # a's accepted work is untouched
    # a is still unloaded (its memory was promised). Once a's process is gone the promise is let go and b loads
    # (until then b is refused as busy, honestly: a still holds the memory).
    await asyncio.to_thread(wait_for, lambda: row(asyncio.run(status(daemon.url)), "a")["state"] == "stopped", 10.0)

    def b_placed() -> dict[str, str] | None:
        code, headers, reply = asyncio.run(chat(daemon.url, "b"))
        assert code in (200, 503), reply
        return headers if code == 200 else None

    headers = await asyncio.to_thread(wait_for, b_placed, 20.0)
    assert headers["x-hybridd-placement"] == "local"
    assert "evicts" not in headers["x-hybridd-reason"]  # nothing left to evict: a is gone
