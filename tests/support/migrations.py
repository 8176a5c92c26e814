"""Databases as an older Understudy left them, for tests of a later migration's conversion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from proxy.storage.migrations import MIGRATIONS
from proxy.testing.servers import REPOSITORY_ROOT


async def apply_first_migrations(conn: AsyncConnection, count: int) -> None:
    """Create the migrations table and apply the first `count` of `MIGRATIONS` on `conn`, each
    recorded as applied: the schema a database had when migration `count` was the newest."""
    await conn.execute(
        text(
            "CREATE TABLE understudy_migrations (name TEXT PRIMARY KEY, applied_utc TEXT NOT NULL)"
        )
    )
    for migration in MIGRATIONS[:count]:
        for statement in migration.statements:
            await conn.execute(text(statement))
        if conn.dialect.name == "sqlite":
            for statement in migration.sqlite_statements:
                await conn.execute(text(statement))
        await conn.execute(
            text("INSERT INTO understudy_migrations VALUES (:n, 'x')"), {"n": migration.name}
        )


def run_migrate_command(db: Path) -> str:
    """Run `python -m proxy migrate --db DB` as a user would (a process, from the repository
    root); assert it exits 0 and return what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "migrate", "--db", str(db)],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
