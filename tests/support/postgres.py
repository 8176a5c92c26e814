"""The PostgreSQL test server: its URL, fresh databases on it, admin statements (plain asyncpg)."""

from __future__ import annotations

POSTGRES_URL_ENV = "UNDERSTUDY_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` instead."""
    return f"{url.rpartition('/')[0]}/{name}"


async def pg_admin(url: str, *statements: str) -> None:
    """Run `statements` on `url` with plain asyncpg (not the code under test)."""
    import asyncpg

    conn = await asyncpg.connect(url, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()
