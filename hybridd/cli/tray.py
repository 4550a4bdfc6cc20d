"""`hybridd tray`: a tray icon for the running daemon, through Ayatana AppIndicator (the maintained
StatusNotifierItem library GNOME's AppIndicator extension, KDE, waybar's tray and XFCE read; where no
StatusNotifierItem host runs, the library falls back to an XEmbed icon, which stalonetray or trayer show).

The icon is the status-bar class (hybridd-idle, hybridd-serving, ... in icons/); the title is the bar's text;
the menu's first lines are the tooltip `hybridd status --format waybar` shows (each model's engine, each peer's
link, running jobs, where the last request ran), then "Open dashboard", "Unload idle engines" and "Quit".

Threads: GTK runs on the main thread; a poller thread reads GET /hybridd/v1/status every --interval seconds and
hands each reading to the main loop (GLib.idle_add); the two actions that talk to something slow (a browser, the
unload POST) run on threads of their own and hand their result back the same way.

Needs PyGObject (`pip install 'hybridd[tray]'`) and the AyatanaAppIndicator3 typelib (Debian and Ubuntu:
gir1.2-ayatanaappindicator3-0.1), imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hybridd.cli.statusbar import BarView, bar_view
from hybridd.cli.unload import UNLOAD_IDLE_PATH, render_unloaded
from hybridd.cli.watch import DEFAULT_INTERVAL_S, TIMEOUT_S, fetch_status, interval_seconds
from hybridd.errors import ConfigError

HELP = "a tray icon showing where requests run, the loaded models, the peers and jobs (needs hybridd[tray])"
DESCRIPTION = ("A tray icon for the running daemon (Ayatana AppIndicator: a StatusNotifierItem, or an XEmbed icon "
               "where no StatusNotifierItem host runs). Its icon says what the node does; its menu lists each model's "
               "engine, each peer's link, running jobs and where the last request ran, and opens the dashboard or "
               "unloads idle engines.")
ICONS = Path(__file__).with_name("icons")
ITEM_ID = "hybridd"  # the StatusNotifierItem's Id, and its D-Bus path: /org/ayatana/NotificationItem/hybridd
MISSING = ("hybridd tray needs PyGObject and the Ayatana AppIndicator typelib:\n"
           "    pip install 'hybridd[tray]'\n"
           "    sudo apt-get install gir1.2-ayatanaappindicator3-0.1   (Debian, Ubuntu)\n"
           "(PyGObject builds against libgirepository1.0-dev, libcairo2-dev and pkg-config.) Import error: {error}")


def add_arguments(parser: argparse.ArgumentParser, flag: Callable[..., None]) -> None:
    """`hybridd tray`'s flags besides --url and --config (flag: main's env-aware add_argument)."""
    flag(parser, "--interval", env="HYBRIDD_INTERVAL", type=interval_seconds, default=DEFAULT_INTERVAL_S,
         metavar="SECONDS", help=f"seconds between status readings (default {DEFAULT_INTERVAL_S:g})")
    parser.add_argument("--autostart", action="store_true",
                        help="write an XDG autostart entry that starts this tray at login (with this install's "
                        "hybridd and these flags), print where, and exit")


def _exec_word(word: str) -> str:
    """One argument of a desktop entry's Exec key, quoted where the Desktop Entry spec reserves a character."""
    if word and not any(c in word for c in ' \t\n"\'\\><~|&;$*?#()`'):
        return word.replace("%", "%%")
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`").replace("$", "\\$")
    return '"' + escaped.replace("%", "%%") + '"'


def _exec_value(words: list[str]) -> str:
    """The Exec value: the quoted words, then the key file's own escape (a backslash is written twice)."""
    return " ".join(_exec_word(w) for w in words).replace("\\", "\\\\")


def autostart_entry(program: tuple[str, ...], args: argparse.Namespace) -> str:
    """The autostart entry's text: this install's hybridd, `tray`, and the flags that were given."""
    words = [*program, "tray"]
    if args.url:
        words += ["--url", str(args.url)]
    if args.config:
        words += ["--config", str(Path(args.config).expanduser().absolute())]
    if args.interval != DEFAULT_INTERVAL_S:
        words += ["--interval", f"{args.interval:g}"]
    return ("[Desktop Entry]\nType=Application\nName=hybridd tray\n"
            "Comment=Where requests run, loaded models, peers and jobs\n"
            f"Exec={_exec_value(words)}\nIcon={ICONS / 'hybridd-idle.svg'}\n"
            "Terminal=false\nX-GNOME-Autostart-enabled=true\n")


def write_autostart(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Write $XDG_CONFIG_HOME/autostart/hybridd-tray.desktop; the exit code."""
    from hybridd.cli.install_service import this_hybridd  # the same program the systemd unit runs

    folder = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "autostart"
    path = folder / "hybridd-tray.desktop"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(autostart_entry(this_hybridd(), args))
    except OSError as exc:
        print(f"hybridd tray: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}: the tray starts at your next login (delete the file to stop that)")
    return 0


def icon_name(view: BarView) -> str:
    """The icon (in icons/) for a reading: one per status-bar class."""
    return f"hybridd-{view.cls}"


def menu_lines(view: BarView) -> list[str]:
    """The menu's information lines: what the bar says, then the tooltip's lines."""
    return [view.text, *view.tooltip.splitlines()]


def idle_engines(status: dict[str, Any] | None) -> list[str]:
    """The models whose engine is loaded and serving nothing: what "Unload idle engines" would stop."""
    models = (status or {}).get("models") or []
    return [str(m.get("name")) for m in models
            if isinstance(m, dict) and m.get("loaded") and not m.get("in_flight")]


def post_unload(base_url: str) -> str:
    """POST the unload-idle route; what happened, in `hybridd unload`'s words."""
    request = urllib.request.Request(base_url + UNLOAD_IDLE_PATH, data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return render_unloaded(json.load(reply))
    except urllib.error.HTTPError as exc:
        return f"unload failed: HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"unload failed: {getattr(exc, 'reason', exc)}"


class Tray:
    """The indicator and its menu, kept in step with the daemon's status."""

    def __init__(self, gi: dict[str, Any], base_url: str, interval_s: float, why_not: str = "") -> None:
        self.gtk, self.glib, indicator = gi["Gtk"], gi["GLib"], gi["AppIndicator"]
        self.base_url, self.interval_s, self.why_not = base_url, interval_s, why_not
        self.wake = threading.Event()  # set: read the status now (after an action), and on quit
        self.stopping = False
        self.unloading = False  # an unload is on its way: the item stays greyed out until it answers
        self.indicator = indicator.Indicator.new(ITEM_ID, "hybridd-down",
                                                 indicator.IndicatorCategory.APPLICATION_STATUS)
        self.indicator.set_icon_theme_path(str(ICONS))
        self.indicator.set_title("hybridd")
        self.indicator.set_status(indicator.IndicatorStatus.ACTIVE)
        self.menu = self.gtk.Menu()
        self.info: list[Any] = []  # the insensitive information lines at the top
        self.note = self._item("", None)  # the last action's outcome, hidden until there is one
        self.menu.append(self.gtk.SeparatorMenuItem())
        self.menu.append(self._item("Open dashboard", self._open_dashboard))
        self.unload = self._item("Unload idle engines", self._unload)
        self.menu.append(self.unload)
        self.menu.append(self.gtk.SeparatorMenuItem())
        self.menu.append(self._item("Quit", lambda _item: self.quit()))
        self.menu.insert(self.note, 0)
        self.menu.show_all()
        self.note.hide()
        self.indicator.set_menu(self.menu)
        self.show(None, why_not or "reading the status")

    def _item(self, label: str, action: Callable[[Any], object] | None) -> Any:
        item = self.gtk.MenuItem(label=label)
        if action is None:
            item.set_sensitive(False)
        else:
            item.connect("activate", action)
        return item

    def show(self, status: dict[str, Any] | None, why: str) -> bool:
        """Show one reading (on the main loop; False so GLib.idle_add runs it once)."""
        view = bar_view(status, why)
        self.indicator.set_icon_full(icon_name(view), view.text)
        self.indicator.set_title(view.text)
        lines = menu_lines(view)
        if len(lines) != len(self.info):  # rebuild the lines; the same count: relabel them in place
            for item in self.info:
                self.menu.remove(item)
            self.info = [self._item(line, None) for line in lines]
            for position, item in enumerate(self.info):
                self.menu.insert(item, position)
                item.show()
        else:
            for item, line in zip(self.info, lines, strict=True):
                item.set_label(line)
        idle = idle_engines(status)
        self.unload.set_sensitive(bool(idle) and not self.unloading)
        self.unload.set_label(f"Unload idle engines ({', '.join(idle)})" if idle else "Unload idle engines")
        return False

    def tell(self, text: str) -> bool:
        """Show an action's outcome under the information lines, and read the status again at once."""
        self.note.set_label(text.replace("\n", "; "))
        self.note.show()
        self.wake.set()
        return False

    def unloaded(self, text: str) -> bool:
        """The unload answered: show what it did; the next reading decides whether the item comes back."""
        self.unloading = False
        return self.tell(text)

    def _open_dashboard(self, _item: Any) -> None:
        url = self.base_url + "/"

        def opener() -> None:  # webbrowser may wait for the browser command ($BROWSER) to exit
            opened = webbrowser.open(url)
            self.glib.idle_add(self.tell, f"opened {url}" if opened else f"no browser found: open {url}")

        threading.Thread(target=opener, name="hybridd-tray-browser", daemon=True).start()

    def _unload(self, _item: Any) -> None:
        self.unloading = True
        self.unload.set_sensitive(False)

        def unloader() -> None:
            self.glib.idle_add(self.unloaded, post_unload(self.base_url))

        threading.Thread(target=unloader, name="hybridd-tray-unload", daemon=True).start()

    def poll(self) -> None:
        """The poller thread: one status reading per interval (sooner after an action) until quit."""
        timeout_s = min(TIMEOUT_S, max(1.0, self.interval_s))
        while not self.stopping:
            status, why = fetch_status(self.base_url, timeout_s) if self.base_url else (None, self.why_not)
            if self.stopping:
                break
            self.glib.idle_add(self.show, status, why)
            if self.wake.wait(self.interval_s):  # cleared only when it was set: a wake after the timeout stays
                self.wake.clear()

    def quit(self) -> bool:
        self.stopping = True
        self.wake.set()
        self.gtk.main_quit()
        return False


def load_gi() -> dict[str, Any]:
    """Gtk 3, GLib and AyatanaAppIndicator3 (ImportError or ValueError when missing)."""
    import gi  # type: ignore[import-not-found, unused-ignore]

    gi.require_version("Gtk", "3.0")
    gi.require_version("AyatanaAppIndicator3", "0.1")
    from gi.repository import AyatanaAppIndicator3, GLib, Gtk  # type: ignore[import-not-found, unused-ignore]

    return {"Gtk": Gtk, "GLib": GLib, "AppIndicator": AyatanaAppIndicator3}


def run(args: argparse.Namespace, daemon_url: Callable[[argparse.Namespace], str]) -> int:
    """Run the tray until Quit, Ctrl-C or SIGTERM (or, with --autostart, write its autostart entry); the exit code."""
    if args.autostart:
        return write_autostart(args, os.environ)
    try:
        gi = load_gi()
    except (ImportError, ValueError) as exc:
        print(MISSING.format(error=exc), file=sys.stderr)
        return 1
    gi["GLib"].set_prgname("hybridd")  # the windows' class, and the name a tray host shows
    if not gi["Gtk"].init_check()[0]:
        print("hybridd tray: cannot open the display (is DISPLAY or WAYLAND_DISPLAY set?)", file=sys.stderr)
        return 1
    try:
        base_url, why_not = daemon_url(args), ""
    except ConfigError as exc:  # shown as "down" with the reason, as the status bar does
        base_url, why_not = "", str(exc)
    tray = Tray(gi, base_url, args.interval, why_not)
    for signum in (signal.SIGINT, signal.SIGTERM):
        gi["GLib"].unix_signal_add(gi["GLib"].PRIORITY_DEFAULT, signum, tray.quit)
    threading.Thread(target=tray.poll, name="hybridd-tray-status", daemon=True).start()
    gi["Gtk"].main()
    return 0
