"""Migration 008's rewrite of old rows: their JSON texts packed in place (SQLite).

Rows written before 008 hold their JSON texts as text; the writer packs every row it writes since
(`BodyWriter.pack`). This pass packs the old ones: exchanges in id order, then `blobs` in hash
order, a batch at a time, each batch one transaction that also moves the position kept in
`understudy_conversions` (row `PACKING`), so an interrupted pass resumes after the last committed
batch and a finished one costs one lookup. Only the `PACKED_COLUMNS` and `blobs.body_json`
change, each to the packed form of the same text; values packed already are left as they are. A `request_json` still holding a whole body
(003 not converted yet) stays text: the 003 conversion reads it, and the writer packs it then.

PostgreSQL keeps its texts (it compresses large values itself): the pass only records that it is
finished. Who runs it: as the 003 conversion (`proxy.storage.conversion`): `python -m proxy
migrate` in the foreground, the proxy at start in the background.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Table, bindparam, select, update

from proxy.core.packing import pack_text
from proxy.storage.bodies import PACKED_COLUMNS, pack_row
from proxy.storage.engine import dialect_insert, utc_now
from proxy.storage.schema import blobs, conversions, exchanges

if TYPE_CHECKING:
    from proxy.storage.database import Database

log = logging.getLogger("understudy.storage")

PACKING: Final = "008_packed_texts"
"""The `understudy_conversions` row of this pass."""


@dataclass(frozen=True)
class _Table:
    """One table the pass goes through: its key (the order, and `after_id`) and packed columns."""

    table: Table
    key: str
    columns: tuple[str, ...]


_TABLES: Final = (
    _Table(exchanges, "id", PACKED_COLUMNS),
    _Table(blobs, "hash", ("body_json",)),
)


def _packed(stage: _Table, row: dict[str, Any]) -> dict[str, Any]:
    if stage.table is exchanges:
        return pack_row(row)
    text = row["body_json"]
    return {**row, "body_json": pack_text(text)} if isinstance(text, str) else row


async def packing_finished(db: Database) -> bool:
    """Whether the pass has finished (on PostgreSQL it finishes at its first batch)."""
    async with db.engine.connect() as conn:
        row = (
            await conn.execute(
                select(conversions.c.finished_utc).where(conversions.c.name == PACKING)
            )
        ).first()
    return row is not None and row[0] is not None


async def pack_batch(db: Database, batch: int) -> tuple[int, int]:
    """Pack the next `batch` rows after the kept position in one transaction; return how many
    rows were looked at (0: the pass is finished, and recorded so) and how many changed.

    The position (`after_id`) is `<table>:<key>`: exchanges by id first, then blobs by hash.
    """
    c = conversions.c
    async with db.engine.begin() as conn:
        # A write first: on SQLite the batch then holds the write lock from its read to its
        # update, so no writer's commit (a shadow answer) falls in between.
        await conn.execute(
            dialect_insert(db.dialect, conversions)
            .values(name=PACKING, after_id=None, finished_utc=None)
            .on_conflict_do_nothing(index_elements=[c.name])
        )
        kept = (
            await conn.execute(select(c.after_id, c.finished_utc).where(c.name == PACKING))
        ).one()
        if kept.finished_utc is not None:
            return 0, 0
        at_table, _, after = (kept.after_id or "").partition(":")
        stages = list(_TABLES) if db.dialect == "sqlite" else []
        names = [t.table.name for t in stages]
        first = names.index(at_table) if at_table in names else 0
        for stage in stages[first:]:
            column = stage.table.c[stage.key]
            query = select(column, *(stage.table.c[name] for name in stage.columns))
            if stage.table.name == at_table:
                query = query.where(column > after)
            query = query.order_by(column).limit(batch)
            rows = [dict(row) for row in (await conn.execute(query)).mappings()]
            if rows:
                break
        else:
            await conn.execute(
                update(conversions).where(c.name == PACKING).values(finished_utc=utc_now())
            )
            return 0, 0
        changed = []
        for row in rows:
            packed = _packed(stage, row)
            if any(packed[name] is not row[name] for name in stage.columns):
                changed.append({f"b_{name}": packed[name] for name in stage.columns})
                changed[-1]["b_key"] = row[stage.key]
        if changed:
            await conn.execute(
                update(stage.table)
                .where(column == bindparam("b_key"))
                .values({name: bindparam(f"b_{name}") for name in stage.columns}),
                changed,
            )
        position = f"{stage.table.name}:{rows[-1][stage.key]}"
        await conn.execute(update(conversions).where(c.name == PACKING).values(after_id=position))
    return len(rows), len(changed)


async def pack_old_rows(db: Database, *, batch: int = 500, pause_s: float = 0.0) -> int:
    """Run the pass to its end; return how many rows (exchanges and `blobs`) it packed. Cancelling loses nothing (a
    batch commits whole or not at all; the next run resumes after the last one)."""
    total = 0
    while True:
        looked, packed = await pack_batch(db, batch)
        if not looked:
            return total
        total += packed
        if pause_s:
            await asyncio.sleep(pause_s)
