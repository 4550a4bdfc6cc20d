"""Two real nodes on loopback: a peer and a desktop pair with a one-time code, link over mutual TLS, and a
request that does not fit the desktop's budget is answered by the peer's own tiny-model engine."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hybridd.demo.tiny_gguf import TinyLlama, write_tiny_llama
from tests.conftest import http, wait_for
from tests.nodes import node_config

LONG_CTX = 131072
NO_EOS = {"2": -100}


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("peer") / "a.gguf", TinyLlama(n_ctx_train=262144))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybridd", *args], capture_output=True, text=True, timeout=60)


def get(url: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)  # type: ignore[no-any-return]


def test_pair_link_and_forward_to_the_peer(daemon_factory, long_model: Path) -> None:  # type: ignore[no-untyped-def]
    from hybridd.model.memory import RunSettings, estimate_memory
    from hybridd.model.spec import model_spec
    from hybridd.probe.gguf_file import read_gguf_header

    header = read_gguf_header(long_model)
    spec = model_spec(header.metadata, header.tensors)
    short, long = (estimate_memory(spec, RunSettings(ctx=c, flash_attn=False)).total_bytes for c in (4096, LONG_CTX))
    only_there = f'[[models]]\nname = "b"\npath = "{long_model}"\nctx = 4096\n'
    peer = daemon_factory(node_config(long_model, "spark", "peer", long * 4, extra=only_there))
    desk = daemon_factory(node_config(long_model, "desk", "desktop", (short + long) // 2))
    assert peer.lan_url.startswith("https://127.0.0.1:")

    # Before pairing, the peer's LAN listener serves nothing but pairing (no client certificate here at all).
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(peer.lan_url + "/v1/models", context=context, timeout=10)
    assert refused.value.code == 403

    opened = cli("pair", "--url", peer.url, "--json")
    assert opened.returncode == 0, opened.stderr
    code = json.loads(opened.stdout)["code"]
    assert len(code) == 8 and code.isdigit()
    lan_address = peer.lan_url.removeprefix("https://")
    wrong = cli("pair", lan_address, "00000000" if code != "00000000" else "11111111", "--url", desk.url)
    assert wrong.returncode != 0 and "hybridd:" in wrong.stderr
    paired = cli("pair", lan_address, code, "--url", desk.url, "--json")
    assert paired.returncode == 0, paired.stderr
    assert json.loads(paired.stdout)["name"] == "spark"
    reused = cli("pair", lan_address, code, "--url", desk.url)
    assert reused.returncode != 0  # the code was single-use

    def linked() -> dict | None:  # type: ignore[type-arg]
        peers = get(desk.url + "/hybridd/v1/peers")["paired"]
        return peers[0] if peers and peers[0]["link"] == "up" and peers[0]["models"] else None

    # The link is up with the peer's models once its hello and inventory are in; its RTT comes with the first pong,
    # which the peer sends only after reading our ping, so it may be a moment behind: wait for that too.
    link = wait_for(lambda: (s := linked()) and s["rtt_ms"] is not None and s, timeout=20,
                    what="the desktop's link to the peer, with an RTT")
    assert link["name"] == "spark" and link["models"] == ["a", "b"] and link["rtt_ms"] is not None
    # /v1/models on the desktop lists local and peer models together and says where each runs.
    listing = {m["id"]: m["hybridd"]["runs_on"] for m in get(desk.url + "/v1/models")["data"]}
    assert listing == {"a": ["local", "peer:spark"], "b": ["peer:spark"]}
    only = http("POST", desk.url + "/v1/completions", {"model": "b", "prompt": "x", "max_tokens": 2})
    assert only.status == 200 and only.headers["x-hybridd-placement"] == "peer:spark"
    assert get(peer.url + "/hybridd/v1/peers")["paired"][0]["name"] == "desk"
    assert "spark" in cli("peers", "--url", desk.url).stdout
    (shown,) = get(desk.url + "/hybridd/v1/status")["peers"]
    assert shown["name"] == "spark" and shown["up"] and shown["rtt_ms"] is not None and shown["free_bytes"] > 0
    assert "spark" in cli("status", "--url", desk.url).stdout

    body = {"model": "a", "prompt": "hi", "max_tokens": 3, "logit_bias": NO_EOS}
    local = http("POST", desk.url + "/v1/completions", body)
    assert local.status == 200 and local.headers["x-hybridd-placement"] == "local"

    far = http("POST", desk.url + "/v1/completions", {**body, "hybridd": {"min_ctx": LONG_CTX}})
    assert far.status == 200, far.body
    assert far.headers["x-hybridd-placement"] == "peer:spark"
    assert f"at {LONG_CTX} ctx" in far.headers["x-hybridd-reason"]
    assert far.json()["usage"]["completion_tokens"] >= 1  # a real engine on the peer answered
    # The peer served it on its own resources, as its own local decision.
    decisions = get(peer.url + "/hybridd/v1/status")["decisions"]
    assert decisions and decisions[-1]["placement"] == "local" and decisions[-1]["ctx"] >= LONG_CTX


async def _start_and_stall(lan_url: str, source: str) -> int:
    """A stranger on the LAN: a pairing start from a guessed code, from `source`, never finished."""
    import base64

    import aiohttp
    from spake2 import SPAKE2_A

    from hybridd.peer.identity import new_identity
    from hybridd.peer.pairing import ID_A, ID_B, START_PATH
    from hybridd.peer.tls import client_context

    stranger = new_identity("stranger")
    body = {"msg_a": base64.b64encode(SPAKE2_A(b"00000000", idA=ID_A, idB=ID_B).start()).decode(), "name": "desk",
            "role": "desktop", "node_id": stranger.node_id, "cert_pem": stranger.cert_pem.decode()}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0))) as http, \
            http.post(lan_url + START_PATH, json=body, ssl=client_context(None, None)) as response:
        return response.status


@pytest.mark.timeout(120)
def test_pair_on_the_peer_shows_each_attempt_and_a_stalled_start_blocks_nothing(
        daemon_factory, long_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import re

    from hybridd.peer.identity import new_identity
    from hybridd.peer.pairing import PairingStore, pair_with

    peer = daemon_factory(node_config(long_model, "spark", "peer"))
    watcher = subprocess.Popen([sys.executable, "-m", "hybridd", "pair", "--url", peer.url], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        shown = re.search(r"Pairing code for spark: (\d{4}) (\d{4})", watcher.stdout.readline())
        assert shown is not None
        assert asyncio.run(_start_and_stall(peer.lan_url, "127.0.0.2")) == 200
        laptop = new_identity("laptop")
        paired = asyncio.run(pair_with(peer.lan_url, shown[1] + shown[2], laptop, "laptop", "desktop",
                                       PairingStore.load(tmp_path / "laptop")))  # at once: the stall holds nothing
        out, err = watcher.communicate(timeout=30)  # the watcher ends when the window closes
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert paired.name == "spark"
    assert watcher.returncode == 0, out + err
    # One line per event: since the window opened, the address, what happened, how.
    lines = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if line.lstrip().startswith("+")]
    assert [(source, kind) for _, source, kind, _ in lines] == [
        ("127.0.0.2", "started"), ("127.0.0.1", "started"), ("127.0.0.1", "paired"), ("this node", "closed")]
    assert "calls itself 'desk' (desktop)" in lines[0][3] and "paired with 'laptop' (desktop" in lines[2][3]
    assert lines[3][3] == "the window closed: the code is used"
    # stderr is not a terminal here: the wait is one plain line, not a redrawn one.
    assert "hybridd: waiting for a desktop to use the code: 0 s of 120 s\n" in err and "\r" not in err


def test_demo_runs_from_the_readme(tmp_path: Path) -> None:
    import os
    import re

    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    result = subprocess.run([sys.executable, "-m", "hybridd", "demo"], capture_output=True, text=True, timeout=240,
                            env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "paired with spark-demo" in out
    assert "short context: ran on local" in out
    assert "long context (32768 tokens): ran on peer:spark-demo" in out
    assert "answer: The three primary colors of light are" in out
    # The third part (the training extra is installed here): a fine-tune asked on the desktop trains on the peer, the
    # adapter comes back, and the desktop answers with it on its own engine.
    assert "fine-tuning tiny-llama" in out and "uploaded count.jsonl" in out
    assert re.search(r"job ftjob-\w+: trains on peer:spark-demo\n  why:    needs [\d.]+ GiB", out), out
    steps = re.findall(r"^  step (\d+)/20  loss [\d.]+", out, re.MULTILINE)
    assert steps and steps[-1] == "20", out
    made = re.search(r"succeeded in [\d.]+ s: (ft:tiny-llama:desk-demo:demo:\w+)", out)
    assert made, out
    assert f"{made[1]}: ran on local in" in out
    assert out.count("why:") == 4 and out.count("answer:") == 3


async def test_client_leaving_cancels_the_work_on_the_peer(daemon_factory, long_model: Path) -> None:  # type: ignore[no-untyped-def]
    # client -> desktop -> (mutual TLS) -> peer -> engine: when the client goes, each hop drops the next one, so the
    # engine on the peer sees its connection close. The engine here is a fake that records exactly that.
    import asyncio

    import aiohttp

    from tests.fake_upstream import FakeEngine, sse, start_fake

    engine = FakeEngine()
    server = await start_fake(engine)
    try:
        ext = f'[[models]]\nname = "ext"\nbase_url = "{str(server.make_url("/")).rstrip("/")}"\n'
        peer = daemon_factory(node_config(long_model, "spark", "peer", 10**12, extra=ext))
        desk = daemon_factory(node_config(long_model, "desk", "desktop", 10**12))
        code = json.loads((await asyncio.to_thread(cli, "pair", "--url", peer.url, "--json")).stdout)["code"]
        paired = await asyncio.to_thread(cli, "pair", peer.lan_url.removeprefix("https://"), code, "--url", desk.url)
        assert paired.returncode == 0, paired.stderr

        async def linked() -> bool:
            async with aiohttp.ClientSession() as session, session.get(desk.url + "/v1/models") as r:
                return "ext" in {m["id"] for m in (await r.json())["data"]}

        deadline = asyncio.get_running_loop().time() + 20
        while not await linked():
            assert asyncio.get_running_loop().time() < deadline, "the peer's models never reached the desktop"
            await asyncio.sleep(0.05)  # polling the desktop's model list with a deadline

        async with aiohttp.ClientSession() as session:
            response = await session.post(desk.url + "/v1/chat/completions", json={
                "model": "ext", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
            assert response.status == 200 and response.headers["x-hybridd-placement"] == "peer:spark"
            await engine.release.put(sse("first"))
            await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=10)
            response.close()  # the client goes away mid-stream
        await asyncio.wait_for(engine.disconnected.wait(), timeout=10)
    finally:
        await engine.release.put(None)
        await server.close()
