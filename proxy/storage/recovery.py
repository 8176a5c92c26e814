"""Queries for replaying the journal: which exchanges does the database already hold?"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from proxy.storage.database import Database
from proxy.storage.schema import exchanges


async def existing_exchange_ids(db: Database, ids: Sequence[str]) -> set[str]:
    """The subset of `ids` already stored in `exchanges` (one indexed query per 500 ids)."""
    found: set[str] = set()
    async with db.engine.connect() as conn:
        for start in range(0, len(ids), 500):
            part = list(ids[start : start + 500])
            rows = await conn.execute(select(exchanges.c.id).where(exchanges.c.id.in_(part)))
            found.update(row[0] for row in rows)
    return found


async def ping(db: Database) -> None:
    """One round trip to the database (`SELECT 1`); raises what the driver raises, or
    DatabaseError when a SQLite file was removed or replaced."""
    db.check_file()
    async with db.engine.connect() as conn:
        await conn.execute(select(1))
