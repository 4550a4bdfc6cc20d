"""How much of a file a process has brought into memory, from /proc/PID/smaps: the resident pages of its mappings of
that file. llama.cpp maps its model (mmap is the default of both engines) and reads the weights through the mapping
while it loads, so this rises from 0 toward the file's size during a load, whether the pages came from disk or from
the page cache (/proc/PID/io's read_bytes counts only the first)."""

from __future__ import annotations

from pathlib import Path


def mapped_bytes(pid: int, path: Path) -> int | None:
    """Resident bytes of path's mappings in process pid; None when it has not mapped path (yet), or when the
    process cannot be read (gone, or not ours)."""
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            smaps = f.read()
    except OSError:
        return None
    name = b" " + str(path.resolve()).encode() + b"\n"
    at = smaps.find(name)
    if at == -1:
        return None
    total = 0
    while at != -1:
        # The mapping's header line ends with the path; its "Rss:" line follows within the block.
        rss = smaps.find(b"\nRss:", at)
        if rss == -1:
            break
        end = smaps.find(b"\n", rss + 1)
        fields = smaps[rss + 5:end].split()
        if fields and fields[0].isdigit():
            total += int(fields[0]) * 1024  # kB
        at = smaps.find(name, end)
    return total
