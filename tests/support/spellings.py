"""Helpers for the spelling, Azure and choice tests: a database on SQLite or PostgreSQL, and what
was recorded in it (read through storage's own rebuild, so request bodies are whole)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from proxy.storage import Database
from proxy.storage.schema import exchanges
from tests.support.inprocess import run_exporter


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database: a SQLite file, or a new database on the PostgreSQL test server."""
    if request.param == "sqlite":
        return str(tmp_path / "spellings.db")
    return str(request.getfixturevalue("pg_url"))


async def exchanges_in(db_url: str) -> list[dict[str, Any]]:
    """Every exchange recorded in `db_url` (SQLite path or URL), request bodies whole, in the
    order they started (grouped by trajectory, by step)."""
    db = await Database.open(db_url)
    try:
        async with db.engine.connect() as conn:
            query = select(exchanges.c.trajectory_id).order_by(exchanges.c.started_utc)
            ids = [row[0] for row in await conn.execute(query)]
        rows: list[dict[str, Any]] = []
        for trajectory_id in dict.fromkeys(ids):
            rows.extend(await db.exchanges_of(trajectory_id))
        return rows
    finally:
        await db.close()


def stats_of(db_url: str) -> dict[str, Any]:
    """`python -m exporter stats --db DB --json`, parsed."""
    result = run_exporter("stats", "--db", db_url, "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))
