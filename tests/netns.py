"""Two network namespaces joined by a veth pair, for tests that need a real LAN (multicast included) on one host.

`NetnsPair()` is a context manager: namespaces `a` (10.77.0.1/24) and `b` (10.77.0.2/24), lo up, multicast routed
over the veth. `spawn(ns, "module:function", *args)` runs a Python function inside a namespace as a subprocess that
talks JSON lines over stdin/stdout. Everything (processes, namespaces, the veth with them) goes at exit, also on
failure; names carry our pid, so leftovers of a killed run are swept on the next one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
PREFIX = "hybt-"
SUBNET = "10.77.0"


@functools.cache
def netns_available() -> tuple[bool, str]:
    """(True, "") if we may create namespaces and veth pairs here, else (False, why) for pytest.skip."""
    if sys.platform != "linux":
        return False, "network namespaces need Linux"
    if shutil.which("ip") is None:
        return False, "iproute2 `ip` not installed"
    if os.geteuid() != 0:
        return False, "network namespaces need root (CAP_NET_ADMIN)"
    probe = f"{PREFIX}{os.getpid()}-probe{secrets.token_hex(2)}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return False, f"`ip netns add` failed: {exc.stderr.strip()}"
    with contextlib.suppress(subprocess.CalledProcessError):
        _ip("netns", "del", probe)
    return True, ""


def _ip(*args: str, netns: str | None = None) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout


def sweep_stale() -> None:
    """Delete namespaces a previous, killed test run left behind (their owner pid is gone)."""
    try:
        names = [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]
    except (subprocess.CalledProcessError, FileNotFoundError):
        return
    for name in names:
        if not name.startswith(PREFIX):
            continue
        owner = name[len(PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", name)


@dataclass(frozen=True)
class Namespace:
    """One end of the pair: namespace name, its veth interface and address."""

    name: str
    iface: str
    address: str


@dataclass
class Agent:
    """A Python function running in a namespace; speaks JSON lines on stdin/stdout, stderr goes to a file."""

    proc: subprocess.Popen[str]
    stderr_path: Path
    lines: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    seen: list[dict[str, Any]] = field(default_factory=list)

    def send(self, message: dict[str, Any]) -> None:
        """One JSON line to the agent's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def expect(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """The first line (seen before or arriving within timeout) that satisfies predicate."""
        for line in self.seen:
            if predicate(line):
                return line
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; agent said {self.seen[-5:]}, "
                             f"exit {self.proc.poll()}, stderr:\n{self.stderr()}")

    def collect(self, seconds: float) -> list[dict[str, Any]]:
        """Every line the agent says during the next `seconds` (also kept in `seen`)."""
        deadline = time.monotonic() + seconds
        said = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            said.append(line)
        return said

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: the agent gets no chance to say goodbye."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int:
        """Close stdin (the agent's cue to shut down cleanly) and wait; kill if it hangs."""
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"agent did not stop within {timeout} s; stderr:\n{self.stderr()}") from None


class NetnsPair:
    """Two namespaces joined by a veth pair; use as a context manager."""

    def __init__(self) -> None:
        token = secrets.token_hex(3)
        self.a = Namespace(f"{PREFIX}{os.getpid()}-{token}-a", f"hv{token}a", f"{SUBNET}.1")
        self.b = Namespace(f"{PREFIX}{os.getpid()}-{token}-b", f"hv{token}b", f"{SUBNET}.2")
        self._agents: list[Agent] = []
        self._scratch = Path(tempfile.mkdtemp(prefix="hybt-netns-"))

    def __enter__(self) -> NetnsPair:
        sweep_stale()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        for ns in (self.a, self.b):
            _ip("netns", "add", ns.name)
            _ip("link", "set", "lo", "up", netns=ns.name)
        # Created inside `a` and moved, so nothing of it ever appears in the host namespace.
        _ip("link", "add", self.a.iface, "type", "veth", "peer", "name", self.b.iface, netns=self.a.name)
        _ip("link", "set", self.b.iface, "netns", self.b.name, netns=self.a.name)
        for ns in (self.a, self.b):
            _ip("addr", "add", f"{ns.address}/24", "dev", ns.iface, netns=ns.name)
            _ip("link", "set", ns.iface, "multicast", "on", "up", netns=ns.name)
            _ip("route", "add", "224.0.0.0/4", "dev", ns.iface, netns=ns.name)

    def spawn(self, ns: Namespace, target: str, *args: Any) -> Agent:
        """Run `module:function(*args)` inside ns with the repo and tests importable; args go as JSON."""
        module, function = target.split(":")
        code = ("import json, sys, importlib; "
                f"getattr(importlib.import_module({module!r}), {function!r})(*json.loads(sys.argv[1]))")
        stderr_path = self._scratch / f"agent{len(self._agents)}.stderr"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "PYTHONUNBUFFERED": "1"}
        with stderr_path.open("w") as stderr:
            proc = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", code, json.dumps(args)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                    env=env, cwd=REPO)
        agent = Agent(proc, stderr_path)
        self._agents.append(agent)
        threading.Thread(target=_pump, args=(proc, agent.lines), daemon=True, name="netns agent stdout").start()
        return agent

    def run(self, ns: Namespace, *argv: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        """Run a command inside ns to completion (stdout and stderr captured)."""
        return subprocess.run(["ip", "netns", "exec", ns.name, *argv], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def close(self) -> None:
        """Kill our agents, delete both namespaces (which takes the veth with them)."""
        for agent in self._agents:
            with contextlib.suppress(Exception):
                agent.kill()
            for pipe in (agent.proc.stdin, agent.proc.stdout):
                with contextlib.suppress(Exception):
                    pipe.close()  # type: ignore[union-attr]
        for ns in (self.a, self.b):
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", ns.name)
        shutil.rmtree(self._scratch, ignore_errors=True)


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[dict[str, Any]]) -> None:
    """Move the agent's JSON lines into a queue; non-JSON lines are kept as {"raw": line}."""
    assert proc.stdout is not None
    with contextlib.suppress(ValueError, OSError):  # the pipe is closed under us at teardown
        for line in proc.stdout:
            try:
                lines.put(json.loads(line))
            except json.JSONDecodeError:
                lines.put({"raw": line.rstrip()})


def emit(message: dict[str, Any]) -> None:
    """For agent functions: one JSON line to the test."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()
