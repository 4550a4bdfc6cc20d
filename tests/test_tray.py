"""`hybridd tray` on a real desktop session: a private D-Bus bus, Xvfb and the trayer tray host (tests/xsession.py).

The item is read over D-Bus as a StatusNotifierItem host reads it (org.kde.StatusNotifierItem properties,
com.canonical.dbusmenu layout), its menu items are clicked the same way, and the icon the tray host shows (the
library's XEmbed fallback: trayer is not a StatusNotifierItem host) is read off the screen.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hybridd.cli import tray as tray_cli
from hybridd.cli.main import main as cli_main
from hybridd.cli.statusbar import CLASSES
from tests.conftest import http, stop_daemon, wait_for
from tests.nodes import node_config
from tests.xsession import Session, desktop, has_appindicator, missing_programs, screen, stop

MISSING = missing_programs()
READY = not MISSING and has_appindicator()
SCREENSHOT_COPY = os.environ.get("HYBRIDD_TRAY_SCREENSHOT")  # scripts/screenshots.sh refreshes docs/ with it
ITEM = "/org/ayatana/NotificationItem/hybridd"
IDLE_COLOUR = "#93a1a1"  # hybridd-idle.svg's disc


def test_every_status_class_has_an_icon() -> None:
    for cls in CLASSES:
        svg = (tray_cli.ICONS / f"hybridd-{cls}.svg").read_text()
        assert svg.startswith("<svg") and 'viewBox="0 0 24 24"' in svg


def test_without_the_typelib_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "gi", None)  # `import gi` raises ImportError
    assert cli_main(["tray", "--url", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'hybridd[tray]'" in err and "gir1.2-ayatanaappindicator3-0.1" in err


def test_autostart_entry_starts_this_install_s_tray_with_the_flags_given(tmp_path: Path) -> None:
    gi = pytest.importorskip("gi")
    gi.require_version("Gio", "2.0")
    from gi.repository import Gio, GLib

    config = tmp_path / "my configs" / "hybridd $HOME.toml"  # a space, a dollar: quoted in Exec, not expanded
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    done = subprocess.run([sys.executable, "-m", "hybridd", "tray", "--autostart", "--url", "http://127.0.0.1:9",
                           "--config", str(config), "--interval", "5"], env=env, capture_output=True, text=True,
                          timeout=60)
    entry = tmp_path / "cfg" / "autostart" / "hybridd-tray.desktop"
    assert done.returncode == 0 and done.stdout.startswith(f"wrote {entry}"), done.stderr
    # Read back as a desktop session reads it: the key file, then the Exec line's quoting.
    app = Gio.DesktopAppInfo.new_from_filename(str(entry))
    assert app is not None and app.get_name() == "hybridd tray"
    _, argv = GLib.shell_parse_argv(app.get_commandline())
    assert argv[1:] == ["tray", "--url", "http://127.0.0.1:9", "--config", str(config), "--interval", "5"]
    program = Path(argv[0])
    assert program.is_absolute() and os.access(program, os.X_OK)
    assert subprocess.run([*argv[:1], "tray", "--help"], capture_output=True, timeout=60).returncode == 0


class Bus:
    """Calls on the session's bus through Gio, as a tray host makes them."""

    def __init__(self, address: str) -> None:
        from gi.repository import Gio, GLib

        self.gio, self.glib = Gio, GLib
        flags = Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION
        self.connection = Gio.DBusConnection.new_for_address_sync(address, flags, None, None)

    def call(self, dest: str, path: str, method: str, args: Any = None) -> Any:
        interface, _, name = method.rpartition(".")
        reply = self.connection.call_sync(dest, path, interface, name, args, None, self.gio.DBusCallFlags.NONE,
                                          10_000, None)
        return reply.unpack()

    def name_of(self, pid: int) -> str | None:
        """The unique bus name the process pid holds, if it has connected."""
        bus, path = "org.freedesktop.DBus", "/org/freedesktop/DBus"
        for name in self.call(bus, path, "org.freedesktop.DBus.ListNames")[0]:
            if name.startswith(":"):
                try:
                    pid_of = self.call(bus, path, "org.freedesktop.DBus.GetConnectionUnixProcessID",
                                       self.glib.Variant("(s)", (name,)))[0]
                except self.glib.Error:  # that connection closed meanwhile
                    continue
                if pid_of == pid:
                    return str(name)
        return None

    def item(self, name: str) -> dict[str, Any]:
        """The StatusNotifierItem's properties."""
        args = self.glib.Variant("(s)", ("org.kde.StatusNotifierItem",))
        return dict(self.call(name, ITEM, "org.freedesktop.DBus.Properties.GetAll", args)[0])

    def exported(self, name: str) -> dict[str, Any]:
        """The item's properties once it is exported ({} until then: the connection comes first)."""
        try:
            return self.item(name)
        except self.glib.Error:
            return {}

    def menu(self, name: str) -> list[dict[str, Any]]:
        """The menu's top-level items: id, label, enabled, visible."""
        args = self.glib.Variant("(iias)", (0, -1, []))
        _revision, (_root, _props, children) = self.call(name, ITEM + "/Menu", "com.canonical.dbusmenu.GetLayout",
                                                          args)
        return [{"id": child_id, "label": props.get("label", ""), "enabled": props.get("enabled", True),
                 "visible": props.get("visible", True)} for child_id, props, _ in children]

    def click(self, name: str, label: str) -> None:
        """Click the visible menu item whose label starts with label."""
        (item,) = [i for i in self.menu(name) if i["visible"] and i["label"].startswith(label)]
        args = self.glib.Variant("(isvu)", (item["id"], "clicked", self.glib.Variant("s", ""), 0))
        self.call(name, ITEM + "/Menu", "com.canonical.dbusmenu.Event", args)


def _labels(bus: Bus, name: str) -> list[str]:
    return [i["label"] for i in bus.menu(name) if i["visible"]]


# 0x400007 "hybridd idle, 1 loaded": ("hybridd" "hybridd")  24x22+0+0  +615+1: a window the tray named (its
# title, or the program name), its size and offset, and where it is on the screen.
_WINDOW = re.compile(r'^\s*0x[0-9a-f]+ "hybridd[^"]*":.*\s(\d+)x(\d+)[+-]\d+[+-]\d+\s+\+(-?\d+)\+(-?\d+)$')


def _tray_windows(session: Session) -> list[tuple[int, int, int, int]]:
    """The tray's windows as (x, y, width, height) on the screen."""
    found = (_WINDOW.search(line) for line in session.windows().splitlines())
    return [(int(m[3]), int(m[4]), int(m[1]), int(m[2])) for m in found if m]


def _icon_boxes(session: Session) -> list[tuple[int, int, int, int]]:
    """Where the tray host may show the item: the tray's windows inside trayer's panel."""
    panel = re.search(r'"panel": \("panel" "trayer"\)\s+(\d+)x(\d+)\S*\s+\+(-?\d+)\+(-?\d+)', session.windows())
    if panel is None:
        return []
    width, height, left, top = (int(v) for v in panel.groups())
    return [box for box in _tray_windows(session) if box[2] > 1 and box[3] > 1
            and left <= box[0] < left + width and top <= box[1] < top + height]


def _icon_drawn(session: Session) -> tuple[tuple[int, int, int, int], dict[str, int]] | None:
    """The icon's box in the tray host and the colours in it, once its disc's colour fills it. The boxes are read
    anew each time: the host may lay its icons out again after embedding one, and name more than one window."""
    for box in _icon_boxes(session):
        colours = screen(session, box)
        if colours.get(IDLE_COLOUR, 0) > 100:
            return box, colours
    return None


def _top_colours(colours: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(colours.items(), key=lambda item: -item[1])[:3]


def _menu_box(session: Session) -> tuple[int, int, int, int] | None:
    """Where the open menu is: the tray's one large window."""
    return next((box for box in _tray_windows(session) if box[2] > 100 and box[3] > 50), None)


def _browser(tmp_path: Path) -> tuple[Path, Path]:
    """A $BROWSER that writes the URL it was asked to open into a file (the file, the script)."""
    opened, script = tmp_path / "opened.txt", tmp_path / "browser.sh"
    script.write_text(f'#!/bin/sh\nprintf %s "$1" > "{opened}"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return opened, script


@pytest.mark.skipif(not READY and not os.environ.get("CI"),
                    reason=f"no desktop session here ({', '.join(MISSING) or 'no AyatanaAppIndicator3'}); "
                    "scripts/install_desktop.sh installs it (in CI a missing one fails)")
def test_tray_item_shows_the_node_and_its_menu_unloads_and_opens_the_dashboard(
        daemon_factory, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert READY, f"no desktop session: run scripts/install_desktop.sh (missing: {MISSING or 'the typelib'})"
    daemon = daemon_factory(node_config(tiny_model, "desk", "desktop"))
    assert http("POST", daemon.url + "/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 2}).status == 200
    opened, browser = _browser(tmp_path)
    with desktop() as session:
        bus = Bus(session.bus)
        log = (tmp_path / "tray.log").open("wb")
        tray = subprocess.Popen([sys.executable, "-m", "hybridd", "tray", "--url", daemon.url, "--interval", "0.2"],
                                env={**session.env, "BROWSER": str(browser)}, stdout=log, stderr=log)
        try:
            name = wait_for(lambda: bus.name_of(tray.pid), timeout=30, what="the tray's D-Bus connection")
            # The node is idle with its engine loaded: the icon, the title and the menu say so.
            item = wait_for(lambda: (p := bus.exported(name)).get("IconName") == "hybridd-idle" and p, timeout=30,
                            what="the idle icon")
            assert item["Id"] == "hybridd" and item["Status"] == "Active" and item["Category"] == "ApplicationStatus"
            assert item["Title"] == "hybridd idle, 1 loaded"
            assert (Path(item["IconThemePath"]) / "hybridd-idle.svg").is_file()
            labels = _labels(bus, name)
            assert labels[0] == "hybridd idle, 1 loaded" and labels[1].startswith("hybridd ")
            assert any(label.startswith("a: ready") for label in labels), labels
            assert "last: a -> local" in labels  # where the last request ran
            (unload,) = [i for i in bus.menu(name) if i["label"].startswith("Unload idle engines")]
            assert unload["label"] == "Unload idle engines (a)" and unload["enabled"]
            assert {"Open dashboard", "Quit"} <= set(labels)

            # The tray host shows the icon: its disc's colour fills the embedded window. Where that window is is read
            # again each time: the host may lay its icons out anew after the first one is embedded.
            try:
                box, colours = wait_for(lambda: _icon_drawn(session), timeout=30,
                                        what="the idle icon drawn in the tray")
            except AssertionError as exc:  # say what the tray host showed instead
                seen = {box: _top_colours(screen(session, box)) for box in _icon_boxes(session)}
                windows = [line.strip() for line in session.windows().splitlines() if "hybridd" in line or
                           "panel" in line]
                raise AssertionError(f"{exc}; boxes and their main colours: {seen}; windows: {windows}") from None
            assert colours[IDLE_COLOUR] > 100
            # A click on the icon opens the menu (the screenshot is the panel with it).
            x, y, width, height = box
            session.xdotool("mousemove", str(x + width // 2), str(y + height // 2), "click", "1")
            mx, my, mwidth, mheight = wait_for(lambda: _menu_box(session), timeout=30, what="the menu on screen")
            wait_for(lambda: screen(session, (mx, my, mwidth, mheight)).get("#ffffff", 0) > mwidth * mheight // 2,
                     timeout=30, what="the menu drawn")  # mapped is not yet painted
            screen(session, (mx - 8, 0, mwidth + 8, my + mheight + 8), png=tmp_path / "tray.png")
            session.xdotool("key", "Escape")
            if SCREENSHOT_COPY:
                shutil.copyfile(tmp_path / "tray.png", SCREENSHOT_COPY)

            # "Unload idle engines" stops the engine; the menu says so and the item greys out.
            bus.click(name, "Unload idle engines")
            wait_for(lambda: not next(m for m in daemon.status()["models"] if m["name"] == "a")["loaded"],
                     timeout=30, what="the engine unloaded")
            wait_for(lambda: any(label.startswith("unloaded a") for label in _labels(bus, name)), timeout=30,
                     what="the menu's note of the unload")
            wait_for(lambda: bus.item(name)["Title"] == "hybridd idle", timeout=30, what="the title without an engine")
            (unload,) = [i for i in bus.menu(name) if i["label"].startswith("Unload idle engines")]
            assert not unload["enabled"]

            bus.click(name, "Open dashboard")
            wait_for(lambda: opened.exists() and opened.read_text() == daemon.url + "/", timeout=30,
                     what="the browser asked to open the dashboard")

            # The daemon goes away: the icon turns to "down" and the menu says why.
            stop_daemon(daemon)
            wait_for(lambda: bus.item(name)["IconName"] == "hybridd-down", timeout=30, what="the down icon")
            assert _labels(bus, name)[0] == "hybridd down"

            bus.click(name, "Quit")
            assert tray.wait(timeout=30) == 0
        finally:
            stop(tray)
            log.close()
    assert b"Traceback" not in (tmp_path / "tray.log").read_bytes()
