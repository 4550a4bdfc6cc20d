"""Start `hybridd serve` as a child process and learn its URLs from its sd_notify READY message.

Used by `hybridd demo` and by the tests: port 0 everywhere, so nothing races for a port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunningNode:
    """A daemon we started: its process, loopback URL, LAN URL (peers), and log file."""

    proc: subprocess.Popen[bytes]
    url: str
    lan_url: str
    log_path: Path
    notify: socket.socket

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after timeout; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()
        return self.proc.returncode


def start_node(config_text: str | None, folder: Path, extra_env: dict[str, str] | None = None,
               timeout: float = 120.0, args: tuple[str, ...] = (), wrapper: tuple[str, ...] = ()) -> RunningNode:
    """Start a daemon with config_text (None: no config, listening on a free loopback port); wait for READY.

    `wrapper` execs the daemon in its place, e.g. ("prlimit", "--nofile=1024:1024", "--"): the pid stays the daemon's.
    """
    folder.mkdir(parents=True, exist_ok=True)
    argv = [*wrapper, sys.executable, "-m", "hybridd", "serve", *args]
    if config_text is None:
        argv += ["--listen", "127.0.0.1:0"]
    else:
        config = folder / "config.toml"
        config.write_text(config_text)
        argv += ["--config", str(config)]
    sock_path = folder / "notify.sock"
    sock_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    log_path = folder / "daemon.log"
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "XDG_STATE_HOME": str(folder / "state"),
           "XDG_CONFIG_HOME": str(folder / "xdg-config"), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            notify.close()
            raise RuntimeError(f"hybridd exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            notify.close()
            raise RuntimeError(f"hybridd was not ready after {timeout:g} s: {log_path.read_text()[-2000:]}")
        notify.settimeout(0.2)
        try:
            message = notify.recv(4096).decode()
        except TimeoutError:
            continue
        fields = dict(line.split("=", 1) for line in message.splitlines() if "=" in line)
        if fields.get("READY") == "1":
            return RunningNode(proc, fields["X_HYBRIDD_URL"], fields.get("X_HYBRIDD_LAN", ""),
                               log_path, notify)
