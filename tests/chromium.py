"""A real headless Chromium for a test, driven over the DevTools protocol with aiohttp's websocket client.

`chromium_binary()` finds it (HYBRIDD_CHROMIUM, else chromium, chromium-browser or google-chrome on PATH; installed
by scripts/install_desktop.sh). `open_browser()` starts one with a throwaway profile, waits (polling, with a deadline)
for its DevTools port, and kills it, every process of it, on the way out.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil

NAMES = ("chromium", "chromium-browser", "google-chrome")
START_S = 30.0


def chromium_binary() -> str | None:
    """The Chromium to test with, or None when there is none here."""
    configured = os.environ.get("HYBRIDD_CHROMIUM")
    if configured:
        return shutil.which(configured)
    return next((found for name in NAMES if (found := shutil.which(name))), None)


class Page:
    """One tab: send DevTools commands and wait for their results."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one command; events that arrive meanwhile are skipped (nothing here waits on them)."""
        call = next(self._ids)
        await self.ws.send_json({"id": call, "method": method, "params": params})
        while True:
            message = await self.ws.receive(timeout=START_S)
            if message.type is not aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"DevTools connection ended during {method}: {message.type.name}")
            reply = json.loads(message.data)
            if reply.get("id") == call:
                if "error" in reply:
                    raise AssertionError(f"DevTools {method} failed: {reply['error']}")
                return reply.get("result", {})  # type: ignore[no-any-return]

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values only)."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 20.0, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; its value, or AssertionError at the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what or expression}")
            await asyncio.sleep(0.05)

    async def screenshot(self) -> bytes:
        """A PNG of the whole page (not only the window)."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics["cssContentSize"]
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                               clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        return base64.b64decode(shot["data"])


@contextlib.asynccontextmanager
async def open_browser(binary: str, profile: Path, width: int = 1280, height: int = 900,
                       dark: bool = False) -> AsyncIterator[Page]:
    """Headless Chromium with a fresh profile in `profile`, its one tab on about:blank."""
    await asyncio.to_thread(profile.mkdir, parents=True, exist_ok=True)
    args = [binary, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", "--mute-audio", "--remote-debugging-port=0",
            "--remote-allow-origins=*", f"--user-data-dir={profile}", f"--window-size={width},{height}"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox (CI containers)
    log = await asyncio.to_thread((profile / "chromium.log").open, "wb")
    proc = await asyncio.create_subprocess_exec(*args, "about:blank", stdin=asyncio.subprocess.DEVNULL,
                                                stdout=log, stderr=log, start_new_session=True)
    try:
        port = await _devtools_port(profile / "DevToolsActivePort", proc)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with http.ws_connect(page_url, max_msg_size=0) as ws:
                page = Page(ws)
                if dark:
                    await page.send("Emulation.setEmulatedMedia",
                                    features=[{"name": "prefers-color-scheme", "value": "dark"}])
                yield page
    finally:
        await _kill(proc)
        log.close()


async def _devtools_port(path: Path, proc: asyncio.subprocess.Process) -> int:
    """The port Chromium writes to its profile once DevTools listens (first line of DevToolsActivePort)."""
    deadline = time.monotonic() + START_S
    while True:
        port = await asyncio.to_thread(_port_in, path)
        if port is not None:
            return port
        if proc.returncode is not None:
            raise AssertionError(f"chromium exited ({proc.returncode}) before DevTools listened; see its log beside "
                                 f"{path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"chromium's DevTools did not listen within {START_S:g} s")
        await asyncio.sleep(0.05)


def _port_in(path: Path) -> int | None:
    """The first line of DevToolsActivePort, once Chromium has written it whole."""
    try:
        first = path.read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return None
    return int(first) if first.isdigit() else None


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Chromium and every process it started (renderers, zygotes, the crash handler): its session, then the rest."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # started in its own session: its group is its id
    for child in family:  # one that left the group (the crash handler may)
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    await proc.wait()
