"""Content-addressed request storage on real databases (SQLite file and the PostgreSQL test
server): what is stored, what every reader reads back, NUL, the 003 conversion of old rows."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import random
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

from proxy.core.packing import PACKED_REFS, refs_of_packed, unpack_text
from proxy.storage import Database, new_id
from proxy.storage.bodies import BASE_ID, PARENT_BASE, BodyWriter, stored_text
from proxy.storage.browse import (
    TrajectoryFilter,
    get_trajectory,
    label_trajectory,
    list_trajectories,
)
from proxy.storage.conversion import convert_batch, unconverted_count
from proxy.storage.engine import create_engines, database_url
from proxy.storage.migrations import MIGRATIONS
from proxy.storage.reading import (
    LeafFilter,
    leaves_query,
    rows_by_id_query,
    shadow_query,
    sqlite_row_statements,
    stream_batches,
)
from proxy.storage.rebuild import SqliteRows, json_array
from proxy.storage.schema import blobs, exchanges, trajectories
from tests.support.migrations import apply_first_migrations, run_migrate_command
from tests.support.shapes import SHAPES, TOOLS

IMAGE = "data:image/png;base64," + base64.b64encode(random.Random(3).randbytes(150_000)).decode()
SYSTEM = {"role": "system", "content": "You are a support agent. Use the tools."}


# `db_target` and `db` (each dialect, migrated): tests/conftest.py


# -- rows ----------------------------------------------------------------------------------------

_clock = [0]


def started() -> str:
    _clock[0] += 1
    minute, second = divmod(_clock[0], 60)
    return f"2026-11-21T{10 + minute // 60:02d}:{minute % 60:02d}:{second:02d}.000+00:00"


def exchange_row(
    trajectory_id: str,
    step: int,
    request: Any,
    *,
    parent_id: str | None = None,
    answer: dict[str, Any] | None = None,
    user: str | None = None,
    raw: str | None = None,
) -> dict[str, Any]:
    """An `exchanges` row as the recorder builds it (request_json: the whole body text)."""
    answer = answer or {"role": "assistant", "content": f"answer {step}"}
    return {
        "id": new_id(),
        "trajectory_id": trajectory_id,
        "parent_id": parent_id,
        "step": step,
        "started_utc": started(),
        "path": "/v1/chat/completions",
        "stream": False,
        "status_code": 200,
        "outcome": "ok",
        "route": "student",
        "model_requested": "gpt-4.1-mini",
        "request_json": raw if raw is not None else json.dumps(request),
        "response_json": json.dumps(
            {"object": "chat.completion", "choices": [{"index": 0, "message": answer}]}
        ),
        "end_user": user,
        "tool_call_count": len(answer.get("tool_calls") or []),
        "request_hash": f"r{step}",
        "state_hash": f"s{trajectory_id}{step}",
    }


def trajectory_row(trajectory_id: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": trajectory_id,
        "created_utc": min(r["started_utc"] for r in rows),
        "updated_utc": max(r["started_utc"] for r in rows),
        "id_source": "hash",
        "route": "student",
        "shadow": False,
        "exchange_count": len(rows),
        "error_count": 0,
        "tool_call_count": sum(r["tool_call_count"] for r in rows),
        "prompt_tokens": 0,
        "completion_tokens": 0,
    }


async def write(db: Database, rows: list[dict[str, Any]]) -> None:
    """Write `rows` in one batch (one trajectory row per trajectory)."""
    by_trajectory: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_trajectory.setdefault(row["trajectory_id"], []).append(row)
    await db.write_exchanges(rows, [trajectory_row(t, r) for t, r in by_trajectory.items()])


def agent_loop(trajectory_id: str, steps: int, *, extra: Any = None) -> list[dict[str, Any]]:
    """A BFCL-shaped tool loop: each step re-sends the history plus a tool call and its result."""
    messages: list[Any] = [SYSTEM, {"role": "user", "content": extra or "Where is order A1?"}]
    rows: list[dict[str, Any]] = []
    for step in range(steps):
        call = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": f"call_{step}",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": step})},
                }
            ],
        }
        request = {"model": "gpt-4.1-mini", "messages": list(messages), "tools": TOOLS}
        parent = rows[-1]["id"] if rows else None
        rows.append(exchange_row(trajectory_id, step, request, parent_id=parent, answer=call))
        messages += [call, {"role": "tool", "tool_call_id": f"call_{step}", "content": f"r{step}"}]
    return rows


def sent(row: dict[str, Any]) -> Any:
    return json.loads(row["request_json"])


# -- what every reader reads ---------------------------------------------------------------------


async def test_every_reader_gets_the_request_bodies_json_equal(db: Database) -> None:
    loop = agent_loop("loop", 4, extra=[{"type": "image_url", "image_url": {"url": IMAGE}}])
    singles = [exchange_row(f"one-{i}", 0, body) for i, body in enumerate(SHAPES.values())]
    singles.append(exchange_row("raw", 0, None, raw='{"model": "m",  "messages": [ ]}'))
    singles.append(exchange_row("garbage", 0, None, raw="{not json"))
    expected = {row["id"]: row["request_json"] for row in loop + singles}
    await write(db, loop[:2])
    await write(db, loop[2:] + singles)
    await db.write_exchanges(
        [],
        [],
        [
            {
                "id": loop[1]["id"],
                "shadow_model": "o3",
                "shadow_response_json": loop[1]["response_json"],
                "shadow_error_json": None,
                "shadow_duration_ms": 1.0,
            }
        ],
    )

    def check(rows: list[dict[str, Any]]) -> None:
        assert rows
        for row in rows:
            assert "request_refs_json" not in row and "request_base_id" not in row
            want = expected[row["id"]]
            if want == "{not json":
                assert row["request_json"] == want
            else:
                assert json.loads(row["request_json"]) == json.loads(want), row["id"]
                assert list(sent(row)) == list(json.loads(want))

    check(await db.exchanges_of("loop"))
    trajectory = await get_trajectory(db, "loop")
    assert trajectory is not None
    check(trajectory["exchanges"])
    leaves = [
        r
        async for b in stream_batches(db, leaves_query(LeafFilter(complete_only=False)), 3)
        for r in b
    ]
    assert len(leaves) == len(singles) + 1
    check(leaves)
    shadows = [r async for b in stream_batches(db, shadow_query(LeafFilter())) for r in b]
    assert [r["id"] for r in shadows] == [loop[1]["id"]]
    check(shadows)
    check([row async for row in db.stream(select(exchanges))])


async def test_references_grow_linearly_and_each_part_is_stored_once(db: Database) -> None:
    rows = agent_loop("long", 30, extra=[{"type": "image_url", "image_url": {"url": IMAGE}}])
    for start in range(0, 30, 7):  # several batches, some steps with their parent in the batch
        await write(db, rows[start : start + 7])
    async with db.engine.connect() as conn:
        stored = {
            r.id: r
            for r in await conn.execute(
                select(
                    exchanges.c.id,
                    BASE_ID,
                    exchanges.c.request_base_id.label("stored_base"),
                    exchanges.c.request_refs_json,
                    func.length(exchanges.c.request_json).label("options"),
                )
            )
        }
        parts = (
            await conn.execute(
                select(func.count(), func.sum(func.length(blobs.c.body_json))).select_from(blobs)
            )
        ).one()
        images = (
            await conn.execute(
                select(func.count())
                .select_from(blobs)
                .where(
                    stored_text(blobs.c.body_json).like("%iVBOR%")
                    | stored_text(blobs.c.body_json).like(f"%{IMAGE[30:60]}%")
                )
            )
        ).scalar_one()
    for step, row in enumerate(rows):
        refs = json.loads(unpack_text(stored[row["id"]].request_refs_json) or "")
        if step == 0:
            assert stored[row["id"]].request_base_id is None and len(refs["items"]) == 2
        else:  # only the tool call and its result are new
            assert stored[row["id"]].request_base_id == rows[step - 1]["id"]
            assert stored[row["id"]].stored_base == PARENT_BASE  # not the id again (009)
            assert len(refs["items"]) == 2
        assert stored[row["id"]].options < 120  # model, null, null: no history
    # system, user (with the image), 29 calls + 29 results: each once; one tool list.
    assert parts[0] == 2 + 2 * 29 + 1
    assert images == 1
    assert parts[1] < len(IMAGE) + 20_000
    assert [sent(r)["messages"] for r in await db.exchanges_of("long")] == [
        sent(r)["messages"] for r in rows
    ]


async def test_a_parent_this_process_did_not_write_gives_a_full_reference_list(
    db_target: str,
) -> None:
    rows = agent_loop("restart", 3)
    first = await Database.open(db_target)
    try:
        await write(first, rows[:2])
    finally:
        await first.close()
    second = await Database.open(db_target)  # a restart: nothing remembered
    try:
        await write(second, rows[2:])
        async with second.engine.connect() as conn:
            base, refs = (
                await conn.execute(
                    select(exchanges.c.request_base_id, exchanges.c.request_refs_json).where(
                        exchanges.c.id == rows[2]["id"]
                    )
                )
            ).one()
        assert base is None and len(json.loads(unpack_text(refs) or "")["items"]) == 6
        assert [sent(r) for r in await second.exchanges_of("restart")] == [sent(r) for r in rows]
    finally:
        await second.close()


async def test_nul_in_user_content_and_arguments_is_stored_losslessly(db: Database) -> None:
    body = SHAPES["nul everywhere"]
    row = exchange_row(
        "nul", 0, body, user=body["user"], answer={"role": "assistant", "content": "ok\x00"}
    )
    row["metadata_json"] = '{"k": "v\x00"}'  # not written by a JSON encoder: raw NUL
    await write(db, [row])
    (back,) = await db.exchanges_of("nul")
    assert sent(back) == body
    assert sent(back)["user"] == "a\x00b"
    assert sent(back)["messages"][1]["tool_calls"][0]["function"]["arguments"] == (
        '{"q": "\\u0000x\x00"}'
    )
    assert json.loads(back["response_json"])["choices"][0]["message"]["content"] == "ok\x00"
    assert json.loads(back["metadata_json"]) == {"k": "v\x00"}
    assert back["end_user"] == "a\ufffdb"  # the display copy; the body keeps the exact value


async def test_a_curation_note_with_nul_is_stored_on_both_databases(db: Database) -> None:
    await write(db, agent_loop("noted", 1))
    row = await label_trajectory(db, "noted", label="approved", note="keep\x00this", tags=["t\x00"])
    assert row is not None
    assert (row["label"], row["note"], json.loads(row["tags_json"])) == (
        "approved",
        "keep\ufffdthis",
        ["t\x00"],
    )


async def test_the_dashboard_text_search_finds_words_stored_in_parts(db: Database) -> None:
    await write(db, agent_loop("kitchen", 3, extra="Do you sell Kitchenware?"))
    await write(db, agent_loop("other", 2))
    page = await list_trajectories(db, TrajectoryFilter(text="kitchenware"))
    assert [row["id"] for row in page.rows] == ["kitchen"]
    page = await list_trajectories(db, TrajectoryFilter(text='"r0"'))  # step 1 tool result
    assert {row["id"] for row in page.rows} == {"kitchen", "other"}
    page = await list_trajectories(db, TrajectoryFilter(text="100%_"))
    assert page.rows == []


async def test_reading_many_leaves_costs_a_few_queries_not_one_per_message(db: Database) -> None:
    rows = [row for t in range(40) for row in agent_loop(f"t{t}", 6)]
    await write(db, rows)
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(db.engine.sync_engine, "before_cursor_execute", count)
    try:
        leaves = [
            r
            async for b in stream_batches(db, leaves_query(LeafFilter(complete_only=False)), 500)
            for r in b
        ]
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", count)
    assert len(leaves) == 40 and all(len(sent(r)["messages"]) == 12 for r in leaves)
    # the leaves, one recursive query for their bases, one for their parts
    assert len([s for s in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))]) <= 4


def continued(row: dict[str, Any], tool_result: str) -> dict[str, Any]:
    """The next request body after `row`: its messages, its answer's tool call, a result."""
    body = sent(row)
    call = json.loads(row["response_json"])["choices"][0]["message"]
    call_id = call["tool_calls"][0]["id"]
    body["messages"] = [
        *body["messages"],
        call,
        {"role": "tool", "tool_call_id": call_id, "content": tool_result},
    ]
    return body


def responses_steps(trajectory_id: str) -> list[dict[str, Any]]:
    """Two chained Responses API exchanges (their `input` items are cut like messages)."""
    items: list[Any] = [{"role": "user", "content": [{"type": "input_text", "text": "Go"}]}]
    rows: list[dict[str, Any]] = []
    for step in range(2):
        body = {"model": "gpt-4.1", "input": list(items), "tools": [{"type": "web_search"}]}
        row = exchange_row(trajectory_id, step, body, parent_id=rows[-1]["id"] if rows else None)
        rows.append({**row, "path": "/v1/responses", "kind": "responses"})
        items += [{"type": "function_call_output", "call_id": f"c{step}", "output": f"{step}"}]
    return rows


@pytest.mark.parametrize("db_target", ["sqlite"], indirect=True)
@pytest.mark.parametrize("preference", [False, True], ids=["leaves", "pairs"])
async def test_a_worker_reads_what_the_engine_reads_from_a_damaged_file(
    db: Database, preference: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # An export worker reads rows by id with the standard library's sqlite3 (`SqliteRows`):
    # the same rows and the same log lines as `rebuild_requests`, however the chains run.
    loop = agent_loop("loop", 4)
    fork = exchange_row("loop", 2, continued(loop[1], "other"), parent_id=loop[1]["id"])
    moved = exchange_row("moved", 4, continued(loop[3], "r3"), parent_id=loop[3]["id"])
    lost, damaged, refs, text = (
        agent_loop(name, 3, extra=name) for name in ("lost", "dmg", "r", "t")
    )
    answers = responses_steps("responses")
    everything = [*loop, fork, moved, *lost, *damaged, *refs, *text, *answers]
    await write(db, [*loop, *lost, *damaged, *refs, *text])
    await write(db, [fork, moved])  # its own batch: the fork's base is a stored row
    await write(db, answers)  # a batch of rows with a `kind` (one insert: one set of columns)
    await db.write_exchanges(
        [],
        [],
        [
            {
                "id": loop[2]["id"],
                "shadow_model": "o3",
                "shadow_response_json": loop[2]["response_json"],
                "shadow_error_json": None,
                "shadow_duration_ms": 1.0,
            }
        ],
    )
    assert db.sqlite_file is not None
    with contextlib.closing(sqlite3.connect(db.sqlite_file)) as conn, conn:
        (packed,) = conn.execute(
            "SELECT request_refs_json FROM exchanges WHERE id = ?", (damaged[0]["id"],)
        ).fetchone()
        assert packed[0] == PACKED_REFS  # binary references: the parts are found by key
        user = refs_of_packed(packed, hex_keys=False)["items"][1]  # in this trajectory only
        conn.execute("UPDATE blobs SET body_json = x'01ffff' WHERE hash = ?", (user,))
        conn.execute("DELETE FROM exchanges WHERE id = ?", (lost[1]["id"],))  # a base missing
        conn.execute(
            "UPDATE exchanges SET request_refs_json = substr(request_refs_json, 1, 9) WHERE id = ?",
            (refs[2]["id"],),
        )
        conn.execute(
            "UPDATE exchanges SET response_json = x'01ffff' WHERE id = ?", (refs[1]["id"],)
        )
        for exchange_id, stored in conn.execute(
            "SELECT id, request_refs_json FROM exchanges WHERE trajectory_id = 't'"
        ).fetchall():  # references as text, as rows written before 009 hold them
            conn.execute(
                "UPDATE exchanges SET request_refs_json = ? WHERE id = ?",
                (unpack_text(stored), exchange_id),
            )
    ids = [row["id"] for row in reversed(everything)] + ["no-such-id"]
    query = rows_by_id_query(preference).params(ids=json_array(ids))
    caplog.set_level(logging.WARNING, logger="understudy.storage")
    by_id = {row["id"]: row async for rows in db.stream_batches(query) for row in rows}
    engine_logs = Counter(record.getMessage() for record in caplog.records)
    caplog.clear()
    reader = SqliteRows(db.sqlite_file, sqlite_row_statements(preference))
    try:
        direct = reader.read(ids)
    finally:
        reader.close()
    assert direct == [by_id[exchange_id] for exchange_id in ids if exchange_id in by_id]
    assert Counter(record.getMessage() for record in caplog.records) == engine_logs
    # what both read is right: the damage logged (a part by its hex), every other body whole
    unpacked = f"request part {user.hex()} cannot be read (damaged packed text:"
    assert sum(line.startswith(unpacked) for line in engine_logs) == 1
    not_rebuilt = {
        line.split(":")[0].removeprefix("exchange ")
        for line in engine_logs
        if "cannot be rebuilt" in line
    }
    assert not_rebuilt == {lost[2]["id"], *(row["id"] for row in damaged)}
    assert (
        f"exchange {refs[2]['id']}: request_refs_json cannot be read (truncated request references)"
        in engine_logs
    )
    assert any(
        line.startswith(f"exchange {refs[1]['id']}: response_json cannot be")
        for line in engine_logs
    )
    assert len(engine_logs) == 1 + len(not_rebuilt) + 2
    for original in everything:
        row = by_id.get(original["id"])
        if row is not None and row["id"] not in not_rebuilt | {refs[2]["id"]}:
            assert json.loads(row["request_json"]) == sent(original), original["id"]
    assert {row["kind"] for row in direct} == {"chat", "responses"}


# -- migration 003: converting rows written before it ---------------------------------------------


async def legacy_database(target: str, rows: list[dict[str, Any]]) -> None:
    """A database at migration 002 holding `rows` the old way (whole request bodies)."""
    engine, request_engine = create_engines(database_url(target))
    try:
        async with engine.begin() as conn:
            await apply_first_migrations(conn, 2)
            by_trajectory: dict[str, list[dict[str, Any]]] = {}
            for row in rows:
                by_trajectory.setdefault(row["trajectory_id"], []).append(row)
            await conn.execute(
                trajectories.insert(), [trajectory_row(t, r) for t, r in by_trajectory.items()]
            )
            await conn.execute(exchanges.insert(), rows)
    finally:
        await engine.dispose()
        if request_engine is not None:
            await request_engine.dispose()


async def test_old_rows_are_read_whole_then_converted_in_place_resumably(db_target: str) -> None:
    rows = (
        agent_loop("old", 5)
        + agent_loop("old2", 3, extra="second")
        + [
            exchange_row("odd", 0, None, raw='"not an object"'),
            exchange_row("shape", 0, SHAPES["nul everywhere"]),
        ]
    )
    await legacy_database(db_target, rows)
    db = await Database.open(db_target)
    try:
        assert db.applied_migrations == [m.name for m in MIGRATIONS[2:]]  # 003 onwards
        assert await unconverted_count(db) == len(rows)
        before = {r["id"]: sent(r) for t in ("old", "old2") for r in await db.exchanges_of(t)}
        assert before == {r["id"]: sent(r) for r in rows[:8]}
        # Interrupted after one batch: a committed batch stays converted, the rest waits.
        assert await convert_batch(db, BodyWriter(), 3, has_kind=False) == 3
        assert await unconverted_count(db) == len(rows) - 3
    finally:
        await db.close()
    db = await Database.open(db_target, convert_in_background=True)  # a restart resumes
    try:
        assert db.conversion is not None
        assert await db.conversion == len(rows) - 3
        assert await unconverted_count(db) == 0
        assert await db.convert_requests() == 0
        after = {
            r["id"]: r for t in ("old", "old2", "odd", "shape") for r in await db.exchanges_of(t)
        }
        for row in rows:
            if row["trajectory_id"] == "odd":
                assert after[row["id"]]["request_json"] == '"not an object"'
            else:
                assert sent(after[row["id"]]) == sent(row)
        async with db.engine.connect() as conn:
            refs = {
                r.id: (r.request_base_id, unpack_text(r.request_refs_json))
                for r in await conn.execute(
                    select(exchanges.c.id, BASE_ID, exchanges.c.request_refs_json)
                )
            }
        # Converted in order: later steps of the resumed conversation reference their parent.
        old = agent_ids = [r["id"] for r in rows[:5]]
        assert refs[old[4]][0] == agent_ids[3] and len(json.loads(refs[old[4]][1])["items"]) == 2
        assert refs[rows[8]["id"]] == (None, "{}")
    finally:
        await db.close()


def test_the_migrate_command_converts_old_rows_and_says_so(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "old.db"
    rows = agent_loop("cli", 4)
    asyncio.run(legacy_database(str(path), rows))
    printed = run_migrate_command(path)
    assert "applied: 003_content_addressed" in printed
    assert "converted 4 exchanges" in printed
    with sqlite3.connect(path) as conn:
        assert conn.execute(
            "SELECT count(*) FROM exchanges WHERE request_refs_json IS NULL"
        ).fetchone() == (0,)
    assert "converted" not in run_migrate_command(path)


# -- through the proxy, with the official SDK (issue 16's recording gaps) -------------------------


def _image_message(text: str) -> dict[str, Any]:
    image = base64.b64encode(random.Random(16).randbytes(150_000)).decode()  # 200 KB as base64
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        ],
    }


@pytest.mark.e2e
async def test_nul_text_and_a_big_image_are_recorded_through_the_proxy(
    db_target: str, start_proxy: Any, tmp_path: Path
) -> None:
    import openai

    # the journal in tmp_path: for PostgreSQL it would default to the working directory
    proxy = start_proxy(db=db_target, journal=tmp_path / "journal.jsonl")
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-test", max_retries=0)
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "You describe images.\x00"},
        _image_message("What is in this picture? \x00 (a NUL)"),
    ]
    calls = [
        {
            "id": "call_nul",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Z\\u0000rich\x00"}'},
        }
    ]
    sent: list[dict[str, Any]] = []
    for step in range(3):
        body = {"model": "gpt-4.1-mini", "messages": list(history), "user": "end\x00user"}
        if step:
            body["tools"] = TOOLS
        response = client.chat.completions.create(**body)  # type: ignore[call-overload]
        sent.append(json.loads(json.dumps(body)))
        answer = response.choices[0].message.model_dump(exclude_none=True)
        history += [
            answer,
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "call_nul", "content": f"sunny \x00 {step}"},
            {"role": "user", "content": f"and then? {step}"},
        ]
    proxy.stop()

    db = await Database.open(db_target)
    try:
        rows = []
        async with db.engine.connect() as conn:
            ids = [r[0] for r in await conn.execute(select(exchanges.c.trajectory_id).distinct())]
        for trajectory_id in ids:
            rows += await db.exchanges_of(trajectory_id)
        recorded = sorted(
            (json.loads(r["request_json"]) for r in rows), key=lambda b: len(b["messages"])
        )
        assert recorded == sent
        assert {r["end_user"] for r in rows} == {"end\ufffduser"}  # display copy
        async with db.engine.connect() as conn:
            images = (
                await conn.execute(
                    select(func.count())
                    .select_from(blobs)
                    .where(stored_text(blobs.c.body_json).like("%base64,%"))
                )
            ).scalar_one()
            options = (
                await conn.execute(select(func.sum(func.length(exchanges.c.request_json))))
            ).scalar_one()
        assert images == 1  # the 200 KB image once, not once per step
        assert options < 2_000
    finally:
        await db.close()
