"""What a CLI command waits for, shown on stderr while it waits; stdout (and so --json output) is never touched.

On a terminal: one status line, redrawn in place ("waiting for spark's link to come up: 12 s of 120 s") and erased
when the wait ends. Elsewhere (a log, a pipe): one plain line when the wait starts and nothing after, so logs get no
carriage returns. A wait shorter than its grace shows nothing at all: quick answers stay quiet.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

ERASE = "\r\x1b[K"  # back to the line's start, clear to its end
GRACE_S = 1.0  # a server-side wait is shown once it has lasted this long
TICK_S = 0.25


def wait_text(what: str, elapsed_s: float, limit_s: float | None = None) -> str:
    """'waiting for X: 12 s of 120 s', or 'waiting for X: 12 s' for a wait with no limit."""
    so_far = f"{int(elapsed_s)} s"
    return f"waiting for {what}: {so_far} of {limit_s:g} s" if limit_s else f"waiting for {what}: {so_far}"


def is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class StatusLine:
    """The status line of one command: begin(what) starts a wait, tick() redraws it, end() erases it.

    Safe to tick from a thread while the main thread waits: a lock keeps each write whole.
    """

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic, grace_s: float = 0.0,
                 tty: bool | None = None) -> None:
        self.stream = stream
        self.clock = clock
        self.grace_s = grace_s
        self.tty = is_tty(stream) if tty is None else tty
        self._lock = threading.Lock()
        self._what: str | None = None
        self._limit_s: float | None = None
        self._started = 0.0
        self._announced = False  # not a terminal: the one line of this wait is out
        self._drawn = False  # a terminal: a status line is on screen

    def begin(self, what: str, limit_s: float | None = None) -> None:
        """Start waiting for what (at most limit_s seconds, when given); shown at once unless there is a grace.
        The last wait's line goes at once, even while this one is inside its grace."""
        self.clear()
        with self._lock:
            self._what, self._limit_s, self._started, self._announced = what, limit_s, self.clock(), False
        self.tick()

    def tick(self) -> None:
        """Redraw the line (a terminal), or write the wait's one line once it has passed its grace (elsewhere)."""
        with self._lock:
            if self._what is None:
                return
            elapsed = self.clock() - self._started
            if elapsed < self.grace_s:
                return
            text = wait_text(self._what, elapsed, self._limit_s)
            if self.tty:  # one row: a line that wrapped would leave its first rows behind at each redraw
                self.stream.write(ERASE + text[:max(20, shutil.get_terminal_size().columns - 1)])
                self._drawn = True
            elif not self._announced:
                self.stream.write(f"hybridd: {text}\n")
                self._announced = True
            else:
                return
            self.stream.flush()

    def clear(self) -> None:
        """Take the line off the screen for a moment (the caller prints something); the next tick redraws it."""
        with self._lock:
            if self._drawn:
                self.stream.write(ERASE)
                self.stream.flush()
                self._drawn = False

    def end(self) -> None:
        """The wait is over: erase the line, so what is printed next starts on a clean line."""
        self.clear()
        with self._lock:
            self._what = None


@contextmanager
def showing(what: str, stream: TextIO, limit_s: float | None = None, grace_s: float = GRACE_S,
            tick_s: float = TICK_S, clock: Callable[[], float] = time.monotonic,
            tty: bool | None = None) -> Iterator[StatusLine]:
    """Show what the block waits for while it blocks (a call to the daemon, a file read), redrawn by a thread.

    The block may call begin() on the line it gets to say that it now waits for something else.
    """
    line = StatusLine(stream, clock, grace_s, tty)
    line.begin(what, limit_s)
    stop = threading.Event()

    def redraw() -> None:
        while not stop.wait(tick_s):
            line.tick()

    ticker = threading.Thread(target=redraw, name="hybridd-waiting", daemon=True)
    ticker.start()
    try:
        yield line
    finally:
        stop.set()
        ticker.join()
        line.end()
