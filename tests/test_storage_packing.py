"""Packed JSON texts (migration 008) on real databases (SQLite file and the PostgreSQL test
server): the exact text back for every reader, the search and charts through packed values, and
the in-place, resumable packing of rows written before 008."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from proxy.core.canonical import chain_hash
from proxy.core.packing import PACKED_HEX, PACKED_V1, pack_text, unpack_text
from proxy.storage import Database, new_id
from proxy.storage.bodies import PACKED_COLUMNS, USAGE_OF_RESPONSE, BodyWriter
from proxy.storage.browse import TrajectoryFilter, chart_rows, list_trajectories
from proxy.storage.engine import create_engines, database_url
from proxy.storage.packing import pack_batch, packing_finished
from proxy.storage.rows import exchange_row, trajectory_meta, trajectory_rows
from proxy.storage.schema import blobs, exchanges, trajectories
from proxy.testing.openai_shapes import chat_completion, openai_usage
from tests.support.migrations import apply_first_migrations, run_migrate_command
from tests.support.records import tool_step_record

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Look an order up.",
            "parameters": {"type": "object", "properties": {"id": {"type": "string"}}},
        },
    }
]


# `db_target` and `db` (each dialect, migrated): tests/conftest.py


# -- rows, as the recorder builds them ------------------------------------------------------------


def completion(message: dict[str, Any], step: int) -> dict[str, Any]:
    """A `chat.completion` with every field the API sends (usage with its token details)."""
    return chat_completion(
        {**message, "refusal": None, "annotations": []},
        completion_id=f"chatcmpl-{new_id()[:29]}",
        created=1_790_000_000 + step,
        usage=openai_usage(100 + step, 12),
    )


def conversation(trajectory_id: str, steps: int, final: str) -> list[dict[str, Any]]:
    """`exchange_row`s of a tool loop: `steps - 1` calls then the answer `final`; each answer
    stored as the API sent it (pretty-printed)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Where is order A1?"}]
    rows: list[dict[str, Any]] = []
    for step in range(steps):
        if step == steps - 1:
            message: dict[str, Any] = {"role": "assistant", "content": final}
        else:
            call = {"name": "lookup_order", "arguments": json.dumps({"id": f"A{step}"})}
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": f"call_{step}", "type": "function", "function": call}],
            }
        response = completion(message, step)
        record = tool_step_record(
            trajectory_id,
            step,
            messages,
            message,
            response,
            rows[-1]["id"] if rows else None,
            TOOLS,
            upstream_request_id=f"req_{new_id()}",
        )
        rows.append(exchange_row(record) | {"_meta": trajectory_meta(record)})
        result = f"order A{step} left warehouse-omega"
        messages += [message, {"role": "tool", "tool_call_id": f"call_{step}", "content": result}]
    return rows


def failed(trajectory_id: str) -> dict[str, Any]:
    """An exchange the upstream refused (error_json, no answer)."""
    (row,) = conversation(trajectory_id, 1, "unused")
    error = {"error": {"message": "Rate limit reached for gpt-4.1-mini", "type": "requests"}}
    return row | {
        "outcome": "error",
        "status_code": 429,
        "response_json": None,
        "usage_json": None,
        "error_json": json.dumps(error),
        "state_hash": None,
    }


async def write(db: Database, rows: list[dict[str, Any]]) -> None:
    entries = [({k: v for k, v in row.items() if k != "_meta"}, row["_meta"]) for row in rows]
    await db.write_exchanges([row for row, _ in entries], trajectory_rows(entries))


SHADOW = json.dumps(completion({"role": "assistant", "content": "teacher says hello"}, 0))


async def stored_values(db: Database) -> dict[str, dict[str, Any]]:
    """id -> the raw stored values of the packed columns (as the driver returns them)."""
    async with db.engine.connect() as conn:
        query = select(exchanges.c.id, *(exchanges.c[name] for name in PACKED_COLUMNS))
        return {row["id"]: dict(row) for row in (await conn.execute(query)).mappings()}


# -- pure ----------------------------------------------------------------------------------------


def test_a_packed_text_unpacks_to_exactly_the_text() -> None:
    pretty = json.dumps(
        completion({"role": "assistant", "content": "Grüße 😀 \\u0000"}, 3), indent=2
    )
    samples = [
        pretty,
        json.dumps(json.loads(pretty)),
        json.dumps({"text": "é" * 500, "n": 1e-7, "big": 10**30}, ensure_ascii=False),
        "not json at all, but long enough to be packed: " * 3,
        "12345678901234567890123456789012345678901234567890 digits, then words",
    ]
    for sample in samples:
        packed = pack_text(sample)
        assert isinstance(packed, bytes) and packed[0] == PACKED_V1
        assert unpack_text(packed) == sample
    assert len(pack_text(pretty)) < len(pretty) / 4  # the envelope is in the dictionary


def test_a_hash_is_stored_as_the_bytes_its_hex_spells() -> None:
    digest = chain_hash("", {"role": "user", "content": "hi"})
    packed = pack_text(digest)
    assert packed == bytes((PACKED_HEX,)) + bytes.fromhex(digest) and len(packed) == 33
    assert unpack_text(packed) == digest
    upper = digest.upper()  # would not come back as it was: not this form
    assert unpack_text(pack_text(upper)) == upper and pack_text(upper)[:1] != bytes((PACKED_HEX,))


def test_short_texts_and_texts_utf8_cannot_carry_stay_as_they_are() -> None:
    assert pack_text("{}") == "{}"
    lone = json.dumps({"content": "half an emoji \ud83d" * 10}, ensure_ascii=False)
    assert pack_text(lone) == lone
    assert unpack_text(lone) == lone and unpack_text(None) is None


def test_a_value_that_is_not_a_packed_text_raises_value_error() -> None:
    packed = pack_text("a text long enough to be packed, repeated " * 4)
    assert isinstance(packed, bytes)
    for bad in (b"", bytes([99]) + packed[1:], packed[:5], packed[:1] + b"\xff" * 20):
        with pytest.raises(ValueError):
            unpack_text(bad)


# -- stored and read back ------------------------------------------------------------------------


async def test_every_json_text_is_read_back_byte_for_byte(db: Database) -> None:
    rows = conversation("packed", 3, "Your order A1 ships on Monday.") + [failed("refused")]
    # a usage the answer does not carry (estimated for a stream without include_usage)
    rows[0]["usage_json"] = json.dumps(
        {"prompt_tokens": 7, "completion_tokens": 1, "estimated": True}
    )
    await write(db, rows[:2])
    await write(db, rows[2:])
    await db.write_exchanges(
        [],
        [],
        [
            {
                "id": rows[1]["id"],
                "shadow_model": "o3",
                "shadow_response_json": SHADOW,
                "shadow_error_json": None,
                "shadow_duration_ms": 1.0,
            }
        ],
    )
    read = {r["id"]: r for t in ("packed", "refused") for r in await db.exchanges_of(t)}
    for row in rows:
        back = read[row["id"]]
        for column in ("response_json", "usage_json", "error_json", "request_hash", "state_hash"):
            assert back[column] == row[column], column  # the pretty text as the API sent it
        assert json.loads(back["request_json"]) == json.loads(row["request_json"])
    assert read[rows[1]["id"]]["shadow_response_json"] == SHADOW
    raw = await stored_values(db)
    answer = raw[rows[2]["id"]]
    if db.dialect == "sqlite":
        assert isinstance(answer["response_json"], bytes)
        assert len(answer["response_json"]) < len(rows[2]["response_json"]) / 4
        assert answer["usage_json"] == USAGE_OF_RESPONSE  # the answer's usage, not twice
        assert raw[rows[0]["id"]]["usage_json"] != USAGE_OF_RESPONSE
        assert len(answer["request_hash"]) == 33
        assert isinstance(raw[rows[3]["id"]]["error_json"], bytes)
        assert isinstance(raw[rows[1]["id"]]["shadow_response_json"], bytes)
    else:  # PostgreSQL compresses large values itself: texts stay texts
        assert answer["response_json"] == rows[2]["response_json"]
        assert answer["usage_json"] == rows[2]["usage_json"]


async def test_the_search_and_the_charts_read_inside_packed_answers(db: Database) -> None:
    await write(db, conversation("unicorn", 3, "A final answer about the Unicorn-Marker order."))
    await write(db, conversation("plain", 2, "Nothing to see."))
    await write(db, [failed("limited")])
    page = await list_trajectories(db, TrajectoryFilter(text="unicorn-marker"))
    assert [row["id"] for row in page.rows] == ["unicorn"]  # only in the last answer
    page = await list_trajectories(db, TrajectoryFilter(text="rate limit reached"))
    assert [row["id"] for row in page.rows] == ["limited"]  # only in error_json
    page = await list_trajectories(db, TrajectoryFilter(text="warehouse-OMEGA"))  # request items
    assert {row["id"] for row in page.rows} == {"unicorn", "plain"}
    charts = await chart_rows(db, "2026-01-01")
    assert len(charts.tool_responses) == 3
    assert all("lookup_order" in json.loads(r)["choices"][0]["message"]["tool_calls"][0]["function"]["name"] for r in charts.tool_responses)  # fmt: skip


# -- migration 008: packing rows written before it ------------------------------------------------


async def database_at_007(target: str, rows: list[dict[str, Any]]) -> None:
    """A database at migration 007 holding `rows` as 007 stored them (request parts cut, every
    JSON text as text)."""
    engine, request_engine = create_engines(database_url(target))
    try:
        async with engine.begin() as conn:
            await apply_first_migrations(conn, 7)
            prepared = BodyWriter(pack=False).prepare(
                [{k: v for k, v in row.items() if k != "_meta"} for row in rows]
            )
            await conn.execute(blobs.insert(), prepared.blob_rows)
            entries = [(row, meta["_meta"]) for row, meta in zip(prepared.rows, rows, strict=True)]
            await conn.execute(trajectories.insert(), trajectory_rows(entries))
            await conn.execute(exchanges.insert(), prepared.rows)
    finally:
        await engine.dispose()
        if request_engine is not None:
            await request_engine.dispose()


async def test_rows_written_before_008_are_packed_in_place_resumably(db_target: str) -> None:
    rows = conversation("old", 4, "Old answer.") + conversation("old2", 3, "Another old answer.")
    await database_at_007(db_target, rows)
    db = await Database.open(db_target)
    try:
        assert db.applied_migrations == ["008_packed_texts", "009_compact_keys"]
        assert not await packing_finished(db) or db.dialect == "postgresql"
        before = {r["id"]: r for t in ("old", "old2") for r in await db.exchanges_of(t)}
        # Interrupted after one batch: what it packed stays packed, the rest waits.
        looked, packed = await pack_batch(db, 3)
        if db.dialect == "sqlite":
            assert (looked, packed) == (3, 3)
            raw = await stored_values(db)
            assert sum(isinstance(v["response_json"], bytes) for v in raw.values()) == 3
            await write(db, conversation("new", 2, "Written after 008."))  # packed as written
    finally:
        await db.close()
    db = await Database.open(db_target, convert_in_background=True)  # a restart resumes
    try:
        if db.conversion is not None:
            await db.conversion
        assert await packing_finished(db)
        assert await db.pack_old_rows() == 0
        after = {r["id"]: r for t in ("old", "old2") for r in await db.exchanges_of(t)}
        assert after == before
        for row in rows:
            assert after[row["id"]]["response_json"] == row["response_json"]
        raw = await stored_values(db)
        async with db.engine.connect() as conn:
            parts = [r[0] for r in await conn.execute(select(blobs.c.body_json))]
        if db.dialect == "sqlite":
            assert all(isinstance(v["response_json"], bytes) for v in raw.values())
            assert all(isinstance(v["request_refs_json"], bytes) for v in raw.values())
            assert all(isinstance(p, bytes) for p in parts if len(p) >= 48)
        else:
            assert all(isinstance(v["response_json"], str) for v in raw.values())
            assert all(isinstance(p, str) for p in parts)
    finally:
        await db.close()


async def test_a_new_database_has_nothing_to_pack(db: Database) -> None:
    assert await packing_finished(db)
    assert db.conversion is None


async def test_looking_a_response_id_up_uses_its_partial_index(db: Database) -> None:
    """`find_response` (the stitcher's lookup of `previous_response_id`) searches
    `ix_exchanges_response_id`, which holds only the rows that have a response id."""
    await write(db, conversation("chat", 2, "Done."))  # chat rows: no response id
    engine = db._request_engine or db.engine  # the stitcher's own pool on PostgreSQL
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        assert await db.find_response("resp_1") is None
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    ((statement, parameters),) = seen
    async with engine.connect() as conn:
        if db.dialect == "sqlite":
            result = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            plan = " ".join(str(r[-1]) for r in result)
        else:
            await conn.exec_driver_sql("SET enable_seqscan = off")
            result = await conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)
            plan = " ".join(str(r[0]) for r in result)
    assert "ix_exchanges_response_id" in plan, plan
    async with db.engine.connect() as conn:
        if db.dialect == "sqlite":
            query = "SELECT sql FROM sqlite_master WHERE name = 'ix_exchanges_response_id'"
        else:
            query = "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_exchanges_response_id'"
        (definition,) = (await conn.exec_driver_sql(query)).one()
    assert "response_id IS NOT NULL" in definition


def test_the_migrate_command_packs_old_rows_and_says_so(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "old.db"
    asyncio.run(database_at_007(str(path), conversation("cli", 3, "Old answer.")))

    first = run_migrate_command(path)
    assert "applied: 008_packed_texts" in first
    assert "packed the JSON texts of 8 rows" in first  # 3 exchanges, 5 request parts
    with contextlib.closing(sqlite3.connect(path)) as conn:
        kinds = conn.execute("SELECT DISTINCT typeof(response_json) FROM exchanges").fetchall()
    assert kinds == [("blob",)]
    assert "packed" not in run_migrate_command(path)
