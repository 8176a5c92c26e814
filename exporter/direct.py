"""Export worker processes that read the rows they build, straight from the SQLite file.

With `--workers` on SQLite, the main process lists the ids to export (`exporter.reader.read_ids`)
and sends them in batches; each worker reads its batch's rows with its own read-only sqlite3
connection (`proxy.storage.rebuild.SqliteRows`), builds them (`exporter.building.SampleBuilder`)
and returns the outcomes. Duplicates, limits, the split and the writing stay in the main process
(`exporter.api.SampleCollector`), in order. Neither SQLAlchemy nor the async engine is loaded
here, so a worker starts in about the time its tokenizer takes to load; only a batch that holds
`responses` rows opens the database the usual way (`DirectReader`).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exporter.building import Built, SampleBuilder
from exporter.options import ExportOptions
from proxy.storage.rebuild import SqliteRows, SqliteStatements

__all__ = ["DirectReader", "init_reading_worker", "read_and_build_in_worker"]


class DirectReader:
    """The rows of `exporter.reader.read_batches`, by id, read from a SQLite file with
    `SqliteRows` (`statements`: `proxy.storage.reading.sqlite_row_statements`).

    `responses` rows are converted to chat form as `read_batches` converts them
    (`exporter.reader.as_chat_rows`); only a batch that holds some opens the database the usual
    way, for the histories a `previous_response_id` needs. Raises sqlite3.Error when the file
    cannot be read.
    """

    def __init__(self, path: str | Path, statements: SqliteStatements, options: ExportOptions):
        self.path = Path(path)
        self.options = options
        # chat rows keep their tool list apart: the builder parses each distinct list once
        self._rows = SqliteRows(self.path, statements, defer_tools=not options.preference)

    def read(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """The rows of `ids`, in that order (an id no longer stored is left out)."""
        rows = self._rows.read(ids)
        if any(row.get("kind") == "responses" for row in rows):
            rows = asyncio.run(self._as_chat(rows))
        return rows

    async def _as_chat(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from exporter.reader import as_chat_rows
        from proxy.storage import Database

        db = await Database.open(str(self.path), migrate=False, must_exist=True)
        try:
            return await as_chat_rows(db, rows, include_truncated=self.options.include_truncated)
        finally:
            await db.close()


_worker: tuple[DirectReader, SampleBuilder] | None = None


def init_reading_worker(options: ExportOptions, path: str, statements: SqliteStatements) -> None:
    """Process-pool initializer: this process's `DirectReader` of the SQLite file at `path` and
    its `SampleBuilder`."""
    global _worker
    _worker = (DirectReader(path, statements, options), SampleBuilder(options))
    gc.freeze()  # the tokenizer's tables live as long as the process: no collector pass scans them


def read_and_build_in_worker(ids: list[str]) -> tuple[list[str], list[Built]]:
    """Read the rows of `ids` and build them, in a pool process set up by `init_reading_worker`:
    (the trajectory id of each row read, `SampleBuilder.build` of the rows), in `ids` order."""
    assert _worker is not None
    reader, builder = _worker
    rows = reader.read(ids)
    return [row["trajectory_id"] for row in rows], builder.build(rows)
