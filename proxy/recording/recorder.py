"""Recording: exchanges go through an in-memory queue to one writer task that writes them in batches.

The request path only builds an `ExchangeRecord` and calls `Recorder.submit()` (never blocks,
never raises). The writer turns records into rows (JSON encoding, usage extraction) and writes a
batch every `flush_interval` or `batch_size` records, whichever comes first (on a SQLite file,
in a process of its own: `proxy.recording.writer`). `stop()` drains the queue,
so a clean shutdown loses nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from proxy.core.fastjson import loads
from proxy.core.redaction import Redactor, loggable_error
from proxy.recording.journal import Journal, Segment, WriteAhead
from proxy.recording.writer import (
    WriteFailed,
    WriterGone,
    WriterProcess,
    can_write_in_a_process,
)
from proxy.storage import Database
from proxy.storage.recovery import existing_exchange_ids, ping
from proxy.storage.rows import batch_rows, exchange_row, trajectory_meta, trajectory_rows

log = logging.getLogger("understudy.recorder")

_CONTROL_HEADER_PREFIX = "x-understudy-"


@dataclass
class ExchangeRecord:
    """One proxied request and its answer, as the request path saw it.

    request_text: the request body as the client sent it (UTF-8). response: the answer as a
    `chat.completion` dict (assembled for streams); response_text: the upstream body as received,
    stored verbatim when present. error_text: the error body (upstream's or the proxy's own).
    Times: started_utc (ISO-8601), duration_ms and ttft_ms in milliseconds.
    """

    id: str
    trajectory_id: str
    parent_id: str | None
    step: int
    new_trajectory: bool
    id_source: str
    route: str
    shadow: bool
    started_utc: str
    path: str
    stream: bool
    request: dict[str, Any]
    request_text: str
    request_hash: str
    control_headers: dict[str, str] = field(default_factory=dict)
    status_code: int | None = None
    outcome: str = "ok"
    response: dict[str, Any] | None = None
    response_text: str | None = None
    error_text: str | None = None
    state_hash: str | None = None
    duration_ms: float | None = None
    ttft_ms: float | None = None
    upstream_request_id: str | None = None
    injected_logit_bias: dict[str, int | float] | None = None
    queued_at: float = 0.0  # time.monotonic() when submitted to the recorder

    kind: str = "chat"  # 'chat' (Chat Completions) or 'responses' (Responses API)

    def to_row(self) -> dict[str, Any]:
        """The `exchanges` row for this record (runs in the writer, off the request path)."""
        return exchange_row(self)


def control_headers(headers: Any) -> dict[str, str]:
    """The `X-Understudy-*` request headers (names lower-cased): the only headers ever stored."""
    return {
        k.lower(): v for k, v in headers.items() if k.lower().startswith(_CONTROL_HEADER_PREFIX)
    }


@dataclass
class ShadowUpdate:
    """A teacher's shadow answer for an exchange submitted earlier (JSON texts, duration in ms)."""

    exchange_id: str
    model: str
    response_json: str | None
    error_json: str | None
    duration_ms: float
    queued_at: float = 0.0

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.exchange_id,
            "shadow_model": self.model,
            "shadow_response_json": self.response_json,
            "shadow_error_json": self.error_json,
            "shadow_duration_ms": self.duration_ms,
        }


_REDACTED_JSON_COLUMNS = (  # besides request_json (`Redactor.document_json`)
    "response_json",
    "error_json",
    "request_headers_json",
    "metadata_json",
)
# Client- or upstream-controlled texts: a key pasted as a model name or user id is masked too.
_REDACTED_TEXT_COLUMNS = (
    "end_user",
    "model_requested",
    "model_answered",
    "finish_reason",
    "upstream_request_id",
)
_REDACTED_SHADOW_COLUMNS = ("shadow_response_json", "shadow_error_json")


# The write-ahead log is fsynced at most this often (what an OS crash, not a SIGKILL, can lose).
_WAL_SYNC_INTERVAL_S = 1.0


@dataclass
class _Pending:
    """A record made ready for storage on submit: its journal line (redacted rows) as the bytes
    the write-ahead log holds (`size` is theirs), and the write-ahead segment holding it (None
    when that append failed)."""

    # The journal line as a dict: kept only while batches are written on the event loop (with a
    # writer process, a queued record is its bytes alone: one object the collector never scans).
    line: dict[str, Any] | None
    data: bytes  # the line as written to the write-ahead log: what the writer process is sent
    queued_at: float
    segment: Segment | None = None

    @property
    def size(self) -> int:
        return len(self.data)


def _entry(pending: _Pending) -> dict[str, Any]:
    """A queued record's journal line as a dict (parsed from its bytes when only those were kept:
    its writer process went away)."""
    if pending.line is not None:
        return pending.line
    entry: dict[str, Any] = loads(pending.data)
    return entry


def _line_bytes(line: dict[str, Any]) -> bytes:
    """The journal / write-ahead line of a record: compact JSON (UTF-8) and a newline.

    orjson on the request path (several times cheaper than `json.dumps`); what it refuses (a lone
    surrogate, an integer beyond 64 bits) is written by the standard library instead. Both read
    back with `json.loads` to the same values."""
    try:
        return orjson.dumps(line) + b"\n"
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return (json.dumps(line, separators=(",", ":")) + "\n").encode()


def is_transient(exc: BaseException) -> bool:
    """Whether a failed write says nothing about the records themselves: the database or disk
    is unavailable, locked or full (SQLAlchemy OperationalError / InterfaceError, OSError such
    as ENOSPC or EIO, DatabaseError for a removed file). Such records are kept and retried,
    never set aside as refused; only other errors (a constraint, bad data) mark a bad record."""
    from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

    from proxy.storage import DatabaseError

    if isinstance(exc, OperationalError | InterfaceError | DisconnectionError | OSError):
        return True
    if isinstance(exc, WriteFailed):  # judged in the writer process, where it was raised
        return exc.transient
    if isinstance(exc, DatabaseError) and not hasattr(exc, "orig"):
        return True  # our own: the SQLite file was removed or replaced
    orig = getattr(exc, "orig", None)
    name = type(orig).__name__ if orig is not None else ""
    return name in {"DiskFullError", "InsufficientResourcesError", "OutOfMemoryError"} or (
        "disk" in str(orig).lower() and "full" in str(orig).lower()
    )


class Recorder:
    """Queue plus single writer task, with redaction, a write-ahead log, the journal and a
    bounded memory buffer as the fallbacks.

    `submit()` (on the request path) redacts the record, appends its line to the write-ahead
    log (`WriteAhead`: a plain write, so a SIGKILL loses nothing submitted) and queues it. The
    writer writes batches to the database and settles them in the log. When the database
    refuses a batch, it goes to the journal (fsynced) and is replayed as soon as a write
    succeeds again (the writer retries every `retry_interval_s` even without traffic) and at
    stop. When the journal refuses too (disk full), records are held in memory, up to
    `buffer_bytes`, and retried; meanwhile `impaired` is true (`/ready` answers 503). Only
    what exceeds the buffer is lost (counted). Counters in `stats`: submitted, written,
    failed_batches, journaled, spilled (queue full), replayed, rejected, held, lost,
    wal_failed, writer_promoted (a background writer process fell behind: see `_promote_writer`).
    """

    def __init__(
        self,
        db: Database,
        *,
        journal: Journal,
        redactor: Redactor | None = None,
        flush_interval_s: float = 0.05,
        batch_size: int = 500,
        queue_size: int = 100_000,
        buffer_bytes: int = 256 * 1024 * 1024,
        retry_interval_s: float = 1.0,
        write_ahead: bool = True,
        writer: Literal["process", "loop"] = "process",
        writer_lag_records: int | None = None,
    ) -> None:
        self._db = db
        self._writer_kind = writer
        self._writer: WriterProcess | None = None
        # Records queued behind a background writer process that mean it is starved of CPU.
        self._writer_lag = writer_lag_records or max(4 * batch_size, 1000)
        self.journal = journal
        self._redact = redactor or Redactor()
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._idle = True
        # Batches the database itself refused (a lost writer process is not one): at shutdown,
        # one refusal journals the rest at once instead of trying every batch in turn.
        self._refused_batches = 0
        self._buffer_limit = buffer_bytes
        self._held: collections.deque[_Pending] = collections.deque()
        self._held_bytes = 0  # of the records in `_held`
        self._retrying_bytes = 0  # of held records taken out for a write that has not returned
        self._retry_interval_s = retry_interval_s
        self._wal_enabled = write_ahead
        self.wal: WriteAhead | None = None
        self._wal_failing = False
        self._replay_failing = False
        self._next_sync = 0.0  # time.monotonic() of the next fsync of the write-ahead log
        self.stats: Counter[str] = Counter()

    @property
    def held_bytes(self) -> int:
        """Bytes of records only memory holds (neither database nor journal took them),
        including those a retry is writing right now."""
        return self._held_bytes + self._retrying_bytes

    @property
    def writer(self) -> Literal["process", "loop"]:
        """Where batches are written now: by the writer process, or on the event loop (asked
        for, a PostgreSQL database, or the process could not start or ended)."""
        return "process" if self._writer is not None else "loop"

    @property
    def writer_pid(self) -> int | None:
        """The writer process's id; None while batches are written on the event loop."""
        return self._writer.pid if self._writer is not None else None

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def impaired(self) -> str | None:
        """Why recording is impaired right now (one line), or None: records held in memory
        because neither the database nor the journal takes them, or the write-ahead log
        refusing appends (what a crash would then lose)."""
        if self._held:
            return (
                f"{len(self._held)} records ({self.held_bytes} bytes) held in memory: "
                "neither the database nor the journal takes them (disk full?)"
            )
        if self._wal_failing:
            return "the write-ahead log refuses appends (disk full?): a crash would lose records"
        return None

    def submit(self, record: ExchangeRecord | ShadowUpdate) -> None:
        """Redact the record, append it to the write-ahead log and queue it for writing.
        Never blocks or raises; when the queue is full the record goes to the journal."""
        self.stats["submitted"] += 1
        record.queued_at = time.monotonic()
        try:
            line = self._line(record)
            data = _line_bytes(line)
        except Exception:  # never let recording break a call
            self.stats["lost"] += 1
            log.exception("could not prepare a record for storage; it is lost")
            return
        pending = _Pending(line if self._writer is None else None, data, time.monotonic())
        if self.wal is not None:
            try:
                pending.segment = self.wal.append(data)
                self._wal_failing = False
            except OSError as exc:
                self.stats["wal_failed"] += 1
                if not self._wal_failing:
                    log.warning("write-ahead log refused a record (%s)", loggable_error(exc))
                self._wal_failing = True
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            self.stats["spilled"] += 1
            self._fall_back([pending])

    def _line(self, item: ExchangeRecord | ShadowUpdate) -> dict[str, Any]:
        """The journal line of a record: redacted exchange row and trajectory meta, or a
        redacted shadow row."""
        row = item.to_row()
        if isinstance(item, ExchangeRecord):
            row["request_json"] = self._redact.document_json(row["request_json"], item.request)
            for column in _REDACTED_JSON_COLUMNS:
                row[column] = self._redact.json_text(row[column])
            for column in _REDACTED_TEXT_COLUMNS:
                row[column] = self._redact(row[column])
            return {"exchange": row, "trajectory": trajectory_meta(item)}
        for column in _REDACTED_SHADOW_COLUMNS:
            row[column] = self._redact.json_text(row[column])
        return {"shadow": row}

    def _settle(self, batch: list[_Pending]) -> None:
        if self.wal is None:
            return
        for pending in batch:
            if pending.segment is not None:
                self.wal.settle(pending.segment)
                pending.segment = None

    def _fall_back(self, batch: list[_Pending]) -> None:
        """The database did not take `batch`: append it to the journal (fsynced), else hold it
        in memory up to the buffer limit; what exceeds it is lost (counted and logged)."""
        try:
            self.journal.append([p.data for p in batch])
        except OSError as exc:
            kept = 0
            for pending in batch:
                if self._held_bytes + pending.size > self._buffer_limit:
                    break
                self._held.append(pending)
                self._held_bytes += pending.size
                kept += 1
            self.stats["held"] += kept
            if kept < len(batch):
                lost = batch[kept:]
                self.stats["lost"] += len(lost)
                self._settle(lost)  # nothing to replay them from but the log itself
                log.error(
                    "journal %s refused %d records (%s) and the memory buffer is full: %d are lost",
                    self.journal.path,
                    len(batch),
                    loggable_error(exc),
                    len(lost),
                )
            return
        self.stats["journaled"] += len(batch)
        self._settle(batch)
        if self._held:  # the journal takes appends again: what memory holds goes there too
            held = list(self._held)
            self._held.clear()
            self._held_bytes = 0
            self._fall_back(held)

    async def start(self) -> None:
        """Own a journal file, replay what earlier runs left (this file's, its write-ahead
        files, and those of processes that are gone), then start the writer task. With
        `writer="process"` (the default) and a SQLite file, batches are written by a process of
        their own (`proxy.recording.writer`); should it not start, and with `writer="loop"`,
        through `db` itself, on the event loop."""
        if self._writer_kind == "process" and can_write_in_a_process(self._db):
            writer = WriterProcess()
            try:
                await writer.open(self._db)
                self._writer = writer
            except Exception as exc:
                log.warning(
                    "writing on the event loop: no writer process (%s)", loggable_error(exc)
                )
        try:
            self.journal.claim()
        except OSError:
            log.exception("cannot claim a journal file next to %s", self.journal.base)
        await self.replay()
        wal = WriteAhead(self.journal.path)
        for leftover in wal.leftovers():
            await self.replay_file(leftover)
        for orphan in self.journal.orphans():
            try:
                await self.replay(orphan)
                for leftover in WriteAhead(orphan.path).leftovers():
                    await self.replay_file(leftover)
            finally:
                orphan.release()
        if self._wal_enabled:
            self.wal = wal
        self._task = asyncio.create_task(self._run(), name="understudy-recorder")

    async def stop(self) -> None:
        """Write everything queued and held, replay the journal if the database takes writes,
        then end the writer task (a batch being written completes)."""
        self._stopping = True
        self._stop_event.set()
        refused_before = self._refused_batches
        if self._task is not None:
            if self._idle:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            if self._refused_batches > refused_before:
                # The database refused during shutdown: journal the rest at once, so a large
                # queue never outlasts the orchestrator's grace period.
                self._fall_back(self._take(self._queue.qsize()))
            else:
                await self._write(self._take(self._batch_size))
        if self._held:
            await self._retry_held()
        if self._refused_batches == refused_before and self.journal.pending():
            await self.replay()
        if self._held:
            self.stats["lost"] += len(self._held)
            log.error(
                "shutdown: %d records held in memory could not be stored (disk full?); "
                "those in the write-ahead log are replayed at the next start",
                len(self._held),
            )
        if self.wal is not None:
            self.wal.close()
        self.journal.release()
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await writer.close()

    async def _store(
        self,
        exchange_rows: list[dict[str, Any]],
        trajectory_rows: list[dict[str, Any]],
        shadow_rows: list[dict[str, Any]] | None = None,
        *,
        lines: list[bytes] | None = None,
    ) -> None:
        """`Database.write_exchanges`, in the writer process when there is one (sent the
        records' journal `lines` when given: the same rows, already encoded). Should that
        process be gone, this batch fails (`WriterGone`, transient: it is journaled and
        replayed) and later ones are written on the event loop."""
        if self._writer is not None:
            try:
                if lines is not None:
                    await self._writer.write_lines(lines)
                else:
                    await self._writer.write(exchange_rows, trajectory_rows, shadow_rows or ())
                return
            except WriterGone as exc:
                log.warning("writing on the event loop from now on: %s", exc)
                writer, self._writer = self._writer, None
                await writer.close()
                raise
        await self._db.write_exchanges(exchange_rows, trajectory_rows, shadow_rows or ())

    def _take(self, limit: int) -> list[_Pending]:
        batch: list[_Pending] = []
        while len(batch) < limit and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _run(self) -> None:
        while not self._stopping:
            self._idle = True
            try:
                if self._held or self._wal_failing or self.journal.pending():
                    first = await asyncio.wait_for(self._queue.get(), self._retry_interval_s)
                else:
                    first = await self._queue.get()
            except TimeoutError:
                self._idle = False
                await self._recover()
                continue
            self._idle = False
            # Write at most one flush interval after the oldest record arrived; a batch that
            # took long to write leaves less (or no) waiting for the next one.
            wait = self._flush_interval_s - (time.monotonic() - first.queued_at)
            if wait > 0 and self._queue.qsize() < self._batch_size - 1:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), wait)
            if (
                self._writer is not None
                and self._writer.background
                and self._queue.qsize() + 1 >= self._writer_lag
            ):
                await self._promote_writer()
            batch = [first, *self._take(self._batch_size - 1)]
            if self.wal is not None and time.monotonic() >= self._next_sync:
                self._next_sync = time.monotonic() + _WAL_SYNC_INTERVAL_S
                await asyncio.to_thread(self.wal.sync)  # batched fsync, off the event loop
            await self._write(batch)

    async def _promote_writer(self) -> None:
        """The background writer process fell behind (every core busy with work that outranks
        it): write through a new one at normal priority from now on; the old one finishes what
        it was sent and exits. Should the new one not start, the old one goes on."""
        assert self._writer is not None
        queued = self._queue.qsize() + 1
        self._writer_lag = sys.maxsize  # tried once, whatever comes of it
        writer = WriterProcess(background=False)
        try:
            await writer.open(self._db)
        except Exception as exc:
            log.warning("no writer process at normal priority (%s)", loggable_error(exc))
            return
        old, self._writer = self._writer, writer
        await old.close()
        self.stats["writer_promoted"] += 1
        log.warning(
            "the writer process fell behind (%d records queued): writing at normal priority",
            queued,
        )

    async def _recover(self) -> None:
        """No traffic for a while and something is waiting: probe the write-ahead log, retry
        what is held, then replay the journal if the database takes writes again."""
        if self._wal_failing and self.wal is not None:
            try:
                self.wal.probe()
                self._wal_failing = False
                log.info("the write-ahead log takes appends again")
            except OSError:
                pass
        if self._held:
            await self._retry_held()
        if not self._held and self.journal.pending():
            await self.replay()

    async def _retry_held(self) -> None:
        held = list(self._held)
        self._held.clear()
        self._held_bytes = 0
        for start in range(0, len(held), self._batch_size):
            chunk = held[start : start + self._batch_size]
            size = sum(pending.size for pending in chunk)
            self._retrying_bytes += size
            try:
                await self._write(chunk, retrying=True)  # what fails is held again
            finally:
                self._retrying_bytes -= size

    async def _write(self, batch: list[_Pending], *, retrying: bool = False) -> None:
        if not batch:
            return
        try:
            self._db.check_file()
            if self._writer is not None:  # the rows are built there, from the lines
                await self._store([], [], lines=[p.data for p in batch])
            else:
                await self._store(*batch_rows([_entry(p) for p in batch]))
        except Exception as exc:
            self.stats["failed_batches"] += 1
            if not isinstance(exc, WriterGone):  # the database itself is fine then
                self._refused_batches += 1
            if not retrying:
                log.warning(
                    "database write of %d records failed (%s): journaling them",
                    len(batch),
                    loggable_error(exc),
                )
            self._fall_back(batch)
            return
        self.stats["written"] += len(batch)
        self._settle(batch)
        if retrying:
            self.stats["held_written"] += len(batch)
        if self._held and not retrying:
            await self._retry_held()
        if self.journal.pending() and not self._stopping and not self._held:
            await self.replay()

    async def replay(self, journal: Journal | None = None) -> int:
        """Write journaled records (this recorder's journal, or `journal`) into the database,
        skipping exchanges it already holds.

        Returns the number of records replayed. On a transient error (database unreachable,
        locked or full) the journal is kept for the next attempt.
        """
        journal = journal or self.journal
        path = journal.take()
        if path is None:
            return 0
        return await self.replay_file(path, journal)

    async def replay_file(self, path: Path, journal: Journal | None = None) -> int:
        """Replay one journal or write-ahead file (see `replay`); it is removed once done."""
        journal = journal or self.journal
        replayed = 0
        try:
            chunk: list[dict[str, Any]] = []
            for entry in Journal.read(path):
                chunk.append(entry)
                if len(chunk) >= self._batch_size:
                    replayed += await self._replay_chunk(chunk, journal)
                    chunk = []
            replayed += await self._replay_chunk(chunk, journal)
        except Exception as exc:
            if not self._replay_failing:  # once per outage, not at every retry
                log.warning("journal replay stopped (%s); will retry", loggable_error(exc))
            self._replay_failing = True
            return replayed
        self._replay_failing = False
        Journal.done(path)
        self.stats["replayed"] += replayed
        if replayed:
            log.info("replayed %d journaled records from %s", replayed, path)
        return replayed

    async def _replay_chunk(self, chunk: list[dict[str, Any]], journal: Journal) -> int:
        if not chunk:
            return 0
        self._db.check_file()  # never replay into a removed SQLite file
        entries = [(e["exchange"], e["trajectory"]) for e in chunk if "exchange" in e]
        shadows = [e["shadow"] for e in chunk if "shadow" in e]
        held = await existing_exchange_ids(self._db, [row["id"] for row, _ in entries])
        entries = [(row, meta) for row, meta in entries if row["id"] not in held]
        try:
            await self._store([row for row, _ in entries], trajectory_rows(entries), shadows)
        except Exception as exc:
            if is_transient(exc):
                raise  # keep the journal for the next attempt
            await ping(self._db)  # unreachable: raise, keep the journal for the next attempt
            return await self._replay_one_by_one(entries, shadows, journal)
        return len(entries) + len(shadows)

    async def _replay_one_by_one(
        self,
        entries: list[tuple[dict[str, Any], dict[str, Any]]],
        shadows: list[dict[str, Any]],
        journal: Journal,
    ) -> int:
        """The database answers but refused the chunk: write its records one at a time and set
        aside the ones it refuses (counted as `rejected`), so one bad record blocks nothing. A
        transient error (disk full, locked) stops the replay instead: nothing is set aside."""
        written = 0
        refused: list[dict[str, Any]] = []
        for row, meta in entries:
            try:
                await self._store([row], trajectory_rows([(row, meta)]))
                written += 1
            except Exception as exc:
                if is_transient(exc):
                    raise
                refused.append({"exchange": row, "trajectory": meta})
        for shadow in shadows:
            try:
                await self._store([], [], [shadow])
                written += 1
            except Exception as exc:
                if is_transient(exc):
                    raise
                refused.append({"shadow": shadow})
        if refused:
            self.stats["rejected"] += len(refused)
            path = journal.reject(refused)
            log.error("database refused %d journaled records; set aside in %s", len(refused), path)
        return written
