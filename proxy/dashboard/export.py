"""The export button: `GET /dashboard/export` and `GET /api/export` download the filtered set.

The list's filters become `exporter.api.ExportOptions` and the samples come from the exporter's
own pipeline (`exporter.api.export_samples`, the code path of `python -m exporter export`), as
JSONL. Filters the exporter has no option for (free text, errors, without tool calls) select
trajectory ids here, passed as `ExportOptions.trajectory_ids`. As with the CLI, rejected
trajectories are left out unless the label filter asks for them.

Extra query parameters: `format` (openai | hf | sharegpt | dpo, default openai) and `limit` (most
samples).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.dashboard.guard import database, guarded
from proxy.dashboard.params import ListQuery, ParamError, parse_list_query
from proxy.dashboard.render import error
from proxy.storage import Database
from proxy.storage.browse import MAX_PAGE_SIZE, TrajectoryFilter, list_trajectories

MAX_SELECTED_IDS = 50_000
"""Most trajectories a free-text (or errors) export selects."""


def export_options(query: ListQuery, params: Any) -> Any:
    """`exporter.api.ExportOptions` for the list filter plus `format` / `limit` parameters.

    Raises ParamError for values the exporter does not take.
    """
    from exporter.api import ExportOptions
    from exporter.options import DEFAULT_LABELS

    flt = query.filter
    if flt.route not in (None, "student", "teacher"):
        raise ParamError("export takes route student or teacher", "route")
    labels: tuple[str, ...] = DEFAULT_LABELS
    if flt.label == "labeled":
        labels = ("approved", "rejected")
    elif flt.label:
        labels = (flt.label,)
    raw_limit = params.get("limit", "").strip()
    if raw_limit and not raw_limit.isdigit():
        raise ParamError("limit must be a positive integer", "limit")
    return ExportOptions(
        format=params.get("format", "openai") or "openai",
        route=flt.route or "any",
        models=(flt.model,) if flt.model else (),
        since=flt.since_utc,
        until=flt.until_utc,
        labels=labels,
        tags=(flt.tag,) if flt.tag else (),
        min_tool_calls=1 if flt.has_tool_calls else 0,
        limit=int(raw_limit) if raw_limit else None,
    )


def _needs_selection(flt: TrajectoryFilter) -> bool:
    return bool(flt.text) or flt.errors is not None or flt.has_tool_calls is False


async def selected_ids(db: Database, flt: TrajectoryFilter) -> set[str]:
    """Ids of the trajectories the list filter matches (at most MAX_SELECTED_IDS)."""
    found: set[str] = set()
    cursor: str | None = None
    while len(found) < MAX_SELECTED_IDS:
        page = await list_trajectories(db, flt, limit=MAX_PAGE_SIZE, after=cursor)
        found.update(row["id"] for row in page.rows)
        cursor = page.next_cursor
        if cursor is None:
            break
    return found


@guarded
async def export_download(request: Request) -> Response:
    """Download the trajectories matching the list filters as JSONL."""
    from exporter.api import export_samples
    from exporter.options import OptionsError

    db = database(request)
    query = parse_list_query(request.query_params)
    try:
        options = export_options(query, request.query_params)
        if _needs_selection(query.filter):
            ids = tuple(sorted(await selected_ids(db, query.filter)))
            options = dataclasses.replace(options, trajectory_ids=ids)
        options.check()
        lines, summary = await export_samples(db, options)
    except OptionsError as exc:
        return error(request, 400, str(exc), code="invalid_export_options")
    if not lines:
        dropped = ", ".join(f"{n} {reason}" for reason, n in summary.dropped.most_common())
        return error(
            request,
            404,
            "nothing to export: no trajectory leaf matching these filters makes a sample"
            + (f" (dropped: {dropped})" if dropped else "")
            + (
                "; rejected trajectories are left out unless label=rejected"
                if not query.filter.label
                else ""
            ),
            code="nothing_to_export",
        )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    body = "".join(line + "\n" for line in lines).encode("utf-8")
    return Response(
        body,
        media_type="application/jsonl",
        headers={
            "content-disposition": f'attachment; filename="understudy-{options.format}-{stamp}.jsonl"',
            "x-understudy-export-written": str(summary.written),
            "x-understudy-export-read": str(summary.read),
            "cache-control": "no-store",
        },
    )
