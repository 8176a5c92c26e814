"""Query parameters of the list (page and API alike): filters, page size and cursors.

route, model, label (approved|rejected|unlabeled|labeled), tools (yes|no), errors (yes|no),
from, to (when the trajectory started: YYYY-MM-DD or ISO-8601; `to` is inclusive for a date), q (free text), tag,
limit (1..500), after / before (cursors from a previous page)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import urlencode

from proxy.storage.browse import MAX_PAGE_SIZE
from proxy.storage.filters import LABELS, UNLABELED, TrajectoryFilter

FILTER_PARAMS = ("route", "model", "label", "tools", "errors", "from", "to", "q", "tag")
LABEL_CHOICES = (*LABELS, UNLABELED, "labeled")
DEFAULT_LIMIT = 50
_MAX_TEXT = 200


class ParamError(ValueError):
    """A query parameter with a value the list does not take; `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class ListQuery:
    """A parsed list request: the filter, the raw filter values (to rebuild links) and paging."""

    filter: TrajectoryFilter
    values: dict[str, str]
    limit: int = DEFAULT_LIMIT
    after: str | None = None
    before: str | None = None

    def link(self, **changes: str | None) -> str:
        """A query string (with `?`) for this filter with `changes` applied (None removes)."""
        values: dict[str, str] = dict(self.values)
        if self.limit != DEFAULT_LIMIT:
            values["limit"] = str(self.limit)
        for key, value in changes.items():
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
        return "?" + urlencode(values) if values else "?"

    def without_paging(self) -> ListQuery:
        """The same filter on its first page."""
        return replace(self, after=None, before=None)


def _yes_no(value: str, param: str) -> bool | None:
    if value in ("", "any"):
        return None
    if value in ("yes", "true", "1"):
        return True
    if value in ("no", "false", "0"):
        return False
    raise ParamError(f"{param} must be yes or no", param)


def _labels(label: str | None) -> tuple[str, ...] | None:
    """The filter's labels for the `label` parameter (None: any label)."""
    if label is None:
        return None
    if label == "labeled":
        return LABELS
    return (label,)


def parse_time(value: str, param: str, *, end: bool = False) -> str:
    """A `from`/`to` bound as a stored-format UTC string.

    A date (YYYY-MM-DD) is the start of that day, or for `end` the start of the next (so `to` is
    inclusive). A datetime without zone is taken as UTC. Raises ParamError.
    """
    text = value.strip()
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            return (day + dt.timedelta(days=1 if end else 0)).isoformat()
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ParamError(f"{param} must be a date (YYYY-MM-DD) or an ISO-8601 time", param) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds")


def parse_list_query(params: Mapping[str, str]) -> ListQuery:
    """The filter and paging of a list request; raises ParamError for a bad value."""
    values = {k: params[k].strip() for k in FILTER_PARAMS if params.get(k, "").strip()}
    for key, value in values.items():
        if len(value) > _MAX_TEXT:
            raise ParamError(f"{key} is longer than {_MAX_TEXT} characters", key)
    label = values.get("label")
    if label is not None and label not in LABEL_CHOICES:
        raise ParamError(f"label must be one of {', '.join(LABEL_CHOICES)}", "label")
    flt = TrajectoryFilter(
        route=values.get("route"),
        models=(values["model"],) if "model" in values else (),
        labels=_labels(label),
        has_tool_calls=_yes_no(values.get("tools", ""), "tools"),
        errors=_yes_no(values.get("errors", ""), "errors"),
        since_utc=parse_time(values["from"], "from") if "from" in values else None,
        until_utc=parse_time(values["to"], "to", end=True) if "to" in values else None,
        text=values.get("q"),
        tags=(values["tag"],) if "tag" in values else (),
    )
    raw_limit = params.get("limit", "").strip()
    try:
        limit = int(raw_limit) if raw_limit else DEFAULT_LIMIT
    except ValueError as exc:
        raise ParamError("limit must be an integer", "limit") from exc
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ParamError(f"limit must be between 1 and {MAX_PAGE_SIZE}", "limit")
    after = params.get("after") or None
    before = params.get("before") or None
    if after and before:
        raise ParamError("give at most one of after and before", "before")
    return ListQuery(flt, values, limit, after, before)
