"""The one trajectory filter: which trajectories the dashboard list, `/api/*` and the exporter read.

A `TrajectoryFilter` compiles to one SQL condition over the `trajectories` table
(`trajectory_where`), so every reader selects the same trajectories for the same filter: the
dashboard list pages it, `/api/trajectories` returns it, the dashboard's Export and `python -m
exporter export` read the leaves of exactly those trajectories. Conditions on a trajectory's
exchanges (model, free text, promoted) are correlated `EXISTS` subqueries on an alias of
`exchanges`, so the condition also works inside a query that reads `exchanges` itself.

Meanings, fixed here once:
- dates bound when the trajectory **started** (`created_utc`): since inclusive, until exclusive,
  stored-format UTC strings or dates (`2026-11-21`), which compare as text. A trajectory falls in
  exactly one window however long it runs, so consecutive exports never overlap.
- a model matches the requested or answered model of any exchange of the trajectory, or a dated
  snapshot of it (`o3` matches an answer from `o3-2025-04-16`, `gpt-4` one from `gpt-4-0613`;
  `gpt-4.1` does not match `gpt-4.1-mini`).
- "unlabeled" is a NULL or empty `label`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from sqlalchemy import ColumnElement, and_, exists, false, func, or_, select, true

from proxy.storage.bodies import RequestItemsLike, stored_text
from proxy.storage.schema import exchanges, trajectories

UNLABELED: Final = "unlabeled"
"""The label value that stands for trajectories without a label (NULL or '')."""

LABELS: Final = ("approved", "rejected")
"""The curation labels stored in `trajectories.label`."""

MAX_SQL_IDS: Final = 5000
"""Most trajectory ids sent as query parameters (SQLite allows 32,766 per statement)."""

_LIKE_ESCAPE: Final = "\\"


class FilterError(ValueError):
    """A filter value that cannot be compiled (unknown label, too many ids)."""


@dataclass(frozen=True)
class TrajectoryFilter:
    """Which trajectories to read; every field is optional, set fields combine with AND.

    route: 'student' | 'teacher' (`trajectories.route`). models: any exchange's requested or
    answered model is one of these or a dated snapshot of one; empty: any. labels: keep these
    ('approved', 'rejected', `UNLABELED`); None: all. has_tool_calls / errors: at least one tool
    call / failed exchange (True) or none (False). since_utc (inclusive) / until_utc
    (exclusive): bounds on the trajectory's start (`created_utc`), stored-format ISO-8601 UTC
    or a date. text: case-insensitive substring of the trajectory id, note, tags or any
    exchange's request, response or error JSON (a scan). tags: every one is among the
    trajectory's curation tags, exactly. ids: only these trajectory ids (at most `MAX_SQL_IDS`).
    exclude_promoted: no exchange of the trajectory had a logit_bias injected.
    """

    route: str | None = None
    models: tuple[str, ...] = ()
    labels: tuple[str, ...] | None = None
    has_tool_calls: bool | None = None
    errors: bool | None = None
    since_utc: str | None = None
    until_utc: str | None = None
    text: str | None = None
    tags: tuple[str, ...] = ()
    ids: tuple[str, ...] | None = None
    exclude_promoted: bool = False

    def is_empty(self) -> bool:
        """True when no condition is set (the filter selects every trajectory)."""
        return self == TrajectoryFilter()


def like_pattern(text: str) -> str:
    """A LIKE pattern matching `text` anywhere, `%`, `_` and `\\` taken literally (escape `\\`)."""
    escaped = text.replace(_LIKE_ESCAPE, _LIKE_ESCAPE * 2).replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _label_condition(labels: tuple[str, ...]) -> ColumnElement[bool]:
    t = trajectories.c
    unknown = [label for label in labels if label not in (*LABELS, UNLABELED)]
    if unknown:
        raise FilterError(f"unknown label {unknown[0]!r}: use {', '.join((*LABELS, UNLABELED))}")
    named = sorted({label for label in labels if label != UNLABELED})
    if UNLABELED in labels and not named:
        # Not `label IS NULL`: unlabeled is most of the table, and the label index would make
        # the database sort all of it; walking the updated_utc index and filtering stops early.
        return func.coalesce(t.label, "") == ""
    options: list[ColumnElement[bool]] = []
    if named:
        options.append(t.label.in_(named))
    if UNLABELED in labels:
        options.append(func.coalesce(t.label, "") == "")
    return or_(*options) if options else false()


def _snapshot_of(column: ColumnElement[str], model: str) -> ColumnElement[bool]:
    """`column` names a dated snapshot of `model`: `MODEL-YYYY-MM-DD` (`o3-2025-04-16`) or
    `MODEL-NNNN` (`gpt-4-0613`); never another model that merely starts alike (`gpt-4.1-mini`)."""
    base = model.replace(_LIKE_ESCAPE, _LIKE_ESCAPE * 2).replace("%", "\\%").replace("_", "\\_")
    suffix = func.substr(column, len(model) + 2)
    return or_(
        and_(
            column.like(f"{base}-____-__-__", escape=_LIKE_ESCAPE),
            suffix.between("1900-01-01", "2999-12-31"),
        ),
        and_(column.like(f"{base}-____", escape=_LIKE_ESCAPE), suffix.between("0000", "9999")),
    )


def trajectory_conditions(flt: TrajectoryFilter) -> list[ColumnElement[bool]]:
    """The conditions of `flt` over `trajectories` (AND them; empty for an empty filter).

    Raises FilterError for an unknown label or more than `MAX_SQL_IDS` ids.
    """
    t = trajectories.c
    e = exchanges.alias("filter_exchange")
    where: list[ColumnElement[bool]] = []
    if flt.route:
        where.append(t.route == flt.route)
    if flt.labels is not None:
        where.append(_label_condition(flt.labels))
    if flt.has_tool_calls is not None:
        where.append(t.tool_call_count > 0 if flt.has_tool_calls else t.tool_call_count == 0)
    if flt.errors is not None:
        where.append(t.error_count > 0 if flt.errors else t.error_count == 0)
    if flt.since_utc:
        where.append(t.created_utc >= flt.since_utc)
        # Implied (a trajectory's last activity is never before its start), and it lets the
        # list's walk of the updated_utc index stop at the bound.
        where.append(t.updated_utc >= flt.since_utc)
    if flt.until_utc:
        where.append(t.created_utc < flt.until_utc)
    if flt.ids is not None:
        if len(flt.ids) > MAX_SQL_IDS:
            raise FilterError(f"at most {MAX_SQL_IDS} trajectory ids per query")
        where.append(t.id.in_(list(flt.ids)) if flt.ids else false())
    for tag in flt.tags:
        pattern = like_pattern(json.dumps(tag))
        where.append(t.tags_json.like(pattern, escape=_LIKE_ESCAPE))
    if flt.models:
        models = list(flt.models)
        snapshots = [_snapshot_of(e.c.model_answered, m) for m in models]
        where.append(
            exists().where(
                e.c.trajectory_id == t.id,
                or_(e.c.model_requested.in_(models), e.c.model_answered.in_(models), *snapshots),
            )
        )
    if flt.exclude_promoted:
        where.append(
            ~exists(
                select(e.c.id).where(
                    e.c.trajectory_id == t.id, e.c.injected_logit_bias_json.is_not(None)
                )
            )
        )
    if flt.text:
        pattern = like_pattern(flt.text)
        where.append(
            or_(
                t.id == flt.text,
                t.note.ilike(pattern, escape=_LIKE_ESCAPE),
                t.tags_json.ilike(pattern, escape=_LIKE_ESCAPE),
                exists().where(
                    e.c.trajectory_id == t.id,
                    or_(
                        stored_text(e.c.request_json).ilike(pattern, escape=_LIKE_ESCAPE),
                        RequestItemsLike(e.c.request_refs_json, pattern),
                        stored_text(e.c.response_json).ilike(pattern, escape=_LIKE_ESCAPE),
                        stored_text(e.c.error_json).ilike(pattern, escape=_LIKE_ESCAPE),
                    ),
                ),
            )
        )
    return where


def trajectory_where(*filters: TrajectoryFilter) -> ColumnElement[bool]:
    """One WHERE condition over `trajectories` selecting what every one of `filters` selects.

    Use it in any query that has `trajectories` in its FROM (alone, or joined to `exchanges`).
    Raises FilterError (see `trajectory_conditions`).
    """
    conditions = [c for flt in filters for c in trajectory_conditions(flt)]
    return and_(true(), *conditions)
