"""systemd's watchdog and STATUS= line, kept from the event loop: a loop that stops turning stops the pings, and
systemd kills and restarts the service (WatchdogSec= in the unit, Restart=on-failure)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

from hybridd.systemd.notify import sd_notify

# How often STATUS= is recomputed; it is sent only when its text changed.
STATUS_EVERY_S = 5.0

Notify = Callable[[str], bool]


def watchdog_interval_s(env: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout systemd set for this process, in seconds; None when there is none (sd_watchdog_enabled(3):
    WATCHDOG_USEC a positive integer, and WATCHDOG_PID, when set, this process)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner is not None and owner.strip() != str(pid):
        return None  # the watchdog is another process's, e.g. the daemon that started us
    return usec / 1_000_000


async def ping_watchdog(interval_s: float, notify: Notify = sd_notify) -> None:
    """Send WATCHDOG=1 every interval_s / 2, as sd_watchdog_enabled(3) advises, until cancelled."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval_s / 2)


async def publish_status(summary: Callable[[], str], every_s: float = STATUS_EVERY_S,
                         notify: Notify = sd_notify) -> None:
    """Send STATUS=<summary()> whenever the text changed, checking every every_s, until cancelled."""
    sent = None
    while True:
        text = summary()
        if text != sent and notify(f"STATUS={text}"):
            sent = text
        await asyncio.sleep(every_s)


def under_notify_socket(env: Mapping[str, str] | None = None) -> bool:
    """Whether a service manager listens for our notifications."""
    return bool((env if env is not None else os.environ).get("NOTIFY_SOCKET"))
