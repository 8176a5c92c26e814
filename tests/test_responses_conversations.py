"""Responses created in a `conversation` (issue 12): the proxy mirrors `/v1/conversations` and
`/v1/conversations/{id}/items` and the items of each response created with `conversation`, so
that the conversation's responses stitch into one trajectory whose export equals what the
client saw. Driven with the official `openai` SDK against the app in-process, the fake upstream
(which keeps conversations server-side, as OpenAI does) on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from exporter.api import export_samples
from exporter.options import ExportOptions
from proxy.core.responses import canonical_item
from proxy.storage import Database
from tests.support.records import database_bytes, db_rows
from tests.support.responses import exchanges, fake_url, in_process_proxy

__all__ = ["fake_url"]

MODEL = "gpt-4.1-mini"
TEACHER = "gpt-4.1-teacher"
INSTRUCTIONS = "You plan city trips. Use the tools, then answer in one sentence."
TOOLS = [
    {
        "type": "function",
        "name": name,
        "description": f"{name} for the city in the query.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "step": {"type": "integer"},
                "n": {"type": "integer"},
            },
        },
    }
    for name in ("get_weather", "find_museums")
]


def sdk(client: httpx.AsyncClient) -> AsyncOpenAI:
    """The official SDK over the in-process proxy's transport."""
    return AsyncOpenAI(
        base_url="http://127.0.0.1/v1", api_key="sk-test-conv", http_client=client, max_retries=0
    )


async def exported(db: Path, trajectory_id: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    database = await Database.open(str(db))
    try:
        lines, summary = await export_samples(
            database, ExportOptions(trajectory_ids=(trajectory_id,))
        )
    finally:
        await database.close()
    return [json.loads(line) for line in lines], dict(summary.dropped)


async def tool_loop(openai: AsyncOpenAI, conversation: str, *, stream: bool) -> dict[str, Any]:
    """Answer the model's tool calls until it answers in text. The first round's results go in
    the next request's `input`; later rounds add them with `conversations.items.create` and
    send no input. Returns what the client saw: calls, results, the final text."""
    calls: list[tuple[str, dict[str, Any]]] = []
    results: list[str] = []
    pending: list[dict[str, Any]] = []
    rounds = 0
    while True:
        kwargs: dict[str, Any] = {
            "model": MODEL,
            "instructions": INSTRUCTIONS,
            "tools": TOOLS,
            "conversation": conversation if rounds % 2 == 0 else {"id": conversation},
        }
        if pending and rounds == 1:
            kwargs["input"] = pending
        elif pending:
            added = await openai.conversations.items.create(conversation, items=pending)
            assert [item.type for item in added.data] == ["function_call_output"] * len(pending)
        if stream:
            async with openai.responses.stream(**kwargs) as events:
                async for _event in events:
                    pass
                response = await events.get_final_response()
        else:
            response = await openai.responses.create(**kwargs)
        assert response.conversation is not None and response.conversation.id == conversation
        rounds += 1
        pending = []
        for item in response.output:
            if item.type == "function_call":
                calls.append((item.name, json.loads(item.arguments)))
                results.append(f"{item.name} says fine ({len(results)})")
                pending.append(
                    {"type": "function_call_output", "call_id": item.call_id, "output": results[-1]}
                )
        if not pending:
            return {"calls": calls, "results": results, "final": response.output_text}


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_sdk_conversation_is_one_trajectory_exported_as_seen(
    tmp_path: Path, fake_url: str, stream: bool
) -> None:
    db = tmp_path / "u.db"
    async with in_process_proxy(db, fake_url) as client:
        openai = sdk(client)
        conversation = await openai.conversations.create(
            items=[{"type": "message", "role": "user", "content": "parallel trip to Oslo"}],
            metadata={"topic": "trip"},
        )
        seen = await tool_loop(openai, conversation.id, stream=stream)
        listed = await openai.conversations.items.list(conversation.id, order="asc")
    assert len(seen["calls"]) == 3  # two parallel calls, then one
    rows = exchanges(db)
    assert len(rows) == 3
    assert len({r["trajectory_id"] for r in rows}) == 1
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["parent_id"] for r in rows] == [None, rows[0]["id"], rows[1]["id"]]
    assert all(r["kind"] == "responses" and r["outcome"] == "ok" for r in rows)

    # the mirror holds the conversation as the upstream does, item for item
    mirrored = db_rows(
        db,
        "SELECT item_json FROM conversation_items WHERE conversation_id = ? ORDER BY position",
        (conversation.id,),
    )
    assert [canonical_item(json.loads(r["item_json"])) for r in mirrored] == [
        canonical_item(item.model_dump(exclude_none=True)) for item in listed.data
    ]

    samples, dropped = await exported(db, rows[0]["trajectory_id"])
    assert dropped == {}
    [sample] = samples
    messages = sample["messages"]
    assert messages[0] == {"role": "system", "content": INSTRUCTIONS}
    assert messages[1] == {"role": "user", "content": "parallel trip to Oslo"}
    sample_calls = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for m in messages
        for c in m.get("tool_calls") or []
    ]
    assert sample_calls == seen["calls"]
    assert [m["content"] for m in messages if m["role"] == "tool"] == seen["results"]
    assert messages[-1] == {"role": "assistant", "content": seen["final"]}


async def test_teacher_gets_the_whole_conversation(tmp_path: Path, fake_url: str) -> None:
    """A conversation routed to the teacher: the teacher's input is the conversation's items
    (mirrored) followed by the new input, without `conversation`."""
    db = tmp_path / "u.db"
    async with in_process_proxy(
        db, fake_url, teacher_model=TEACHER, teacher_base_url=fake_url
    ) as client:
        openai = sdk(client)
        conversation = await openai.conversations.create(
            items=[{"type": "message", "role": "user", "content": "remember the word kiwi"}]
        )
        reply = await client.post(
            "/responses",
            headers={"x-understudy-route": "teacher"},
            json={"model": MODEL, "conversation": conversation.id, "input": "which word?"},
        )
        assert reply.status_code == 200, reply.text
    async with httpx.AsyncClient(timeout=30) as direct:
        sent = (await direct.get(fake_url.removesuffix("/v1") + "/_fake/requests")).json()
    [row] = exchanges(db)
    assert row["route"] == "teacher"
    [teacher_body] = [r["body"] for r in sent if r["body"].get("model") == TEACHER]
    assert "conversation" not in teacher_body
    texts = json.dumps(teacher_body["input"])
    assert "remember the word kiwi" in texts and "which word?" in texts


async def created_upstream(fake_url: str, text: str) -> str:
    """A conversation created straight at the upstream (before the proxy saw it)."""
    async with httpx.AsyncClient(base_url=fake_url, timeout=30) as direct:
        created = await direct.post(
            "/conversations",
            json={"items": [{"type": "message", "role": "user", "content": text}]},
        )
    conversation: str = created.json()["id"]
    return conversation


async def test_a_conversation_the_proxy_never_saw_begin_exports_as_truncated(
    tmp_path: Path, fake_url: str
) -> None:
    conversation = await created_upstream(fake_url, "secret plan A")
    db = tmp_path / "u.db"
    async with in_process_proxy(db, fake_url) as client:
        answer = await sdk(client).responses.create(
            model=MODEL, conversation=conversation, input="go"
        )
    assert answer.output_text
    [row] = exchanges(db)
    samples, dropped = await exported(db, row["trajectory_id"])
    assert samples == [] and dropped == {"truncated_history": 1}


async def test_a_whole_listing_tells_the_proxy_a_conversation_begun_before_it(
    tmp_path: Path, fake_url: str
) -> None:
    conversation = await created_upstream(fake_url, "secret plan B")
    db = tmp_path / "u.db"
    async with in_process_proxy(db, fake_url) as client:
        openai = sdk(client)
        listed = await openai.conversations.items.list(conversation)  # desc, whole: mirrored
        assert not listed.has_more
        first = await openai.responses.create(model=MODEL, conversation=conversation, input="go")
        second = await openai.responses.create(model=MODEL, conversation=conversation, input="on")
    assert first.output_text and second.output_text
    rows = exchanges(db)
    assert len(rows) == 2 and rows[1]["parent_id"] == rows[0]["id"]
    samples, dropped = await exported(db, rows[0]["trajectory_id"])
    assert dropped == {}
    [sample] = samples
    assert [m["content"] for m in sample["messages"] if m["role"] == "user"] == [
        "secret plan B",
        "go",
        "on",
    ]
    assert [m["content"] for m in sample["messages"] if m["role"] == "assistant"] == [
        first.output_text,
        second.output_text,
    ]


async def test_bad_conversation_is_a_400(tmp_path: Path, fake_url: str) -> None:
    async with in_process_proxy(tmp_path / "u.db", fake_url) as client:
        reply = await client.post(
            "/responses", json={"model": MODEL, "conversation": {"id": 7}, "input": "x"}
        )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "conversation"


async def test_conversation_items_are_redacted_in_the_mirror(tmp_path: Path, fake_url: str) -> None:
    db = tmp_path / "u.db"
    secret = "sk-proj-" + "Q9w8E7r6T5y4U3i2" * 3
    async with in_process_proxy(db, fake_url) as client:
        openai = sdk(client)
        conversation = await openai.conversations.create(
            items=[{"type": "message", "role": "user", "content": f"my key is {secret}"}]
        )
        await openai.conversations.items.create(
            conversation.id,
            items=[{"type": "message", "role": "user", "content": f"again {secret}"}],
        )
        await openai.responses.create(
            model=MODEL, conversation=conversation.id, input=f"and {secret}"
        )
    assert secret.encode() not in database_bytes(db)
    items = db_rows(db, "SELECT item_json FROM conversation_items ORDER BY position")
    assert len(items) == 4  # two added, then the response's input and output
    assert "my key is" in items[0]["item_json"]
