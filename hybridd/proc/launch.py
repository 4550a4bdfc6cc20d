"""Exec an engine so that it dies with the daemon: `python -m hybridd.proc.launch PARENT_PID -- ARGV...`.

The kernel sends SIGKILL to the engine when the daemon dies, even by SIGKILL (PR_SET_PDEATHSIG survives exec).
Doing this in a tiny exec wrapper, not a preexec_fn, keeps fork safe in a daemon that has threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    """Arm the parent-death signal, check the parent is still there, then exec the engine."""
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: python -m hybridd.proc.launch PARENT_PID -- ARGV...\n")
        raise SystemExit(2)
    parent = int(argv[0])
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The daemon may have died between fork and prctl; then nobody would ever reap us.
    if os.getppid() != parent:
        raise SystemExit(1)
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
