"""`hybridd status --format/--watch` and `hybridd unload` against a real daemon serving the tiny GGUF."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from tests.conftest import engine_processes, http, wait_for


def config(model: Path) -> str:
    return f"""
[server]
listen = "127.0.0.1:0"

[[models]]
name = "tiny"
path = "{model}"
ctx = 512
"""


def hybridd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybridd", *args], capture_output=True, text=True, timeout=60)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ask(url: str) -> None:
    reply = http("POST", url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert reply.status == 200, reply.body


def test_bar_formats_read_the_running_daemon(daemon_factory, tiny_model: Path) -> None:
    daemon = daemon_factory(config(tiny_model))
    first = hybridd("status", "--format", "waybar", "--url", daemon.url)
    assert first.returncode == 0, first.stderr
    bar = json.loads(first.stdout)
    assert (bar["text"], bar["class"], bar["alt"], bar["percentage"]) == ("hybridd idle", "idle", "idle", 0)
    assert bar["tooltip"].splitlines()[1] == "tiny: stopped"

    ask(daemon.url)
    wait_for(lambda: daemon.model_status("tiny")["in_flight"] == 0, what="the request to end")
    bar = json.loads(hybridd("status", "--format", "waybar", "--url", daemon.url).stdout)
    assert bar["text"] == "hybridd idle, 1 loaded" and bar["tooltip"].splitlines()[1].startswith("tiny: ready, idle ")
    block = json.loads(hybridd("status", "--format", "i3bar", "--url", daemon.url).stdout)
    assert block == {"name": "hybridd", "instance": "idle", "full_text": "hybridd idle, 1 loaded",
                     "short_text": "idle"}
    assert hybridd("status", "--format", "oneline", "--url", daemon.url).stdout == "hybridd idle, 1 loaded\n"
    # --json is unchanged, and it does not mix with a bar format
    assert json.loads(hybridd("status", "--json", "--url", daemon.url).stdout)["models"][0]["name"] == "tiny"
    both = hybridd("status", "--json", "--format", "waybar", "--url", daemon.url)
    assert both.returncode == 2 and "choose one" in both.stderr


def test_bar_formats_show_down_and_exit_0_while_plain_status_fails() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    for fmt in ("waybar", "i3bar", "oneline"):
        result = hybridd("status", "--format", fmt, "--url", url)
        assert result.returncode == 0 and result.stderr == ""
    bar = json.loads(hybridd("status", "--format", "waybar", "--url", url).stdout)
    assert (bar["text"], bar["class"], bar["percentage"]) == ("hybridd down", "down", 0)
    assert bar["tooltip"].startswith(f"hybridd is not running\nthe daemon is not running at {url} (")
    assert hybridd("status", "--format", "oneline", "--url", url).stdout == "hybridd down\n"
    plain = hybridd("status", "--url", url)
    assert plain.returncode == 1 and "the daemon is not running" in plain.stderr


def test_a_bar_shows_down_when_the_config_cannot_be_read(tmp_path: Path) -> None:
    broken = tmp_path / "config.toml"
    broken.write_text("[server]\nlisten = 5\n")
    result = hybridd("status", "--format", "waybar", "--config", str(broken))
    assert result.returncode == 0
    bar = json.loads(result.stdout)
    assert bar["class"] == "down" and "server.listen" in bar["tooltip"]


def watch(*args: str, lines: int) -> tuple[list[str], int]:
    """Run `hybridd status --watch ARGS`, read `lines` lines, press Ctrl-C; (the lines, the exit code)."""
    proc = subprocess.Popen([sys.executable, "-m", "hybridd", "status", "--watch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        read = [proc.stdout.readline() for _ in range(lines)]
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return [line.rstrip("\n") for line in read], code


def test_watch_prints_a_reading_each_interval_until_ctrl_c(daemon_factory, tiny_model: Path) -> None:
    daemon = daemon_factory(config(tiny_model))
    lines, code = watch("--interval", "0.1", "--format", "waybar", "--url", daemon.url, lines=3)
    assert code == 0 and [json.loads(line)["class"] for line in lines] == ["idle"] * 3

    # i3bar's protocol for status_command: a header, an endless array, one status line per reading
    lines, code = watch("--interval", "0.1", "--format", "i3bar", "--url", daemon.url, lines=4)
    assert code == 0 and lines[:2] == ['{"version": 1}', "["]
    assert json.loads(lines[2])[0]["full_text"] == "hybridd idle"
    assert lines[3].startswith(",") and json.loads(lines[3][1:])[0]["full_text"] == "hybridd idle"

    # A daemon that goes away is shown down, and the watch goes on
    lines, code = watch("--interval", "0.1", "--format", "oneline", "--url", f"http://127.0.0.1:{closed_port()}",
                        lines=2)
    assert code == 0 and lines == ["hybridd down", "hybridd down"]


def test_watch_without_a_format_redraws_the_table(daemon_factory, tiny_model: Path) -> None:
    daemon = daemon_factory(config(tiny_model))
    # Not a terminal: frames one after another, each ending with when it was read
    proc = subprocess.Popen([sys.executable, "-m", "hybridd", "status", "--watch", "--interval", "0.1", "--url",
                             daemon.url], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        frames = 0
        seen: list[str] = []
        while frames < 2:
            line = proc.stdout.readline()
            seen.append(line)
            frames += "Ctrl-C to stop" in line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sum(line.startswith("tiny ") and " stopped " in line for line in seen) == 2
    assert not any("\x1b" in line for line in seen)


def test_unload_stops_idle_engines_and_a_cross_origin_post_is_refused(daemon_factory, tiny_model: Path) -> None:
    daemon = daemon_factory(config(tiny_model))
    ask(daemon.url)
    wait_for(lambda: daemon.model_status("tiny")["in_flight"] == 0, what="the request to end")
    assert daemon.model_status("tiny")["state"] == "ready" and engine_processes(daemon.pid)

    refused = http("POST", daemon.url + "/hybridd/v1/unload-idle", {}, headers={"Origin": "http://evil.example"})
    assert refused.status == 403 and refused.json()["error"]["code"] == "forbidden_origin"
    rebound = http("POST", daemon.url + "/hybridd/v1/unload-idle", {},
                   headers={"Host": "evil.example", "Origin": "http://evil.example"})
    assert rebound.status == 403 and rebound.json()["error"]["code"] == "forbidden_host"
    assert daemon.model_status("tiny")["state"] == "ready"

    result = hybridd("unload", "--url", daemon.url)
    assert result.returncode == 0, result.stderr
    key = daemon.model_status("tiny")["engines"][0]["key"]
    assert result.stdout == f"unloaded {key}\n"
    assert daemon.model_status("tiny")["state"] == "stopped"
    wait_for(lambda: not engine_processes(daemon.pid), timeout=10, what="the engine process to exit")

    assert hybridd("unload", "--url", daemon.url).stdout == "no idle engines to unload\n"
    ask(daemon.url)  # the next request loads it again
    wait_for(lambda: daemon.model_status("tiny")["in_flight"] == 0, what="the request to end")
    assert daemon.model_status("tiny")["state"] == "ready"
    # A page on loopback (the dashboard) may press the button
    same = http("POST", daemon.url + "/hybridd/v1/unload-idle", {}, headers={"Origin": daemon.url})
    assert same.status == 200 and same.json() == {"unloaded": [key], "busy": []}


def test_the_bar_path_takes_the_same_status_flags_as_the_full_cli() -> None:
    from hybridd.cli.main import build_parser
    from hybridd.cli.watch import bar_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    full = {s for a in commands.choices["status"]._actions for s in a.option_strings}
    assert {s for a in bar_parser()._actions for s in a.option_strings} == full


def test_a_bar_reading_is_told_apart_from_every_other_command() -> None:
    from hybridd.cli.watch import is_bar_reading

    assert is_bar_reading(["status", "--format", "waybar"], {})
    assert is_bar_reading(["status", "--url", "http://127.0.0.1:1", "--format=i3bar"], {})
    assert is_bar_reading(["status"], {"HYBRIDD_FORMAT": "oneline"})
    assert not is_bar_reading(["status"], {})
    assert not is_bar_reading(["status", "--watch"], {})
    assert not is_bar_reading(["status", "--format", "waybar", "--help"], {})
    assert not is_bar_reading(["plan", "--format", "waybar"], {})
    assert not is_bar_reading([], {"HYBRIDD_FORMAT": "waybar"})


def test_a_bar_reading_from_the_environment_and_a_bad_format_is_a_usage_error() -> None:
    env = {**os.environ, "HYBRIDD_FORMAT": "oneline", "HYBRIDD_URL": f"http://127.0.0.1:{closed_port()}"}
    reading = subprocess.run([sys.executable, "-m", "hybridd", "status"], capture_output=True, text=True, env=env,
                             timeout=60)
    assert (reading.returncode, reading.stdout) == (0, "hybridd down\n")
    bad = hybridd("status", "--format", "xmobar")
    assert bad.returncode == 2 and "invalid choice: 'xmobar'" in bad.stderr


def test_a_server_that_is_not_hybridd_reads_as_down_with_what_it_answered() -> None:
    server = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)  # answers 501 to everything
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        from hybridd.cli.watch import fetch_status

        url = f"http://127.0.0.1:{server.server_port}"
        status, why = fetch_status(url)
        assert status is None and why.startswith(f"{url}/hybridd/v1/status answered \"HTTP/1.0 501 ")
        assert fetch_status("https://127.0.0.1:1") == (None, "--url must be http://HOST:PORT, not 'https://127.0.0.1:1'")
    finally:
        server.shutdown()
        server.server_close()


async def test_a_request_on_a_peer_shows_as_forwarding_until_it_ends(daemon_factory, tiny_model: Path) -> None:
    import asyncio

    import aiohttp

    from hybridd.cli.statusbar import bar_view
    from tests.fake_upstream import FakeEngine, sse, start_fake

    fake = FakeEngine()
    server = await start_fake(fake)
    peer_url = str(server.make_url("/")).rstrip("/")
    daemon = daemon_factory(f'[[peers]]\nname = "spark"\nbase_url = "{peer_url}"\nhardware = "dgx-spark"\n'
                            f'models = ["tiny"]\n{config(tiny_model)}')
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
            "hybridd": {"placement": "peer"}}
    try:
        async with aiohttp.ClientSession() as session:

            async def bar() -> Any:
                async with session.get(daemon.url + "/hybridd/v1/status") as reply:
                    return bar_view(await reply.json())

            async with session.post(daemon.url + "/v1/chat/completions", json=body) as reply:
                assert reply.headers["x-hybridd-placement"] == "peer:spark"
                view = await bar()  # the stream is open: the peer holds it until released
                assert (view.cls, view.text) == ("forwarding", "hybridd forwarding to spark (1)")
                assert "peer spark: up, 1 forwarded" in view.tooltip.splitlines()
                await fake.release.put(sse("ok"))
                await fake.release.put(None)
                assert b"ok" in await reply.read()
            for _ in range(500):  # the forward's bookkeeping ends just after the last byte
                if (view := await bar()).cls != "forwarding":
                    break
                await asyncio.sleep(0.01)
            assert view.cls == "idle"
    finally:
        await server.close()
