"""Reading what a proxy recorded in a SQLite file (after `ProxyServer.stop()`, or while it runs
with `wait_recorded` / `wait_for_ids`), and following trajectories (`leaves`, `path_to`); and
`user_record` and `tool_step_record`, exchange records to hand the recorder or the storage
directly."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.core.canonical import chain_hash, prefix_hashes
from proxy.recording.recorder import ExchangeRecord
from proxy.storage import new_id, utc_now
from proxy.storage.bodies import unpack_row
from tests.support.bodies import whole_requests

_JSON_COLUMNS = {
    "request_json": "request",
    "response_json": "response",
    "error_json": "error",
    "request_headers_json": "headers",
    "metadata_json": "metadata",
    "usage_json": "usage",
}


def db_rows(db: Path, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Rows of `query` on the SQLite file `db`, as dicts."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        # packed JSON texts (migration 008) read as the text they hold
        return [unpack_row(dict(row)) for row in conn.execute(query, params)]


def recorded_ids(db: Path) -> list[str]:
    """The ids of the exchanges recorded in the SQLite file `db` (cheap: for polling a running
    proxy; raises sqlite3.OperationalError while a writer holds a lock)."""
    return [row["id"] for row in db_rows(db, "SELECT id FROM exchanges")]


def recorded_exchanges(db: Path, trajectory_id: str | None = None) -> list[dict[str, Any]]:
    """`exchanges` rows by step then time, each *_json column also decoded under a short name
    (`request`, `response`, `error`, `headers`, `metadata`, `usage`; None when NULL, the raw
    text when it is not JSON)."""
    where, params = ("WHERE trajectory_id = ?", (trajectory_id,)) if trajectory_id else ("", ())
    rows = db_rows(db, f"SELECT * FROM exchanges {where} ORDER BY step, started_utc, id", params)
    rows = whole_requests(db, rows)  # request bodies are stored in parts (migration 003)
    for row in rows:
        for column, name in _JSON_COLUMNS.items():
            row[name] = _json_or_text(row[column])
    return rows


def recorded_trajectories(db: Path, trajectory_id: str | None = None) -> list[dict[str, Any]]:
    """`trajectories` rows (all, or the one of `trajectory_id`), oldest first, as dicts of their
    columns (`label`, `tags_json`, `exchange_count`, `route`, ...)."""
    where, params = ("WHERE id = ?", (trajectory_id,)) if trajectory_id else ("", ())
    return db_rows(db, f"SELECT * FROM trajectories {where} ORDER BY created_utc, id", params)


def _json_or_text(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value  # not JSON: tests that care check the raw column


def wait_recorded(
    db: Path, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Poll a *running* proxy's database until `until(recorded_exchanges(db))` holds; return the
    rows. The recorder writes in batches off the request path, so rows appear a little after the
    answer; after `ProxyServer.stop()` they are all there and no waiting is needed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            rows = recorded_exchanges(db)
        except sqlite3.OperationalError:  # a writer holds a lock for a moment: read again
            rows = []
        if until(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def wait_for_ids(db: Path, *exchange_ids: str) -> dict[str, dict[str, Any]]:
    """The exchanges `exchange_ids` of a running proxy, by id, once all are written."""
    wanted = set(exchange_ids)
    rows = wait_recorded(db, lambda rows: wanted <= {row["id"] for row in rows})
    found = {row["id"]: row for row in rows if row["id"] in wanted}
    assert set(found) == wanted, f"not recorded: {wanted - set(found)}"
    return found


def leaves(exchanges: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The exchanges no other exchange continues (one per branch of each trajectory)."""
    parents = {row["parent_id"] for row in exchanges}
    return [row for row in exchanges if row["id"] not in parents]


def path_to(exchanges: list[dict[str, Any]], leaf: dict[str, Any]) -> list[dict[str, Any]]:
    """The exchanges from the trajectory's first step to `leaf`, following `parent_id`."""
    by_id = {row["id"]: row for row in exchanges}
    path = [leaf]
    while path[-1]["parent_id"] is not None:
        path.append(by_id[path[-1]["parent_id"]])
    return path[::-1]


def response_message(exchange: dict[str, Any]) -> dict[str, Any]:
    """The assistant message of a recorded exchange's (assembled) `chat.completion`."""
    message: dict[str, Any] = exchange["response"]["choices"][0]["message"]
    return message


def conversation(exchange: dict[str, Any]) -> list[dict[str, Any]]:
    """A recorded exchange's request messages followed by its response message."""
    return [*exchange["request"]["messages"], response_message(exchange)]


def database_bytes(db: Path) -> bytes:
    """The raw bytes of a SQLite database and its side files (-wal, -shm, -journal)."""
    files = [db, *(db.with_name(db.name + suffix) for suffix in ("-wal", "-shm", "-journal"))]
    return b"".join(path.read_bytes() for path in files if path.exists())


def user_record(text: str) -> ExchangeRecord:
    """A first-step chat exchange asking `text` (as the message and as the body's `user`),
    answered 200 without a body, with a request hash of its own."""
    body = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": text}], "user": text}
    return ExchangeRecord(
        id=new_id(),
        trajectory_id=new_id(),
        parent_id=None,
        step=0,
        new_trajectory=True,
        id_source="hash",
        route="student",
        shadow=False,
        started_utc=utc_now(),
        path="/v1/chat/completions",
        stream=False,
        request=body,
        request_text=json.dumps(body),
        request_hash=hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
        status_code=200,
    )


def tool_step_record(
    trajectory_id: str,
    step: int,
    messages: list[dict[str, Any]],
    message: dict[str, Any],
    response: dict[str, Any],
    parent_id: str | None,
    tools: list[dict[str, Any]],
    **extra: Any,
) -> ExchangeRecord:
    """Step `step` of a tool-calling conversation as the recorder sees it: `messages` and
    `tools` sent as compact JSON, `response` (holding `message`) answered as the API
    pretty-prints it, the request and state hashes stitching computes; `extra` fields too."""
    request = {"model": "gpt-4.1-mini", "messages": list(messages), "tools": tools}
    hashes = prefix_hashes(messages)
    return ExchangeRecord(
        id=new_id(),
        trajectory_id=trajectory_id,
        parent_id=parent_id,
        step=step,
        new_trajectory=step == 0,
        id_source="hash",
        route="student",
        shadow=False,
        started_utc=f"2026-11-21T10:00:{step:02d}.000+00:00",
        path="/v1/chat/completions",
        stream=False,
        request=request,
        request_text=json.dumps(request, separators=(",", ":")),
        request_hash=hashes[-1],
        status_code=200,
        response=response,
        response_text=json.dumps(response, indent=2),
        state_hash=chain_hash(hashes[-1], message),
        duration_ms=500.0,
        **extra,
    )
