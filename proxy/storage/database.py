"""The database: one async query layer (SQLAlchemy 2 Core) over SQLite (aiosqlite) and PostgreSQL (asyncpg).

All SQL of the project lives in this package, one module per job: `engine` (URLs, engines, ids),
`migrations` (the schema changes and their runner), `conversion` (003's in-place rewrite of old
rows), `writes` (the recorder's batches), `states` (the stitcher's request-path statements),
`bodies` (request bodies cut into content-addressed parts and rebuilt), `browse` (dashboard) and
`reading` (exporter). `Database` ties the engines to the writes and states it serves. Callers get
plain dicts and dataclasses back.

A database is **shared** when several proxy processes write it at once: PostgreSQL (replicas
behind a load balancer); see `proxy.storage.states`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.storage import migrations
from proxy.storage.background import BackgroundHolds
from proxy.storage.bodies import BodyWriter, rebuild_requests, unpack_row
from proxy.storage.conversations import ConversationMirror, attach_conversation_contexts
from proxy.storage.engine import (
    DatabaseError,
    create_engines,
    database_url,
    display_target,
    new_id,
    utc_now,
)
from proxy.storage.schema import exchanges, trajectories
from proxy.storage.states import RequestPathStates, StateRef
from proxy.storage.writes import STALE_STATE_AGE_S, STATE_SWEEP_INTERVAL_S, RecorderWrites

__all__ = [
    "STALE_STATE_AGE_S",
    "STATE_SWEEP_INTERVAL_S",
    "Database",
    "DatabaseError",
    "StateRef",
    "database_url",
    "display_target",
    "new_id",
    "utc_now",
]

log = logging.getLogger("understudy.storage")


class Database(RequestPathStates, RecorderWrites):
    """An open database. Create with `await Database.open(target)`; close with `await db.close()`.

    `shared`: several processes write it at once (default: True for PostgreSQL, False for SQLite);
    the stitcher then writes through (see `proxy.recording.stitching`).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        target: str,
        *,
        shared: bool | None = None,
        request_engine: AsyncEngine | None = None,
    ) -> None:
        self.engine = engine
        self.target = target
        self.dialect = engine.dialect.name
        self.shared = self.dialect == "postgresql" if shared is None else shared
        self.applied_migrations: list[str] = []
        self.sqlite_file: Path | None = None
        self._sqlite_identity: tuple[int, int] = (0, 0)
        # The stitcher's statements on the request path (see `_request_path`); None: `engine`.
        self._request_engine = request_engine
        self._next_state_sweep = 0.0  # time.monotonic() of the next stale-state sweep
        # SQLite stores the JSON texts packed (migration 008); PostgreSQL compresses them itself.
        self.bodies = BodyWriter(pack=self.dialect == "sqlite")
        self._conversion: asyncio.Task[int] | None = None
        self.conversations = ConversationMirror(engine)  # Responses `conversation` items
        self.background = BackgroundHolds(engine)  # background responses, shared databases
        self._build_state_statements()

    @classmethod
    async def open(
        cls,
        target: str,
        *,
        migrate: bool = True,
        must_exist: bool = False,
        shared: bool | None = None,
        convert_in_background: bool = False,
    ) -> Database:
        """Open `target` (path or URL); apply pending migrations when `migrate`.

        `convert_in_background` (with `migrate`; the proxy at start): rows written before
        migration 003 are converted to content-addressed storage, then rows written before 008
        get their JSON texts packed (SQLite), by a background task, batch by batch, while the
        database serves (a huge database must not hold up the start); `close()` stops it, the
        next start resumes. `python -m proxy migrate` does both in the foreground
        (`convert_requests`, `pack_old_rows`). Readers read both shapes meanwhile.

        `must_exist`: for readers (the exporter), a missing SQLite file is an error instead of
        being created. `shared`: override whether several processes write this database (tests
        use it to run the shared stitching path on SQLite). Raises DatabaseError with a one-line
        message (a URL's password is never shown).
        """
        url = database_url(target)
        if must_exist and url.startswith("sqlite") and "://" in url:
            path = Path(url.split(":///", 1)[1])
            if not path.is_file():
                raise DatabaseError(f"database not found: {path}")
        engine, request_engine = create_engines(url)
        db = cls(engine, target, shared=shared, request_engine=request_engine)
        shown = display_target(target)
        try:
            if migrate:
                db.applied_migrations = await db.migrate()
            else:
                pending = await db.pending_migrations()
                if pending and not await db._has_migrations_table():
                    raise DatabaseError(
                        f"{shown} is not an Understudy database (no recorded exchanges); "
                        "check --db, or start the proxy on it first"
                    )
                if pending:
                    raise DatabaseError(
                        f"database {shown} is at an older schema (pending: {', '.join(pending)}); "
                        "run `python -m proxy migrate --db ...` or start the proxy once"
                    )
        except DatabaseError:
            await db.close()
            raise
        except Exception as exc:
            await db.close()
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise DatabaseError(f"cannot open database {shown}: {reason}") from exc
        if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            db.sqlite_file = Path(engine.url.database)
            stat = db.sqlite_file.stat()
            db._sqlite_identity = (stat.st_dev, stat.st_ino)
        if migrate and convert_in_background:
            await db.start_conversion()
        return db

    def check_file(self) -> None:
        """For SQLite: raise DatabaseError when the file was removed or replaced since it was
        opened (open connections would go on writing into the removed file, and what they
        write would be lost)."""
        if self.sqlite_file is None:
            return
        try:
            stat = self.sqlite_file.stat()
        except OSError as exc:
            raise DatabaseError(f"database file {self.sqlite_file} is gone") from exc
        if (stat.st_dev, stat.st_ino) != self._sqlite_identity:
            raise DatabaseError(f"database file {self.sqlite_file} was replaced")

    async def close(self) -> None:
        """Stop a background conversion; close every pooled connection (both pools on PostgreSQL)."""
        if self._conversion is not None:
            self._conversion.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._conversion
            self._conversion = None
        await self.engine.dispose()
        if self._request_engine is not None:
            await self._request_engine.dispose()

    async def pending_migrations(self) -> list[str]:
        """Names of the migrations not yet applied, in order."""
        return await migrations.pending_migrations(self.engine)

    async def _has_migrations_table(self) -> bool:
        async with self.engine.connect() as conn:
            return await migrations.has_migrations_table(conn)

    async def migrate(self) -> list[str]:
        """Apply pending migrations, each in its own transaction; return the names applied
        (see `proxy.storage.migrations.migrate`)."""
        return await migrations.migrate(self.engine)

    # -- 003: converting rows written before it ----------------------------------------------

    async def convert_requests(
        self, *, batch: int = 200, progress: Any = None, pause_s: float = 0.0
    ) -> int:
        """Convert every row still holding a whole request body; return how many were converted
        (see `proxy.storage.conversion.convert_requests`)."""
        from proxy.storage.conversion import convert_requests

        return await convert_requests(self, batch=batch, progress=progress, pause_s=pause_s)

    async def pack_old_rows(self, *, batch: int = 500, pause_s: float = 0.0) -> int:
        """Pack the JSON texts of rows written before migration 008 (SQLite); return how many
        rows (exchanges and request parts) it packed (see `proxy.storage.packing.pack_old_rows`)."""
        from proxy.storage.packing import pack_old_rows

        return await pack_old_rows(self, batch=batch, pause_s=pause_s)

    async def start_conversion(self) -> None:
        """Start rewriting old rows in a background task when there are any (logged): the 003
        conversion, then the 008 packing."""
        from proxy.storage.conversion import run_in_background, unconverted_count
        from proxy.storage.packing import packing_finished

        remaining = await unconverted_count(self)
        if remaining:
            log.info(
                "converting %d exchanges to content-addressed request storage in the background "
                "(resumes at the next start if stopped)",
                remaining,
            )
        if remaining or not await packing_finished(self):
            self._conversion = asyncio.create_task(
                run_in_background(self), name="understudy-conversion"
            )

    @property
    def conversion(self) -> asyncio.Task[int] | None:
        """The background conversion task, if one was started."""
        return self._conversion

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
        """Run `query` and yield rows as dicts without loading them all; rows that carry the
        request columns (`proxy.storage.bodies.REQUEST_COLUMNS`) get their whole request body.

        PostgreSQL: a server-side cursor (asyncpg portal inside a transaction) fetched `batch`
        rows at a time, so memory stays bounded by `batch` however many rows match; the first
        rows arrive before the query has finished. SQLite: the cursor is stepped `batch` rows at
        a time.
        """
        async for rows in self.stream_batches(query, batch):
            for row in rows:
                yield row

    async def stream_batches(
        self, query: Select[Any], batch: int = 500
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """As `stream`, a list of up to `batch` rows at a time (request bodies rebuilt per batch,
        on a second connection, so the cursor's own stays in its portal)."""
        async with self.engine.connect() as conn:
            result = await conn.stream(query.execution_options(yield_per=batch))
            keys = list(map(str, result.keys()))  # plain str: rows pickle without SQLAlchemy
            async for partition in result.partitions(batch):
                rows = [dict(zip(keys, row, strict=True)) for row in partition]
                if rows and "request_refs_json" in rows[0]:
                    async with self.engine.connect() as lookup:
                        await rebuild_requests(lookup, rows)
                else:
                    for row in rows:
                        unpack_row(row)  # packed texts (008), as rebuild_requests does
                yield rows

    async def exchanges_of(self, trajectory_id: str) -> list[dict[str, Any]]:
        """All exchanges of one trajectory, by step then time, request bodies whole
        (`rebuild_requests`); a Responses exchange created in a `conversation` also gets its
        `conversation_context` (`attach_conversation_contexts`)."""
        e = exchanges.c
        query = (
            select(exchanges)
            .where(e.trajectory_id == trajectory_id)
            .order_by(e.step, e.started_utc)
        )
        async with self.engine.connect() as conn:
            rows = [dict(row) for row in (await conn.execute(query)).mappings()]
            rows = await rebuild_requests(conn, rows)
            await attach_conversation_contexts(conn, rows)
            return rows
