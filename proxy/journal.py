"""The journal: an append-only JSON-lines file that keeps records the database could not take.

When a batch cannot be written (database locked, full, unreachable) or the record queue is full,
its rows are appended here, already redacted, one JSON object per line:
`{"exchange": {row}, "trajectory": {"id_source", "route", "shadow"}}` or `{"shadow": {row}}`.
They are replayed into the database at the next start and after the next successful write.
Replay skips exchanges the database already holds, so nothing is written twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Journal:
    """Appends and replays journal lines at `path` (created on first append)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        """Bytes waiting: the journal plus a replay file not yet done (0 when neither exists)."""
        total = 0
        for path in (self.path, self._replaying_path):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    @property
    def rejected_path(self) -> Path:
        """Where records the database refused even one by one are set aside for a person."""
        return self.path.with_name(self.path.name + ".rejected")

    @property
    def rejected_bytes(self) -> int:
        """Size of the set-aside file (0 when absent)."""
        try:
            return self.rejected_path.stat().st_size
        except FileNotFoundError:
            return 0

    @property
    def _replaying_path(self) -> Path:
        return self.path.with_name(self.path.name + ".replaying")

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Append entries (one line each) and flush them to the OS. Raises OSError when the disk
        refuses (the caller counts it as lost)."""
        if not entries:
            return
        data = "".join(json.dumps(entry, separators=(",", ":")) + "\n" for entry in entries)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())

    def pending(self) -> bool:
        """Whether there is anything to replay."""
        return self.size_bytes > 0

    def take(self) -> Path | None:
        """Move the journal aside for replay and return that file (a replay file left over from
        an interrupted replay is returned first). None when there is nothing to replay."""
        with self._lock:
            if self._replaying_path.exists():
                return self._replaying_path
            if not self.path.exists() or self.path.stat().st_size == 0:
                return None
            self.path.rename(self._replaying_path)
            return self._replaying_path

    @staticmethod
    def read(path: Path) -> Iterator[dict[str, Any]]:
        """Entries of a journal file; a torn last line (crash mid-append) is skipped."""
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    yield entry

    def reject(self, entries: list[dict[str, Any]]) -> Path:
        """Set aside entries the database refuses even one by one (`<journal>.rejected`), so
        they never block the rest; returns that file."""
        rejected = self.rejected_path
        with self._lock, rejected.open("a", encoding="utf-8") as handle:
            for entry in entries:
                handle.write(json.dumps(entry, separators=(",", ":")) + "\n")
        return rejected

    @staticmethod
    def done(path: Path) -> None:
        """The replay of `path` reached the database: remove it."""
        path.unlink(missing_ok=True)
