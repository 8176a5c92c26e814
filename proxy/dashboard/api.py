"""The admin JSON API under `/api/`, and the payload builders the pages render too.

    GET  /api/trajectories                 list (filters as in proxy.dashboard.params), keyset pages
    GET  /api/trajectories/{id}            one trajectory: summary, exchanges, branches, conversation
    POST /api/trajectories/{id}/label      {"label": "approved"|"rejected"|null, "tags": [...], "note": "..."}
    POST /api/labels                       {"ids": [...], "label": ...}: label several at once
    GET  /api/charts?window=24h|7d|30d     chart series
    GET  /api/stats                        {"exchanges": N, "trajectories": N}

Errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.dashboard import charts
from proxy.dashboard.guard import database, guarded
from proxy.dashboard.params import ListQuery, ParamError, parse_list_query
from proxy.dashboard.render import error
from proxy.dashboard.view import summary, trajectory_payload
from proxy.storage import Database
from proxy.storage.browse import (
    KEEP,
    LABELS,
    MAX_PAGE_SIZE,
    chart_rows,
    get_trajectory,
    label_many,
    label_trajectory,
    list_trajectories,
    trajectory_details,
)

MAX_TAGS = 20
MAX_TAG_CHARS = 64
MAX_NOTE_CHARS = 10_000
MAX_BODY_BYTES = 256 * 1024


async def list_payload(db: Database, query: ListQuery) -> dict[str, Any]:
    """`{"object": "list", "data": [summary...], "has_more", "next_cursor", "prev_cursor",
    "filters"}` for one page of the list (see `proxy.dashboard.view.summary`)."""
    page = await list_trajectories(
        db, query.filter, limit=query.limit, after=query.after, before=query.before
    )
    details = await trajectory_details(db, page.rows)
    return {
        "object": "list",
        "data": [summary(row, details.get(row["id"])) for row in page.rows],
        "has_more": page.next_cursor is not None,
        "next_cursor": page.next_cursor,
        "prev_cursor": page.prev_cursor,
        "filters": query.values,
    }


async def get_payload(db: Database, trajectory_id: str) -> dict[str, Any] | None:
    """One trajectory as the API returns it (see `view.trajectory_payload`), or None."""
    found = await get_trajectory(db, trajectory_id)
    if found is None:
        return None
    exchanges = found.pop("exchanges")
    return trajectory_payload(found, exchanges)


async def charts_payload(db: Database, window: str) -> dict[str, Any]:
    """Chart series for a window name ('24h', '7d', '30d'); raises ParamError for others."""
    if window not in charts.WINDOWS:
        raise ParamError(f"window must be one of {', '.join(charts.WINDOWS)}", "window")
    since, bucket_chars = charts.window_start(window)
    rows = await chart_rows(db, since, bucket_chars=bucket_chars)
    series = charts.chart_series(rows, charts.bucket_labels(since, bucket_chars))
    return {"object": "charts", "window": window, "since_utc": since, **series}


def clean_tags(value: Any) -> list[str]:
    """Curation tags from a JSON list or a comma-separated string: trimmed, unique, in order.

    Raises ParamError when there are more than MAX_TAGS or one is longer than MAX_TAG_CHARS.
    """
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, list):
        items = value
    elif value is None:
        items = []
    else:
        raise ParamError("tags must be a list of strings", "tags")
    tags: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ParamError("tags must be a list of strings", "tags")
        tag = " ".join(item.split())
        if not tag or tag in tags:
            continue
        if len(tag) > MAX_TAG_CHARS:
            raise ParamError(f"a tag is at most {MAX_TAG_CHARS} characters", "tags")
        tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise ParamError(f"at most {MAX_TAGS} tags", "tags")
    return tags


def clean_note(value: Any) -> str | None:
    """A note: a string (stripped; empty means none) of at most MAX_NOTE_CHARS, or None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ParamError("note must be a string or null", "note")
    if len(value) > MAX_NOTE_CHARS:
        raise ParamError(f"note is at most {MAX_NOTE_CHARS} characters", "note")
    return value.strip() or None


def clean_label(value: Any) -> str | None:
    """'approved', 'rejected' or None; raises ParamError for anything else."""
    if value is None or value in LABELS:
        return value
    raise ParamError(f"label must be one of {', '.join(LABELS)} or null", "label")


async def _json_body(request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        raise ParamError("send a JSON body with Content-Type: application/json", "content-type")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ParamError("request body too large", "body")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ParamError(f"request body is not valid JSON: {exc}", "body") from exc
    if not isinstance(body, dict):
        raise ParamError("request body must be a JSON object", "body")
    return body


@guarded
async def api_list(request: Request) -> Response:
    """GET /api/trajectories."""
    query = parse_list_query(request.query_params)
    return JSONResponse(await list_payload(database(request), query))


@guarded
async def api_get(request: Request) -> Response:
    """GET /api/trajectories/{id}."""
    trajectory_id = request.path_params["trajectory_id"]
    payload = await get_payload(database(request), trajectory_id)
    if payload is None:
        return error(request, 404, f"no trajectory {trajectory_id}", code="trajectory_not_found")
    return JSONResponse(payload)


@guarded
async def api_label(request: Request) -> Response:
    """POST /api/trajectories/{id}/label: set any of label, tags, note (absent keys are kept)."""
    trajectory_id = request.path_params["trajectory_id"]
    body = await _json_body(request)
    unknown = set(body) - {"label", "tags", "note"}
    if unknown:
        raise ParamError(f"unknown field {sorted(unknown)[0]!r}", sorted(unknown)[0])
    row = await label_trajectory(
        database(request),
        trajectory_id,
        label=clean_label(body["label"]) if "label" in body else KEEP,
        tags=clean_tags(body["tags"]) if "tags" in body else KEEP,
        note=clean_note(body["note"]) if "note" in body else KEEP,
    )
    if row is None:
        return error(request, 404, f"no trajectory {trajectory_id}", code="trajectory_not_found")
    return JSONResponse(summary(row))


@guarded
async def api_label_many(request: Request) -> Response:
    """POST /api/labels: `{"ids": [...], "label": ...}` -> `{"updated": N}`."""
    body = await _json_body(request)
    ids = body.get("ids")
    if (
        not isinstance(ids, list)
        or not all(isinstance(i, str) for i in ids)
        or len(ids) > MAX_PAGE_SIZE
    ):
        raise ParamError(f"ids must be a list of at most {MAX_PAGE_SIZE} trajectory ids", "ids")
    if "label" not in body:
        raise ParamError("label is required (null clears it)", "label")
    updated = await label_many(database(request), ids, clean_label(body["label"]))
    return JSONResponse({"object": "label_result", "updated": updated})


@guarded
async def api_charts(request: Request) -> Response:
    """GET /api/charts."""
    window = request.query_params.get("window", "24h")
    return JSONResponse(await charts_payload(database(request), window))


@guarded
async def api_stats(request: Request) -> Response:
    """GET /api/stats."""
    return JSONResponse({"object": "stats", **await database(request).counts()})
