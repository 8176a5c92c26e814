"""Engines and URLs: what `--db` means, how each dialect's connections are made, ids and times.

A plain path or `sqlite://` URL opens SQLite through aiosqlite (WAL, one process writes);
`postgresql://` opens PostgreSQL through asyncpg with two pools (see `create_engines`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import time
from pathlib import Path
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from proxy.core.packing import register_sqlite_functions

POOL_SIZE: Final = 5
POOL_OVERFLOW: Final = 5
REQUEST_POOL_SIZE: Final = 10
"""PostgreSQL connections per process: up to POOL_SIZE + POOL_OVERFLOW for the recorder, dashboard
and exporter, plus REQUEST_POOL_SIZE for the stitcher's request-path statements (20 in all)."""

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
    register_sqlite_functions(dbapi_connection)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def create_private_file(url: str) -> None:
    """Create a SQLite URL's file readable by its owner only (0600) when it does not exist yet
    (recorded traffic is private; SQLite would create it 0644 under the usual umask)."""
    if "://" not in url or ":memory:" in url or "mode=memory" in url:
        return
    path = Path(url.split(":///", 1)[1].split("?", 1)[0])
    if not path.name or path.exists():
        return
    with contextlib.suppress(OSError):  # a missing directory: SQLite's own error says so
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def create_engines(url: str) -> tuple[AsyncEngine, AsyncEngine | None]:
    """The engines for an async URL (from `database_url`): `(engine, request_engine)`.

    PostgreSQL: `engine` pools POOL_SIZE + POOL_OVERFLOW connections; `request_engine` is the
    stitcher's own autocommit pool of REQUEST_POOL_SIZE with `synchronous_commit = off` (see
    `proxy.storage.states`). SQLite: one engine with WAL and a 5 s busy timeout; no request
    engine (None: the stitcher uses `engine`).
    """
    if url.startswith("postgresql"):
        engine = create_async_engine(
            url,
            hide_parameters=True,  # error texts carry no row values into logs
            pool_size=POOL_SIZE,
            max_overflow=POOL_OVERFLOW,
            connect_args={"server_settings": {"application_name": "understudy"}},
        )
        request_engine = create_async_engine(
            url,
            hide_parameters=True,
            isolation_level="AUTOCOMMIT",
            pool_size=REQUEST_POOL_SIZE,
            max_overflow=0,
            connect_args={"server_settings": _REQUEST_PATH_SETTINGS},
        )
        return engine, request_engine
    create_private_file(url)  # SQLite gives its -wal and -shm files the same mode
    engine = create_async_engine(url, pool_pre_ping=False, hide_parameters=True)
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine, None


def dialect_insert(dialect: str, table: Any) -> Any:
    """An INSERT of `dialect` ('sqlite' | 'postgresql'), which has `on_conflict_do_nothing/do_update`."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)
