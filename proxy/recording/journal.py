"""The journal: an append-only JSON-lines file that keeps records the database could not take.

When a batch cannot be written (database locked, full, unreachable) or the record queue is full,
its rows are appended here, already redacted, one JSON object per line:
`{"exchange": {row}, "trajectory": {"id_source", "route", "shadow"}}` or `{"shadow": {row}}`.
They are replayed into the database at the next start and after the next successful write.
Replay skips exchanges the database already holds, so nothing is written twice.

One journal file belongs to one process: `claim()` takes the configured path, or `NAME-2.EXT`,
`NAME-3.EXT`, ... when another live process holds it (an exclusive `flock` on `<file>.lock`), so
uvicorn workers or replicas sharing a directory never write into one file (`.NAME.lock` files
stay beside the journal). At start a process
also replays the files of processes that are gone (`orphans()`: their lock is free).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

_MAX_FILES = 64  # NAME.EXT, NAME-2.EXT, ... NAME-64.EXT


def _open_private(path: Path) -> TextIO:
    """`path` opened for appending text, created readable by its owner only (0600): journaled
    records are recorded traffic."""
    return open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a", encoding="utf-8")


class Journal:
    """Appends and replays journal lines at `path` (created on first append).

    `path` is the configured name; after `claim()` it is the file this process owns.
    """

    def __init__(self, path: Path) -> None:
        self.base = path
        self.path = path
        self._lock = threading.Lock()
        self._lock_fd: int | None = None

    def _candidates(self) -> list[Path]:
        stem, suffix = self.base.name, ""
        for ending in (".jsonl", ".json", ".log"):
            if stem.endswith(ending):
                stem, suffix = stem[: -len(ending)], ending
                break
        names = [self.base.name] + [f"{stem}-{n}{suffix}" for n in range(2, _MAX_FILES + 1)]
        return [self.base.with_name(name) for name in names]

    def _try_lock(self, path: Path) -> int | None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A hidden `.NAME.lock` beside the journal; it stays (removing it could race a claim).
        fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    def claim(self) -> Path:
        """Own the first journal file no live process holds; returns it. Raises OSError when the
        directory cannot be written or all names are taken."""
        for candidate in self._candidates():
            fd = self._try_lock(candidate)
            if fd is not None:
                self.path, self._lock_fd = candidate, fd
                return candidate
        raise OSError(f"every journal name next to {self.base} is held by a live process")

    def orphans(self) -> Iterator[Journal]:
        """Journals of processes that are gone (unlocked files with something to replay), each
        locked for the caller until `release()`."""
        for candidate in self._candidates():
            if candidate == self.path:
                continue
            other = Journal(candidate)
            if (
                not other.pending()
                and not other._replaying_path.exists()
                and not WriteAhead(candidate).leftovers()
            ):
                continue
            fd = self._try_lock(candidate)
            if fd is None:
                continue
            other._lock_fd = fd
            yield other

    def release(self) -> None:
        """Give up this journal file (its lock); at shutdown, or after replaying an orphan."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

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

    def append(self, entries: Sequence[dict[str, Any] | bytes]) -> None:
        """Append entries (one line each: a dict, or a record's line as the write-ahead log
        holds it, UTF-8 JSON ending in a newline) and flush them to the OS. Raises OSError when
        the disk refuses (the caller counts it as lost)."""
        if not entries:
            return
        data = "".join(
            entry.decode()
            if isinstance(entry, bytes)
            else json.dumps(entry, separators=(",", ":")) + "\n"
            for entry in entries
        )
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _open_private(self.path) as handle:
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
        with self._lock, _open_private(rejected) as handle:
            for entry in entries:
                handle.write(json.dumps(entry, separators=(",", ":")) + "\n")
        return rejected

    @staticmethod
    def done(path: Path) -> None:
        """The replay of `path` reached the database: remove it."""
        path.unlink(missing_ok=True)


class Segment:
    """One write-ahead file: how many records were appended to it and how many are settled
    (in the database, or in the journal). Sealed and all settled: it is removed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.appended = 0
        self.settled = 0
        self.bytes = 0
        self.sealed = False
        self.torn = False  # a failed write may have left half a line: start the next one anew

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class WriteAhead:
    """The write-ahead log: every finished exchange is appended here (a plain `write` to the
    page cache, one line as in the journal) before its last byte goes to the client, so a
    SIGKILL of the proxy loses none of them; only an OS crash can lose what was written since
    the last `sync()` (the writer task calls it at most once a second). The writer settles
    records as they reach the database; the active file is sealed at `rotate_bytes` and a
    sealed file is removed once all its records are settled, so the log stays a few files of
    `rotate_bytes` (no truncation or unlink on the hot path). Files: `.<journal name>.wal-<n>` beside the journal; what a killed process left is replayed at the next
    start (`leftovers()`), skipping exchanges the database already holds.
    """

    def __init__(self, journal_path: Path, rotate_bytes: int = 4 * 1024 * 1024) -> None:
        self.journal_path = journal_path
        self.rotate_bytes = rotate_bytes
        self._active: Segment | None = None
        self._sealed: list[Segment] = []
        self._next = 1
        self._prefix = f".{journal_path.name}.wal-"  # hidden, like the journal's lock file

    def leftovers(self) -> list[Path]:
        """Write-ahead files left by an earlier process under this journal's name, oldest
        first (call before the first `append`)."""
        prefix = self._prefix
        found = []
        with contextlib.suppress(FileNotFoundError):
            for path in self.journal_path.parent.iterdir():
                suffix = path.name.removeprefix(prefix)
                if path.name.startswith(prefix) and suffix.isdigit():
                    found.append((int(suffix), path))
        return [path for _, path in sorted(found)]

    def _open(self) -> Segment:
        taken = {p.name for p in self.leftovers()}
        while f"{self._prefix}{self._next}" in taken:
            self._next += 1
        segment = Segment(self.journal_path.with_name(f"{self._prefix}{self._next}"))
        self._next += 1
        return segment

    def append(self, data: bytes) -> Segment:
        """Append one record's line (ending in a newline); returns the segment to settle it in.
        Raises OSError when the disk refuses (ENOSPC, EIO): the caller keeps the record."""
        segment = self._active
        if segment is None or segment.fd is None:
            segment = self._active = self._open()
        elif segment.bytes >= self.rotate_bytes:
            # Sealed: removed once all its records are settled (at once when they are).
            segment.sealed = True
            self._sealed.append(segment)
            if segment.settled >= segment.appended:
                self._remove(segment)
            segment = self._active = self._open()
        assert segment.fd is not None
        if segment.torn:
            data = b"\n" + data
        try:
            written = os.write(segment.fd, data)
            if written != len(data):  # the disk filled up mid-line
                raise OSError(errno.ENOSPC, "short write to the write-ahead log")
        except OSError:
            segment.torn = True
            raise
        segment.torn = False
        segment.appended += 1
        segment.bytes += len(data)
        return segment

    def probe(self) -> None:
        """Does the disk take appends again? Writes a newline (ending a torn line; replay
        skips blank lines). Raises OSError when it still refuses."""
        segment = self._active
        if segment is None or segment.fd is None:
            segment = self._active = self._open()
        assert segment.fd is not None
        if os.write(segment.fd, b"\n") != 1:
            raise OSError(errno.ENOSPC, "short write to the write-ahead log")
        segment.torn = False
        segment.bytes += 1

    def settle(self, segment: Segment) -> None:
        """One record of `segment` reached the database or the journal."""
        segment.settled += 1
        if segment.sealed and segment.settled >= segment.appended:
            self._remove(segment)

    def _remove(self, segment: Segment) -> None:
        segment.close()
        segment.path.unlink(missing_ok=True)
        self._sealed.remove(segment)

    def sync(self) -> None:
        """fsync the active file (what a SIGKILL cannot lose, an OS crash then cannot either).
        Blocking: call it from a thread."""
        segment = self._active
        if segment is not None and segment.fd is not None and segment.bytes:
            with contextlib.suppress(OSError):
                os.fsync(segment.fd)

    def close(self) -> None:
        """Close the files; remove those whose records are all settled (at a clean stop)."""
        for segment in [*self._sealed, *([self._active] if self._active else [])]:
            segment.close()
            if segment.settled >= segment.appended:
                segment.path.unlink(missing_ok=True)
        self._sealed.clear()
        self._active = None
