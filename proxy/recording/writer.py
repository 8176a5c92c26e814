"""The recorder's database writes in a process of their own, off the interpreter that serves calls.

A batch's CPU work grows with the batch and the database: cutting request bodies into
content-addressed parts (parsing, hashing, packing), SQLAlchemy's statement and parameter
processing for every row, the driver's hand-offs. On the serving event loop it stalled every call
in flight for milliseconds per batch. On a thread of the same process it still shared the GIL:
each time the event loop gave the GIL up (any socket call) the writer could take it for up to a
switch interval, which put 1-3 ms on one call in ten (added p99 3.3 ms at one connection,
`bench/proxy_bench.py`, 2026-11-29). `WriterProcess` runs `Database.write_exchanges` in a child
interpreter (`main`: the parent's Python, importing the parent's `proxy` package whatever the
working directory holds) with its own handle on the same SQLite file (WAL: the serving handle
keeps reading meanwhile), so the serving interpreter only writes a batch's lines onto a pipe and
reads one short reply.

The pipe carries frames: an 8-byte big-endian length, then a pickle. The parent sends
`("open", (target, shared))` once, then per batch `("lines", bytes)`: the records' write-ahead
lines, which the serving loop already encoded (the recorder's batches), or `("write",
(exchange_rows, trajectory_rows, shadow_rows))` (journal replay); the child answers each frame in order with `("ok", None)` or
`("error", exception)` (the exception itself when it pickles, so `is_transient` judges it as it
would on the loop; else `WriteFailed` carrying its text and that judgement). Both ends are this
package's own code: the pipe never carries anything from a client but the rows being written.

The child ignores SIGINT and SIGTERM (Ctrl-C and systemd signal the whole process group; the
parent drains the recorder through it first), and ends when its standard input closes: when the
parent closes it, or dies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pickle
import signal
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final

__all__ = ["WriteFailed", "WriterGone", "WriterProcess", "can_write_in_a_process"]

log = logging.getLogger("understudy.recorder")

_HEADER: Final = struct.Struct(">Q")
_CHILD: Final = (
    "import sys; root = sys.argv[1]; "
    # The working directory (sys.path[0]) gives way to the parent's own `proxy`: its directory
    # when that is not on the path already (a checkout), else nothing (an installed package).
    "sys.path[0:1] = [] if root in sys.path[1:] else [root]; "
    "from proxy.recording.writer import main; main()"
)
OPEN_TIMEOUT_S: Final = 60.0
"""How long the child may take to start and open the database (imports included; seconds on a
loaded machine) before the recorder writes on the event loop instead."""
CLOSE_TIMEOUT_S: Final = 30.0
"""How long `close` waits for the child to finish a batch still unanswered and exit before
killing it."""
IDLE_CLOSE_TIMEOUT_S: Final = 2.0
"""How long `close` waits for a child that has answered every call to exit before killing it."""


class WriterGone(OSError):
    """The writer process ended (or its pipe broke) before it answered: whether the batch was
    written is unknown. An OSError, so the recorder treats it as transient: the batch goes to the
    journal, whose replay skips the exchanges the database already holds."""


class WriteFailed(Exception):
    """A write failed in the writer process with an exception that could not be pickled back:
    its type and text, and whether `is_transient` judged it transient there."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message, transient)  # both in `args`: the exception pickles
        self.transient = transient

    def __str__(self) -> str:
        return str(self.args[0])


def can_write_in_a_process(db: Any) -> bool:
    """Whether a second handle on `db` (a `proxy.storage.Database`) reaches the same data: a
    SQLite file (an in-memory database is private to its connection). PostgreSQL keeps writing
    through its own pool, whose driver does its work off the event loop already."""
    return bool(db.dialect == "sqlite" and db.sqlite_file is not None)


class WriterProcess:
    """A child interpreter that writes the recorder's batches (see the module docstring).

    `open(db)` starts it and opens its handle on `db`'s target (without migrating: the serving
    handle did); `write` runs `Database.write_exchanges` there and returns or raises what it did
    (`WriterGone` if the child ended first); `close` lets it finish and waits for it to exit.
    Calls are answered in the order they were sent; the recorder sends one batch at a time.

    background: run the child under Linux's `SCHED_IDLE` policy, so that it only gets a CPU
    no serving task wants and gives it up the moment one wakes. A nice value is not enough:
    on the 2-core bench machine a batch being written still put 2-3 ms on one call in fifty
    at one connection (added p99 4.3 ms with nice 19 or 0; 2.0 ms under `SCHED_IDLE`;
    `python -m bench.proxy_bench`). Such a child can starve on a machine whose every core is
    busy: the recorder then starts a child at normal priority instead (`Recorder`). Where the
    policy does not exist, the child runs at normal priority (`background` reads False).
    """

    def __init__(self, *, background: bool = True) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._replies: collections.deque[asyncio.Future[tuple[str, Any]]] = collections.deque()
        self._reader: asyncio.Task[None] | None = None
        self._gone: str | None = None
        self._want_background = background
        self.background = False

    @property
    def pid(self) -> int | None:
        """The child's process id, once started."""
        return self._process.pid if self._process is not None else None

    async def open(self, db: Any) -> None:
        """Start the child and open its handle on `db`'s target (same `shared` mode). Raises
        what `Database.open` raises there, `WriterGone` if the child does not start, or
        TimeoutError after `OPEN_TIMEOUT_S`; the child is ended again in each case."""
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            str(Path(__file__).resolve().parents[2]),  # the directory holding this `proxy`
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read_replies(), name="understudy-writer-replies")
        try:
            await asyncio.wait_for(self._call("open", (db.target, db.shared)), OPEN_TIMEOUT_S)
        except BaseException:
            await self.close()
            raise
        # Only once started: its imports at idle priority could wait for as long as every core
        # stays busy.
        if self._want_background and hasattr(os, "SCHED_IDLE"):
            try:  # lowering a child's priority needs no privilege
                os.sched_setscheduler(self._process.pid, os.SCHED_IDLE, os.sched_param(0))
                self.background = True
            except OSError as exc:
                log.info("the writer process runs at normal priority (%s)", exc)

    async def write(
        self,
        exchange_rows: Sequence[dict[str, Any]],
        trajectory_rows: Sequence[dict[str, Any]],
        shadow_rows: Sequence[dict[str, Any]] = (),
    ) -> None:
        """`Database.write_exchanges` in the child (same arguments, same errors)."""
        await self._call("write", (list(exchange_rows), list(trajectory_rows), list(shadow_rows)))

    async def write_lines(self, lines: Sequence[bytes]) -> None:
        """The records of `lines` (journal lines, `{"exchange": row, "trajectory": meta}` or
        `{"shadow": row}` as JSON ending in a newline) written in the child as `write` writes
        their rows: the serving loop only joins bytes it already has; the child parses them and
        builds the batch (`proxy.storage.rows.batch_rows`)."""
        await self._call("lines", b"".join(lines))

    async def _call(self, op: str, args: Any) -> None:
        if self._gone is not None or self._process is None or self._process.stdin is None:
            raise WriterGone(f"the writer process is gone ({self._gone or 'not started'})")
        payload = pickle.dumps((op, args), protocol=pickle.HIGHEST_PROTOCOL)
        reply: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies.append(reply)
        try:
            self._process.stdin.writelines((_HEADER.pack(len(payload)), payload))
            await self._process.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            self._lost(f"its pipe broke: {exc}")
        status, value = await reply
        if status == "error":
            raise value

    async def _read_replies(self) -> None:
        process = self._process
        assert process is not None and process.stdout is not None
        try:
            while True:
                (size,) = _HEADER.unpack(await process.stdout.readexactly(_HEADER.size))
                reply = pickle.loads(await process.stdout.readexactly(size))
                if self._replies:
                    waiting = self._replies.popleft()
                    if not waiting.done():
                        waiting.set_result(reply)
        except asyncio.IncompleteReadError:
            self._lost(f"exit code {await process.wait()}")
        except ConnectionError as exc:
            self._lost(str(exc))

    def _lost(self, why: str) -> None:
        if self._gone is None:
            self._gone = why
        while self._replies:
            waiting = self._replies.popleft()
            if not waiting.done():
                waiting.set_exception(WriterGone(f"the writer process is gone ({why})"))

    async def close(self) -> None:
        """Close the child's input (it finishes what it was sent, closes its handle and
        exits) and wait for it. It is killed after `CLOSE_TIMEOUT_S` while a call is still
        unanswered, after `IDLE_CLOSE_TIMEOUT_S` when every call was answered: then nothing is
        left to write (each batch was committed or refused before its answer), and a background
        child on a machine whose every core is busy may get no CPU to exit at all."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        in_flight = any(not reply.done() for reply in self._replies)
        timeout = CLOSE_TIMEOUT_S if in_flight else IDLE_CLOSE_TIMEOUT_S
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            (log.warning if in_flight else log.info)(
                "the writer process did not exit in %.0f s: killed", timeout
            )
            process.kill()
            await process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._lost("closed")


# -- the child -------------------------------------------------------------------------------------


def _read_frame(source: BinaryIO) -> bytes | None:
    header = source.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    body = source.read(size)
    return body if len(body) == size else None


def _reply(exc: BaseException | None) -> bytes:
    if exc is None:
        return pickle.dumps(("ok", None))
    try:
        data = pickle.dumps(("error", exc))
        pickle.loads(data)  # some exceptions pickle but do not unpickle
        return data
    except Exception:
        from proxy.recording.recorder import is_transient

        failed = WriteFailed(f"{type(exc).__name__}: {exc}", is_transient(exc))
        return pickle.dumps(("error", failed))


def serve_writes(source: BinaryIO, sink: BinaryIO) -> None:
    """The child's loop: answer each frame of `source` on `sink` until `source` ends, then close
    the database handle. Runs `Database.open` / `write_exchanges` on an event loop of its own."""
    from proxy.core.fastjson import loads
    from proxy.storage import Database
    from proxy.storage.rows import batch_rows

    loop = asyncio.new_event_loop()
    db: Database | None = None
    try:
        while (frame := _read_frame(source)) is not None:
            op, args = pickle.loads(frame)
            error: BaseException | None = None
            try:
                if op == "open":
                    target, shared = args
                    db = loop.run_until_complete(
                        Database.open(target, migrate=False, shared=shared)
                    )
                elif db is None:
                    raise RuntimeError(f"{op!r} before 'open'")
                elif op == "lines":
                    entries = [loads(line) for line in args.split(b"\n") if line]
                    loop.run_until_complete(db.write_exchanges(*batch_rows(entries)))
                else:
                    loop.run_until_complete(db.write_exchanges(*args))
            except Exception as exc:
                error = exc
            reply = _reply(error)
            sink.write(_HEADER.pack(len(reply)) + reply)
            sink.flush()
    finally:
        if db is not None:
            loop.run_until_complete(db.close())
        loop.close()


def main() -> None:
    """The writer process (started by `WriterProcess`): serve frames from standard input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.WARNING, format="understudy writer: %(levelname)s %(message)s"
    )
    sink = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print goes to standard error, never into the replies
    import gc

    gc.set_threshold(50_000, 20, 100)  # as `serve`: batches allocate many short-lived objects
    with sink:
        serve_writes(sys.stdin.buffer, sink)
