"""Every agent API through real daemons on a real llama-server engine: placed locally, and through a paired peer.

Messages and Responses go to the local llama-server as they came (it speaks them); chat and Ollama's routes as
chat completions. On the desktop that has no engine for the model, each request goes to the peer as it came, and
the peer's hybridd serves it on its own llama-server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anthropic
import ollama
import openai
import pytest

from hybridd.engine.llamaserver import find_llama_server
from tests.conftest import Daemon, wait_for
from tests.test_jobs_e2e import pair
from tests.test_peer_e2e import cli

BINARY = find_llama_server("")
pytestmark = [
    pytest.mark.timeout(180),
    # In CI the setup builds it (scripts/build_engines.sh): there, a missing binary fails rather than skips.
    pytest.mark.skipif(BINARY is None and not os.environ.get("CI"),
                       reason="no llama-server built (scripts/build_engines.sh builds it)"),
]
NO_EOS = {"2": -100}


def node(model: Path, name: str, role: str, *, serves: bool) -> str:
    lan = 'lan_listen = "127.0.0.1:0"' if role == "peer" else ""
    entry = f'[[models]]\nname = "tiny"\npath = "{model}"\nengine = "llama-server"\nslots = 2\nctx = 1024\n' \
        if serves else ""
    return f"""
[server]
listen = "127.0.0.1:0"
{lan}
[engine]
llama_server = "{BINARY or ''}"
[node]
name = "{name}"
role = "{role}"
ram_bytes = 200_000
[[node.devices]]
name = "budget0"
memory_bytes = 4_000_000_000
{entry}"""


def every_api(daemon: Daemon, placement: str) -> None:
    """One request of each API, the chat one streamed with usage, each answered where `placement` says."""
    chat = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    raw = chat.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True}, logit_bias=NO_EOS)  # type: ignore[arg-type]
    assert raw.headers["x-hybridd-placement"] == placement
    chunks = list(raw.parse())
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4  # from the engine itself

    messages = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0)
    reply = messages.messages.with_raw_response.create(model="tiny", max_tokens=4,
                                                       messages=[{"role": "user", "content": "hi"}])
    assert reply.headers["x-hybridd-placement"] == placement
    message = reply.parse()
    assert message.role == "assistant" and message.usage.output_tokens >= 1
    with messages.messages.stream(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}]) as s:
        kinds = [event.type for event in s]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
    final = s.get_final_message()
    assert final.stop_reason in ("max_tokens", "end_turn") and final.usage.output_tokens >= 1

    response = chat.responses.with_raw_response.create(model="tiny", input="hi", max_output_tokens=4, store=False)
    assert response.headers["x-hybridd-placement"] == placement
    assert response.parse().output

    local = ollama.Client(host=daemon.url)
    answer = local.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 4},
                        stream=False)
    assert answer.done and answer.message.role == "assistant"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    return tiny_model


def test_every_agent_api_on_a_local_llama_server(daemon_factory, served: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(node(served, "desk", "desktop", serves=True))
    every_api(daemon, "local")
    (model,) = [m for m in json.loads(cli("models", "--url", daemon.url, "--json").stdout)["data"]
                if m["id"] == "tiny"]
    assert model["hybridd"]["engine"] == "llama-server"
    assert model["hybridd"]["capabilities"]["tool_choice_auto"] is True
    assert model["hybridd"]["capabilities"]["parallel_slots"] == 2


def test_every_agent_api_through_a_paired_peer(daemon_factory, served: Path) -> None:  # type: ignore[no-untyped-def]
    peer = daemon_factory(node(served, "spark", "peer", serves=True))
    desk = daemon_factory(node(served, "desk", "desktop", serves=False))
    pair(desk, peer)
    wait_for(lambda: "tiny" in {m["id"] for m in json.loads(cli("models", "--url", desk.url, "--json").stdout)
                                ["data"]}, timeout=30, what="the peer's model on the desktop")
    every_api(desk, "peer:spark")


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tools_called_at_will_go_to_the_peer_whose_engine_parses_them(daemon_factory,  # type: ignore[no-untyped-def]
                                                                       served: Path) -> None:
    peer = daemon_factory(node(served, "spark", "peer", serves=True))
    text_only = node(served, "desk", "desktop", serves=True).replace('engine = "llama-server"\nslots = 2',
                                                                      'engine = "llama-cpp-python"')
    desk = daemon_factory(text_only)
    pair(desk, peer)
    chat = openai.OpenAI(base_url=desk.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "weather in Oslo?"}], "max_tokens": 4,
           "logit_bias": NO_EOS}

    def placed(**extra: object) -> str:
        raw = chat.chat.completions.with_raw_response.create(**{**ask, **extra})  # type: ignore[call-overload]
        return str(raw.headers["x-hybridd-placement"])

    # Until the peer's inventory says its engine parses tool calls, the desktop's own engine serves them.
    wait_for(lambda: placed(tools=[WEATHER]) == "peer:spark", timeout=30, what="tools placed on the peer")
    raw = chat.chat.completions.with_raw_response.create(**ask, tools=[WEATHER])  # type: ignore[arg-type]
    assert "tools: peer:spark parses tool calls, this node's engine of tiny does not" in raw.headers["x-hybridd-reason"]
    assert placed() == "local"  # no tools: the desktop, as before
    forced = {"type": "function", "function": {"name": "get_weather"}}
    assert placed(tools=[WEATHER], tool_choice=forced) == "local"  # llama-cpp-python parses one forced function
    assert placed(tools=[WEATHER], tool_choice="none") == "local"
