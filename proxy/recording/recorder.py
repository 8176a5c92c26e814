"""Recording: exchanges go through an in-memory queue to one writer task that writes them in batches.

The request path only builds an `ExchangeRecord` and calls `Recorder.submit()` (never blocks,
never raises). The writer turns records into rows (JSON encoding, usage extraction) and writes a
batch every `flush_interval` or `batch_size` records, whichever comes first. `stop()` drains the
queue, so a clean shutdown loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from proxy.core.redaction import Redactor, storable
from proxy.core.usage import estimate_usage
from proxy.recording.journal import Journal
from proxy.storage import Database
from proxy.storage.recovery import existing_exchange_ids, ping

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

    def to_row(self) -> dict[str, Any]:
        """The `exchanges` row for this record (runs in the writer, off the request path)."""
        response = self.response or {}
        usage = response.get("usage") if isinstance(response.get("usage"), dict) else None
        if usage is None and self.stream and self.outcome == "ok" and self.response:
            # A stream sent without stream_options.include_usage: counted here, marked estimated.
            usage = estimate_usage(self.request, self.response)
        choices = response.get("choices") or []
        first = choices[0] if choices and isinstance(choices[0], dict) else {}
        message = first.get("message") or {}
        tool_calls = message.get("tool_calls") if isinstance(message, dict) else None
        metadata = self.request.get("metadata")
        user = self.request.get("user")
        return {
            "id": self.id,
            "trajectory_id": self.trajectory_id,
            "parent_id": self.parent_id,
            "step": self.step,
            "started_utc": self.started_utc,
            "duration_ms": self.duration_ms,
            "ttft_ms": self.ttft_ms,
            "path": self.path,
            "stream": self.stream,
            "status_code": self.status_code,
            "outcome": self.outcome,
            "route": self.route,
            "model_requested": _text(self.request.get("model")),
            "model_answered": _text(response.get("model")),
            "request_json": self.request_text,
            "response_json": self.response_text
            if self.response_text is not None
            else (json.dumps(self.response) if self.response is not None else None),
            "error_json": self.error_text,
            "request_headers_json": json.dumps(self.control_headers)
            if self.control_headers
            else None,
            "upstream_request_id": self.upstream_request_id,
            "end_user": _text(user) if user is not None else None,
            "metadata_json": json.dumps(metadata) if metadata is not None else None,
            "prompt_tokens": _int(usage, "prompt_tokens"),
            "completion_tokens": _int(usage, "completion_tokens"),
            "total_tokens": _int(usage, "total_tokens"),
            "usage_json": json.dumps(usage) if usage is not None else None,
            "finish_reason": _text(first.get("finish_reason")),
            "tool_call_count": len(tool_calls) if isinstance(tool_calls, list) else 0,
            "request_hash": self.request_hash,
            "state_hash": self.state_hash,
            "injected_logit_bias_json": json.dumps(self.injected_logit_bias)
            if self.injected_logit_bias
            else None,
        }


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return storable(value if isinstance(value, str) else str(value))


def _int(usage: dict[str, Any] | None, key: str) -> int | None:
    if not usage:
        return None
    value = usage.get(key)
    return value if isinstance(value, int) else None


def control_headers(headers: Any) -> dict[str, str]:
    """The `X-Understudy-*` request headers (names lower-cased): the only headers ever stored."""
    return {
        k.lower(): v for k, v in headers.items() if k.lower().startswith(_CONTROL_HEADER_PREFIX)
    }


def trajectory_meta(record: ExchangeRecord) -> dict[str, Any]:
    """What a new trajectory row needs beyond the exchange row: how it was identified, its route."""
    return {"id_source": record.id_source, "route": record.route, "shadow": record.shadow}


def trajectory_rows(entries: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-trajectory increments for a batch of (exchange row, trajectory meta) pairs
    (see `Database.write_exchanges`)."""
    out: dict[str, dict[str, Any]] = {}
    for row, meta in entries:
        entry = out.get(row["trajectory_id"])
        if entry is None:
            entry = out[row["trajectory_id"]] = {
                "id": row["trajectory_id"],
                "created_utc": row["started_utc"],
                "updated_utc": row["started_utc"],
                "id_source": meta["id_source"],
                "route": meta["route"],
                "shadow": meta["shadow"],
                "exchange_count": 0,
                "error_count": 0,
                "tool_call_count": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
            }
        entry["created_utc"] = min(entry["created_utc"], row["started_utc"])
        entry["updated_utc"] = max(entry["updated_utc"], row["started_utc"])
        entry["exchange_count"] += 1
        entry["error_count"] += row["outcome"] != "ok"
        entry["tool_call_count"] += row["tool_call_count"]
        entry["prompt_tokens"] += row["prompt_tokens"] or 0
        entry["completion_tokens"] += row["completion_tokens"] or 0
    return list(out.values())


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


_REDACTED_JSON_COLUMNS = (
    "request_json",
    "response_json",
    "error_json",
    "request_headers_json",
    "metadata_json",
)
_REDACTED_TEXT_COLUMNS = ("end_user",)
_REDACTED_SHADOW_COLUMNS = ("shadow_response_json", "shadow_error_json")


class Recorder:
    """Queue plus single writer task, with redaction and the journal as the fallback.

    Backpressure: the queue holds at most `queue_size` records (memory stays bounded); when it is
    full, records go straight to the journal file instead (never dropped while the disk takes
    them). Counters in `stats`: submitted, written, failed_batches, journaled, spilled (queue
    full), replayed, lost (neither database nor journal took them).
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
    ) -> None:
        self._db = db
        self.journal = journal
        self._redact = redactor or Redactor()
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._queue: asyncio.Queue[ExchangeRecord | ShadowUpdate] = asyncio.Queue(
            maxsize=queue_size
        )
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._idle = True
        self.stats: Counter[str] = Counter()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def submit(self, record: ExchangeRecord | ShadowUpdate) -> None:
        """Queue a record (or a shadow answer) for writing. Never blocks or raises; when the
        queue is full the record is appended to the journal instead."""
        self.stats["submitted"] += 1
        record.queued_at = time.monotonic()
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.stats["spilled"] += 1
            self._to_journal([record])

    def _entries(
        self, batch: list[ExchangeRecord | ShadowUpdate]
    ) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], list[dict[str, Any]]]:
        """Redacted (exchange row, trajectory meta) pairs and shadow rows of a batch."""
        entries = []
        shadows = []
        for item in batch:
            if isinstance(item, ExchangeRecord):
                row = item.to_row()
                for column in _REDACTED_JSON_COLUMNS:
                    row[column] = self._redact.json_text(row[column])
                for column in _REDACTED_TEXT_COLUMNS:
                    row[column] = self._redact(row[column])
                entries.append((row, trajectory_meta(item)))
            else:
                row = item.to_row()
                for column in _REDACTED_SHADOW_COLUMNS:
                    row[column] = self._redact.json_text(row[column])
                shadows.append(row)
        return entries, shadows

    def _to_journal(self, batch: list[ExchangeRecord | ShadowUpdate]) -> None:
        entries, shadows = self._entries(batch)
        self._append_journal(entries, shadows)

    def _append_journal(
        self, entries: list[tuple[dict[str, Any], dict[str, Any]]], shadows: list[dict[str, Any]]
    ) -> None:
        lines = [{"exchange": row, "trajectory": meta} for row, meta in entries]
        lines += [{"shadow": row} for row in shadows]
        try:
            self.journal.append(lines)
            self.stats["journaled"] += len(lines)
        except OSError:
            self.stats["lost"] += len(lines)
            log.exception(
                "journal %s refused %d records: they are lost", self.journal.path, len(lines)
            )

    async def start(self) -> None:
        """Own a journal file, replay what earlier runs left (this file's and those of processes
        that are gone), then start the writer task."""
        try:
            self.journal.claim()
        except OSError:
            log.exception("cannot claim a journal file next to %s", self.journal.base)
        await self.replay()
        for orphan in self.journal.orphans():
            try:
                await self.replay(orphan)
            finally:
                orphan.release()
        self._task = asyncio.create_task(self._run(), name="understudy-recorder")

    async def stop(self) -> None:
        """Write everything queued, then end the writer task (a batch being written completes)."""
        self._stopping = True
        self._stop_event.set()
        failed_before = self.stats["failed_batches"]
        if self._task is not None:
            if self._idle:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            if self.stats["failed_batches"] > failed_before:
                # The database refused during shutdown: journal the rest at once, so a large
                # queue never outlasts the orchestrator's grace period.
                self._to_journal(self._take(self._queue.qsize()))
            else:
                await self._write(self._take(self._batch_size))
        self.journal.release()

    def _take(self, limit: int) -> list[ExchangeRecord | ShadowUpdate]:
        batch: list[ExchangeRecord | ShadowUpdate] = []
        while len(batch) < limit and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _run(self) -> None:
        while not self._stopping:
            self._idle = True
            first = await self._queue.get()
            self._idle = False
            # Write at most one flush interval after the oldest record arrived; a batch that
            # took long to write leaves less (or no) waiting for the next one.
            wait = self._flush_interval_s - (time.monotonic() - first.queued_at)
            if wait > 0 and self._queue.qsize() < self._batch_size - 1:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), wait)
            await self._write([first, *self._take(self._batch_size - 1)])

    async def _write(self, batch: list[ExchangeRecord | ShadowUpdate]) -> None:
        if not batch:
            return
        entries, shadows = self._entries(batch)
        try:
            self._db.check_file()
            await self._db.write_exchanges(
                [row for row, _ in entries], trajectory_rows(entries), shadows
            )
        except Exception as exc:
            self.stats["failed_batches"] += 1
            log.warning(
                "database write of %d records failed (%s): journaling them", len(batch), exc
            )
            self._append_journal(entries, shadows)
            return
        self.stats["written"] += len(batch)
        if self.journal.pending() and not self._stopping:
            await self.replay()

    async def replay(self, journal: Journal | None = None) -> int:
        """Write journaled records (this recorder's journal, or `journal`) into the database,
        skipping exchanges it already holds.

        Returns the number of records replayed. On a database error the journal is kept for the
        next attempt.
        """
        journal = journal or self.journal
        path = journal.take()
        if path is None:
            return 0
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
            log.warning("journal replay stopped (%s); will retry", exc)
            return replayed
        Journal.done(path)
        self.stats["replayed"] += replayed
        if replayed:
            log.info("replayed %d journaled records from %s", replayed, path)
        return replayed

    async def _replay_chunk(self, chunk: list[dict[str, Any]], journal: Journal) -> int:
        if not chunk:
            return 0
        entries = [(e["exchange"], e["trajectory"]) for e in chunk if "exchange" in e]
        shadows = [e["shadow"] for e in chunk if "shadow" in e]
        held = await existing_exchange_ids(self._db, [row["id"] for row, _ in entries])
        entries = [(row, meta) for row, meta in entries if row["id"] not in held]
        try:
            await self._db.write_exchanges(
                [row for row, _ in entries], trajectory_rows(entries), shadows
            )
        except Exception:
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
        aside the ones it refuses (counted as `rejected`), so one bad record blocks nothing."""
        written = 0
        refused: list[dict[str, Any]] = []
        for row, meta in entries:
            try:
                await self._db.write_exchanges([row], trajectory_rows([(row, meta)]))
                written += 1
            except Exception:
                refused.append({"exchange": row, "trajectory": meta})
        for shadow in shadows:
            try:
                await self._db.write_exchanges([], [], [shadow])
                written += 1
            except Exception:
                refused.append({"shadow": shadow})
        if refused:
            self.stats["rejected"] += len(refused)
            path = journal.reject(refused)
            log.error("database refused %d journaled records; set aside in %s", len(refused), path)
        return written
