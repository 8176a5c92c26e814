"""The recorder's database writes on a thread of their own, off the event loop that serves calls.

A batch's CPU work grows with the batch and the database: cutting request bodies into
content-addressed parts (parsing, hashing), SQLAlchemy's statement and parameter processing for
every row, the driver's bookkeeping. On the serving event loop it stalled every call in flight
for milliseconds per batch (the added p99 latency; bench/proxy_bench.py). `WriterThread` runs an
event loop on its own thread with its own `Database` handle on the same SQLite file (WAL: the
serving handle keeps reading meanwhile); the recorder awaits each batch there. The thread still
shares the GIL, which `python -m proxy` hands over every `SWITCH_INTERVAL_S` (see `serve`), so a
long batch delays a call by a slice at most, not by the whole batch.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from proxy.storage import Database

__all__ = ["SWITCH_INTERVAL_S", "WriterThread", "can_write_on_a_thread"]

T = TypeVar("T")

SWITCH_INTERVAL_S = 0.001
"""How long a thread holding the GIL may keep it while another waits (`sys.setswitchinterval`;
Python's default is 5 ms): what a batch on the writer thread can delay the event loop by.
Measured (`proxy_bench --kinds json --quick`, idle 2-core machine, 2026-11-29): 0.5 ms gave
added p50 0.54 ms at one connection but 1,547 requests/s at 32 connections; 5 ms, 0.78 ms and
2,009/s; 1 ms, 0.54 ms and 1,695/s (the switches themselves cost CPU under load)."""


def can_write_on_a_thread(db: Database) -> bool:
    """Whether a second handle on `db` reaches the same data: a SQLite file (an in-memory
    database is private to its connection). PostgreSQL keeps writing through its own pool."""
    return db.dialect == "sqlite" and db.sqlite_file is not None


class WriterThread:
    """An event loop on a daemon thread named `understudy-writer`, holding a second `Database`
    handle on the same target (opened by `open`, without migrating: the serving handle did).
    `write` runs `Database.write_exchanges` there and returns (or raises) what it did;
    `close` closes the handle and ends the thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="understudy-writer", daemon=True)
        self.db: Database | None = None

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def open(self, db: Database) -> None:
        """Start the thread and open its handle on `db`'s target (same `shared` mode). Raises
        what `Database.open` raises (the thread is ended again)."""
        self._thread.start()
        try:
            self.db = await self._run(Database.open(db.target, migrate=False, shared=db.shared))
        except BaseException:
            await self.close()
            raise

    async def write(
        self,
        exchange_rows: Sequence[dict[str, Any]],
        trajectory_rows: Sequence[dict[str, Any]],
        shadow_rows: Sequence[dict[str, Any]] = (),
    ) -> None:
        """`Database.write_exchanges` on the writer thread (same arguments, same errors)."""
        assert self.db is not None, "open() first"
        await self._run(self.db.write_exchanges(exchange_rows, trajectory_rows, shadow_rows))

    async def close(self) -> None:
        """Close the handle, stop the loop and join the thread."""
        if self.db is not None:
            db, self.db = self.db, None
            await self._run(db.close())
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join)
        self._loop.close()
