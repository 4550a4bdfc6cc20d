"""A desktop session for a test: a private D-Bus session bus (what dbus-run-session starts), an Xvfb display and
the trayer tray host on it, all stopped on the way out. Installed by scripts/install_desktop.sh.

`screen()` reads pixels off the display through GDK in a subprocess (the test process keeps no display open).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROGRAMS = ("dbus-daemon", "Xvfb", "trayer", "xwininfo", "xdotool")
START_S = 20.0


def missing_programs() -> list[str]:
    """The programs this session needs that are not on PATH."""
    return [name for name in PROGRAMS if shutil.which(name) is None]


def has_appindicator() -> bool:
    """True when PyGObject and the AyatanaAppIndicator3 typelib import (checked in a subprocess: no GTK here)."""
    probe = ("import gi; gi.require_version('Gtk', '3.0'); gi.require_version('AyatanaAppIndicator3', '0.1'); "
             "from gi.repository import AyatanaAppIndicator3")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60).returncode == 0


@dataclass
class Session:
    display: str  # ":N"
    bus: str  # the session bus address

    @property
    def env(self) -> dict[str, str]:
        """The environment a program on this desktop gets (no accessibility bus: nothing here reads it)."""
        return {**os.environ, "DISPLAY": self.display, "DBUS_SESSION_BUS_ADDRESS": self.bus, "NO_AT_BRIDGE": "1"}

    def windows(self) -> str:
        """The window tree, as `xwininfo -root -tree` prints it.

        xwininfo walks the tree one query at a time, and a window that goes away meanwhile (the tray host reparents
        a new icon) ends the walk with BadWindow: that walk is taken again. Any other failure is raised.
        """
        for _ in range(10):
            done = subprocess.run(["xwininfo", "-root", "-tree", "-display", self.display], capture_output=True,
                                  text=True, timeout=30)
            if done.returncode == 0:
                return done.stdout
            if "X Error" not in done.stderr:  # BadWindow, BadDrawable: the tree changed under the walk
                break
        raise AssertionError(f"xwininfo on {self.display} failed ({done.returncode}): {done.stderr.strip()}")

    def xdotool(self, *args: str) -> None:
        """Move the pointer, click, press keys (xdotool's words)."""
        subprocess.run(["xdotool", *args], env=self.env, capture_output=True, timeout=30, check=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; reaped either way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _first_line(proc: subprocess.Popen[bytes], what: str) -> str:
    """The first line proc prints on stdout (its bus address, its display number), waited for START_S at most."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_S)
    line = proc.stdout.readline().decode().strip() if ready else ""
    if not line:
        raise AssertionError(f"{what} printed nothing in {START_S:g} s; exit status {proc.poll()}")
    return line


@contextlib.contextmanager
def desktop(width: int = 640, height: int = 360) -> Iterator[Session]:
    """A bus, a display and a tray host on its top edge; every process is stopped on the way out."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        bus_proc = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address=1"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        started.append(bus_proc)
        bus = _first_line(bus_proc, "dbus-daemon")
        # -displayfd: Xvfb picks a free display and prints its number once it accepts clients.
        x_proc = subprocess.Popen(["Xvfb", "-displayfd", "1", "-screen", "0", f"{width}x{height}x24", "-nolisten",
                                   "tcp"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        started.append(x_proc)
        session = Session(f":{_first_line(x_proc, 'Xvfb')}", bus)
        tray = subprocess.Popen(["trayer", "--edge", "top", "--align", "right", "--widthtype", "request",
                                 "--height", "24", "--SetDockType", "true", "--tint", "0xfdf6e3", "--transparent",
                                 "true", "--alpha", "0"], env=session.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        started.append(tray)
        deadline = time.monotonic() + START_S
        while '"panel"' not in session.windows():
            if tray.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"trayer did not show its panel on {session.display}")
            time.sleep(0.05)
        yield session
    finally:
        for proc in reversed(started):
            stop(proc)
            if proc.stdout is not None:
                proc.stdout.close()


_GRAB = """
import json, sys
import gi
gi.require_version("Gdk", "3.0")
from gi.repository import Gdk
x, y, w, h, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
root = Gdk.get_default_root_window()
if w <= 0:
    w, h = root.get_width(), root.get_height()
shot = Gdk.pixbuf_get_from_window(root, x, y, w, h)
if path:
    shot.savev(path, "png", [], [])
pixels, stride, step = shot.get_pixels(), shot.get_rowstride(), shot.get_n_channels()
colours = {}
for row in range(shot.get_height()):
    for col in range(shot.get_width()):
        at = row * stride + col * step
        key = "#%02x%02x%02x" % tuple(pixels[at:at + 3])
        colours[key] = colours.get(key, 0) + 1
print(json.dumps(colours))
"""


def screen(session: Session, box: tuple[int, int, int, int] = (0, 0, 0, 0), png: Path | None = None) -> dict[str, int]:
    """The count of each colour ("#rrggbb") in box (x, y, width, height; width 0: the whole screen), and the
    box saved as png when one is given."""
    x, y, width, height = box
    done = subprocess.run([sys.executable, "-c", _GRAB, str(x), str(y), str(width), str(height), str(png or "")],
                          env=session.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]
