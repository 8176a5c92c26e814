"""Reading recorded rows for an export: export options -> storage filter -> batches of rows.

The SQL lives in `proxy.storage.reading`; this module only translates `ExportOptions` and streams
(server-side cursor, constant memory). Rows are dicts keyed by the column names that
`proxy.storage.reading.leaves_query` / `shadow_query` document.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import Select

from exporter.messages import Rejected
from exporter.options import ExportOptions, parse_utc
from exporter.responses import as_chat, chat_completion
from proxy.core.responses import needs_history, rebuild_context, recorded_exchange
from proxy.storage import Database
from proxy.storage.reading import (
    MAX_SQL_IDS,
    LeafFilter,
    TrajectoryFilter,
    id_batches,
    leaves_query,
    shadow_query,
    stream_batches,
)

BATCH_ROWS = 500
WORKER_BATCH_ROWS = 1000
"""Rows per task when worker processes read the SQLite file themselves (`exporter.direct`)."""


def trajectory_filter(options: ExportOptions) -> TrajectoryFilter:
    """The trajectory filter of the export flags (`--route`, `--model`, `--since`, `--until`,
    `--label`, `--tag`, `--exclude-promoted`, a small `trajectory_ids` selection)."""
    return TrajectoryFilter(
        route=None if options.route == "any" else options.route,
        models=tuple(options.models),
        since_utc=parse_utc(options.since, "--since") if options.since else None,
        until_utc=parse_utc(options.until, "--until") if options.until else None,
        labels=None if "any" in options.labels else tuple(options.labels),
        tags=tuple(options.tags),
        ids=_sql_ids(options),
        exclude_promoted=options.exclude_promoted,
    )


def leaf_filter(options: ExportOptions) -> LeafFilter:
    """The storage filter for `options`: the flags' trajectory filter AND `options.selection`
    (the dashboard list's filter); filters that need the sample itself are applied later."""
    filters = [trajectory_filter(options)]
    if options.selection is not None:
        filters.append(options.selection)
    return LeafFilter(
        trajectories=tuple(filters),
        complete_only=False,  # every leaf is read, so each drop is counted with its reason
        longest_only=options.leaves == "longest",
    )


def _sql_ids(options: ExportOptions) -> tuple[str, ...] | None:
    """The selection as a query parameter when small enough; larger ones are filtered here."""
    ids = options.trajectory_ids
    return tuple(ids) if ids is not None and len(ids) <= MAX_SQL_IDS else None


def query_for(options: ExportOptions) -> Select[Any]:
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
            yield await as_chat_rows(db, rows, include_truncated=options.include_truncated)


async def read_ids(
    db: Database, options: ExportOptions, batch: int = WORKER_BATCH_ROWS
) -> AsyncIterator[list[tuple[str, str]]]:
    """`(id, trajectory_id)` of the rows `read_batches` would yield, in the same order and
    lists of up to `batch` (empty lists are skipped): for worker processes that read the rows
    themselves (`exporter.direct`)."""
    selected = set(options.trajectory_ids) if options.trajectory_ids is not None else None
    in_sql = _sql_ids(options) is not None
    async for ids in id_batches(db, query_for(options), batch):
        if selected is not None and not in_sql:
            ids = [pair for pair in ids if pair[1] in selected]
        if ids:
            yield ids


async def as_chat_rows(
    db: Database, rows: list[dict[str, Any]], *, include_truncated: bool = False
) -> list[dict[str, Any]]:
    """`responses` rows in chat form (`exporter.responses`): their request, response and shadow
    JSON replaced by the chat equivalents, the history a `previous_response_id` names rebuilt
    from the trajectory's records (one read per such trajectory). A row that cannot be trained
    faithfully gets `rejected` = (reason, detail) instead, which the sample builder counts;
    `include_truncated` exports a history that starts at its first recorded step instead of
    dropping it as `truncated_history`."""
    trajectories: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row.get("kind") != "responses":
            continue
        try:
            recorded = recorded_exchange(row)
            context: list[Any] = []
            truncated = False
            if needs_history(recorded["request"]):
                tid = row["trajectory_id"]
                if tid not in trajectories:
                    trajectories[tid] = {
                        r["id"]: recorded_exchange(r) for r in await db.exchanges_of(tid)
                    }
                context, truncated = rebuild_context(trajectories[tid], row["id"])
            request, response = as_chat(
                recorded["request"],
                recorded["response"],
                context,
                truncated=truncated and not include_truncated,
            )
            row["request_json"] = json.dumps(request)
            row["response_json"] = json.dumps(response) if response is not None else None
            if row.get("shadow_response_json"):
                shadow = recorded_exchange({"response_json": row["shadow_response_json"]})
                converted = chat_completion(shadow["response"])
                row["shadow_response_json"] = json.dumps(converted) if converted else None
        except Rejected as exc:
            row["rejected"] = (exc.reason, exc.detail)
    return rows
