"""The dashboard's queries: list, get, label and chart data (SQLAlchemy Core, SQLite and PostgreSQL).

The trajectory list reads the `trajectories` table, whose aggregate columns (`exchange_count`,
`tool_call_count`, tokens, `error_count`) the recorder keeps up to date, and pages it with a keyset
on `(updated_utc, id)` newest first: a page costs one index range scan however deep it is, never
an OFFSET and never a GROUP BY over all exchanges. Per-page details (models, durations, the first
user message) come from one indexed query over the page's own exchanges.

Which trajectories a page holds is `proxy.storage.filters.TrajectoryFilter`, the filter the
exporter reads by too.

Timestamps are the stored ISO-8601 UTC strings, which compare as text; a date such as
`2026-11-21` compares correctly against them too.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import (
    Select,
    func,
    literal,
    or_,
    select,
)

from proxy.core.responses import input_items
from proxy.storage.bodies import REQUEST_COLUMNS, nul_safe_row, rebuild_requests, unpack_row
from proxy.storage.database import Database, utc_now
from proxy.storage.filters import LABELS, TrajectoryFilter, trajectory_where
from proxy.storage.schema import exchanges, trajectories

MAX_PAGE_SIZE: Final = 500


class _Keep:
    """Sentinel: leave this curation field as it is."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()


class CursorError(ValueError):
    """A pagination cursor that this module did not produce."""


@dataclass
class Page:
    """One page of trajectory rows, newest activity first.

    rows: dicts of `trajectories` columns. next_cursor: pass as `after` for older rows (None at the
    end). prev_cursor: pass as `before` for newer rows (None on the first page).
    """

    rows: list[dict[str, Any]]
    next_cursor: str | None = None
    prev_cursor: str | None = None


@dataclass
class TrajectoryDetails:
    """What the list shows beside a trajectory's own columns, from its exchanges.

    models: per requested/answered model, `{"model_requested", "model_answered", "exchanges",
    "prompt_tokens", "completion_tokens"}`. duration_ms: first start to the end of the latest
    exchange, None when unknown. first_user_text: text of the first user message of step 0.
    """

    models: list[dict[str, Any]] = field(default_factory=list)
    duration_ms: float | None = None
    first_user_text: str | None = None


def encode_cursor(updated_utc: str, trajectory_id: str) -> str:
    """An opaque cursor for the keyset `(updated_utc, id)`: URL-safe base64 of a JSON pair."""
    raw = json.dumps([updated_utc, trajectory_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """The `(updated_utc, id)` of a cursor; raises CursorError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise CursorError("invalid pagination cursor") from exc
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(part, str) for part in value)
    ):
        raise CursorError("invalid pagination cursor")
    return value[0], value[1]


def _filtered(flt: TrajectoryFilter) -> Select[Any]:
    return select(trajectories).where(trajectory_where(flt))


def list_query(
    flt: TrajectoryFilter | None = None,
    *,
    limit: int = 50,
    after: str | None = None,
    before: str | None = None,
) -> Select[Any]:
    """The keyset query behind `list_trajectories` (it reads `limit + 1` rows to see if more).

    Newest first, `(updated_utc, id)` below the `after` cursor; with `before`, oldest first above
    it (the caller reverses). Raises CursorError for a cursor not made here.
    """
    t = trajectories.c
    query = _filtered(flt or TrajectoryFilter())
    if before:
        updated, tid = decode_cursor(before)
        query = query.where(t.updated_utc >= updated, or_(t.updated_utc > updated, t.id > tid))
        return query.order_by(t.updated_utc.asc(), t.id.asc()).limit(limit + 1)
    if after:
        updated, tid = decode_cursor(after)
        query = query.where(t.updated_utc <= updated, or_(t.updated_utc < updated, t.id < tid))
    return query.order_by(t.updated_utc.desc(), t.id.desc()).limit(limit + 1)


async def list_trajectories(
    db: Database,
    flt: TrajectoryFilter | None = None,
    *,
    limit: int = 50,
    after: str | None = None,
    before: str | None = None,
) -> Page:
    """One page of trajectories matching `flt`, newest activity (`updated_utc`) first.

    after: a `next_cursor` (older rows); before: a `prev_cursor` (newer rows); at most one.
    limit: 1..MAX_PAGE_SIZE. Raises CursorError for a cursor not made here, ValueError for both.
    """
    if after and before:
        raise ValueError("give at most one of after and before")
    limit = max(1, min(limit, MAX_PAGE_SIZE))
    query = list_query(flt, limit=limit, after=after, before=before)
    async with db.engine.connect() as conn:
        rows = [dict(row) for row in (await conn.execute(query)).mappings()]
    more = len(rows) > limit
    rows = rows[:limit]
    if before and not more:
        # Back at the newest rows: answer with a full first page rather than a short one.
        return await list_trajectories(db, flt, limit=limit)
    if before:
        rows.reverse()
    page = Page(rows)
    if rows:
        first, last = rows[0], rows[-1]
        older = more if not before else True
        newer = bool(after or before)
        if older:
            page.next_cursor = encode_cursor(last["updated_utc"], last["id"])
        if newer:
            page.prev_cursor = encode_cursor(first["updated_utc"], first["id"])
    return page


async def trajectory_details(
    db: Database, rows: Sequence[dict[str, Any]]
) -> dict[str, TrajectoryDetails]:
    """Models, durations and first user message for the trajectories in `rows` (a page).

    Reads only those trajectories' exchanges, through the `(trajectory_id, step)` index.
    """
    ids = [row["id"] for row in rows]
    details = {tid: TrajectoryDetails() for tid in ids}
    if not ids:
        return details
    e = exchanges.c
    t = trajectories.c
    by_model = (
        select(
            e.trajectory_id,
            e.model_requested,
            e.model_answered,
            func.count().label("exchanges"),
            func.coalesce(func.sum(e.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(e.completion_tokens), 0).label("completion_tokens"),
        )
        .where(e.trajectory_id.in_(ids))
        .group_by(e.trajectory_id, e.model_requested, e.model_answered)
        .order_by(e.trajectory_id, func.count().desc())
    )
    last = (
        select(e.trajectory_id, func.max(e.duration_ms).label("duration_ms"))
        .join(trajectories, t.id == e.trajectory_id)
        .where(e.trajectory_id.in_(ids), e.started_utc == t.updated_utc)
        .group_by(e.trajectory_id)
    )
    firsts = (
        select(e.id, e.trajectory_id, *REQUEST_COLUMNS)
        .where(e.trajectory_id.in_(ids), e.step == 0)
        .order_by(e.trajectory_id, e.started_utc)
    )
    async with db.engine.connect() as conn:
        for usage in (await conn.execute(by_model)).mappings():
            details[usage["trajectory_id"]].models.append(
                {k: usage[k] for k in usage if k != "trajectory_id"}
            )
        last_ms = {r.trajectory_id: r.duration_ms for r in await conn.execute(last)}
        first_rows = [dict(row) for row in (await conn.execute(firsts)).mappings()]
        for first in await rebuild_requests(conn, first_rows):
            entry = details[first["trajectory_id"]]
            if entry.first_user_text is None:
                entry.first_user_text = first_user_text(first["request_json"])
    for row in rows:
        entry = details[row["id"]]
        span = _span_ms(row["created_utc"], row["updated_utc"])
        if span is not None and last_ms.get(row["id"]) is not None:
            entry.duration_ms = span + float(last_ms[row["id"]])
    return details


def _span_ms(start_utc: str, end_utc: str) -> float | None:
    try:
        start = dt.datetime.fromisoformat(start_utc)
        end = dt.datetime.fromisoformat(end_utc)
    except ValueError:
        return None
    return (end - start).total_seconds() * 1000


def first_user_text(request_json: str | None, limit: int = 200) -> str | None:
    """The text of the first user message of a request body (JSON text), cut to `limit` chars."""
    if not request_json:
        return None
    try:
        body = json.loads(request_json)
    except ValueError:
        return None
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) and isinstance(body, dict):
        messages = input_items(body)  # a Responses API request: its input items
    if not isinstance(messages, list):
        return None
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(
                    str(part.get("text", "")) for part in content if isinstance(part, dict)
                )
            if isinstance(content, str):
                text = " ".join(content.split())
                return text if len(text) <= limit else text[: limit - 1] + "\u2026"
    return None


async def get_trajectory(db: Database, trajectory_id: str) -> dict[str, Any] | None:
    """The `trajectories` row of `trajectory_id` plus `"exchanges"` (all its rows, by step), or None."""
    async with db.engine.connect() as conn:
        row = (
            (await conn.execute(select(trajectories).where(trajectories.c.id == trajectory_id)))
            .mappings()
            .first()
        )
    if row is None:
        return None
    return {**dict(row), "exchanges": await db.exchanges_of(trajectory_id)}


async def get_trajectory_row(db: Database, trajectory_id: str) -> dict[str, Any] | None:
    """Only the `trajectories` row of `trajectory_id`, or None."""
    async with db.engine.connect() as conn:
        row = (
            (await conn.execute(select(trajectories).where(trajectories.c.id == trajectory_id)))
            .mappings()
            .first()
        )
    return dict(row) if row is not None else None


def _curation_values(label: Any, tags: Any, note: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if label is not KEEP:
        if label is not None and label not in LABELS:
            raise ValueError(f"label must be one of {', '.join(LABELS)} or null")
        values["label"] = label
    if tags is not KEEP:
        values["tags_json"] = json.dumps(list(tags)) if tags else None
    if note is not KEEP:
        values["note"] = note or None
    values["labeled_utc"] = utc_now()
    values = nul_safe_row(values)  # PostgreSQL refuses NUL in TEXT
    return values


async def label_trajectory(
    db: Database,
    trajectory_id: str,
    *,
    label: str | None | _Keep = KEEP,
    tags: Sequence[str] | None | _Keep = KEEP,
    note: str | None | _Keep = KEEP,
) -> dict[str, Any] | None:
    """Set a trajectory's curation fields (KEEP leaves one as it is); return the updated row.

    label: 'approved' | 'rejected' | None (cleared). tags: stored as a JSON array in `tags_json`.
    note: free text. `labeled_utc` is set to now. Returns None when the trajectory does not exist;
    raises ValueError for an unknown label.
    """
    values = _curation_values(label, tags, note)
    async with db.engine.begin() as conn:
        result = await conn.execute(
            trajectories.update().where(trajectories.c.id == trajectory_id).values(values)
        )
        if result.rowcount == 0:
            return None
    return await get_trajectory_row(db, trajectory_id)


async def label_many(db: Database, trajectory_ids: Sequence[str], label: str | None) -> int:
    """Set `label` on several trajectories at once; return how many exist and were updated."""
    if not trajectory_ids:
        return 0
    values = _curation_values(label, KEEP, KEEP)
    async with db.engine.begin() as conn:
        result = await conn.execute(
            trajectories.update().where(trajectories.c.id.in_(list(trajectory_ids))).values(values)
        )
    return int(result.rowcount)


async def neighbour_unlabeled(db: Database, row: dict[str, Any]) -> str | None:
    """The id of the next older unlabeled trajectory after `row` in list order, or None."""
    t = trajectories.c
    updated, tid = row["updated_utc"], row["id"]
    query = (
        select(t.id)
        .where(
            func.coalesce(t.label, "") == "",  # as in the list: walk updated_utc, not label
            t.updated_utc <= updated,
            or_(t.updated_utc < updated, t.id < tid),
        )
        .order_by(t.updated_utc.desc(), t.id.desc())
        .limit(1)
    )
    async with db.engine.connect() as conn:
        return (await conn.execute(query)).scalar()


async def recent_models(db: Database, window: int = 2000) -> list[str]:
    """Distinct requested models among the latest `window` exchanges (for filter suggestions)."""
    e = exchanges.c
    recent = (
        select(e.model_requested.label("model"))
        .order_by(e.started_utc.desc())
        .limit(window)
        .subquery()
    )
    query = (
        select(recent.c.model)
        .where(recent.c.model.is_not(None))
        .distinct()
        .order_by(recent.c.model)
    )
    async with db.engine.connect() as conn:
        return [row[0] for row in await conn.execute(query)]


# -- charts ------------------------------------------------------------------------------------


@dataclass
class ChartRows:
    """Raw rows for the charts over one time window (`since_utc` .. now).

    by_bucket_route: `(bucket, route, exchanges)`, bucket being the first `bucket_chars`
    characters of `started_utc` (13: an hour, 10: a day). tokens_by_model: `(model,
    prompt_tokens, completion_tokens, exchanges)`. latencies: `(bucket, duration_ms, ttft_ms)` of
    the latest ok exchanges (at most `sample`). tool_responses: response JSON of the latest
    exchanges with tool calls (at most `tool_sample`). totals: exchanges and trajectories stored.
    """

    by_bucket_route: list[tuple[str, str, int]]
    tokens_by_model: list[tuple[str, int, int, int]]
    latencies: list[tuple[str, float | None, float | None]]
    tool_responses: list[str]
    totals: dict[str, int]


async def chart_rows(
    db: Database,
    since_utc: str,
    *,
    bucket_chars: int = 13,
    sample: int = 20_000,
    tool_sample: int = 5_000,
) -> ChartRows:
    """Chart data for exchanges started at or after `since_utc` (uses ix_exchanges_started_utc)."""
    e = exchanges.c
    bucket = func.substr(e.started_utc, 1, bucket_chars).label("bucket")
    in_window = e.started_utc >= since_utc
    by_bucket = (
        select(bucket, e.route, func.count().label("n"))
        .where(in_window)
        .group_by(bucket, e.route)
        .order_by(bucket)
    )
    model = func.coalesce(e.model_requested, literal("(unknown)")).label("model")
    tokens = (
        select(
            model,
            func.coalesce(func.sum(e.prompt_tokens), 0),
            func.coalesce(func.sum(e.completion_tokens), 0),
            func.count(),
        )
        .where(in_window)
        .group_by(model)
        .order_by(model)
    )
    latencies = (
        select(bucket, e.duration_ms, e.ttft_ms)
        .where(in_window, e.outcome == "ok")
        .order_by(e.started_utc.desc())
        .limit(sample)
    )
    tools = (
        select(e.response_json)
        .where(in_window, e.tool_call_count > 0, e.response_json.is_not(None))
        .order_by(e.started_utc.desc())
        .limit(tool_sample)
    )
    async with db.engine.connect() as conn:
        rows = ChartRows(
            by_bucket_route=[(r[0], r[1], int(r[2])) for r in await conn.execute(by_bucket)],
            tokens_by_model=[
                (r[0], int(r[1]), int(r[2]), int(r[3])) for r in await conn.execute(tokens)
            ],
            latencies=[(r[0], r[1], r[2]) for r in await conn.execute(latencies)],
            tool_responses=[
                text
                for r in await conn.execute(tools)
                if (text := unpack_row(dict(r._mapping))["response_json"]) is not None
            ],
            totals={},
        )
    rows.totals = await db.counts()
    return rows
