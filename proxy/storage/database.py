"""The database: one async query layer (SQLAlchemy 2 Core) over SQLite (aiosqlite) and PostgreSQL (asyncpg).

All SQL of the project lives in this package. Callers get plain dicts and dataclasses back.

A database is **shared** when several proxy processes write it at once: PostgreSQL (replicas
behind a load balancer). Then the stitcher's request-path statements (`remember_state`,
`claim_trajectory`, `find_states`, `trajectory_route`) run in autocommit, one round trip each,
and `write_exchanges` clears the `conversation_states` rows its exchanges supersede. SQLite is
owned by one process and never pays for that.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import random
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    Select,
    bindparam,
    case,
    event,
    func,
    literal_column,
    or_,
    select,
    text,
    union_all,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from proxy.core.responses import response_key
from proxy.storage.migrations import MIGRATIONS
from proxy.storage.schema import conversation_states, exchanges, migrations_table, trajectories

MIGRATION_LOCK_KEY: Final = zlib.crc32(b"understudy_migrations")
"""The PostgreSQL advisory lock (a bigint key) that serializes migrations across processes."""

POOL_SIZE: Final = 5
POOL_OVERFLOW: Final = 5
REQUEST_POOL_SIZE: Final = 10
"""PostgreSQL connections per process: up to POOL_SIZE + POOL_OVERFLOW for the recorder, dashboard
and exporter, plus REQUEST_POOL_SIZE for the stitcher's request-path statements (20 in all)."""

STALE_STATE_AGE_S: Final = 3600
STATE_SWEEP_INTERVAL_S: Final = 300
"""`conversation_states` rows older than an hour are swept (at most every 5 minutes per process):
their exchange was never written because its replica died before flushing. (A conversation that
resumes from such a state later than that starts a new trajectory.)"""

_REQUEST_PATH_SETTINGS: Final = {
    "application_name": "understudy-stitcher",
    "synchronous_commit": "off",
}

# libpq spellings users copy from other tools -> the asyncpg.connect() keyword they mean.
_LIBPQ_TO_ASYNCPG: Final = {"sslmode": "ssl", "connect_timeout": "timeout"}


class DatabaseError(RuntimeError):
    """The database cannot be opened or is not in a usable state (message is one line, for users)."""


_random = random.Random()  # ids need uniqueness, not secrecy: no system call per id


def new_id() -> str:
    """A time-ordered unique id: 32 hex characters, 48-bit ms timestamp then 80 random bits."""
    return f"{time.time_ns() // 1_000_000:012x}{_random.getrandbits(80):020x}"


def utc_now() -> str:
    """Now as the stored timestamp format: ISO-8601 UTC with milliseconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def database_url(target: str) -> str:
    """Turn `--db` into an async SQLAlchemy URL.

    A plain path (`./understudy.db`) or `sqlite:///path` becomes `sqlite+aiosqlite:///ABS_PATH`;
    `postgresql://` / `postgres://` (any `postgresql+driver://`) become `postgresql+asyncpg://`,
    with the libpq query options `sslmode` and `connect_timeout` renamed to asyncpg's `ssl` and
    `timeout`. Raises DatabaseError for anything else.
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
        query = {_LIBPQ_TO_ASYNCPG.get(k, k): v for k, v in url.query.items()}
        return url.set(drivername="postgresql+asyncpg", query=query).render_as_string(
            hide_password=False
        )
    raise DatabaseError(
        f"unsupported database (use a SQLite path or postgresql:// URL): {display_target(target)}"
    )


def display_target(target: str) -> str:
    """`--db` as it may be shown in logs and errors: a URL's password replaced by `***`."""
    if "://" not in target:
        return target
    try:
        return make_url(target).render_as_string(hide_password=True)
    except ArgumentError:
        return target.split("://", 1)[0] + "://..."


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


_CLAIM_COLUMNS: Final = ("id", "created_utc", "updated_utc", "id_source", "route", "shadow")
_COUNT_COLUMNS: Final = (
    "exchange_count",
    "error_count",
    "tool_call_count",
    "prompt_tokens",
    "completion_tokens",
)

_ROUTE_OF: Final = select(trajectories.c.route, trajectories.c.shadow).where(
    trajectories.c.id == bindparam("trajectory_id")
)


@functools.cache
def _state_lookup(include_pending: bool, by_trajectory: bool) -> Select[Any]:
    """The `find_states` query, built once per variant. Parameters: `hashes` (a list, expanded
    into IN) and, `by_trajectory`, `trajectory_id`. Rows: state_hash, exchange_id, trajectory_id,
    step, route, shadow, ordered so that the latest state of each hash comes last."""
    e, t = exchanges.c, trajectories.c
    flushed = (
        select(
            e.state_hash,
            e.id.label("exchange_id"),
            e.trajectory_id,
            e.step,
            e.route,
            t.shadow,
            literal_column("0").label("pending"),
            e.started_utc.label("at_utc"),
        )
        .join(trajectories, t.id == e.trajectory_id)
        .where(e.state_hash.in_(bindparam("hashes", expanding=True)))
    )
    if by_trajectory:
        flushed = flushed.where(e.trajectory_id == bindparam("trajectory_id"))
    if not include_pending:
        return flushed.order_by(e.started_utc)
    s = conversation_states.c
    pending = select(
        s.state_hash,
        s.exchange_id,
        s.trajectory_id,
        s.step,
        s.route,
        s.shadow,
        literal_column("1").label("pending"),
        s.remembered_utc.label("at_utc"),
    ).where(s.state_hash.in_(bindparam("hashes", expanding=True)))
    if by_trajectory:
        pending = pending.where(s.trajectory_id == bindparam("trajectory_id"))
    both = union_all(flushed, pending).subquery("states")
    return select(both).order_by(both.c.pending, both.c.at_utc)


@dataclass(frozen=True)
class StateRef:
    """Where a conversation state was recorded: the exchange that produced it and its trajectory."""

    exchange_id: str
    trajectory_id: str
    step: int
    route: str
    shadow: bool = False


class Database:
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
        # Built once: on the request path SQLAlchemy then only binds parameters (cached SQL).
        states = conversation_states.c
        remember = self._insert(conversation_states).values(
            {column.name: bindparam(column.name) for column in conversation_states.columns}
        )
        self._remember_statement = remember.on_conflict_do_update(
            index_elements=[states.state_hash, states.trajectory_id],
            set_={
                name: remember.excluded[name]
                for name in ("exchange_id", "step", "route", "shadow", "remembered_utc")
            },
        )
        t = trajectories.c
        self._claim_statement = (
            self._insert(trajectories)
            .values(
                {
                    **{name: bindparam(name) for name in _CLAIM_COLUMNS},
                    **dict.fromkeys(_COUNT_COLUMNS, 0),
                }
            )
            .on_conflict_do_nothing(index_elements=[t.id])
            .returning(t.route, t.shadow)
        )

    @classmethod
    async def open(
        cls,
        target: str,
        *,
        migrate: bool = True,
        must_exist: bool = False,
        shared: bool | None = None,
    ) -> Database:
        """Open `target` (path or URL); apply pending migrations when `migrate`.

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
        request_engine: AsyncEngine | None = None
        if url.startswith("postgresql"):
            engine = create_async_engine(
                url,
                pool_size=POOL_SIZE,
                max_overflow=POOL_OVERFLOW,
                connect_args={"server_settings": {"application_name": "understudy"}},
            )
            request_engine = create_async_engine(
                url,
                isolation_level="AUTOCOMMIT",
                pool_size=REQUEST_POOL_SIZE,
                max_overflow=0,
                connect_args={"server_settings": _REQUEST_PATH_SETTINGS},
            )
        else:
            engine = create_async_engine(url, pool_pre_ping=False)
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
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
        """Close every pooled connection (both pools on PostgreSQL)."""
        await self.engine.dispose()
        if self._request_engine is not None:
            await self._request_engine.dispose()

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

    async def _has_migrations_table(self) -> bool:
        async with self.engine.connect() as conn:
            return bool(
                await conn.run_sync(
                    lambda sync: sync.dialect.has_table(sync, migrations_table.name)
                )
            )

    async def _lock_migrations(self, conn: AsyncConnection) -> None:
        """On PostgreSQL, wait for the migration lock; it is released when `conn`'s transaction ends.

        Replicas that start at once then apply each migration exactly once: the first holds the
        lock while it migrates; the others, once they get it, see the migration recorded (each
        statement of a READ COMMITTED transaction sees what committed before it began).
        """
        if self.dialect == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )

    async def migrate(self) -> list[str]:
        """Apply pending migrations, each in its own transaction; return the names applied.

        Safe to run from several processes at once on PostgreSQL (advisory lock, see
        `_lock_migrations`): each migration is applied by exactly one of them.
        """
        done: list[str] = []
        async with self.engine.begin() as conn:
            await self._lock_migrations(conn)
            await conn.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS understudy_migrations "
                    "(name TEXT PRIMARY KEY, applied_utc TEXT NOT NULL)"
                )
            )
        for migration in MIGRATIONS:
            async with self.engine.begin() as conn:
                await self._lock_migrations(conn)
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

    def _insert(self, table: Any) -> Any:
        """An INSERT of the dialect, which has `on_conflict_do_nothing/do_update` (both have)."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)

    def _insert_ignore(self, table: Any) -> Any:
        return self._insert(table).on_conflict_do_nothing()

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

        A trajectory row may exist before its first exchange is written: claimed early
        (`claim_trajectory`, exchange_count 0) or created by another replica's batch holding a
        later step. Its `created_utc` becomes the earliest `started_utc` written, so the row and
        its exchanges agree whatever order the batches arrive in. On a shared database the
        `conversation_states` rows of these exchanges are deleted in the same transaction: from
        then on `find_states` finds the states in `exchanges`. Trajectory rows are locked in id
        order, so replicas whose batches touch the same trajectories never deadlock.
        """
        t = trajectories.c
        trajectory_rows = sorted(trajectory_rows, key=lambda row: str(row["id"]))
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
                    created_utc=case(
                        (
                            or_(
                                t.exchange_count == 0,
                                t.created_utc > bindparam("b_created_utc"),
                            ),
                            bindparam("b_created_utc"),
                        ),
                        else_=t.created_utc,
                    ),
                    updated_utc=case(
                        (t.updated_utc < bindparam("b_updated_utc"), bindparam("b_updated_utc")),
                        else_=t.updated_utc,
                    ),
                ),
                [{f"b_{k}": v for k, v in row.items()} for row in trajectory_rows],
            )
            await conn.execute(exchanges.insert(), list(exchange_rows))
            if self.shared:
                await self._forget_states(conn, exchange_rows)
            await self._write_shadows(conn, shadow_rows)

    async def _forget_states(
        self, conn: AsyncConnection, exchange_rows: Sequence[dict[str, Any]]
    ) -> None:
        """Delete the `conversation_states` rows that the exchange rows being inserted supersede.

        Only a row that still names the same exchange goes: a newer exchange that produced the
        same state in the same trajectory (a retry) keeps its own row until it is written. Every
        `STATE_SWEEP_INTERVAL_S` this also deletes rows older than `STALE_STATE_AGE_S`: states of
        a replica that died before its recorder flushed (the table is small: a scan is cheap).
        """
        now = time.monotonic()
        if now >= self._next_state_sweep:
            self._next_state_sweep = now + STATE_SWEEP_INTERVAL_S
            cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=STALE_STATE_AGE_S)
            await conn.execute(
                conversation_states.delete().where(
                    conversation_states.c.remembered_utc < cutoff.isoformat(timespec="milliseconds")
                )
            )
        keys = [
            {
                "b_state_hash": row["state_hash"],
                "b_trajectory_id": row["trajectory_id"],
                "b_exchange_id": row["id"],
            }
            for row in exchange_rows
            if row.get("state_hash")
        ]
        # A Responses exchange's id was written through as a state too (`Stitcher.remember_response`).
        keys += [
            {
                "b_state_hash": response_key(row["response_id"]),
                "b_trajectory_id": row["trajectory_id"],
                "b_exchange_id": row["id"],
            }
            for row in exchange_rows
            if row.get("response_id")
        ]
        if not keys:
            return
        s = conversation_states.c
        await conn.execute(
            conversation_states.delete().where(
                s.state_hash == bindparam("b_state_hash"),
                s.trajectory_id == bindparam("b_trajectory_id"),
                s.exchange_id == bindparam("b_exchange_id"),
            ),
            keys,
        )

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

    @contextlib.asynccontextmanager
    async def _request_path(self) -> AsyncIterator[AsyncConnection]:
        """A connection for the stitcher's small statements on the request path.

        PostgreSQL: a pool of its own (`REQUEST_POOL_SIZE` connections) in autocommit, so a
        statement is one round trip (no BEGIN, COMMIT or ROLLBACK on return to the pool) and a
        write is visible to every replica when it returns; with `synchronous_commit = off`, so a
        commit does not wait for the WAL flush (a server crash can lose the last fraction of a
        second of these rows: a conversation then starts a new trajectory, nothing else; the
        recorder's exchange rows stay fully durable). SQLite: the ordinary engine. Writers call
        `commit()` (a no-op in autocommit).
        """
        async with (self._request_engine or self.engine).connect() as conn:
            yield conn

    async def find_states(
        self,
        state_hashes: Sequence[str],
        trajectory_id: str | None = None,
        *,
        include_pending: bool = False,
    ) -> dict[str, StateRef]:
        """The latest exchange recorded with each of `state_hashes` (one indexed query).

        With `trajectory_id`, only exchanges of that trajectory count. Hashes not found are absent.
        include_pending: also look in `conversation_states` (states written through by
        `remember_state` whose exchange rows are not flushed yet; shared databases); a pending
        state counts as later than any flushed one. Still one statement: a UNION ALL of two
        primary-key/index lookups, read from one snapshot, so a state that the recorder moves
        from one table to the other in the meantime is seen exactly once.
        """
        if not state_hashes:
            return {}
        query = _state_lookup(include_pending, trajectory_id is not None)
        params: dict[str, Any] = {"hashes": list(state_hashes)}
        if trajectory_id is not None:
            params["trajectory_id"] = trajectory_id
        found: dict[str, StateRef] = {}
        async with self._request_path() as conn:
            for row in await conn.execute(query, params):
                found[row.state_hash] = StateRef(
                    row.exchange_id, row.trajectory_id, row.step, row.route, bool(row.shadow)
                )
        return found

    async def remember_state(self, state_hash: str, ref: StateRef) -> None:
        """Write `state_hash -> ref` to `conversation_states` now (one autocommit upsert).

        Visible to every process when this returns. A later exchange with the same state in the
        same trajectory (a retry that got the same answer) replaces the row. The recorder deletes
        the row when it writes `ref`'s exchange (`write_exchanges`). Raises what the driver raises.
        """
        async with self._request_path() as conn:
            await conn.execute(
                self._remember_statement,
                {
                    "state_hash": state_hash,
                    "trajectory_id": ref.trajectory_id,
                    "exchange_id": ref.exchange_id,
                    "step": ref.step,
                    "route": ref.route,
                    "shadow": ref.shadow,
                    "remembered_utc": utc_now(),
                },
            )
            await conn.commit()

    async def claim_trajectory(
        self, trajectory_id: str, *, id_source: str, route: str, shadow: bool
    ) -> tuple[str, bool]:
        """Create the `trajectories` row of a new trajectory unless one exists; return its route.

        Returns `(route, shadow)` of the row that holds: ours when the insert won, else the one
        another process inserted first (the primary key decides, `ON CONFLICT DO NOTHING`; on
        PostgreSQL a conflicting insert still in flight is waited for). The row starts with zero
        counts; `write_exchanges` adds the exchanges. Raises what the driver raises.
        """
        now = utc_now()
        params = {
            "id": trajectory_id,
            "created_utc": now,
            "updated_utc": now,
            "id_source": id_source,
            "route": route,
            "shadow": shadow,
        }
        async with self._request_path() as conn:
            row = (await conn.execute(self._claim_statement, params)).first()
            if row is None:  # lost: read the winner (committed: a new statement sees it)
                row = (await conn.execute(_ROUTE_OF, {"trajectory_id": trajectory_id})).first()
            await conn.commit()
        if row is None:  # only if the row was deleted in between; keep our own decision
            return route, shadow
        return str(row[0]), bool(row[1])

    async def find_response(self, response_id: str) -> StateRef | None:
        """The exchange that produced Responses API response `response_id` (the latest when
        several did), or None. One lookup on `ix_exchanges_response_id`."""
        e, t = exchanges.c, trajectories.c
        query = (
            select(e.id, e.trajectory_id, e.step, e.route, t.shadow)
            .join(trajectories, t.id == e.trajectory_id)
            .where(e.response_id == response_id)
            .order_by(e.started_utc.desc())
            .limit(1)
        )
        async with self._request_path() as conn:
            row = (await conn.execute(query)).first()
        return StateRef(row[0], row[1], row[2], row[3], bool(row[4])) if row else None

    async def trajectory_route(self, trajectory_id: str) -> tuple[str, bool] | None:
        """(route, shadow) of an existing trajectory, or None when it is not recorded."""
        async with self._request_path() as conn:
            row = (await conn.execute(_ROUTE_OF, {"trajectory_id": trajectory_id})).first()
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
        """Run `query` and yield rows as dicts without loading them all.

        PostgreSQL: a server-side cursor (asyncpg portal inside a transaction) fetched `batch`
        rows at a time, so memory stays bounded by `batch` however many rows match; the first
        rows arrive before the query has finished. SQLite: the cursor is stepped `batch` rows at
        a time.
        """
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
