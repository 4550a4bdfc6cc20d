"""`hybridd status --watch` and `--format waybar|i3bar|oneline`: read the daemon's status (once, or every
--interval seconds until Ctrl-C) and print it for a person or a status bar.

A bar format never fails: a daemon that is down, or a config that cannot be read, prints the `down` reading and
exits 0, so the bar shows it. This path runs every few seconds, so it imports only the standard library's small
parts (http.client, json) and hybridd.cli's pure views.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import urlsplit

from hybridd.cli.statusbar import FORMATS, bar_view, i3bar_block, render
from hybridd.cli.views import render_status

STATUS_PATH = "/hybridd/v1/status"
DEFAULT_INTERVAL_S = 2.0
TIMEOUT_S = 5.0  # a bar waits no longer than this for a wedged daemon before it shows `down`
# Home, then clear from there to the end: the next frame overwrites the last without a blank flash.
REDRAW = "\x1b[H\x1b[J"


def fetch_status(base_url: str, timeout_s: float = TIMEOUT_S) -> tuple[dict[str, Any] | None, str]:
    """(the status object, "") or (None, why it could not be read)."""
    try:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            return None, f"--url must be http://HOST:PORT, not {base_url!r}"
        connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
    except ValueError as exc:
        return None, f"bad --url {base_url!r}: {exc}"
    try:
        connection.request("GET", STATUS_PATH, headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return None, f"the daemon is not running at {base_url} ({exc})"
    finally:
        connection.close()
    if response.status != 200:
        return None, f"{base_url}{STATUS_PATH} answered HTTP {response.status}"
    try:
        status = json.loads(body)
    except ValueError:
        return None, f"{base_url}{STATUS_PATH} did not answer JSON"
    if not isinstance(status, dict):
        return None, f"{base_url}{STATUS_PATH} did not answer a JSON object"
    return status, ""


def add_arguments(status: argparse.ArgumentParser, flag: Callable[..., None]) -> None:
    """The status command's --watch, --interval and --format flags (flag: main's env-aware add_argument)."""
    flag(status, "--watch", env="HYBRIDD_WATCH", action="store_true",
         help="redraw every --interval seconds until Ctrl-C (with --format: one reading per line, as bars read "
         "a running command)")
    flag(status, "--interval", env="HYBRIDD_INTERVAL", type=_interval, default=DEFAULT_INTERVAL_S, metavar="SECONDS",
         help=f"seconds between readings with --watch (default {DEFAULT_INTERVAL_S:g})")
    flag(status, "--format", env="HYBRIDD_FORMAT", choices=FORMATS,
         help="one status-bar reading: waybar (custom-module JSON), i3bar (an i3bar JSON block, as i3blocks reads "
         "with format=json; with --watch the whole i3bar protocol, for status_command), oneline (tmux, polybar); "
         "a daemon that is down prints the 'down' reading and exits 0")


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--interval: {text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--interval: must be more than 0 seconds, not {text}")
    return value


def run(args: argparse.Namespace, daemon_url: Callable[[argparse.Namespace], str], out: TextIO = sys.stdout) -> int:
    """Print the status once (a bar format) or every --interval seconds until Ctrl-C; the exit code."""
    if args.format and args.json:
        print("hybridd status: --json and --format are two different outputs; choose one", file=sys.stderr)
        return 2
    try:
        base_url, why_not = daemon_url(args), ""
    except Exception as exc:  # a config that cannot be read (ConfigError): a bar shows down and why
        base_url, why_not = "", str(exc)
    if not args.watch:
        status, why = fetch_status(base_url) if base_url else (None, why_not)
        print(render(args.format, bar_view(status, why)), file=out, flush=True)
        return 0
    timeout_s = min(TIMEOUT_S, max(1.0, args.interval))
    redraw = args.format is None and not args.json and out.isatty()
    if args.format == "i3bar":  # the i3bar protocol: a header, then an endless JSON array of status lines
        print(json.dumps({"version": 1}), "[", sep="\n", file=out, flush=True)
    first = True
    try:
        while True:
            status, why = fetch_status(base_url, timeout_s) if base_url else (None, why_not)
            print(_frame(args, status, why, first, redraw), file=out, flush=True)
            first = False
            time.sleep(args.interval)
    except KeyboardInterrupt:  # Ctrl-C is how a watch ends
        return 0


def _frame(args: argparse.Namespace, status: dict[str, Any] | None, why: str, first: bool, redraw: bool) -> str:
    """One reading as --watch prints it."""
    if args.format == "i3bar":
        return ("" if first else ",") + json.dumps([i3bar_block(bar_view(status, why))], ensure_ascii=False)
    if args.format:
        return render(args.format, bar_view(status, why))
    if args.json:
        return json.dumps(status if status is not None else {"error": why})
    text = render_status(status) if status is not None else f"hybridd: {why}; trying again every {args.interval:g} s"
    stamp = time.strftime("%H:%M:%S")
    text = f"{text}\n\n{stamp} · every {args.interval:g} s · Ctrl-C to stop"
    return REDRAW + text if redraw else ("" if first else "\n") + text
