"""Several proxy replicas on one PostgreSQL (issue 7).

Layers:
- the storage layer on a real PostgreSQL server: migrations (valid on both dialects, applied once
  when replicas start together), the early state and trajectory rows, claims racing from several
  connection pools, and `Database.stream`'s server-side cursor;
- end to end: four real proxy processes on one fresh PostgreSQL database, a multi-step tool-use
  workload through the official `openai` SDK (concurrent conversations, stream and not, parallel
  tool calls), every step sent to a different replica than the one before, milliseconds later and
  before that replica's recorder has flushed; every trajectory must be whole and single. Then
  concurrent first requests naming one trajectory id on several replicas get one route.

The server is `UNDERSTUDY_TEST_POSTGRES_URL` (default postgresql://postgres@127.0.0.1:5432/postgres);
its user must be able to create databases: each test gets one of its own, created and dropped
here. When nothing answers at the default URL these tests skip and say why; when the variable is
set (`.ci/run` sets it), an unreachable server is a failure.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from sqlalchemy import Select, literal_column, select, text
from sqlalchemy import inspect as sa_inspect

from proxy.core.canonical import chain_hash
from proxy.recording.stitching import Stitcher
from proxy.storage import Database, StateRef, new_id, utc_now
from proxy.storage.bodies import rebuild_requests
from proxy.storage.migrations import MIGRATIONS
from proxy.storage.schema import metadata
from proxy.testing.servers import REPOSITORY_ROOT as ROOT
from proxy.testing.servers import child_env
from tests.support.inprocess import in_process_proxy, run_proxy_cli
from tests.support.postgres import pg_admin
from tests.support.processes import FakeUpstream
from tests.support.waiting import poll_async

pytestmark = pytest.mark.e2e


async def _fetch(url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    """Rows of `query` read with plain asyncpg (not the code under test), as dicts."""
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return [dict(row) for row in await conn.fetch(query, *args)]
    finally:
        await conn.close()


async def _whole_exchanges(pg_url: str, order_by: str) -> list[dict[str, Any]]:
    """`exchanges` rows read with plain asyncpg, request bodies made whole (stored in parts since
    migration 003) by the storage layer's one rebuild."""
    exchanges = await _fetch(pg_url, f"SELECT * FROM exchanges {order_by}")
    db = await Database.open(pg_url, migrate=False)
    try:
        async with db.engine.connect() as conn:
            return await rebuild_requests(conn, exchanges)
    finally:
        await db.close()


@pytest.fixture
async def open_db(pg_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await open_db()` opens the test database (one connection pool each: a replica)."""
    opened: list[Database] = []

    async def open_one(**options: Any) -> Database:
        db = await Database.open(pg_url, **options)
        opened.append(db)
        return db

    yield open_one
    for db in opened:
        await db.close()


# -- storage layer ---------------------------------------------------------------------------------


async def test_migrations_run_once_when_replicas_start_together(pg_url: str) -> None:
    dbs = await asyncio.gather(*[Database.open(pg_url) for _ in range(8)])
    try:
        applied = [name for db in dbs for name in db.applied_migrations]
        assert sorted(applied) == sorted(m.name for m in MIGRATIONS)
        rows = await _fetch(pg_url, "SELECT name FROM understudy_migrations ORDER BY name")
        assert [row["name"] for row in rows] == [m.name for m in MIGRATIONS]
        assert [await db.pending_migrations() for db in dbs] == [[]] * len(dbs)
    finally:
        for db in dbs:
            await db.close()


def test_migrate_command_runs_once_then_has_nothing_to_do(pg_url: str) -> None:
    def migrate() -> str:
        done = run_proxy_cli("migrate", "--db", pg_url)
        assert done.returncode == 0, done.stderr
        return done.stdout

    first = migrate()
    assert all(m.name in first for m in MIGRATIONS)
    assert "none needed" in migrate()


def test_a_database_url_password_is_never_shown() -> None:
    done = run_proxy_cli(
        "migrate", "--db", "postgresql://someone:hunter2-secret@127.0.0.1:1/nowhere"
    )
    assert done.returncode != 0
    assert "cannot open database postgresql://someone:***@127.0.0.1:1/nowhere" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1


async def test_migrations_give_the_same_schema_on_postgresql_and_sqlite(
    open_db: Callable[..., Any], tmp_path: Path
) -> None:
    """The DDL is valid on both dialects and yields what `schema.py` describes on each."""

    def shape(sync_conn: Any) -> dict[str, Any]:
        inspector = sa_inspect(sync_conn)
        out = {}
        for table in sorted(inspector.get_table_names()):
            key = inspector.get_pk_constraint(table)["constrained_columns"]
            out[table] = {
                # SQLite lets a TEXT primary key hold NULL unless told otherwise; nothing writes one
                "columns": {
                    c["name"]: bool(c["nullable"]) and c["name"] not in key
                    for c in inspector.get_columns(table)
                },
                "primary_key": key,
                "indexes": sorted(i["name"] for i in inspector.get_indexes(table)),
            }
        return out

    pg = await open_db()
    sqlite = await Database.open(str(tmp_path / "same.db"))
    try:
        async with pg.engine.connect() as conn:
            on_pg = await conn.run_sync(shape)
        async with sqlite.engine.connect() as conn:
            on_sqlite = await conn.run_sync(shape)
            unique = {
                i["name"]: i["column_names"]
                for i in await conn.run_sync(lambda c: sa_inspect(c).get_indexes("blobs"))
                if i["unique"]
            }
    finally:
        await sqlite.close()
    # Migration 009 rebuilt SQLite's `blobs` with its key as a unique index built by one sort
    # (a rowid table, the parts in the order they were written): the same constraint as
    # PostgreSQL's primary key.
    assert unique == {"ix_blobs_hash": ["hash"]}
    blobs_sqlite = on_sqlite["blobs"]
    assert blobs_sqlite["primary_key"] == [] and blobs_sqlite["indexes"] == ["ix_blobs_hash"]
    on_sqlite["blobs"] = {**blobs_sqlite, "primary_key": ["hash"], "indexes": []}
    assert on_pg == on_sqlite
    described = {
        table.name: {
            "columns": {c.name: bool(c.nullable) and not c.primary_key for c in table.columns},
            "primary_key": [c.name for c in table.primary_key.columns],
        }
        for table in metadata.sorted_tables
    }
    assert {
        name: {"columns": s["columns"], "primary_key": s["primary_key"]}
        for name, s in on_pg.items()
    } == described


async def test_stream_reads_through_a_server_side_cursor(open_db: Callable[..., Any]) -> None:
    """Rows arrive before the query has finished: the query fails at row 5000, and the rows
    before it were already yielded in batches (a client-side fetch would fail before any row)."""
    db = await open_db()
    query: Select[Any] = select(literal_column("1 / (g - 5000)").label("x")).select_from(
        text("generate_series(1, 10000) AS g")
    )
    received = 0
    with pytest.raises(Exception, match="division by zero"):
        async for _row in db.stream(query, batch=100):
            received += 1
    assert 4000 <= received < 5000


def _ref(trajectory_id: str, step: int = 0, route: str = "student") -> StateRef:
    return StateRef(new_id(), trajectory_id, step, route, False)


def _exchange_row(state_hash: str, ref: StateRef, started_utc: str) -> dict[str, Any]:
    return {
        "id": ref.exchange_id,
        "trajectory_id": ref.trajectory_id,
        "parent_id": None,
        "step": ref.step,
        "started_utc": started_utc,
        "path": "/v1/chat/completions",
        "stream": False,
        "outcome": "ok",
        "route": ref.route,
        "request_json": "{}",
        "tool_call_count": 0,
        "request_hash": "r",
        "state_hash": state_hash,
    }


def _trajectory_row(ref: StateRef, started_utc: str, id_source: str = "hash") -> dict[str, Any]:
    return {
        "id": ref.trajectory_id,
        "created_utc": started_utc,
        "updated_utc": started_utc,
        "id_source": id_source,
        "route": ref.route,
        "shadow": ref.shadow,
        "exchange_count": 1,
        "error_count": 0,
        "tool_call_count": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
    }


async def test_a_state_is_found_on_another_replica_before_and_after_its_flush(
    open_db: Callable[..., Any], pg_url: str
) -> None:
    replica_a, replica_b = await open_db(), await open_db()
    a, b = Stitcher(replica_a), Stitcher(replica_b)
    assert (a.mode, b.mode) == ("shared", "shared")
    system = {"role": "system", "content": "You plan trips."}
    user = {"role": "user", "content": "Weather in Paris?"}
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    first = await a.link([system, user])
    assert first.new_trajectory
    route, shadow = await a.claim(first, "teacher", False)
    ref = StateRef(new_id(), first.trajectory_id, 0, route, shadow)
    state = chain_hash(first.request_hash, call)
    await a.remember(state, ref)
    assert a.db_writes == 1  # the state; a hash-stitched trajectory needs no claim row

    step1 = [system, user, call, {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]
    pending = await b.link(step1)  # replica A's recorder has not written anything yet
    assert (pending.trajectory_id, pending.parent, pending.step, pending.route) == (
        first.trajectory_id,
        ref,
        1,
        "teacher",
    )

    started = utc_now()
    await replica_a.write_exchanges(
        [_exchange_row(state, ref, started)], [_trajectory_row(ref, started)]
    )
    assert await _fetch(pg_url, "SELECT * FROM conversation_states") == []
    flushed = await Stitcher(replica_b).link(step1)  # a fresh replica: only the exchange row
    assert flushed.parent == ref


async def test_states_a_dead_replica_never_flushed_are_swept_after_an_hour(
    open_db: Callable[..., Any], pg_url: str
) -> None:
    db = await open_db()
    orphan, fresh = _ref("t-dead"), _ref("t-alive")
    await db.remember_state("s-orphan", orphan)
    await db.remember_state("s-fresh", fresh)
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "UPDATE conversation_states SET remembered_utc = '2020-01-01T00:00:00.000+00:00' "
            "WHERE state_hash = 's-orphan'"
        )
    finally:
        await conn.close()
    written = _ref("t-other")
    started = utc_now()
    await db.write_exchanges(
        [_exchange_row("s-other", written, started)], [_trajectory_row(written, started)]
    )
    rows = await _fetch(pg_url, "SELECT state_hash FROM conversation_states")
    assert rows == [{"state_hash": "s-fresh"}]


async def test_concurrent_claims_of_one_id_on_several_replicas_agree(
    open_db: Callable[..., Any], pg_url: str
) -> None:
    replicas = [Stitcher(await open_db()) for _ in range(6)]
    ids = [f"run-{n}" for n in range(10)]
    attempts = []
    for trajectory_id in ids:
        for number, stitcher in enumerate(replicas):
            link = await stitcher.link(
                [{"role": "user", "content": f"{trajectory_id} {number}"}], trajectory_id, "header"
            )
            assert link.new_trajectory
            route = "teacher" if number % 2 else "student"
            attempts.append((trajectory_id, stitcher.claim(link, route, number % 3 == 0)))
    results = await asyncio.gather(*(claim for _, claim in attempts))
    rows = {
        row["id"]: (row["route"], row["shadow"], row["exchange_count"], row["id_source"])
        for row in await _fetch(pg_url, "SELECT * FROM trajectories")
    }
    assert sorted(rows) == sorted(ids)
    for (trajectory_id, _), held in zip(attempts, results, strict=True):
        assert held == rows[trajectory_id][:2]
        assert rows[trajectory_id][2:] == (0, "header")
    # every replica now knows the winner without asking
    for stitcher in replicas:
        lookups = stitcher.db_lookups
        link = await stitcher.link([{"role": "user", "content": "again"}], ids[0], "header")
        assert (link.route, link.shadow) == rows[ids[0]][:2] and not link.new_trajectory
        assert stitcher.db_lookups == lookups


async def test_an_early_trajectory_row_agrees_with_its_exchanges_whatever_order_they_arrive(
    open_db: Callable[..., Any], pg_url: str
) -> None:
    """Claimed row first, then replica B's batch with step 1, then replica A's with step 0."""
    replica_a, replica_b = await open_db(), await open_db()
    claimed = await replica_a.claim_trajectory(
        "run-x", id_source="metadata", route="student", shadow=True
    )
    assert claimed == ("student", True)
    step0 = StateRef(new_id(), "run-x", 0, "student", True)
    step1 = StateRef(new_id(), "run-x", 1, "student", True)
    t0, t1 = utc_now(), None
    await asyncio.sleep(0.01)
    t1 = utc_now()
    await replica_b.write_exchanges(
        [_exchange_row("s1", step1, t1)], [_trajectory_row(step1, t1, "metadata")]
    )
    await replica_a.write_exchanges(
        [_exchange_row("s0", step0, t0)], [_trajectory_row(step0, t0, "metadata")]
    )
    (row,) = await _fetch(pg_url, "SELECT * FROM trajectories")
    assert (row["created_utc"], row["updated_utc"], row["exchange_count"]) == (t0, t1, 2)
    assert (row["route"], row["shadow"], row["id_source"]) == ("student", True, "metadata")


async def test_replicas_writing_batches_of_the_same_trajectories_do_not_deadlock(
    open_db: Callable[..., Any], pg_url: str
) -> None:
    """Two recorders flush batches that touch the same trajectories in opposite orders."""
    replica_a, replica_b = await open_db(), await open_db()
    ids = [f"t-{n:03d}" for n in range(400)]

    def batch(order: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        refs = [StateRef(new_id(), trajectory_id, 0, "student") for trajectory_id in order]
        started = utc_now()
        return (
            [_exchange_row(new_id(), ref, started) for ref in refs],
            [_trajectory_row(ref, started) for ref in refs],
        )

    for _ in range(15):
        await asyncio.gather(
            replica_a.write_exchanges(*batch(ids)),
            replica_b.write_exchanges(*batch(ids[::-1])),
        )
    counts = await _fetch(pg_url, "SELECT DISTINCT exchange_count FROM trajectories")
    assert counts == [{"exchange_count": 30}]


async def test_the_stitcher_fails_open_when_the_database_is_gone(
    open_db: Callable[..., Any], pg_url: str, postgres_server: str
) -> None:
    """No call fails because stitching cannot reach the database: it links as new and says so."""
    db = await open_db()
    stitcher = Stitcher(db)
    name = pg_url.rpartition("/")[2]
    await pg_admin(postgres_server, f'DROP DATABASE "{name}" WITH (FORCE)')
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    link = await stitcher.link(messages, "run-down", "header")
    assert link.new_trajectory and link.parent is None and link.route is None
    assert await stitcher.claim(link, "student", False) == ("student", False)
    await stitcher.remember("s", StateRef("e", "run-down", 0, "student"))
    assert stitcher.db_errors == 4  # states, route, claim, write-through
    assert (await stitcher.link([*messages[:2]], "run-down", "header")).route == "student"


async def test_a_replica_forwards_a_call_while_its_stitching_read_waits(
    pg_url: str, tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    """Without a teacher the route cannot depend on the trajectory, so the call goes upstream
    first and is stitched while the upstream works: a stitching read held up by a lock delays
    neither the forward nor (once it returns) the link to the step before."""
    marker = f"forward-before-stitching-{secrets.token_hex(4)}"
    first = [{"role": "user", "content": f"{marker}: what is the weather in Lyon?"}]
    async with in_process_proxy(tmp_path / "a", upstream=fake_upstream.base_url, db=pg_url) as a:
        answer = await a.client.post(
            "/v1/chat/completions", json={"model": "gpt-4.1-mini", "messages": first}
        )
        assert answer.status_code == 200, answer.text
    reply = answer.json()["choices"][0]["message"]
    follow_up = f"{marker}: and tomorrow?"
    second = [*first, reply, {"role": "user", "content": follow_up}]

    def forwarded() -> bool:
        return any(follow_up in json.dumps(seen["body"]) for seen in fake_upstream.requests())

    # Replica B has nothing in memory: linking step 1 reads the database.
    async with in_process_proxy(tmp_path / "b", upstream=fake_upstream.base_url, db=pg_url) as b:
        holder = await asyncpg.connect(pg_url, timeout=5)
        try:
            locked = holder.transaction()
            await locked.start()
            await holder.execute(
                "LOCK TABLE exchanges, conversation_states, choice_states IN ACCESS EXCLUSIVE MODE"
            )
            call = asyncio.create_task(
                b.client.post(
                    "/v1/chat/completions", json={"model": "gpt-4.1-mini", "messages": second}
                )
            )
            await poll_async(forwarded, timeout_s=30, what="the call to reach the upstream")
            assert not call.done(), "answered before its stitching read could return"
            await locked.rollback()
        finally:
            await holder.close()
        answered = await call
        assert answered.status_code == 200, answered.text
        step_ids = (
            answered.headers["x-understudy-exchange-id"],
            answer.headers["x-understudy-exchange-id"],
        )
    rows = {
        row["id"]: row
        for row in await _fetch(pg_url, "SELECT id, trajectory_id, parent_id, step FROM exchanges")
    }
    later, earlier = rows[step_ids[0]], rows[step_ids[1]]
    assert later["parent_id"] == earlier["id"] and later["step"] == 1
    assert later["trajectory_id"] == earlier["trajectory_id"]


from tests.support.replicas import Replicas  # noqa: E402  (the fixture comes from conftest)

# -- end to end: replicas ---------------------------------------------------------------------------


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} for a city",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    }
    for name in ("weather", "museums", "restaurants")
]


@dataclass
class Step:
    """One call as the client saw it."""

    replica: int
    stream: bool
    sent: list[dict[str, Any]]
    answer: dict[str, Any]
    trajectory_id: str
    exchange_id: str
    route: str


@dataclass
class Conversation:
    number: int
    explicit_id: str | None
    parallel: bool
    messages: list[dict[str, Any]] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


async def _call(
    client: openai.AsyncOpenAI, conversation: Conversation, stream: bool, replica: int
) -> Step:
    """One chat.completions call with the official SDK; returns what the client saw."""
    sent = [dict(m) for m in conversation.messages]
    extra: dict[str, Any] = {}
    if conversation.explicit_id:
        extra["metadata"] = {"trajectory_id": conversation.explicit_id}
    create: Any = client.chat.completions.with_raw_response.create
    if stream:
        raw = await create(
            model="gpt-4.1-mini",
            messages=sent,
            tools=TOOLS,
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        async for chunk in raw.parse():
            for choice in chunk.choices:
                delta = choice.delta
                if delta.content:
                    content.append(delta.content)
                for part in delta.tool_calls or []:
                    call = calls.setdefault(
                        part.index,
                        {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                    )
                    call["id"] += part.id or ""
                    if part.function is not None:
                        call["function"]["name"] += part.function.name or ""
                        call["function"]["arguments"] += part.function.arguments or ""
        answer: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
        if calls:
            answer["tool_calls"] = [calls[i] for i in sorted(calls)]
    else:
        raw = await create(model="gpt-4.1-mini", messages=sent, tools=TOOLS, **extra)
        message = raw.parse().choices[0].message
        answer = message.model_dump(exclude_none=True)  # what SDK users echo back
    return Step(
        replica=replica,
        stream=stream,
        sent=sent,
        answer=answer,
        trajectory_id=raw.headers["x-understudy-trajectory-id"],
        exchange_id=raw.headers["x-understudy-exchange-id"],
        route=raw.headers["x-understudy-route"],
    )


async def _converse(
    conversation: Conversation, replicas: Replicas, rng: random.Random, turns: int
) -> None:
    """`turns` user turns of the fake model's plan (tool calls, tool calls, answer), each step on
    a different replica than the step before, sent as soon as the previous answer ends."""
    previous = -1
    for turn in range(turns):
        text = f"conversation {conversation.number} turn {turn}: plan a day in city {turn}"
        if conversation.parallel and turn == 0:
            text += " (parallel lookups please)"
        conversation.messages.append({"role": "user", "content": text})
        while True:
            replica = rng.choice([n for n in range(len(replicas.clients)) if n != previous])
            previous = replica
            step = await _call(replicas.clients[replica], conversation, rng.random() < 0.5, replica)
            conversation.steps.append(step)
            conversation.messages.append(step.answer)
            calls = step.answer.get("tool_calls") or []
            if not calls:
                break
            for call in calls:
                conversation.messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": call["id"],
                        "content": f"result of {call['function']['name']} for "
                        f"{conversation.number}",
                    }
                )


def _response_message(row: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(row["response_json"])["choices"][0]["message"]
    return message


def _same_answer(recorded: dict[str, Any], seen: dict[str, Any]) -> bool:
    def essence(message: dict[str, Any]) -> tuple[Any, ...]:
        calls = [
            (c["id"], c["function"]["name"], c["function"]["arguments"])
            for c in message.get("tool_calls") or []
        ]
        return message["role"], message.get("content") or None, calls

    return essence(recorded) == essence(seen)


async def _assert_whole_and_single(pg_url: str, conversations: list[Conversation]) -> None:
    """One trajectory per conversation, steps chained by parent_id, leaf = what the client saw."""
    exchanges = await _whole_exchanges(pg_url, "ORDER BY trajectory_id, step")
    trajectories = {row["id"]: row for row in await _fetch(pg_url, "SELECT * FROM trajectories")}
    assert await _fetch(pg_url, "SELECT * FROM conversation_states") == []
    assert len(exchanges) == sum(len(c.steps) for c in conversations)
    assert len(trajectories) == len(conversations)
    by_trajectory: dict[str, list[dict[str, Any]]] = {}
    for row in exchanges:
        by_trajectory.setdefault(row["trajectory_id"], []).append(row)

    for conversation in conversations:
        seen_ids = {step.trajectory_id for step in conversation.steps}
        assert len(seen_ids) == 1, f"conversation {conversation.number} split: {seen_ids}"
        (trajectory_id,) = seen_ids
        if conversation.explicit_id:
            assert trajectory_id == conversation.explicit_id
        rows = by_trajectory[trajectory_id]
        assert [r["id"] for r in rows] == [s.exchange_id for s in conversation.steps]
        assert [r["step"] for r in rows] == list(range(len(rows)))
        assert [r["parent_id"] for r in rows] == [None, *[r["id"] for r in rows[:-1]]]
        for row, step in zip(rows, conversation.steps, strict=True):
            assert json.loads(row["request_json"])["messages"] == step.sent
            assert _same_answer(_response_message(row), step.answer)
            assert row["stream"] == step.stream and row["outcome"] == "ok"
        leaf = rows[-1]
        recorded = [*json.loads(leaf["request_json"])["messages"], _response_message(leaf)]
        assert recorded[:-1] == conversation.messages[:-1]
        assert _same_answer(recorded[-1], conversation.messages[-1])
        trajectory = trajectories[trajectory_id]
        assert trajectory["exchange_count"] == len(rows)
        assert trajectory["created_utc"] == rows[0]["started_utc"]
        assert trajectory["updated_utc"] == max(r["started_utc"] for r in rows)
        assert trajectory["tool_call_count"] == sum(r["tool_call_count"] for r in rows)
        assert {r["route"] for r in rows} == {trajectory["route"]}
        assert {s.route for s in conversation.steps} == {trajectory["route"]}


async def _assert_every_batch_written(replicas: Replicas, timeout_s: float = 10.0) -> None:
    """Each replica's recorder wrote every batch on the first try (no failure, nothing journaled:
    replicas flushing the same trajectories neither deadlock nor conflict)."""
    async with httpx.AsyncClient() as client:
        for server in replicas.servers:
            deadline = time.monotonic() + timeout_s
            while True:
                health = (await client.get(f"{server.root_url}/health")).json()
                if health["record_queue_depth"] == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert health["record_queue_depth"] == 0
            assert health.get("journal_bytes", 0) == 0, health
            assert health["recorder"].get("failed_batches", 0) == 0, health


def _exporter(*args: str) -> str:
    """Run the exporter CLI (`python -m exporter ...`) as a user would; return its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def _copy_to_sqlite(pg_url: str, path: Path) -> None:
    """The recorded rows, written into a fresh SQLite database (the zero-setup default)."""
    exchanges = await _whole_exchanges(pg_url, "ORDER BY started_utc, id")
    trajectories = await _fetch(pg_url, "SELECT * FROM trajectories")
    db = await Database.open(str(path))
    try:
        await db.write_exchanges(
            exchanges,
            [
                {
                    k: v
                    for k, v in t.items()
                    if k not in ("label", "tags_json", "note", "labeled_utc")
                }
                for t in trajectories
            ],
        )
    finally:
        await db.close()


async def _assert_exporter_reads_it_like_sqlite(pg_url: str, tmp_path: Path, samples: int) -> None:
    """`export` and `stats` give the same bytes from PostgreSQL as from the same rows in SQLite."""
    sqlite = tmp_path / "same-rows.db"
    await _copy_to_sqlite(pg_url, sqlite)
    outputs = {}
    for name, db in (("postgresql", pg_url), ("sqlite", str(sqlite))):
        out = tmp_path / f"{name}.jsonl"
        _exporter("export", "--db", db, "--out", str(out), "--quiet")
        outputs[name] = (out.read_bytes(), json.loads(_exporter("stats", "--db", db, "--json")))
    assert outputs["postgresql"] == outputs["sqlite"]
    train, stats = outputs["postgresql"]
    assert len(train.splitlines()) == samples
    assert (stats["trajectories"], stats["leaves"]) == (samples, samples)


def _conversations(count: int, rng: random.Random) -> list[Conversation]:
    return [
        Conversation(
            number=n,
            explicit_id=f"agent-run-{n}-{secrets.token_hex(3)}" if n % 4 == 3 else None,
            parallel=rng.random() < 0.5,
        )
        for n in range(count)
    ]


async def test_conversations_spread_over_four_replicas_stay_whole_and_single(
    start_replicas: Callable[..., Replicas], pg_url: str, tmp_path: Path
) -> None:
    """Every step goes to another replica than the previous one, milliseconds later; two of the
    replicas flush their recorder only every 2 s, so the previous exchange is never written yet.
    Then the exporter reads the database exactly as it reads the same rows from SQLite."""
    replicas = start_replicas(
        4,
        [
            {"flush_interval_ms": 2000},
            {"flush_interval_ms": 50},
            {"flush_interval_ms": 2000},
            {"flush_interval_ms": 50},
        ],
    )
    rng = random.Random(7)
    conversations = _conversations(16, rng)
    await asyncio.gather(
        *[_converse(c, replicas, random.Random(rng.random()), turns=2) for c in conversations]
    )
    assert any(c.parallel for c in conversations) and not all(c.parallel for c in conversations)
    assert any(len(c.steps[0].answer.get("tool_calls", [])) == 2 for c in conversations)
    assert {s.replica for c in conversations for s in c.steps} == {0, 1, 2, 3}
    assert {s.stream for c in conversations for s in c.steps} == {True, False}
    await _assert_every_batch_written(replicas)
    replicas.stop()  # SIGTERM: each recorder drains
    await _assert_whole_and_single(pg_url, conversations)
    await _assert_exporter_reads_it_like_sqlite(pg_url, tmp_path, len(conversations))


async def test_concurrent_first_requests_naming_one_trajectory_get_one_route(
    start_replicas: Callable[..., Replicas], pg_url: str, fake_upstream: FakeUpstream
) -> None:
    """Parallel sub-agents share an explicit id; their first requests reach three replicas at
    once, asking for different routes: the first claim wins on every replica, and the rest of
    the run keeps that route."""
    teacher = {"teacher_model": "openai/fake-teacher", "teacher_base_url": fake_upstream.base_url}
    replicas = start_replicas(3, [teacher, teacher, teacher])
    rounds = 4
    for number in range(rounds):
        trajectory_id = f"shared-run-{number}"

        async def first(agent: int, trajectory_id: str = trajectory_id) -> str:
            client = replicas.clients[agent % 3]
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4.1-mini",
                messages=[{"role": "user", "content": f"sub-agent {agent} of {trajectory_id}"}],
                extra_headers={
                    "X-Understudy-Trajectory-Id": trajectory_id,
                    "X-Understudy-Route": "teacher" if agent % 2 else "student",
                },
            )
            assert raw.headers["x-understudy-trajectory-id"] == trajectory_id
            return raw.headers["x-understudy-route"]

        routes = await asyncio.gather(*[first(agent) for agent in range(6)])
        assert len(set(routes)) == 1, (
            f"{trajectory_id} got routes {routes}: proxy/chat.py must pass a new trajectory's "
            "route decision through `await proxy.stitcher.claim(link, route, shadow)`"
        )
    replicas.stop()
    trajectories = await _fetch(pg_url, "SELECT id, route, exchange_count FROM trajectories")
    assert len(trajectories) == rounds
    for row in trajectories:
        assert row["exchange_count"] == 6
        recorded = await _fetch(
            pg_url, "SELECT DISTINCT route FROM exchanges WHERE trajectory_id = $1", row["id"]
        )
        assert recorded == [{"route": row["route"]}]
