"""The `hybridd` command: its subcommands (main.py) and how their results read on a terminal (views.py)."""

from hybridd.cli.main import main

__all__ = ["main"]
