"""Migration 003's rewrite of old rows: whole request bodies -> options + content-addressed parts.

Resumable and safe to interrupt: rows are taken oldest first from the partial index of rows still
holding a whole body (`request_refs_json IS NULL`), a batch at a time, each batch one transaction
(its parts inserted or ignored, its rows updated only if still unconverted). A converted row
leaves the index, so a rerun starts where the last one stopped and a finished database costs one
index probe. Parents start before their children, so a conversation's later steps usually store
only their new items (`request_base_id`), as the recorder does; a parent converted by an earlier
run gives its children full reference lists (correct, a little larger). On PostgreSQL, replicas
converting at once take disjoint rows (`FOR UPDATE SKIP LOCKED`).

Who runs it: `python -m proxy migrate` (in the foreground, with progress) and the proxy at start
(in the background, `Database.open(convert_in_background=True)`); see `Database.open`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import bindparam, func, inspect, select

from proxy.storage.bodies import BodyWriter
from proxy.storage.engine import dialect_insert
from proxy.storage.schema import blobs, exchanges

if TYPE_CHECKING:
    from proxy.storage.database import Database

log = logging.getLogger("understudy.storage")

BACKGROUND_BATCH: Final = 200
BACKGROUND_PAUSE_S: Final = 0.01
"""The background conversion writes 200 rows per transaction and then lets other writers in."""

LOG_EVERY_S: Final = 30.0


def _unconverted() -> Any:
    return exchanges.c.request_refs_json.is_(None)


async def unconverted_count(db: Database) -> int:
    """How many exchanges still hold a whole request body (counted on the partial index)."""
    async with db.engine.connect() as conn:
        query = select(func.count()).select_from(exchanges).where(_unconverted())
        return int((await conn.execute(query)).scalar_one())


async def _has_kind(db: Database) -> bool:
    async with db.engine.connect() as conn:
        columns = await conn.run_sync(
            lambda sync: {c["name"] for c in inspect(sync).get_columns("exchanges")}
        )
    return "kind" in columns


async def convert_batch(db: Database, writer: BodyWriter, batch: int, has_kind: bool) -> int:
    """Convert up to `batch` of the oldest unconverted rows in one transaction; return how many."""
    e = exchanges.c
    columns = [e.id, e.parent_id, e.request_json]
    if has_kind:
        columns.append(exchanges.c["kind"])
    query = select(*columns).where(_unconverted()).order_by(e.started_utc, e.id).limit(batch)
    if db.dialect == "postgresql":
        query = query.with_for_update(skip_locked=True)
    async with db.engine.begin() as conn:
        rows = [dict(row) for row in (await conn.execute(query)).mappings()]
        if not rows:
            return 0
        prepared = writer.prepare(rows)
        if prepared.blob_rows:
            await conn.execute(
                dialect_insert(db.dialect, blobs).on_conflict_do_nothing(), prepared.blob_rows
            )
        await conn.execute(
            exchanges.update()
            .where(e.id == bindparam("b_id"), _unconverted())
            .values(
                request_json=bindparam("b_request_json"),
                request_base_id=bindparam("b_request_base_id"),
                request_refs_json=bindparam("b_request_refs_json"),
            ),
            [
                {
                    "b_id": row["id"],
                    "b_request_json": row["request_json"],
                    "b_request_base_id": row["request_base_id"],
                    "b_request_refs_json": row["request_refs_json"],
                }
                for row in prepared.rows
            ],
        )
    writer.committed(prepared)
    return len(rows)


async def convert_requests(
    db: Database,
    *,
    batch: int = BACKGROUND_BATCH,
    progress: Callable[[int], None] | None = None,
    pause_s: float = 0.0,
) -> int:
    """Convert every unconverted row, `batch` per transaction; return how many were converted.

    progress: called with the running total after each batch. pause_s: sleep between batches
    (lets the recorder's writes in on SQLite). Cancelling between or inside batches loses
    nothing: a batch is committed whole or not at all.
    """
    writer = BodyWriter(pack=db.bodies.pack)  # SQLite: packed as the recorder writes (008)
    has_kind = await _has_kind(db)
    total = 0
    while True:
        done = await convert_batch(db, writer, batch, has_kind)
        if not done:
            return total
        total += done
        if progress is not None:
            progress(total)
        if pause_s:
            await asyncio.sleep(pause_s)


async def run_in_background(db: Database) -> int:
    """`convert_requests`, then the 008 packing (`proxy.storage.packing`), for the proxy's
    background task, logging progress; return how many rows 003 converted. Errors are logged
    (the next start resumes), never raised into the proxy."""
    from proxy.storage.packing import pack_old_rows

    started = time.monotonic()
    last_log = started

    def report(total: int) -> None:
        nonlocal last_log
        now = time.monotonic()
        if now - last_log >= LOG_EVERY_S:
            last_log = now
            log.info("converted %d exchanges so far", total)

    try:
        total = await convert_requests(
            db, batch=BACKGROUND_BATCH, progress=report, pause_s=BACKGROUND_PAUSE_S
        )
        if total:
            log.info(
                "converted %d exchanges to content-addressed request storage in %.1f s",
                total,
                time.monotonic() - started,
            )
        packed = await pack_old_rows(db, batch=BACKGROUND_BATCH, pause_s=BACKGROUND_PAUSE_S)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("converting exchanges stopped; the next start resumes it")
        return 0
    if packed:
        log.info("packed the JSON texts of %d rows written before migration 008", packed)
    return total
