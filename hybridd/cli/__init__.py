"""The `hybridd` command: its subcommands (main.py) and how their results read on a terminal (views.py)."""

from __future__ import annotations

import sys

from hybridd.cli import watch


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. A status bar runs `hybridd status --format ...` every few seconds, so
    that one is answered before the full CLI (every subcommand's imports) is loaded."""
    args = sys.argv[1:] if argv is None else argv
    if watch.is_bar_reading(args):
        return watch.bar_main(args)
    from hybridd.cli.main import main as cli_main  # loads every subcommand's module

    return cli_main(argv)


__all__ = ["main"]
