"""Reading recorded rows for an export: export options -> storage filter -> batches of rows.

The SQL lives in `proxy.storage.reading`; this module only translates `ExportOptions` and streams
(server-side cursor, constant memory). Rows are dicts keyed by the column names that
`proxy.storage.reading.leaves_query` / `shadow_query` document.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from exporter.options import ExportOptions, parse_utc
from proxy.storage import Database
from proxy.storage.reading import (
    MAX_SQL_IDS,
    LeafFilter,
    leaves_query,
    shadow_query,
    stream_batches,
)

BATCH_ROWS = 500


def leaf_filter(options: ExportOptions) -> LeafFilter:
    """The storage filter for `options` (filters that need the sample itself are applied later)."""
    return LeafFilter(
        route=None if options.route == "any" else options.route,
        models=tuple(options.models),
        since_utc=parse_utc(options.since, "--since") if options.since else None,
        until_utc=parse_utc(options.until, "--until") if options.until else None,
        labels=None if "any" in options.labels else tuple(options.labels),
        complete_only=False,  # every leaf is read, so each drop is counted with its reason
        exclude_promoted=options.exclude_promoted,
        longest_only=options.leaves == "longest",
        trajectory_ids=_sql_ids(options),
    )


def _sql_ids(options: ExportOptions) -> tuple[str, ...] | None:
    """The selection as a query parameter when small enough; larger ones are filtered here."""
    ids = options.trajectory_ids
    return tuple(ids) if ids is not None and len(ids) <= MAX_SQL_IDS else None


def query_for(options: ExportOptions) -> Any:
    """The query an export reads: shadow pairs for `dpo` / `hf-dpo`, trajectory leaves otherwise."""
    f = leaf_filter(options)
    return shadow_query(f) if options.preference else leaves_query(f)


async def read_batches(
    db: Database, options: ExportOptions, batch: int = BATCH_ROWS
) -> AsyncIterator[list[dict[str, Any]]]:
    """Rows to export, oldest first, in lists of up to `batch` dicts (empty lists are skipped)."""
    selected = set(options.trajectory_ids) if options.trajectory_ids is not None else None
    in_sql = _sql_ids(options) is not None
    async for rows in stream_batches(db, query_for(options), batch):
        if selected is not None and not in_sql:
            rows = [row for row in rows if row["trajectory_id"] in selected]
        if rows:
            yield rows
