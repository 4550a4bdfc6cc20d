"""`hybridd status --watch` and `--format waybar|i3bar|oneline`: read the daemon's status (once, or every
--interval seconds until Ctrl-C) and print it for a person or a status bar.

A bar format never fails: a daemon that is down, or a config that cannot be read, prints the `down` reading and
exits 0, so the bar shows it. A bar runs `hybridd status --format ...` every few seconds, so the console script
sends it here (`bar_main`) before the full CLI is imported: this path loads the standard library's small parts
(argparse, socket, json), hybridd.cli's pure views, and hybridd.config only to find the daemon without --url.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from hybridd.cli.statusbar import FORMATS, bar_view, i3bar_block, render
from hybridd.cli.views import render_status
from hybridd.errors import ConfigError

STATUS_PATH = "/hybridd/v1/status"
DEFAULT_INTERVAL_S = 2.0
TIMEOUT_S = 5.0  # a bar waits no longer than this for a wedged daemon before it shows `down`
# Home, then clear from there to the end: the next frame overwrites the last without a blank flash.
REDRAW = "\x1b[H\x1b[J"


def fetch_status(base_url: str, timeout_s: float = TIMEOUT_S) -> tuple[dict[str, Any] | None, str]:
    """(the status object, "") or (None, why it could not be read)."""
    try:
        parts = urlsplit(base_url)
        host, port = parts.hostname, parts.port or 80
    except ValueError as exc:
        return None, f"bad --url {base_url!r}: {exc}"
    if parts.scheme != "http" or not host:
        return None, f"--url must be http://HOST:PORT, not {base_url!r}"
    try:
        reply = _get(host, port, STATUS_PATH, timeout_s)
    except OSError as exc:
        return None, f"the daemon is not running at {base_url} ({exc.strerror or exc})"
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if status_line.split(" ")[1:2] != ["200"]:
        return None, f"{base_url}{STATUS_PATH} answered {status_line or 'nothing'!r}"
    try:
        status = json.loads(body)
    except ValueError:
        return None, f"{base_url}{STATUS_PATH} did not answer JSON"
    if not isinstance(status, dict):
        return None, f"{base_url}{STATUS_PATH} did not answer a JSON object"
    return status, ""


def _get(host: str, port: int, path: str, timeout_s: float) -> bytes:
    """One HTTP/1.0 GET, the whole reply (the server closes after it). By hand, not http.client: that imports ssl
    and the email package, more than the rest of a bar reading together."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        name = f"[{host}]" if ":" in host else host
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {name}:{port}\r\nAccept: application/json\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def add_arguments(status: argparse.ArgumentParser, flag: Callable[..., None]) -> None:
    """The status command's --watch, --interval and --format flags (flag: main's env-aware add_argument)."""
    flag(status, "--watch", env="HYBRIDD_WATCH", action="store_true",
         help="redraw every --interval seconds until Ctrl-C (with --format: one reading per line, as bars read "
         "a running command)")
    flag(status, "--interval", env="HYBRIDD_INTERVAL", type=interval_seconds, default=DEFAULT_INTERVAL_S,
         metavar="SECONDS",
         help=f"seconds between readings with --watch (default {DEFAULT_INTERVAL_S:g})")
    flag(status, "--format", env="HYBRIDD_FORMAT", choices=FORMATS,
         help="one status-bar reading: waybar (custom-module JSON), i3bar (an i3bar JSON block, as i3blocks reads "
         "with format=json; with --watch the whole i3bar protocol, for status_command), oneline (tmux, polybar); "
         "a daemon that is down prints the 'down' reading and exits 0")


def is_bar_reading(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> bool:
    """True for `hybridd status` with a bar format (--format or HYBRIDD_FORMAT) and no --help: bar_main answers it."""
    if not argv or argv[0] != "status" or any(a in ("-h", "--help") for a in argv):
        return False
    return bool(environ.get("HYBRIDD_FORMAT")) or any(a == "--format" or a.startswith("--format=") for a in argv)


def bar_parser() -> argparse.ArgumentParser:
    """`hybridd status`'s flags, for the bar path (the full CLI's status parser has the same ones)."""
    parser = argparse.ArgumentParser(prog="hybridd status")
    _flag(parser, "--url", env="HYBRIDD_URL", help="the daemon's URL (default: from the config's server.listen)")
    _flag(parser, "--config", env="HYBRIDD_CONFIG", metavar="PATH", help="config file")
    _flag(parser, "--json", env="HYBRIDD_JSON", action="store_true", help="print the status object as JSON")
    add_arguments(parser, _flag)
    return parser


def bar_main(argv: Sequence[str]) -> int:
    """`hybridd status --format ...` without the rest of the CLI: argv starts with "status"."""
    try:
        return run(bar_parser().parse_args(argv[1:]), daemon_url)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the bar closed its end (waybar reloading)
        return 0


def daemon_url(args: argparse.Namespace) -> str:
    """--url, else the loopback address of the config's server.listen (ConfigError if the config is bad)."""
    if args.url:
        return str(args.url).rstrip("/")
    from hybridd.config import Config, config_path, is_loopback_host, load_config  # only without --url

    if args.config:
        config = load_config(Path(args.config))
    else:
        path = config_path()
        config = load_config(path) if path.exists() else Config()
    host = config.server.host
    if host in ("0.0.0.0", "::") or (not is_loopback_host(host) and config.server.allow_non_loopback):
        host = "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.server.port}"


def _flag(parser: argparse.ArgumentParser, *names: str, env: str, **kwargs: Any) -> None:
    """Add a flag whose default comes from the environment variable env (as the full CLI's flags do)."""
    value = os.environ.get(env)
    if kwargs.get("action") == "store_true":
        kwargs["default"] = value is not None and value.strip().lower() in ("1", "true", "yes", "on")
    elif value is not None:
        kwargs["default"] = value
    kwargs["help"] = f"{kwargs.get('help', '')} [env {env}]".strip()
    parser.add_argument(*names, **kwargs)


def interval_seconds(text: str) -> float:
    """An --interval value: a positive number of seconds (argparse shows the error)."""
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
    except ConfigError as exc:  # a config that cannot be read: a bar shows down and why
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
