"""Read GGUF headers (metadata + tensor infos) without touching the weight data.

Parsed by hand with `struct` over an mmap rather than with `gguf.GGUFReader`, which builds a numpy view
per tensor and per token string and takes seconds on a real model; here only the header pages are read.
Long string arrays (the tokenizer's tokens and merges) are skipped and kept as their length.
Split models (`name-00001-of-00003.gguf`) are read shard by shard and merged.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from itertools import repeat
from pathlib import Path
from typing import Any

from hybridd.errors import GgufFormatError
from hybridd.model.ggml_types import BY_ID
from hybridd.model.header import GgufHeader, OmittedArray, TensorInfo

GGUF_MAGIC = b"GGUF"
# Arrays of strings longer than this are kept as OmittedArray(length) (tokenizer lists).
MAX_KEPT_STRINGS = 256

_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# GGUF value types -> (struct code, size); 8 = string, 9 = array.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
    6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Cursor:
    """Little-endian reads from a buffer; raises GgufFormatError instead of struct.error at the end."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: Any, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def u32(self) -> int:
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def u64(self) -> int:
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(value)

    def string(self) -> str:
        n = self.u64()
        end = self.pos + n
        if end > len(self.buf):
            raise GgufFormatError("string runs past the end of the file")
        raw = bytes(self.buf[self.pos : end])
        self.pos = end
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        # Hot loop for tokenizer arrays (150k+ strings): locals only, no decoding.
        unpack = _U64.unpack_from
        buf = self.buf
        pos = self.pos
        for _ in repeat(None, count):
            (n,) = unpack(buf, pos)
            pos += 8 + n
        if pos > len(buf):
            raise GgufFormatError("string array runs past the end of the file")
        self.pos = pos

    def value(self, vtype: int) -> Any:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            return self.array()
        try:
            code, size = _SCALARS[vtype]
        except KeyError:
            raise GgufFormatError(f"unknown GGUF value type {vtype}") from None
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return value

    def array(self) -> Any:
        etype = self.u32()
        count = self.u64()
        if etype == 8:
            if count > MAX_KEPT_STRINGS:
                self.skip_strings(count)
                return OmittedArray("str", count)
            return [self.string() for _ in range(count)]
        if etype == 9:
            return [self.array() for _ in range(count)]
        try:
            code, size = _SCALARS[etype]
        except KeyError:
            raise GgufFormatError(f"unknown GGUF array element type {etype}") from None
        values = list(struct.unpack_from(f"<{count}{code}", self.buf, self.pos))
        self.pos += size * count
        return values


def _parse(buf: Any) -> tuple[dict[str, Any], list[TensorInfo]]:
    cur = _Cursor(buf)
    if bytes(buf[0:4]) != GGUF_MAGIC:
        raise GgufFormatError("not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.u32()
    if version not in (2, 3):
        raise GgufFormatError(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.u64()
    n_kv = cur.u64()
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.u32())
    tensors: list[TensorInfo] = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.u32()
        shape = struct.unpack_from(f"<{n_dims}Q", buf, cur.pos)
        cur.pos += 8 * n_dims
        type_id = cur.u32()
        cur.pos += 8  # data offset: we never read the data
        try:
            gtype = BY_ID[type_id]
        except KeyError:
            raise GgufFormatError(f"tensor {name!r} has unknown ggml type {type_id}") from None
        tensors.append(TensorInfo(name, tuple(int(d) for d in shape), gtype))
    return metadata, tensors


def _read_one(path: Path) -> tuple[dict[str, Any], list[TensorInfo], int]:
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise GgufFormatError(f"{path}: too short to be a GGUF file ({size} bytes)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                try:
                    metadata, tensors = _parse(mm)
                except struct.error as exc:
                    raise GgufFormatError(f"{path}: truncated GGUF header") from exc
    except GgufFormatError as exc:
        if str(path) in str(exc):
            raise
        raise GgufFormatError(f"{path}: {exc}") from exc
    return metadata, tensors, size


def split_paths(path: str | os.PathLike[str]) -> tuple[Path, ...]:
    """All shard paths of a split model given any one shard; a single-file model gives itself."""
    p = Path(path)
    m = _SPLIT_RE.match(p.name)
    if not m:
        return (p,)
    count = int(m.group("count"))
    return tuple(p.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1))


def read_gguf_header(path: str | os.PathLike[str]) -> GgufHeader:
    """Metadata of the first shard plus the tensor infos of every shard; raises GgufFormatError, OSError."""
    paths = split_paths(path)
    metadata: dict[str, Any] = {}
    tensors: list[TensorInfo] = []
    total = 0
    for i, shard in enumerate(paths):
        if not shard.exists():
            raise GgufFormatError(f"{shard}: shard {i + 1} of {len(paths)} is missing")
        shard_meta, shard_tensors, size = _read_one(shard)
        if i == 0:
            metadata = shard_meta
        tensors.extend(shard_tensors)
        total += size
    return GgufHeader(metadata=metadata, tensors=tuple(tensors), file_bytes=total,
                      paths=tuple(str(p) for p in paths))

