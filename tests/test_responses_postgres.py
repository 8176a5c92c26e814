"""Responses API on PostgreSQL replicas: a `previous_response_id` chain, and a full-resend
conversation, whose steps land on different replicas (one of which flushes its recorder only
every 2 s, so the parent's row is not written yet) stitch into one trajectory each, and export
with the whole history rebuilt from the records."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from exporter.api import export_samples
from exporter.options import ExportOptions
from proxy.storage import Database
from proxy.storage.bodies import rebuild_requests
from proxy.storage.schema import conversation_states, exchanges
from tests.test_postgres import Replicas, start_replicas

__all__ = ["start_replicas"]

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
