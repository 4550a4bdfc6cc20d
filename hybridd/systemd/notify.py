"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, silently nothing when unset."""

from __future__ import annotations

import os
import socket


def sd_notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send state (e.g. "READY=1\\nSTATUS=...") to systemd; True if a socket was there to take it.

    Never blocks: it is called from the event loop, and a receiver whose queue is full must not stall it (the
    message is dropped, as a missed watchdog ping would be).
    """
    address = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.connect(address)
            sock.send(state.encode())
    except OSError:
        return False
    return True
