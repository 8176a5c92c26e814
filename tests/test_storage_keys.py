"""Compact keys (migration 009) on real databases (SQLite file and the PostgreSQL test server):
hashes looked up by value stored as their bytes on SQLite, request references in binary, a base
that is the parent stored as '', and databases written before 009 converted before serving."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text

from proxy.core.packing import PACKED_REFS, PACKED_V1, pack_text, refs_of_packed, unpack_text
from proxy.storage import Database, new_id
from proxy.storage.bodies import BASE_ID, BodyWriter
from proxy.storage.engine import create_engines, database_url
from proxy.storage.migrations import MIGRATIONS
from proxy.storage.rows import exchange_row, trajectory_meta, trajectory_rows
from proxy.storage.schema import blobs, choice_states, exchanges, trajectories
from proxy.storage.states import StateRef
from proxy.testing.openai_shapes import chat_completion, openai_usage
from tests.support.bodies import whole_requests
from tests.support.migrations import apply_first_migrations, run_migrate_command
from tests.support.records import tool_step_record

TOOLS = [{"type": "function", "function": {"name": "lookup_order", "parameters": {}}}]
HASH = "0123456789abcdef" * 2

# `db_target` and `db` (each dialect, migrated): tests/conftest.py


def conversation(trajectory_id: str, steps: int, *, choices: int = 1) -> list[dict[str, Any]]:
    """`exchange_row`s of a tool loop as the recorder builds them (real stitching hashes); the
    first answer has `choices` choices (`n > 1`: its later choices are `choice_states`)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"Where is {trajectory_id}?"}]
    rows: list[dict[str, Any]] = []
    for step in range(steps):
        call = {"name": "lookup_order", "arguments": json.dumps({"id": f"A{step}"})}
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": f"call_{step}", "type": "function", "function": call}],
        }
        response = chat_completion(
            message,
            completion_id=f"chatcmpl-{new_id()[:29]}",
            created=1_790_000_000 + step,
            usage=openai_usage(100 + step, 12),
        )
        if step == 0 and choices > 1:
            response["choices"] += [
                {**response["choices"][0], "index": i, "message": {**message, "content": f"{i}"}}
                for i in range(1, choices)
            ]
        record = tool_step_record(
            trajectory_id,
            step,
            messages,
            message,
            response,
            rows[-1]["id"] if rows else None,
            TOOLS,
        )
        rows.append(exchange_row(record) | {"_meta": trajectory_meta(record)})
        messages += [message, {"role": "tool", "tool_call_id": f"call_{step}", "content": "ok"}]
    return rows


async def write(db: Database, rows: list[dict[str, Any]]) -> None:
    entries = [({k: v for k, v in row.items() if k != "_meta"}, row["_meta"]) for row in rows]
    await db.write_exchanges([row for row, _ in entries], trajectory_rows(entries))


def sent(row: dict[str, Any]) -> Any:
    return json.loads(row["request_json"])


# -- pure ----------------------------------------------------------------------------------------


def test_request_references_are_packed_as_offsets_and_hash_bytes() -> None:
    shapes = [
        f'{{"at":12,"items":["{HASH}","{HASH[::-1]}"],"tools_at":75,"tools":"{HASH}"}}',
        f'{{"at":300,"items":["{HASH}"]}}',
        '{"at":1,"items":[]}',
        f'{{"tools_at":99999,"tools":"{HASH}"}}',
    ]
    for refs in shapes:
        packed = pack_text(refs)
        assert isinstance(packed, bytes) and packed[0] == PACKED_REFS
        assert unpack_text(packed) == refs
        # a reader that looks the parts up by key gets each hash as its bytes, no text made
        as_keys = refs_of_packed(packed, hex_keys=False)
        expected = json.loads(refs)
        if "items" in expected:
            expected["items"] = [bytes.fromhex(item) for item in expected["items"]]
        if "tools" in expected:
            expected["tools"] = bytes.fromhex(expected["tools"])
        assert as_keys == expected
    assert len(pack_text(shapes[0])) == 2 + 1 + 1 + 2 * 16 + 1 + 16
    # Anything unpack_refs would not give back byte for byte is packed as any text.
    for other in (
        f'{{"at": 12,"items":["{HASH}"],"tools_at":75,"tools":"{HASH}"}}',
        f'{{"at":12,"items":["{HASH.upper()}"],"tools_at":75,"tools":"{HASH}"}}',
        f'{{"at":true,"items":["{HASH}"],"tools_at":75,"tools":"{HASH}"}}',
        f'{{"tools_at":75,"tools":"{HASH}","at":12,"items":["{HASH}"]}}',
        f'{{"at":12,"items":["{HASH}"],"extra":1,"tools_at":75,"tools":"{HASH}"}}',
    ):
        packed = pack_text(other)
        assert isinstance(packed, bytes) and packed[0] == PACKED_V1 and unpack_text(packed) == other
    for bad in (pack_text(shapes[0])[:-1], pack_text(shapes[0]) + b"\x00", bytes((PACKED_REFS, 0))):
        with pytest.raises(ValueError):
            unpack_text(bad)
        with pytest.raises(ValueError):
            refs_of_packed(bad, hex_keys=False)


# -- stored --------------------------------------------------------------------------------------


async def test_keys_are_stored_as_bytes_on_sqlite_and_found_by_their_hex(db: Database) -> None:
    rows = conversation("keys", 3, choices=2)
    await write(db, rows[:1])
    await write(db, rows[1:])
    later_choice = rows[0]["choice_states"][0][1]
    found = await db.find_states([rows[1]["state_hash"], later_choice, "f" * 64])
    assert found == {
        rows[1]["state_hash"]: StateRef(rows[1]["id"], "keys", 1, "student"),
        later_choice: StateRef(rows[0]["id"], "keys", 0, "student"),
    }
    assert [sent(r) for r in await db.exchanges_of("keys")] == [sent(r) for r in rows]
    async with db.engine.connect() as conn:
        raw = text("SELECT state_hash, request_base_id, request_refs_json FROM exchanges")
        stored = (await conn.execute(raw)).all()
        (choice,) = (await conn.execute(text("SELECT state_hash FROM choice_states"))).all()
        (part,) = (await conn.execute(text("SELECT hash FROM blobs LIMIT 1"))).all()
        bases = {
            r.id: r.request_base_id for r in await conn.execute(select(exchanges.c.id, BASE_ID))
        }
    assert bases == {
        rows[0]["id"]: None,
        rows[1]["id"]: rows[0]["id"],
        rows[2]["id"]: rows[1]["id"],
    }
    assert sorted(r.request_base_id for r in stored if r.request_base_id is not None) == ["", ""]
    if db.dialect == "sqlite":
        assert all(len(r.state_hash) == 32 and isinstance(r.state_hash, bytes) for r in stored)
        assert choice.state_hash == bytes.fromhex(later_choice)
        assert isinstance(part.hash, bytes) and len(part.hash) == 16
        assert all(r.request_refs_json[0] == PACKED_REFS for r in stored)
    else:  # PostgreSQL keeps its texts
        assert {r.state_hash for r in stored} == {r["state_hash"] for r in rows}
        assert choice.state_hash == later_choice and len(part.hash) == 32


async def test_looking_states_up_by_their_bytes_uses_the_indexes(db: Database) -> None:
    """`find_states` (one statement per request on the stitcher's path) searches both state
    indexes with the bound keys converted (`HashKey`): no scan."""
    await write(db, conversation("plan", 2, choices=2))
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    engine = db._request_engine or db.engine  # the stitcher's own pool on PostgreSQL
    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        assert await db.find_states(["a" * 64, "b" * 64]) == {}
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    ((statement, parameters),) = seen
    if db.dialect == "sqlite":
        assert all(isinstance(p, bytes) for p in parameters)
    async with engine.connect() as conn:
        if db.dialect == "sqlite":
            result = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            plan = " ".join(str(r[-1]) for r in result)
        else:
            await conn.exec_driver_sql("SET enable_seqscan = off")
            result = await conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)
            plan = " ".join(str(r[0]) for r in result)
    assert "ix_exchanges_state_hash" in plan and "ix_choice_states_state_hash" in plan, plan


async def test_a_parent_id_written_before_009_is_still_read_as_the_base(db: Database) -> None:
    rows = conversation("named", 3)
    await write(db, rows)
    async with db.engine.begin() as conn:  # as a row before 009 names its base
        await conn.execute(
            exchanges.update()
            .where(exchanges.c.request_base_id == "")
            .values(request_base_id=exchanges.c.parent_id)
        )
    assert [sent(r) for r in await db.exchanges_of("named")] == [sent(r) for r in rows]


# -- migration 009: databases written before it ---------------------------------------------------


async def database_at_008(target: str, rows: list[dict[str, Any]]) -> None:
    """A database at migration 008 holding `rows` as 008 stored them: hashes as hex text, the
    parent's id as the base, references as text, `blobs` a rowid table keyed by hex."""
    engine, request_engine = create_engines(database_url(target))
    try:
        async with engine.begin() as conn:
            await apply_first_migrations(conn, 8)
            prepared = BodyWriter(pack=False).prepare(
                [
                    {k: v for k, v in row.items() if k not in ("_meta", "choice_states")}
                    for row in rows
                ]
            )
            entries = [(row, meta["_meta"]) for row, meta in zip(prepared.rows, rows, strict=True)]
            await conn.execute(trajectories.insert(), trajectory_rows(entries))
            statement = "INSERT INTO {} ({}) VALUES ({})"
            for table, values in (
                (blobs, prepared.blob_rows),
                (exchanges, prepared.rows),
                (
                    choice_states,
                    [
                        {"exchange_id": row["id"], "choice_index": i, "state_hash": h}
                        for row in rows
                        for i, h in row.get("choice_states") or ()
                    ],
                ),
            ):
                if not values:
                    continue
                names = list(values[0])
                sql = statement.format(
                    table.name, ", ".join(names), ", ".join(f":{n}" for n in names)
                )
                await conn.execute(text(sql), values)  # text(): no HashKey, hex as it was
            await conn.execute(
                text("UPDATE exchanges SET request_base_id = parent_id WHERE request_base_id = ''")
            )
    finally:
        await engine.dispose()
        if request_engine is not None:
            await request_engine.dispose()


async def test_a_database_written_before_009_is_converted_before_serving(db_target: str) -> None:
    old = conversation("old", 4, choices=3)
    await database_at_008(db_target, old)
    db = await Database.open(db_target)
    try:
        assert db.applied_migrations == [m.name for m in MIGRATIONS[8:]]
        # Every state is found at once: stitching continues old conversations.
        states = [row["state_hash"] for row in old] + [h for _, h in old[0]["choice_states"]]
        found = await db.find_states(states)
        assert set(found) == set(states) and found[old[3]["state_hash"]].exchange_id == old[3]["id"]
        assert [sent(r) for r in await db.exchanges_of("old")] == [sent(r) for r in old]
        # The conversation goes on: its next step's base is a row written before 009.
        more = conversation("old", 6)[4:]
        more[0]["parent_id"] = old[3]["id"]
        await write(db, more)
        assert [sent(r) for r in await db.exchanges_of("old")] == [sent(r) for r in old + more]
    finally:
        await db.close()
    if db.dialect != "sqlite":
        return
    with contextlib.closing(sqlite3.connect(db_target)) as conn:
        conn.row_factory = sqlite3.Row
        kinds = conn.execute("SELECT DISTINCT typeof(state_hash) FROM exchanges").fetchall()
        blobs_sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'blobs'").fetchone()
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        stored = [dict(r) for r in conn.execute("SELECT * FROM exchanges ORDER BY step")]
    assert [tuple(r) for r in kinds] == [("blob",)] and "hash BLOB" in blobs_sql[0]
    assert {"ix_exchanges_state_hash", "ix_choice_states_state_hash", "ix_blobs_hash"} <= indexes
    assert {r["request_base_id"] for r in stored} == {None, ""}  # old bases rewritten too
    # Read straight from the file (old bases named by id, new ones '', keys as bytes).
    assert [sent(r) for r in whole_requests(Path(db_target), stored)] == [
        sent(r) for r in old + more
    ]


def test_the_migrate_command_converts_keys(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "old.db"
    old = conversation("cli", 3)
    asyncio.run(database_at_008(str(path), old))
    run_migrate_command(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        keys = conn.execute("SELECT typeof(state_hash), COUNT(*) FROM exchanges GROUP BY 1")
        parts = conn.execute("SELECT typeof(hash), length(hash) FROM blobs GROUP BY 1, 2")
        assert keys.fetchall() == [("blob", 3)] and parts.fetchall() == [("blob", 16)]
