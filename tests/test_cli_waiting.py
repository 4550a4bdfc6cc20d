"""CLI commands that wait say on stderr what they wait for and for how long so far: one line redrawn in place on a
terminal, one plain line (no carriage returns) elsewhere; stdout, and so --json output, is left as it was."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
from argparse import Namespace
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hybridd.cli import wake as wake_cli
from hybridd.cli.waiting import ERASE, StatusLine, showing, wait_text
from tests.conftest import wait_for


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_text_says_what_is_waited_for_and_for_how_long_of_how_long() -> None:
    assert wait_text("spark's link to come up", 12.7, 120.0) == "waiting for spark's link to come up: 12 s of 120 s"
    assert wait_text("the daemon to stop its idle engines", 3.2) == \
        "waiting for the daemon to stop its idle engines: 3 s"


def test_on_a_terminal_one_line_is_redrawn_in_place_and_erased_at_the_end() -> None:
    stream, clock = Terminal(), Clock()
    line = StatusLine(stream, clock)
    line.begin("spark's link to come up", 120)
    clock.now += 12
    line.tick()
    line.end()
    assert stream.getvalue() == (f"{ERASE}waiting for spark's link to come up: 0 s of 120 s"
                                 f"{ERASE}waiting for spark's link to come up: 12 s of 120 s{ERASE}")
    assert "\n" not in stream.getvalue()


def test_elsewhere_one_plain_line_when_the_wait_starts_and_no_carriage_return() -> None:
    stream, clock = io.StringIO(), Clock()
    line = StatusLine(stream, clock)
    line.begin("spark's link to come up", 120)
    for _ in range(5):
        clock.now += 10
        line.tick()
    line.end()
    assert stream.getvalue() == "hybridd: waiting for spark's link to come up: 0 s of 120 s\n"


def _waited(stream: io.StringIO, seconds: float, ticks: int) -> str:
    """What a 1 s-grace wait of `seconds` writes to stream, ticked `ticks` times after them and then ended."""
    clock = Clock()
    line = StatusLine(stream, clock, grace_s=1.0)
    line.begin("the daemon to answer POST /x", 60)
    clock.now += seconds
    for _ in range(ticks):
        line.tick()
    line.end()
    return stream.getvalue()


def test_a_wait_shorter_than_its_grace_shows_nothing() -> None:
    for stream in (Terminal(), io.StringIO()):
        assert _waited(stream, 0.9, ticks=1) == ""
    assert _waited(io.StringIO(), 1.5, ticks=2) == "hybridd: waiting for the daemon to answer POST /x: 1 s of 60 s\n"


def test_a_new_phase_of_a_wait_is_shown_as_what_is_now_waited_for() -> None:
    stream, clock = io.StringIO(), Clock()
    line = StatusLine(stream, clock)
    line.begin("a scan of the model library (/models)")
    line.begin("m.gguf's GGUF header")
    assert stream.getvalue().splitlines() == ["hybridd: waiting for a scan of the model library (/models): 0 s",
                                              "hybridd: waiting for m.gguf's GGUF header: 0 s"]


def test_on_a_terminal_the_line_fits_one_row_and_a_new_phase_erases_the_last_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    stream, clock = Terminal(), Clock()
    line = StatusLine(stream, clock, grace_s=1.0)
    line.begin("a scan of the model library (/very/long/path/to/models)")
    clock.now += 2
    line.tick()
    drawn = stream.getvalue()
    assert drawn == ERASE + "waiting for a scan of the model library"[:39]  # wider would wrap and leave rows behind
    line.begin("m.gguf's GGUF header")  # inside its grace: nothing new drawn, the old line gone
    assert stream.getvalue() == drawn + ERASE


def test_a_blocking_call_is_shown_by_a_thread_while_it_blocks() -> None:
    stream, clock = Terminal(), Clock()
    with showing("the daemon to stop its idle engines", stream, limit_s=60, grace_s=1.0, tick_s=0.01, clock=clock):
        assert stream.getvalue() == ""  # within the grace
        clock.now += 7
        wait_for(lambda: "waiting for the daemon to stop its idle engines: 7 s of 60 s" in stream.getvalue(),
                 what="the status line")
    assert stream.getvalue().endswith(ERASE)
    assert not any(t.name == "hybridd-waiting" for t in threading.enumerate())


def _daemon_answering_wake(links: list[str]) -> Any:
    def ask(path: str, body: Any) -> Any:
        if path.endswith("/wake"):
            return {"peer": "spark", "mac": "52:a0:ea:91:bc:83", "broadcast": "10.0.0.255", "sent_to": ["10.0.0.255:9"],
                    "link": "down"}
        return {"paired": [{"name": "spark", "link": links.pop(0)}]}

    return ask


@pytest.mark.parametrize("json_out", [False, True])
def test_hybridd_wake_wait_shows_the_link_it_waits_for_on_a_terminal(json_out: bool) -> None:
    out, err, clock = io.StringIO(), Terminal(), Clock()

    def sleep(seconds: float) -> None:
        clock.now += seconds

    args = Namespace(peer="spark", mac=None, broadcast="255.255.255.255", wait=120.0, json=json_out)
    ask = _daemon_answering_wake(["down"] * 5 + ["up"])
    assert wake_cli.run(args, ask, out, clock=clock, err=err, sleep=sleep) == 0
    assert "waiting for spark's link to come up: 2 s of 120 s" in err.getvalue() and err.getvalue().endswith(ERASE)
    if json_out:  # stdout is the JSON alone, as before
        assert json.loads(out.getvalue())["peer"] == "spark"
    else:
        assert out.getvalue().endswith("sent to 10.0.0.255:9\nspark is up\n")


def test_hybridd_wake_wait_writes_one_plain_line_to_a_log() -> None:
    out, err, clock = io.StringIO(), io.StringIO(), Clock()

    def sleep(seconds: float) -> None:
        clock.now += seconds

    args = Namespace(peer="spark", mac=None, broadcast="255.255.255.255", wait=3.0, json=False)
    assert wake_cli.run(args, _daemon_answering_wake(["down"] * 10), out, clock=clock, err=err, sleep=sleep) == 1
    assert err.getvalue() == "hybridd: waiting for spark's link to come up: 0 s of 3 s\n"
    assert out.getvalue().endswith("spark did not come up within 3 s\n")


@pytest.fixture
def slow_daemon() -> Iterator[tuple[str, threading.Event]]:
    """A daemon stand-in whose unload route answers only once the test sets the event."""
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            release.wait(30)
            body = json.dumps({"unloaded": ["tiny@0"], "busy": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", release
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        serving.join()


def test_hybridd_unload_says_it_waits_for_the_daemon_and_keeps_json_on_stdout(
        slow_daemon: tuple[str, threading.Event]) -> None:
    url, release = slow_daemon
    proc = subprocess.Popen([sys.executable, "-m", "hybridd", "unload", "--json", "--url", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # written once the POST has waited a second; blocks until then
        release.set()
        out, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    # The ticker's first reading past the 1 s grace: 1 s, or more on a machine busy enough to delay it.
    assert re.fullmatch(r"hybridd: waiting for the daemon to stop its idle engines: \d+ s of 60 s\n", first)
    assert rest == "" and "\r" not in first
    assert json.loads(out) == {"unloaded": ["tiny@0"], "busy": []}


def test_a_quick_plan_shows_no_wait_and_its_json_is_untouched(tiny_model: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    done = subprocess.run([sys.executable, "-m", "hybridd", "plan", str(tiny_model), "--json", "--config",
                           str(config), "--hardware", "dgx-spark"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and json.loads(done.stdout)["hardware"] == "hardware profile dgx-spark"


def test_the_plan_says_it_waits_for_the_header_and_the_probe() -> None:
    from hybridd.cli.main import _plan_wait

    assert _plan_wait(Namespace(model="m.gguf", hardware=None)) == \
        "m.gguf's GGUF header and a probe of this machine's GPUs"
    assert _plan_wait(Namespace(model="m.gguf", hardware="dgx-spark")) == "m.gguf's GGUF header"
