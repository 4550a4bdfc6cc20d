"""The dashboard on real daemons: its page and assets behind the guards, the recent requests in status, the event
stream (and that it never holds up a shutdown), and the page itself in a real headless Chromium, paired with a real
peer, updating as requests are served, without a reload."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from hybridd.api.recent import RecentRequests, Served, reason_of
from tests.chromium import chromium_binary, open_browser
from tests.conftest import Daemon, http, wait_for
from tests.nodes import node_config

CHROMIUM = chromium_binary()
# Where scripts/screenshots.sh wants the screenshot copied (the README's); unset in a test run.
SCREENSHOT_COPY = os.environ.get("HYBRIDD_DASHBOARD_SCREENSHOT")
NO_EOS = {"2": -100}


def test_recent_requests_keep_the_last_few_and_say_why() -> None:
    recent = RecentRequests(kept=3)
    woken = []
    recent.on_added = lambda: woken.append(1)
    for n in range(5):
        recent.add(Served(float(n), "chat", "a", "local", f"because {n}", 200, 0.5))
    assert [r["reason"] for r in recent.to_json()] == ["because 2", "because 3", "because 4"] and len(woken) == 5
    refused = web.json_response({"error": {"message": "needs 47.1 GiB", "type": "x", "code": "y"}}, status=503)
    assert reason_of(refused) == "needs 47.1 GiB"
    placed = web.Response(status=200, headers={"x-hybridd-reason": "local: fits"})
    assert reason_of(placed) == "local: fits"
    assert reason_of(web.Response(status=500, body=b"not json")) == ""


def test_page_and_assets_are_served_by_hybridd_behind_the_guards(daemon_factory,  # type: ignore[no-untyped-def]
                                                                 tiny_model: Path) -> None:
    daemon = daemon_factory(node_config(tiny_model, "desk", "desktop"))
    page = http("GET", daemon.url + "/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    html = page.body.decode()
    assert "/dashboard/dashboard.js" in html and "/dashboard/dashboard.css" in html and "http" not in html.lower()
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        asset = http("GET", f"{daemon.url}/dashboard/{name}")
        assert asset.status == 200 and asset.headers["Content-Type"].startswith(kind) and asset.body
        assert b"https://" not in asset.body  # every asset is hybridd's own: nothing from a CDN
    assert http("GET", daemon.url + "/dashboard/../config.py").status == 404
    assert http("GET", daemon.url + "/dashboard/secret.js").status == 404
    evil = http("GET", daemon.url + "/", headers={"Origin": "http://evil.example"})
    assert evil.status == 403 and evil.json()["error"]["code"] == "forbidden_origin"
    rebound = http("GET", daemon.url + "/hybridd/v1/events", headers={"Host": "evil.example"})
    assert rebound.status == 403 and rebound.json()["error"]["code"] == "forbidden_host"


def test_status_shows_memory_held_and_the_recent_requests_with_reasons(daemon_factory,  # type: ignore[no-untyped-def]
                                                                        tiny_model: Path) -> None:
    daemon = daemon_factory(node_config(tiny_model, "desk", "desktop"))
    assert http("POST", daemon.url + "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2}).status == 200
    assert http("POST", daemon.url + "/v1/completions", {"model": "nope", "prompt": "hi"}).status == 404
    status = daemon.status()
    first, missing = status["recent"]
    assert first["model"] == "a" and first["api"] == "completion" and first["placement"] == "local"
    assert first["status"] == 200 and first["reason"].startswith("local: needs") and first["tokens"] == 2
    assert missing["status"] == 404 and missing["placement"] is None and "'nope' does not exist" in missing["reason"]
    device = next(d for d in status["devices"] if d["name"] == "budget0")
    (held,) = device["held"]
    assert held["model"] == "a" and held["state"] == "ready" and held["bytes"] == device["reserved_bytes"] > 0
    assert device["free_bytes"] == device["capacity_bytes"] - device["reserved_bytes"]
    assert device["total_bytes"] == 4_000_000_000


async def _next_status(lines: aiohttp.StreamReader) -> dict:  # type: ignore[type-arg]
    """The next `event: status` of a stream, as its object."""
    event = ""
    while True:
        line = (await lines.readline()).decode()
        assert line, "the event stream ended"
        if line.startswith("event: "):
            event = line[7:].strip()
        elif line.startswith("data: ") and event == "status":
            return json.loads(line[6:])  # type: ignore[no-any-return]


def test_event_stream_pushes_each_answer_and_ends_at_shutdown(daemon_factory,  # type: ignore[no-untyped-def]
                                                              tiny_model: Path) -> None:
    # A grace far longer than the test may take: a stream that held up the drain would show.
    config = node_config(tiny_model, "desk", "desktop").replace("[server]", "[server]\nshutdown_grace_s = 120")
    daemon = daemon_factory(config)

    async def follow() -> float:
        async with aiohttp.ClientSession() as client, client.get(daemon.url + "/hybridd/v1/events") as stream:
            assert stream.headers["Content-Type"] == "text/event-stream"
            assert (await _next_status(stream.content))["recent"] == []
            body = {"model": "a", "prompt": "hi", "max_tokens": 2}
            async with client.post(daemon.url + "/v1/completions", json=body) as answer:
                assert answer.status == 200
            # Pushed when the answer ends; the ticks sent while the engine loaded come first.
            async with asyncio.timeout(20):
                while not (await _next_status(stream.content))["recent"]:
                    pass
            asked_at = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)
            while await stream.content.readline():  # the stream ends cleanly once the drain begins
                pass
            return time.monotonic() - asked_at

    ended_after = asyncio.run(follow())
    assert ended_after < 60, f"the event stream held the drain for {ended_after:.1f} s"
    assert daemon.proc.wait(timeout=60) == 0
    assert "ending" not in daemon.log()  # no stream had to be cut at the grace


def _pair(desk: Daemon, peer: Daemon) -> None:
    """Pair desk with peer through the CLI, as a user would, and wait for the link (with its RTT)."""

    def cli(*args: str) -> dict:  # type: ignore[type-arg]
        done = subprocess.run([sys.executable, "-m", "hybridd", *args, "--json"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    code = cli("pair", "--url", peer.url)["code"]
    cli("pair", peer.lan_url.removeprefix("https://"), code, "--url", desk.url)
    wait_for(lambda: any(p["up"] and p["rtt_ms"] is not None for p in desk.status()["peers"]), timeout=30,
             what="the desktop's link to the peer, with an RTT")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="no Chromium here (scripts/install_desktop.sh installs it; in CI a missing one fails)")
def test_dashboard_in_chromium_shows_the_node_and_updates_live(daemon_factory,  # type: ignore[no-untyped-def]
                                                               tiny_model: Path, tmp_path: Path) -> None:
    assert CHROMIUM is not None, "no Chromium: run scripts/install_desktop.sh (or set HYBRIDD_CHROMIUM)"
    peer = daemon_factory(node_config(tiny_model, "spark", "peer", 100_000_000_000))
    desk = daemon_factory(node_config(tiny_model, "desk", "desktop"))
    _pair(desk, peer)
    body = {"model": "a", "prompt": "hi", "max_tokens": 8, "logit_bias": NO_EOS}
    first = http("POST", desk.url + "/v1/completions", body)
    assert first.status == 200 and first.headers["x-hybridd-placement"] == "local"

    async def drive() -> bytes:
        async with open_browser(CHROMIUM, tmp_path / "chromium", width=1280, height=960) as page:
            await page.send("Page.enable")
            await page.send("Page.navigate", url=desk.url + "/")
            await page.wait_for("document.querySelectorAll('#recent tbody tr').length === 1", what="the first decision")
            # The loaded model with its state, the peer with its link, the decision with where it ran and why.
            engine = await page.evaluate("document.querySelector('#engines tr[data-model=\"a\"]').innerText")
            assert "ready" in engine and "local" in engine
            held = await page.evaluate("document.querySelector('#devices [data-device=\"budget0\"]').innerText")
            assert "a " in held and "GiB" in held
            peer_row = await page.evaluate("document.querySelector('#peers tr[data-peer=\"spark\"]').innerText")
            assert "up" in peer_row and "ms" in peer_row and "GiB" in peer_row
            decision = await page.evaluate("document.querySelector('#recent tbody tr').innerText")
            assert "local" in decision and "200" in decision and "needs" in decision
            assert await page.evaluate("document.getElementById('link').textContent") == "live"

            # A second request, streamed from the peer: the open page shows it without being reloaded.
            await page.evaluate("window.sameDocument = true")
            streamed = {**body, "max_tokens": 24, "stream": True, "hybridd": {"placement": "peer"}}
            async with aiohttp.ClientSession() as client, client.post(desk.url + "/v1/completions",
                                                                      json=streamed) as far:
                assert far.status == 200 and far.headers["x-hybridd-placement"] == "peer:spark"
                assert (await far.read()).rstrip().endswith(b"data: [DONE]")
            await page.wait_for("document.querySelectorAll('#recent tbody tr').length === 2",
                                what="the second decision")
            newest = await page.evaluate("document.querySelector('#recent tbody tr').innerText")
            assert "peer:spark" in newest and "200" in newest and "first token" in newest
            assert await page.evaluate("window.sameDocument === true"), "the page was reloaded"
            return await page.screenshot()

    png = asyncio.run(drive())
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    (tmp_path / "dashboard.png").write_bytes(png)
    if SCREENSHOT_COPY:
        shutil.copyfile(tmp_path / "dashboard.png", SCREENSHOT_COPY)
