"""The database: one async query layer (SQLAlchemy 2 Core) over SQLite (aiosqlite) and PostgreSQL (asyncpg).

All SQL of the project lives in this package. Callers get plain dicts and dataclasses back.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Select, bindparam, case, event, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from proxy.storage.migrations import MIGRATIONS
from proxy.storage.schema import exchanges, migrations_table, trajectories


class DatabaseError(RuntimeError):
    """The database cannot be opened or is not in a usable state (message is one line, for users)."""


def new_id() -> str:
    """A time-ordered unique id: 32 hex characters, 48-bit ms timestamp then 80 random bits."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def utc_now() -> str:
    """Now as the stored timestamp format: ISO-8601 UTC with milliseconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def database_url(target: str) -> str:
    """Turn `--db` into an async SQLAlchemy URL.

    A plain path (`./understudy.db`) or `sqlite:///path` becomes `sqlite+aiosqlite:///ABS_PATH`;
    `postgresql://` / `postgres://` become `postgresql+asyncpg://`. Raises DatabaseError for
    anything else.
    """
    if "://" not in target:
        return f"sqlite+aiosqlite:///{Path(target).expanduser().resolve()}"
    try:
        url = make_url(target)
    except ArgumentError as exc:
        raise DatabaseError(f"not a database URL or path: {target}") from exc
    backend = url.get_backend_name()
    if backend == "sqlite":
        return str(url.set(drivername="sqlite+aiosqlite"))
    if backend in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise DatabaseError(f"unsupported database (use a SQLite path or postgresql:// URL): {target}")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


@dataclass(frozen=True)
class StateRef:
    """Where a conversation state was recorded: the exchange that produced it and its trajectory."""

    exchange_id: str
    trajectory_id: str
    step: int
    route: str
    shadow: bool = False


class Database:
    """An open database. Create with `await Database.open(target)`; close with `await db.close()`."""

    def __init__(self, engine: AsyncEngine, target: str) -> None:
        self.engine = engine
        self.target = target
        self.dialect = engine.dialect.name
        self.applied_migrations: list[str] = []

    @classmethod
    async def open(cls, target: str, *, migrate: bool = True, must_exist: bool = False) -> Database:
        """Open `target` (path or URL); apply pending migrations when `migrate`.

        `must_exist`: for readers (the exporter), a missing SQLite file is an error instead of
        being created. Raises DatabaseError with a one-line message.
        """
        url = database_url(target)
        if must_exist and url.startswith("sqlite") and "://" in url:
            path = Path(url.split(":///", 1)[1])
            if not path.is_file():
                raise DatabaseError(f"database not found: {path}")
        engine = create_async_engine(url, pool_pre_ping=False)
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        db = cls(engine, target)
        try:
            if migrate:
                db.applied_migrations = await db.migrate()
            else:
                pending = await db.pending_migrations()
                if pending:
                    raise DatabaseError(
                        f"database {target} is at an older schema (pending: {', '.join(pending)}); "
                        "run `python -m proxy migrate --db ...` or start the proxy once"
                    )
        except DatabaseError:
            await engine.dispose()
            raise
        except Exception as exc:
            await engine.dispose()
            raise DatabaseError(f"cannot open database {target}: {exc}") from exc
        return db

    async def close(self) -> None:
        await self.engine.dispose()

    async def pending_migrations(self) -> list[str]:
        """Names of the migrations not yet applied, in order."""
        async with self.engine.connect() as conn:
            applied = await self._applied(conn)
        return [m.name for m in MIGRATIONS if m.name not in applied]

    @staticmethod
    async def _applied(conn: AsyncConnection) -> set[str]:
        has_table = await conn.run_sync(
            lambda sync: sync.dialect.has_table(sync, migrations_table.name)
        )
        if not has_table:
            return set()
        rows = await conn.execute(select(migrations_table.c.name))
        return {row[0] for row in rows}

    async def migrate(self) -> list[str]:
        """Apply pending migrations, each in its own transaction; return the names applied."""
        done: list[str] = []
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS understudy_migrations "
                    "(name TEXT PRIMARY KEY, applied_utc TEXT NOT NULL)"
                )
            )
        for migration in MIGRATIONS:
            async with self.engine.begin() as conn:
                if migration.name in await self._applied(conn):
                    continue
                for statement in migration.statements:
                    await conn.execute(text(statement))
                await conn.execute(
                    migrations_table.insert().values(name=migration.name, applied_utc=utc_now())
                )
                done.append(migration.name)
        return done

    # -- writing -------------------------------------------------------------------------------

    def _insert_ignore(self, table: Any) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table).on_conflict_do_nothing()
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()

    async def write_exchanges(
        self,
        exchange_rows: Sequence[dict[str, Any]],
        trajectory_rows: Sequence[dict[str, Any]],
        shadow_rows: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Insert a batch in one transaction.

        exchange_rows: dicts keyed by `exchanges` columns. trajectory_rows: one per trajectory the
        batch touches, with `id`, `created_utc`, `updated_utc`, `id_source`, `route`, `shadow` and
        the batch's increments `exchange_count`, `error_count`, `tool_call_count`,
        `prompt_tokens`, `completion_tokens`. New trajectories are inserted; existing ones get the
        increments. shadow_rows: `{"id", "shadow_model", "shadow_response_json",
        "shadow_error_json", "shadow_duration_ms"}` set on exchanges already written (or in this
        batch).
        """
        t = trajectories.c
        async with self.engine.begin() as conn:
            if not trajectory_rows:
                await self._write_shadows(conn, shadow_rows)
                return
            await conn.execute(
                self._insert_ignore(trajectories),
                [
                    {
                        **row,
                        "exchange_count": 0,
                        "error_count": 0,
                        "tool_call_count": 0,
                        "prompt_tokens": 0,
                        "completion_tokens": 0,
                    }
                    for row in trajectory_rows
                ],
            )
            await conn.execute(
                trajectories.update()
                .where(t.id == bindparam("b_id"))
                .values(
                    exchange_count=t.exchange_count + bindparam("b_exchange_count"),
                    error_count=t.error_count + bindparam("b_error_count"),
                    tool_call_count=t.tool_call_count + bindparam("b_tool_call_count"),
                    prompt_tokens=t.prompt_tokens + bindparam("b_prompt_tokens"),
                    completion_tokens=t.completion_tokens + bindparam("b_completion_tokens"),
                    updated_utc=case(
                        (t.updated_utc < bindparam("b_updated_utc"), bindparam("b_updated_utc")),
                        else_=t.updated_utc,
                    ),
                ),
                [{f"b_{k}": v for k, v in row.items()} for row in trajectory_rows],
            )
            await conn.execute(exchanges.insert(), list(exchange_rows))
            await self._write_shadows(conn, shadow_rows)

    @staticmethod
    async def _write_shadows(conn: AsyncConnection, shadow_rows: Sequence[dict[str, Any]]) -> None:
        if not shadow_rows:
            return
        columns = (
            "shadow_model",
            "shadow_response_json",
            "shadow_error_json",
            "shadow_duration_ms",
        )
        await conn.execute(
            exchanges.update()
            .where(exchanges.c.id == bindparam("b_id"))
            .values({name: bindparam(f"b_{name}") for name in columns}),
            [{f"b_{k}": v for k, v in row.items()} for row in shadow_rows],
        )

    # -- stitching -----------------------------------------------------------------------------

    async def find_states(
        self, state_hashes: Sequence[str], trajectory_id: str | None = None
    ) -> dict[str, StateRef]:
        """The latest exchange recorded with each of `state_hashes` (one indexed query).

        With `trajectory_id`, only exchanges of that trajectory count. Hashes not found are absent.
        """
        if not state_hashes:
            return {}
        e = exchanges.c
        query = (
            select(e.state_hash, e.id, e.trajectory_id, e.step, e.route, trajectories.c.shadow)
            .join(trajectories, trajectories.c.id == e.trajectory_id)
            .where(e.state_hash.in_(list(state_hashes)))
        )
        if trajectory_id is not None:
            query = query.where(e.trajectory_id == trajectory_id)
        query = query.order_by(e.started_utc)
        found: dict[str, StateRef] = {}
        async with self.engine.connect() as conn:
            for row in await conn.execute(query):
                found[row.state_hash] = StateRef(
                    row.id, row.trajectory_id, row.step, row.route, bool(row.shadow)
                )
        return found

    async def trajectory_route(self, trajectory_id: str) -> tuple[str, bool] | None:
        """(route, shadow) of an existing trajectory, or None when it is not recorded."""
        t = trajectories.c
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(t.route, t.shadow).where(t.id == trajectory_id))
            ).first()
        return (row[0], bool(row[1])) if row else None

    # -- reading -------------------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        """`{"exchanges": N, "trajectories": N}`."""
        async with self.engine.connect() as conn:
            n_exchanges = (
                await conn.execute(select(func.count()).select_from(exchanges))
            ).scalar_one()
            n_trajectories = (
                await conn.execute(select(func.count()).select_from(trajectories))
            ).scalar_one()
        return {"exchanges": int(n_exchanges), "trajectories": int(n_trajectories)}

    def leaves_query(self) -> Select[Any]:
        """Exchanges that no other exchange continues (each trajectory leaf), oldest first."""
        child = exchanges.alias("child")
        return (
            select(exchanges, trajectories.c.label.label("trajectory_label"))
            .join(trajectories, trajectories.c.id == exchanges.c.trajectory_id)
            .where(~select(child.c.id).where(child.c.parent_id == exchanges.c.id).exists())
            .order_by(exchanges.c.started_utc, exchanges.c.id)
        )

    async def stream(self, query: Select[Any], batch: int = 1000) -> AsyncIterator[dict[str, Any]]:
        """Run `query` and yield rows as dicts without loading them all (server-side cursor)."""
        async with self.engine.connect() as conn:
            result = await conn.stream(query.execution_options(yield_per=batch))
            async for row in result.mappings():
                yield dict(row)

    async def exchanges_of(self, trajectory_id: str) -> list[dict[str, Any]]:
        """All exchanges of one trajectory, by step then time."""
        e = exchanges.c
        query = (
            select(exchanges)
            .where(e.trajectory_id == trajectory_id)
            .order_by(e.step, e.started_utc)
        )
        async with self.engine.connect() as conn:
            return [dict(row) for row in (await conn.execute(query)).mappings()]
