"""systemd's watchdog, end to end: a real `hybridd serve` with a real datagram socket as $NOTIFY_SOCKET pings
WATCHDOG=1 from its event loop at half of $WATCHDOG_USEC, and stops pinging while the process cannot run."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

from hybridd.systemd.watchdog import publish_status, watchdog_interval_s
from tests.conftest import start_daemon, stop_daemon, wait_for
from tests.test_serve_e2e import tiny_config

WATCHDOG_USEC = 400_000  # systemd would kill after 0.4 s without a ping; the daemon pings every 0.2 s
PING_S = WATCHDOG_USEC / 2 / 1e6


def pings(notify: socket.socket, count: int, timeout: float) -> list[float]:
    """Wait for `count` WATCHDOG=1 messages (other messages pass); when each came."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(seen)} of {count} WATCHDOG=1 within {timeout:g} s"
        notify.settimeout(left)
        try:
            message = notify.recv(4096).decode()
        except TimeoutError:
            continue
        if "WATCHDOG=1" in message.splitlines():
            seen.append(time.monotonic())
    return seen


def drain(notify: socket.socket) -> list[str]:
    notify.setblocking(False)
    messages = []
    try:
        while True:
            messages.append(notify.recv(4096).decode())
    except BlockingIOError:
        return messages


def test_event_loop_pings_the_watchdog_and_stops_while_the_process_is_stopped(tmp_path: Path,
                                                                              tiny_model: Path) -> None:
    daemon = start_daemon(tiny_config(tiny_model), tmp_path, extra_env={"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    try:
        # READY=1 came (start_daemon waits for it); then the pings, at about half the interval: never faster.
        times = pings(daemon.notify, 6, timeout=20)
        assert times[-1] - times[0] >= 5 * PING_S * 0.9

        # A stopped process stands for a wedged loop: nothing pings, so systemd would kill it.
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: psutil.Process(daemon.pid).status() == psutil.STATUS_STOPPED, what="SIGSTOP")
            drain(daemon.notify)  # what was sent before it stopped
            daemon.notify.settimeout(8 * PING_S)
            with pytest.raises(TimeoutError):
                message = daemon.notify.recv(4096).decode()
                pytest.fail(f"a stopped daemon sent {message!r}")
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        pings(daemon.notify, 2, timeout=20)  # running again, it pings again
    finally:
        stop_daemon(daemon)
    assert daemon.proc.returncode == 0


@pytest.mark.parametrize(("env", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's watchdog
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_follows_sd_watchdog_enabled(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(env, pid=4242) == expected


async def test_status_is_sent_only_when_its_text_changed() -> None:
    lines = iter(["a", "a", "b", "b", "b", "c"])
    sent: list[str] = []
    done = asyncio.Event()

    def summary() -> str:
        try:
            return next(lines)
        except StopIteration:
            done.set()
            return "c"

    def notify(state: str) -> bool:
        sent.append(state)
        return True

    task = asyncio.create_task(publish_status(summary, every_s=0, notify=notify))
    await asyncio.wait_for(done.wait(), 10)
    task.cancel()
    assert sent == ["STATUS=a", "STATUS=b", "STATUS=c"]

