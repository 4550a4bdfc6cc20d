"""Uploaded files: their records in SQLite (`state_dir/jobs.db`), their bytes under `state_dir/files/`.

Content is stored once per sha256 (`files/<sha256>`), however many file objects name it, and removed when the last
one is deleted. An upload is written to a temporary file beside it, synced, then renamed into place, so a crash
leaves either the whole content or none; whatever a crash strands (a temporary file, content no record names) is
swept when the store opens.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hybridd.errors import FileNotFound

DB_FILE = "jobs.db"
FILES_DIR = "files"
_PARTIAL = ".upload-"  # the prefix of an upload still being written

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_sha256 ON files (sha256);
"""


@dataclass(frozen=True)
class StoredFile:
    """One file object: what a client uploaded, under its own id; `sha256` names its content on disk."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    sha256: str

    def as_json(self) -> dict[str, Any]:
        """The OpenAI file object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "status_details": None}


class Upload:
    """An upload being written: a temporary file in the store's folder, hashed and counted as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._file: BinaryIO = path.open("xb")

    def write(self, chunk: bytes) -> None:
        """Append chunk (blocking: call it off the event loop)."""
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def seal(self) -> str:
        """Flush and sync the bytes to disk; the content's sha256 (blocking)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def lines(self, max_line: int) -> Iterator[bytes]:
        """The written bytes line by line, none read past `max_line + 1` bytes (blocking)."""
        with self.path.open("rb") as file:
            yield from iter(lambda: file.readline(max_line + 1), b"")

    def discard(self) -> None:
        """Drop the temporary file."""
        self._file.close()
        self.path.unlink(missing_ok=True)


class FileStore:
    """File objects and their content under one state folder. Not thread-safe: use it from one thread."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / FILES_DIR
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = sqlite3.connect(state_dir / DB_FILE, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._sweep()

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def start_upload(self) -> Upload:
        """A new temporary file to write an upload into."""
        return Upload(self.folder / f"{_PARTIAL}{secrets.token_hex(8)}")

    def add(self, upload: Upload, sha256: str, filename: str, purpose: str, now: float) -> StoredFile:
        """Keep a sealed upload as a new file object (its content shared with any other of the same sha256)."""
        os.replace(upload.path, self.content_path(sha256))
        stored = StoredFile(id=f"file-{secrets.token_hex(12)}", bytes=upload.size, created_at=int(now),
                            filename=filename, purpose=purpose, sha256=sha256)
        self._db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                         (stored.id, stored.bytes, stored.created_at, stored.filename, stored.purpose, sha256))
        return stored

    def get(self, file_id: str) -> StoredFile:
        """The file object with this id; FileNotFound when there is none."""
        row = self._db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise FileNotFound(f"no file {file_id[:100]!r} here")
        return StoredFile(*row)

    def by_sha256(self, sha256: str, purpose: str = "fine-tune") -> StoredFile | None:
        """A file object of `purpose` holding this content, if any."""
        row = self._db.execute("SELECT * FROM files WHERE sha256 = ? AND purpose = ? ORDER BY rowid LIMIT 1",
                               (sha256, purpose)).fetchone()
        return StoredFile(*row) if row is not None else None

    def list_files(self, purpose: str | None = None, *, newest_first: bool = True, after: str | None = None,
             limit: int | None = None) -> list[StoredFile]:
        """File objects by creation order (ties by rowid), optionally of one purpose and after one id."""
        order = "DESC" if newest_first else "ASC"
        where, args = ["1"], []
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        if after is not None:
            mark = self._db.execute("SELECT created_at, rowid FROM files WHERE id = ?", (after,)).fetchone()
            if mark is None:
                raise FileNotFound(f"no file {after[:100]!r} here (the list's 'after')")
            where.append(f"(created_at, rowid) {'<' if newest_first else '>'} (?, ?)")
            args += list(mark)
        query = f"SELECT * FROM files WHERE {' AND '.join(where)} ORDER BY created_at {order}, rowid {order}"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        return [StoredFile(*row) for row in self._db.execute(query, args)]

    def content_path(self, sha256: str) -> Path:
        """Where the content with this sha256 lives."""
        return self.folder / sha256

    def delete(self, file_id: str) -> StoredFile:
        """Remove the file object; its content goes too when no other file object names it."""
        stored = self.get(file_id)
        self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        if not self._db.execute("SELECT 1 FROM files WHERE sha256 = ?", (stored.sha256,)).fetchone():
            self.content_path(stored.sha256).unlink(missing_ok=True)
        return stored

    def _sweep(self) -> None:
        """Remove what a crash stranded: partial uploads, and content no file object names."""
        named = {row[0] for row in self._db.execute("SELECT DISTINCT sha256 FROM files")}
        for path in self.folder.iterdir():
            if path.is_file() and (path.name.startswith(_PARTIAL) or path.name not in named):
                path.unlink(missing_ok=True)
