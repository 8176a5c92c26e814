"""Responses API on PostgreSQL replicas: a `previous_response_id` chain, and a full-resend
conversation, whose steps land on different replicas (one of which flushes its recorder only
every 2 s, so the parent's row is not written yet) stitch into one trajectory each, and export
with the whole history rebuilt from the records. A background response retrieved on another
replica than the one that created it is recorded there, once."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select

from exporter.api import export_samples
from exporter.options import ExportOptions
from proxy.storage import Database
from proxy.storage.bodies import rebuild_requests
from proxy.storage.schema import background_responses, conversation_states, exchanges
from tests.support.replicas import Replicas

# replicas are proxy processes
pytestmark = pytest.mark.e2e

TOOLS = [
    {"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
    {"type": "function", "name": "find_museums", "parameters": {"type": "object"}},
]


def outputs_of(response: Any) -> list[dict[str, Any]]:
    return [
        {"type": "function_call_output", "call_id": i.call_id, "output": f"{i.name} fine"}
        for i in response.output
        if i.type == "function_call"
    ]


async def test_responses_conversations_across_replicas_stay_single(
    start_replicas: Callable[..., Replicas], pg_url: str
) -> None:
    replicas = start_replicas(2, [{"flush_interval_ms": 2000}, {"flush_interval_ms": 2000}])
    # previous_response_id: each step on the other replica, milliseconds after the last
    chained: list[str] = []
    previous = None
    new_items: list[Any] = [{"role": "user", "content": "chained trip to Quito"}]
    for step in range(3):
        client = replicas.clients[step % 2]
        kwargs: dict[str, Any] = {"model": "m", "input": new_items, "tools": TOOLS}
        if previous:
            kwargs["previous_response_id"] = previous
        response = await client.responses.create(**kwargs)
        chained.append(response.id)
        previous = response.id
        new_items = outputs_of(response)
    # full resend, alternating replicas
    history: list[Any] = [{"role": "user", "content": "resent trip to Lima"}]
    for step in range(3):
        response = await replicas.clients[(step + 1) % 2].responses.create(
            model="m", input=history, tools=TOOLS
        )
        history += [*response.output, *outputs_of(response)]
    replicas.stop()

    db = await Database.open(pg_url)
    try:
        async with db.engine.connect() as conn:
            rows = [
                dict(r)
                for r in (
                    await conn.execute(select(exchanges).order_by(exchanges.c.started_utc))
                ).mappings()
            ]
            rows = await rebuild_requests(conn, rows)  # whole bodies (migration 003)
            pending = (await conn.execute(select(conversation_states))).all()
        lines, summary = await export_samples(db, ExportOptions())
    finally:
        await db.close()
    assert len(rows) == 6 and all(r["kind"] == "responses" for r in rows)
    assert pending == []  # written-through states and response ids went with their rows
    by_trajectory: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_trajectory.setdefault(row["trajectory_id"], []).append(row)
    assert len(by_trajectory) == 2
    for steps in by_trajectory.values():
        assert [r["step"] for r in steps] == [0, 1, 2]
        assert steps[1]["parent_id"] == steps[0]["id"] and steps[2]["parent_id"] == steps[1]["id"]
    chain = next(s for s in by_trajectory.values() if "Quito" in s[0]["request_json"])
    assert [r["response_id"] for r in chain] == chained
    assert dict(summary.dropped) == {}
    samples = [json.loads(line) for line in lines]
    assert len(samples) == 2
    for sample in samples:
        roles = [m["role"] for m in sample["messages"]]
        assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]


async def test_background_answers_retrieved_on_another_replica_are_recorded_once(
    start_replicas: Callable[..., Replicas], pg_url: str
) -> None:
    """A background response created on replica 0 and retrieved on replica 1 (polled, then
    streamed with `starting_after`) is recorded once, with its final answer; the next step,
    chained to it on replica 0, stitches to it. Replica 0 still holds it in memory at shutdown:
    it must not record it a second time."""
    replicas = start_replicas(2)
    creator, retriever = replicas.clients
    queued = await creator.responses.create(
        model="m", input="background trip to Cusco", tools=TOOLS, background=True
    )
    assert queued.status == "queued"
    polled = [await retriever.responses.retrieve(queued.id) for _ in range(2)]
    assert [p.status for p in polled] == ["in_progress", "completed"]
    step = await creator.responses.create(
        model="m", previous_response_id=queued.id, input=outputs_of(polled[1]), tools=TOOLS
    )
    streamed_bg = await creator.responses.create(
        model="m", input="background trip to Arequipa", tools=TOOLS, background=True
    )
    events = []
    async with await retriever.responses.retrieve(
        streamed_bg.id, stream=True, starting_after=1
    ) as stream:
        async for event in stream:
            events.append(event)
    assert events[0].sequence_number == 2 and events[-1].type == "response.completed"
    replicas.stop()

    db = await Database.open(pg_url)
    try:
        async with db.engine.connect() as conn:
            rows = [
                dict(r)
                for r in (
                    await conn.execute(select(exchanges).order_by(exchanges.c.started_utc))
                ).mappings()
            ]
            held = (await conn.execute(select(background_responses))).all()
    finally:
        await db.close()
    assert held == []
    assert [r["response_id"] for r in rows] == [queued.id, step.id, streamed_bg.id]
    first, second, third = rows
    assert json.loads(first["response_json"])["status"] == "completed"
    assert [i["id"] for i in json.loads(first["response_json"])["output"]] == [
        item.id for item in polled[1].output
    ]
    assert first["tool_call_count"] == 1
    assert second["parent_id"] == first["id"]
    assert second["trajectory_id"] == first["trajectory_id"]
    answer = json.loads(third["response_json"])
    assert answer["status"] == "completed"
    assert [i["id"] for i in answer["output"]] == [i.id for i in events[-1].response.output]
    assert third["tool_call_count"] == 1


async def test_a_conversation_across_replicas_is_one_trajectory(
    start_replicas: Callable[..., Replicas], pg_url: str
) -> None:
    """A conversation created on one replica, its responses alternating between replicas: the
    mirror is shared, so the steps stitch into one trajectory that exports whole."""
    replicas = start_replicas(2, [{"flush_interval_ms": 2000}, {"flush_interval_ms": 2000}])
    conversation = await replicas.clients[0].conversations.create(
        items=[{"type": "message", "role": "user", "content": "conversation trip to Bogota"}]
    )
    pending: list[Any] = []
    for step in range(3):
        response = await replicas.clients[(step + 1) % 2].responses.create(
            model="m", conversation=conversation.id, input=pending, tools=TOOLS
        )
        pending = outputs_of(response)
    replicas.stop()
    db = await Database.open(pg_url)
    try:
        async with db.engine.connect() as conn:
            rows = [
                dict(r)
                for r in (
                    await conn.execute(select(exchanges).order_by(exchanges.c.started_utc))
                ).mappings()
            ]
        lines, summary = await export_samples(db, ExportOptions())
    finally:
        await db.close()
    assert len(rows) == 3 and len({r["trajectory_id"] for r in rows}) == 1
    assert [r["parent_id"] for r in rows[1:]] == [rows[0]["id"], rows[1]["id"]]
    assert dict(summary.dropped) == {}
    [sample] = [json.loads(line) for line in lines]
    roles = [m["role"] for m in sample["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert sample["messages"][0]["content"] == "conversation trip to Bogota"
