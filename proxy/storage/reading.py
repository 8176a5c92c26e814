"""Read queries for the exporter and `stats`: trajectory leaves, shadow pairs and aggregates.

All SQL stays in `proxy.storage`; these are SQLAlchemy Core queries that run unchanged on SQLite
and PostgreSQL. Large reads stream through a server-side cursor in batches (`stream_batches`), so
memory stays constant however many exchanges the database holds.

Words: a **leaf** is an exchange that no other exchange has as `parent_id`; its request messages
plus its response message are the whole conversation. A trajectory that forked has several.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, exists, func, or_, select

from proxy.storage.bodies import REQUEST_COLUMNS, json_array_values, sqlite_lookups, sqlite_sql
from proxy.storage.database import Database
from proxy.storage.filters import MAX_SQL_IDS, UNLABELED, TrajectoryFilter, trajectory_where
from proxy.storage.rebuild import SqliteStatements
from proxy.storage.schema import exchanges, trajectories

__all__ = [
    "MAX_SQL_IDS",
    "UNLABELED",
    "LeafFilter",
    "TrajectoryFilter",
    "count_rows",
    "id_batches",
    "leaves_query",
    "rows_by_id_query",
    "shadow_query",
    "sqlite_row_statements",
    "statistics",
    "stream_batches",
]

# finish_reason values that mean the answer is not a complete final answer.
_UNFINISHED_REASONS = ("length", "content_filter", "tool_calls", "function_call")


@dataclass(frozen=True)
class LeafFilter:
    """Which exchanges a read returns: leaves (or shadow pairs) of the trajectories selected.

    trajectories: `TrajectoryFilter`s that all must select the exchange's trajectory (the
    exporter's flags, and the dashboard list's filter when the dashboard exports); empty: every
    trajectory. complete_only: the exchange answered ok with a final answer (no tool calls,
    finish_reason not length/content_filter). longest_only: per trajectory, only the leaf with
    the highest step (ties: the latest).
    """

    trajectories: tuple[TrajectoryFilter, ...] = ()
    complete_only: bool = True
    longest_only: bool = False


_LEAF_COLUMNS = (
    exchanges.c.id,
    exchanges.c.trajectory_id,
    exchanges.c.step,
    exchanges.c.started_utc,
    exchanges.c.outcome,
    exchanges.c.route,
    exchanges.c.model_requested,
    exchanges.c.model_answered,
    *REQUEST_COLUMNS,
    exchanges.c.response_json,
    exchanges.c.finish_reason,
    exchanges.c.tool_call_count,
    exchanges.c.kind,
    trajectories.c.label.label("trajectory_label"),
    trajectories.c.tags_json.label("trajectory_tags_json"),
    trajectories.c.created_utc.label("trajectory_created_utc"),
)

_SHADOW_COLUMNS = (
    exchanges.c.id,
    exchanges.c.trajectory_id,
    exchanges.c.step,
    exchanges.c.started_utc,
    exchanges.c.route,
    exchanges.c.model_requested,
    exchanges.c.model_answered,
    *REQUEST_COLUMNS,
    exchanges.c.response_json,
    exchanges.c.shadow_model,
    exchanges.c.shadow_response_json,
    exchanges.c.kind,
    trajectories.c.label.label("trajectory_label"),
    trajectories.c.tags_json.label("trajectory_tags_json"),
    trajectories.c.created_utc.label("trajectory_created_utc"),
)


def _is_leaf() -> ColumnElement[bool]:
    child = exchanges.alias("child")
    return ~exists(select(child.c.id).where(child.c.parent_id == exchanges.c.id))


def leaves_query(f: LeafFilter) -> Select[Any]:
    """Leaves matching `f`, oldest first (`started_utc`, then id).

    Rows carry the `exchanges` columns the exporter needs (`request_json`: the client's request
    body text, once `stream_batches` has rebuilt it; `response_json`: a `chat.completion` JSON text or NULL) plus the trajectory's
    `trajectory_label`, `trajectory_tags_json` and `trajectory_created_utc`.
    """
    e = exchanges.c
    conditions = [_is_leaf(), trajectory_where(*f.trajectories)]
    if f.complete_only:
        conditions += [
            e.outcome == "ok",
            e.response_json.is_not(None),
            e.tool_call_count == 0,
            or_(e.finish_reason.is_(None), e.finish_reason.not_in(_UNFINISHED_REASONS)),
        ]
    joined = exchanges.join(trajectories, trajectories.c.id == e.trajectory_id)
    if not f.longest_only:
        return (
            select(*_LEAF_COLUMNS)
            .select_from(joined)
            .where(and_(*conditions))
            .order_by(e.started_utc, e.id)
        )
    rank = (
        func.row_number()
        .over(
            partition_by=e.trajectory_id,
            order_by=(e.step.desc(), e.started_utc.desc(), e.id.desc()),
        )
        .label("leaf_rank")
    )
    ranked = select(*_LEAF_COLUMNS, rank).select_from(joined).where(and_(*conditions)).subquery()
    return (
        select(*[ranked.c[c.name] for c in _LEAF_COLUMNS])
        .where(ranked.c.leaf_rank == 1)
        .order_by(ranked.c.started_utc, ranked.c.id)
    )


def shadow_query(f: LeafFilter) -> Select[Any]:
    """Exchanges that answered ok and have a recorded shadow (teacher) answer, oldest first.

    Any step, not only leaves (a preference pair is one request, two answers). `complete_only` and
    `longest_only` do not apply. Columns: as `leaves_query` plus `shadow_model` and
    `shadow_response_json` (a `chat.completion` JSON text).
    """
    e = exchanges.c
    conditions = [
        e.outcome == "ok",
        e.response_json.is_not(None),
        e.shadow_response_json.is_not(None),
        trajectory_where(*f.trajectories),
    ]
    return (
        select(*_SHADOW_COLUMNS)
        .select_from(exchanges.join(trajectories, trajectories.c.id == e.trajectory_id))
        .where(and_(*conditions))
        .order_by(e.started_utc, e.id)
    )


async def stream_batches(
    db: Database, query: Select[Any], batch: int = 500
) -> AsyncIterator[list[dict[str, Any]]]:
    """Run `query` with a server-side cursor and yield its rows as lists of up to `batch` dicts,
    request bodies whole (`Database.stream_batches`: one rebuild per batch, no query per row)."""
    async for rows in db.stream_batches(query, batch):
        yield rows


async def id_batches(
    db: Database, query: Select[Any], batch: int = 1000
) -> AsyncIterator[list[tuple[str, str]]]:
    """The `(id, trajectory_id)` of the rows `query` (`leaves_query` or `shadow_query`) selects,
    in its order, as lists of up to `batch` pairs: same filter, no other column read. Workers
    then read the rows themselves (`proxy.storage.rebuild.SqliteRows`)."""
    columns = query.selected_columns
    ids = query.with_only_columns(
        columns["id"], columns["trajectory_id"], maintain_column_froms=True
    )
    async with db.engine.connect() as conn:
        result = await conn.stream(ids.execution_options(yield_per=batch))
        async for partition in result.partitions(batch):
            yield [(str(row[0]), str(row[1])) for row in partition]


def rows_by_id_query(preference: bool) -> Select[Any]:
    """The columns of `shadow_query` (`preference`) or `leaves_query` of the exchanges whose ids
    are bound as one JSON array text `ids`, in no particular order."""
    return (
        select(*(_SHADOW_COLUMNS if preference else _LEAF_COLUMNS))
        .select_from(exchanges.join(trajectories, trajectories.c.id == exchanges.c.trajectory_id))
        .where(exchanges.c.id.in_(json_array_values("ids", "sqlite")))
    )


def sqlite_row_statements(preference: bool) -> SqliteStatements:
    """The statements a worker process's `proxy.storage.rebuild.SqliteRows` runs to read the
    rows of `shadow_query` (`preference`) or `leaves_query` by id, as SQLite SQL text."""
    chains, parts, trajectory_chains, parts_by_key = sqlite_lookups()
    return SqliteStatements(
        rows=sqlite_sql(rows_by_id_query(preference)),
        chains=chains,
        parts=parts,
        trajectory_chains=trajectory_chains,
        parts_by_key=parts_by_key,
    )


async def count_rows(db: Database, query: Select[Any]) -> int:
    """How many rows `query` returns (one COUNT over it as a subquery)."""
    async with db.engine.connect() as conn:
        counted = select(func.count()).select_from(query.order_by(None).subquery())
        return int((await conn.execute(counted)).scalar_one())


async def statistics(db: Database) -> dict[str, Any]:
    """Aggregates for `stats`, all computed in SQL.

    Returns `{"exchanges", "trajectories", "leaves", "forked_trajectories", "errors",
    "error_rate", "prompt_tokens", "completion_tokens", "first_utc", "last_utc",
    "promoted_exchanges", "shadow_exchanges", "by_route": {route: {...}},
    "by_model": {model: {...}}, "outcomes": {outcome: n}, "labels": {label|"unlabeled": n},
    "tool_call_histogram": {tool calls per trajectory: number of trajectories}}`. Per-route and
    per-model entries hold `exchanges`, `errors`, `prompt_tokens`, `completion_tokens`
    (per-route also `trajectories`). Tokens are the upstream's `usage` numbers.
    """
    e, t = exchanges.c, trajectories.c
    errors = func.coalesce(func.sum(case((e.outcome != "ok", 1), else_=0)), 0)
    out: dict[str, Any] = {}
    async with db.engine.connect() as conn:
        totals = (
            await conn.execute(
                select(
                    func.count(),
                    errors,
                    func.coalesce(func.sum(e.prompt_tokens), 0),
                    func.coalesce(func.sum(e.completion_tokens), 0),
                    func.min(e.started_utc),
                    func.max(e.started_utc),
                    func.count(e.injected_logit_bias_json),
                    func.count(e.shadow_response_json),
                ).select_from(exchanges)
            )
        ).one()
        n_exchanges = int(totals[0])
        out["exchanges"] = n_exchanges
        out["trajectories"] = int(
            (await conn.execute(select(func.count()).select_from(trajectories))).scalar_one()
        )
        out["errors"] = int(totals[1] or 0)
        out["error_rate"] = round(out["errors"] / n_exchanges, 4) if n_exchanges else 0.0
        out["prompt_tokens"] = int(totals[2])
        out["completion_tokens"] = int(totals[3])
        out["first_utc"], out["last_utc"] = totals[4], totals[5]
        out["promoted_exchanges"] = int(totals[6])
        out["shadow_exchanges"] = int(totals[7])

        leaves_per = (
            select(e.trajectory_id, func.count().label("n"))
            .where(_is_leaf())
            .group_by(e.trajectory_id)
            .subquery()
        )
        leaf_row = (
            await conn.execute(
                select(
                    func.coalesce(func.sum(leaves_per.c.n), 0),
                    func.count().filter(leaves_per.c.n > 1),
                ).select_from(leaves_per)
            )
        ).one()
        out["leaves"] = int(leaf_row[0])
        out["forked_trajectories"] = int(leaf_row[1] or 0)

        by_route: dict[str, dict[str, int]] = {}
        for row in await conn.execute(
            select(
                e.route,
                func.count(),
                errors,
                func.coalesce(func.sum(e.prompt_tokens), 0),
                func.coalesce(func.sum(e.completion_tokens), 0),
            ).group_by(e.route)
        ):
            by_route[row[0]] = {
                "trajectories": 0,
                "exchanges": int(row[1]),
                "errors": int(row[2] or 0),
                "prompt_tokens": int(row[3]),
                "completion_tokens": int(row[4]),
            }
        for row in await conn.execute(select(t.route, func.count()).group_by(t.route)):
            by_route.setdefault(
                row[0],
                {"exchanges": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0},
            )["trajectories"] = int(row[1])
        out["by_route"] = dict(sorted(by_route.items()))

        by_model: dict[str, dict[str, int]] = {}
        model = func.coalesce(e.model_answered, e.model_requested, "(none)")
        for row in await conn.execute(
            select(
                model,
                func.count(),
                errors,
                func.coalesce(func.sum(e.prompt_tokens), 0),
                func.coalesce(func.sum(e.completion_tokens), 0),
            )
            .group_by(model)
            .order_by(func.count().desc())
        ):
            by_model[str(row[0])] = {
                "exchanges": int(row[1]),
                "errors": int(row[2] or 0),
                "prompt_tokens": int(row[3]),
                "completion_tokens": int(row[4]),
            }
        out["by_model"] = by_model

        out["outcomes"] = {
            row[0]: int(row[1])
            for row in await conn.execute(
                select(e.outcome, func.count()).group_by(e.outcome).order_by(e.outcome)
            )
        }
        out["labels"] = {
            (row[0] if row[0] is not None else UNLABELED): int(row[1])
            for row in await conn.execute(
                select(t.label, func.count()).group_by(t.label).order_by(t.label)
            )
        }
        out["tool_call_histogram"] = {
            int(row[0]): int(row[1])
            for row in await conn.execute(
                select(t.tool_call_count, func.count())
                .group_by(t.tool_call_count)
                .order_by(t.tool_call_count)
            )
        }
    return out
