"""The dashboard's queries (`proxy.storage.browse`) on a real SQLite file and on a fresh
database of the PostgreSQL test server (`pg_url` in conftest); plus the list's query plans."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from proxy.core.packing import register_sqlite_functions
from proxy.storage import Database
from proxy.storage.browse import (
    CursorError,
    TrajectoryFilter,
    chart_rows,
    get_trajectory,
    label_many,
    label_trajectory,
    list_trajectories,
    neighbour_unlabeled,
    recent_models,
    trajectory_details,
)
from proxy.storage.schema import exchanges, trajectories
from tests.support.exporter import completion, record, write_records

# -- both dialects ----------------------------------------------------------------------------


# `db_target` and `db` (each dialect, migrated): tests/conftest.py


# -- data --------------------------------------------------------------------------------------


def ts(minute: int, second: int = 0) -> str:
    return f"2026-11-21T10:{minute:02d}:{second:02d}.000+00:00"


async def add(
    db: Database,
    tid: str,
    updated: str,
    *,
    route: str = "student",
    label: str | None = None,
    tags: list[str] | None = None,
    note: str | None = None,
    tool_calls: int = 0,
    errors: int = 0,
    model: str = "gpt-4.1-mini",
    text: str = "hello",
    steps: int = 1,
) -> None:
    """A trajectory with `steps` exchanges ending at `updated` (each one second apart)."""
    rows = []
    started = [
        updated[:17] + f"{max(0, int(updated[17:19]) - (steps - 1 - i)):02d}" + updated[19:]
        for i in range(steps)
    ]
    for step in range(steps):
        request = {"model": model, "messages": [{"role": "user", "content": text}]}
        rows.append(
            {
                "id": f"{tid}-x{step}",
                "trajectory_id": tid,
                "parent_id": f"{tid}-x{step - 1}" if step else None,
                "step": step,
                "started_utc": started[step],
                "duration_ms": 100.0 * (step + 1),
                "ttft_ms": 20.0,
                "path": "/v1/chat/completions",
                "stream": False,
                "status_code": 200,
                "outcome": "error" if errors and step == steps - 1 else "ok",
                "route": route,
                "model_requested": model,
                "model_answered": model,
                "request_json": json.dumps(request),
                "response_json": json.dumps(
                    {
                        "choices": [
                            {
                                "message": {
                                    "role": "assistant",
                                    "content": f"re: {text}",
                                    "tool_calls": [{"function": {"name": "lookup"}}]
                                    * (tool_calls if step == 0 else 0),
                                }
                            }
                        ]
                    }
                ),
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "total_tokens": 15,
                "tool_call_count": tool_calls if step == 0 else 0,
                "request_hash": f"h{tid}{step}",
                "state_hash": f"s{tid}{step}",
            }
        )
    async with db.engine.begin() as conn:
        await conn.execute(
            trajectories.insert(),
            {
                "id": tid,
                "created_utc": started[0],
                "updated_utc": updated,
                "id_source": "hash",
                "route": route,
                "exchange_count": steps,
                "error_count": errors,
                "tool_call_count": tool_calls,
                "prompt_tokens": 10 * steps,
                "completion_tokens": 5 * steps,
                "label": label,
                "tags_json": json.dumps(tags) if tags else None,
                "note": note,
            },
        )
        await conn.execute(exchanges.insert(), rows)


async def ids(db: Database, flt: TrajectoryFilter, **kw: Any) -> list[str]:
    return [row["id"] for row in (await list_trajectories(db, flt, **kw)).rows]


# -- tests -------------------------------------------------------------------------------------


async def test_filters(db: Database) -> None:
    await add(db, "a", ts(1), route="teacher", tool_calls=2, text="refund order 42", steps=3)
    await add(db, "b", ts(2), label="approved", tags=["good", "par_allel"], model="gpt-4.1")
    await add(db, "c", ts(3), label="rejected", errors=1, note="Wrong tool 100%")
    await add(db, "d", ts(4, 30), text="50% off_sale")
    assert await ids(db, TrajectoryFilter()) == ["d", "c", "b", "a"]
    assert await ids(db, TrajectoryFilter(route="teacher")) == ["a"]
    assert await ids(db, TrajectoryFilter(labels=("approved",))) == ["b"]
    assert await ids(db, TrajectoryFilter(labels=("unlabeled",))) == ["d", "a"]
    assert await ids(db, TrajectoryFilter(labels=("approved", "rejected"))) == ["c", "b"]
    assert await ids(db, TrajectoryFilter(has_tool_calls=True)) == ["a"]
    assert await ids(db, TrajectoryFilter(has_tool_calls=False)) == ["d", "c", "b"]
    assert await ids(db, TrajectoryFilter(errors=True)) == ["c"]
    assert await ids(db, TrajectoryFilter(models=("gpt-4.1",))) == ["b"]  # not gpt-4.1-mini
    assert await ids(db, TrajectoryFilter(models=("gpt-4.1-mini", "gpt-4.1"))) == [
        "d",
        "c",
        "b",
        "a",
    ]
    assert await ids(db, TrajectoryFilter(since_utc=ts(2), until_utc=ts(4))) == ["c", "b"]
    assert await ids(db, TrajectoryFilter(since_utc="2026-11-22")) == []
    assert await ids(db, TrajectoryFilter(until_utc="2026-11-22")) == ["d", "c", "b", "a"]
    assert await ids(db, TrajectoryFilter(text="REFUND")) == ["a"]  # case-insensitive
    assert await ids(db, TrajectoryFilter(text="wrong tool")) == ["c"]  # the note
    assert await ids(db, TrajectoryFilter(text="50%")) == ["d"]  # % is literal
    assert await ids(db, TrajectoryFilter(text="o_f")) == []  # _ is literal (would match "off")
    assert await ids(db, TrajectoryFilter(text="b")) != [] and "b" in await ids(
        db, TrajectoryFilter(text="b")
    )
    assert await ids(db, TrajectoryFilter(tags=("par_allel",))) == ["b"]
    assert await ids(db, TrajectoryFilter(tags=("par",))) == []  # whole tags only
    assert await ids(db, TrajectoryFilter(ids=("a", "c"))) == ["c", "a"]
    assert await ids(db, TrajectoryFilter(ids=())) == []
    assert await ids(db, TrajectoryFilter(route="teacher", labels=("approved",))) == []


async def test_keyset_pages_cover_everything_once(db: Database) -> None:
    for n in range(23):
        # Pairs share a timestamp, so the id breaks ties.
        await add(db, f"t{n:02d}", ts(n // 2))
    seen: list[str] = []
    page = await list_trajectories(db, limit=5)
    assert page.prev_cursor is None
    pages = [page]
    while page.next_cursor:
        page = await list_trajectories(db, limit=5, after=page.next_cursor)
        pages.append(page)
    for p in pages:
        seen += [row["id"] for row in p.rows]
    expected = sorted(
        (f"t{n:02d}" for n in range(23)), key=lambda i: (int(i[1:]) // 2, i), reverse=True
    )
    assert seen == expected
    assert [len(p.rows) for p in pages] == [5, 5, 5, 5, 3]
    # Going back from the third page gives the second page, then the first (full) page.
    back = await list_trajectories(db, limit=5, before=pages[2].prev_cursor)
    assert [r["id"] for r in back.rows] == [r["id"] for r in pages[1].rows]
    assert back.prev_cursor is not None and back.next_cursor is not None
    first = await list_trajectories(db, limit=5, before=back.prev_cursor)
    assert [r["id"] for r in first.rows] == [r["id"] for r in pages[0].rows]
    assert first.prev_cursor is None
    with pytest.raises(CursorError):
        await list_trajectories(db, after="garbage")


async def test_details_label_and_get(db: Database) -> None:
    await add(db, "a", ts(5, 10), steps=3, text="plan a trip", tool_calls=1)
    page = await list_trajectories(db)
    details = await trajectory_details(db, page.rows)
    d = details["a"]
    assert d.first_user_text == "plan a trip"
    assert d.models == [
        {
            "model_requested": "gpt-4.1-mini",
            "model_answered": "gpt-4.1-mini",
            "exchanges": 3,
            "prompt_tokens": 30,
            "completion_tokens": 15,
        }
    ]
    assert d.duration_ms == pytest.approx(2000 + 300)  # 2 s span + the last exchange's 300 ms

    row = await label_trajectory(db, "a", label="approved", tags=["x", "y"], note="fine")
    assert row is not None
    assert (row["label"], json.loads(row["tags_json"]), row["note"]) == (
        "approved",
        ["x", "y"],
        "fine",
    )
    assert row["labeled_utc"]
    row = await label_trajectory(db, "a", label=None)  # tags and note kept
    assert row is not None and row["label"] is None and row["note"] == "fine"
    assert await label_trajectory(db, "missing", label="approved") is None
    with pytest.raises(ValueError, match="label"):
        await label_trajectory(db, "a", label="great")

    found = await get_trajectory(db, "a")
    assert found is not None and [e["step"] for e in found["exchanges"]] == [0, 1, 2]
    assert await get_trajectory(db, "missing") is None


async def test_label_many_and_next_unlabeled(db: Database) -> None:
    for n, tid in enumerate(["a", "b", "c", "d"]):
        await add(db, tid, ts(n))
    assert await label_many(db, ["b", "c", "nope"], "rejected") == 2
    assert await ids(db, TrajectoryFilter(labels=("rejected",))) == ["c", "b"]
    d = (await list_trajectories(db, TrajectoryFilter(ids=("d",)))).rows[0]
    assert await neighbour_unlabeled(db, d) == "a"
    assert await recent_models(db) == ["gpt-4.1-mini"]


async def test_chart_rows(db: Database) -> None:
    await add(db, "a", ts(1), route="teacher", tool_calls=2)
    await add(db, "b", ts(2), steps=2, model="gpt-4.1")
    rows = await chart_rows(db, "2026-11-21T00:00:00.000+00:00")
    assert sorted(rows.by_bucket_route) == [
        ("2026-11-21T10", "student", 2),
        ("2026-11-21T10", "teacher", 1),
    ]
    assert sorted(rows.tokens_by_model) == [("gpt-4.1", 20, 10, 2), ("gpt-4.1-mini", 10, 5, 1)]
    assert len(rows.latencies) == 3 and len(rows.tool_responses) == 1
    assert rows.totals == {"exchanges": 3, "trajectories": 2}
    empty = await chart_rows(db, "2026-11-22T00:00:00.000+00:00", bucket_chars=10)
    assert empty.by_bucket_route == [] and empty.latencies == []


# -- the list's queries use the indexes (SQLite) -----------------------------------------------
# What keeps the list fast on a large table is its query plans, checked here rather than timed:
# SQLite plans without table statistics (nothing runs ANALYZE), so the plans are those of a
# table of any size.

TRAJECTORY_COUNT = 600


@pytest.fixture(scope="module")
def listed_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file with TRAJECTORY_COUNT one-exchange trajectories (a tenth on the teacher, a
    seventh labelled approved), written through the recorder's storage path."""
    import asyncio

    path = tmp_path_factory.mktemp("listed") / "listed.db"
    items, labels = [], {}
    for n in range(TRAJECTORY_COUNT):
        trajectory_id = f"t{n:05d}"
        request = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": f"hi {n}"}]}
        answer = completion({"role": "assistant", "content": f"hello {n}"})
        started = f"2026-01-{1 + n % 28:02d}T{(n // 28) % 24:02d}:{n % 60:02d}:00.000+00:00"
        route = "teacher" if n % 10 == 0 else "student"
        items.append(record(trajectory_id, request, answer, route=route, started_utc=started))
        if n % 7 == 0:
            labels[trajectory_id] = "approved"
    asyncio.run(write_records(path, items, labels))
    return path


def query_plan(db: Path, statement: str, parameters: Any) -> list[str]:
    """The steps of SQLite's plan for `statement` (`EXPLAIN QUERY PLAN`), e.g. `SEARCH
    trajectories USING INDEX ix_trajectories_updated_utc (updated_utc<?)`."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        register_sqlite_functions(conn)  # understudy_key: request parts looked up (009)
        return [str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)]


async def test_list_pages_walk_the_updated_index_and_never_scan_a_table(listed_db: Path) -> None:
    """Every query the list page runs (pages at the top, after and before a cursor, filtered by
    route, tool calls and labels, then the page's details) reads through an index: no full
    table scan; the keyset pages walk `ix_trajectories_updated_utc` in order (no sort of the
    whole table, no read of `exchanges`); the details read `exchanges` by trajectory."""
    db = await Database.open(str(listed_db))
    executed: list[tuple[str, str, Any]] = []
    stage = ["keyset"]

    @event.listens_for(db.engine.sync_engine, "before_cursor_execute")
    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        executed.append((stage[0], statement, parameters))

    try:
        first = await list_trajectories(db, limit=50)
        deeper = await list_trajectories(db, limit=50, after=first.next_cursor)
        deepest = await list_trajectories(db, limit=50, after=deeper.next_cursor)
        back = await list_trajectories(db, limit=50, before=deepest.prev_cursor)
        assert [len(page.rows) for page in (first, deeper, deepest, back)] == [50] * 4
        assert back.rows == deeper.rows
        teacher = TrajectoryFilter(route="teacher", has_tool_calls=True)
        await list_trajectories(db, teacher, limit=50)
        unlabeled = await list_trajectories(db, TrajectoryFilter(labels=("unlabeled",)), limit=50)
        assert len(unlabeled.rows) == 50
        stage[0] = "label"
        approved = await list_trajectories(db, TrajectoryFilter(labels=("approved",)), limit=50)
        assert len(approved.rows) == 50
        stage[0] = "details"
        details = await trajectory_details(db, deeper.rows)
        assert all(entry.first_user_text for entry in details.values())
    finally:
        await db.close()

    stages = {stage for stage, _, _ in executed}
    assert stages == {"keyset", "label", "details"}, stages
    for stage_name, statement, parameters in executed:
        plan = query_plan(listed_db, statement, parameters)
        # A full table scan grows with the table; a scan of `json_each(?)` (the keys bound as
        # one JSON array) walks the parameter, not stored rows.
        scans = [
            step
            for step in plan
            if step.startswith("SCAN") and " USING " not in step and "VIRTUAL TABLE" not in step
        ]
        assert scans == [], (statement, plan)
        if stage_name == "keyset":
            assert any("ix_trajectories_updated_utc" in step for step in plan), (statement, plan)
            # ties of updated_utc are sorted by id; never every row of the table
            assert "USE TEMP B-TREE FOR ORDER BY" not in plan, (statement, plan)
            assert not any("exchanges" in step for step in plan), (statement, plan)
        elif stage_name == "label":
            assert any("ix_trajectories_label" in step for step in plan), (statement, plan)
        elif "FROM exchanges" in statement:
            assert any("ix_exchanges_trajectory_step" in step for step in plan), (statement, plan)
