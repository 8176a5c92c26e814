"""The export button: `GET /dashboard/export` and `GET /api/export` download the listed set.

The list's filter (`proxy.storage.filters.TrajectoryFilter`) goes to the exporter unchanged as
`ExportOptions.selection`, and the samples come from the exporter's own pipeline
(`exporter.api.export_samples`, the code path of `python -m exporter export`), as JSONL: the
export reads the leaves of exactly the trajectories the list shows. As with the CLI, rejected
trajectories are left out unless the label filter asks for them.

Extra query parameters: `format` (openai | hf | sharegpt | dpo, default openai) and `limit` (most
samples).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import Response

from exporter.api import ExportOptions, ExportSummary, export_samples
from exporter.options import DEFAULT_LABELS, OptionsError
from proxy.dashboard.guard import database, guarded
from proxy.dashboard.params import ListQuery, ParamError, parse_list_query
from proxy.dashboard.render import error


def export_options(query: ListQuery, params: Mapping[str, str]) -> ExportOptions:
    """The exporter's options for the list filter plus the `format` / `limit` parameters.

    The filter is the selection as it is; without a label filter the CLI's default labels apply
    (rejected trajectories left out). Raises ParamError for values the exporter does not take
    (OptionsError comes later, from `ExportOptions.check`).
    """
    flt = query.filter
    if flt.route not in (None, "student", "teacher"):
        raise ParamError("export takes route student or teacher", "route")
    raw_limit = params.get("limit", "").strip()
    if raw_limit and not raw_limit.isdigit():
        raise ParamError("limit must be a positive integer", "limit")
    return ExportOptions(
        format=params.get("format", "openai") or "openai",
        labels=DEFAULT_LABELS if flt.labels is None else ("any",),
        limit=int(raw_limit) if raw_limit else None,
        selection=flt,
    )


def nothing_message(summary: ExportSummary, query: ListQuery) -> str:
    """Why an export wrote nothing, in one sentence a person can act on."""
    reasons = ", ".join(f"{n} {reason}" for reason, n in summary.dropped.most_common())
    if summary.read == 0:
        message = "nothing to export: no trajectory listed with these filters has a finished leaf"
    else:
        message = (
            f"nothing to export: none of the {summary.read} trajectory leaves listed with these "
            f"filters makes a sample (dropped: {reasons})"
        )
    if query.filter.labels is None:
        message += "; rejected trajectories are left out unless you filter for label=rejected"
    return message


@guarded
async def export_download(request: Request) -> Response:
    """Download the trajectories matching the list filters as JSONL."""
    query = parse_list_query(request.query_params)
    try:
        options = export_options(query, request.query_params)
        options.check()
        lines, summary = await export_samples(database(request), options)
    except OptionsError as exc:
        return error(request, 400, str(exc), code="invalid_export_options")
    if not lines:
        return error(request, 404, nothing_message(summary, query), code="nothing_to_export")
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
