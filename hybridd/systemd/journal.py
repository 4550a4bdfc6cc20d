"""Log lines that read well in the journal: no timestamp of our own (journald stamps each line) and a syslog
priority prefix (`<4>`), so `journalctl -p warning` and its colours work. Only when stderr really is the journal's
stream (systemd.exec(5), $JOURNAL_STREAM): a redirected stderr keeps its timestamps."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TextIO

# sd-daemon(3) priorities (crit, err, warning, info), from the highest logging level; below INFO is debug (7)
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"


def stream_is_journal(env: Mapping[str, str], stream: TextIO) -> bool:
    """Whether stream is the journal stream systemd connected ($JOURNAL_STREAM is "device:inode" of that stream)."""
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    if not inode:
        return False
    try:
        stat = os.fstat(stream.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):
        return False


class JournalFormatter(logging.Formatter):
    """JOURNAL_FORMAT with the record's priority in front, which journald reads and strips."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in _PRIORITY if record.levelno >= level), 7)
        return f"<{priority}>{super().format(record)}"


def log_formatter(env: Mapping[str, str], stream: TextIO) -> logging.Formatter:
    """The formatter for logs written to stream: the journal's when it is the journal stream, else timestamped."""
    return JournalFormatter() if stream_is_journal(env, stream) else logging.Formatter(PLAIN_FORMAT)
