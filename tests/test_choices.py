"""`n > 1` (issue 16): every choice of an answer is a conversation state, so an app that continues
choice k stitches to that exchange (in memory, and from the database after a restart), on SQLite
and PostgreSQL; the exporter writes the path the app continued, never the unused choices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from proxy.core.canonical import chain_hash
from proxy.storage import Database
from proxy.storage.rows import choice_state_rows
from proxy.storage.schema import choice_states, conversation_states
from tests.support.inprocess import in_process_proxy, run_exporter
from tests.support.processes import FakeUpstream
from tests.support.spellings import db_url, exchanges_in

__all__ = ["db_url"]  # the fixture, used by parameter name

TOOLS = [
    {
        "type": "function",
        "function": {"name": "search", "parameters": {"type": "object", "properties": {}}},
    }
]


def continue_with(messages: list[Any], message: Any, result: str) -> list[Any]:
    """`messages` + the chosen assistant message + one tool result per call."""
    answer = message.model_dump(exclude_none=True)
    results = [
        {"role": "tool", "tool_call_id": call.id, "content": result}
        for call in message.tool_calls or []
    ]
    return [*messages, answer, *results]


async def table_count(db_url: str, table: Any) -> int:
    db = await Database.open(db_url)
    try:
        async with db.engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())
    finally:
        await db.close()


def test_choice_state_rows_hash_each_later_choice() -> None:
    messages = [{"role": "assistant", "content": f"answer {k}"} for k in range(3)]
    response = {"choices": [{"index": k, "message": m} for k, m in enumerate(messages)]}
    assert choice_state_rows("h0", response) == [
        [1, chain_hash("h0", messages[1])],
        [2, chain_hash("h0", messages[2])],
    ]
    assert choice_state_rows("h0", {"choices": response["choices"][:1]}) == []
    assert choice_state_rows("h0", {"choices": "bad"}) == []


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_continuing_a_later_choice_stitches_to_its_exchange(
    tmp_path: Path, fake_upstream: FakeUpstream, db_url: str, stream: bool
) -> None:
    ask: list[Any] = [{"role": "user", "content": f"pick a choice ({stream})"}]
    async with in_process_proxy(tmp_path, upstream=fake_upstream.base_url, db=db_url) as proxy:
        sdk = proxy.openai()
        if stream:
            async with sdk.chat.completions.stream(
                model="m", messages=ask, tools=TOOLS, n=2
            ) as events:
                first = await events.get_final_completion()
        else:
            first = await sdk.chat.completions.create(model="m", messages=ask, tools=TOOLS, n=2)
        assert len(first.choices) == 2
        chosen = first.choices[1].message
        assert chosen.tool_calls and chosen.tool_calls[0].id.endswith("_c1_0")
        step1 = continue_with(ask, chosen, "result of choice 1")
        second = await sdk.chat.completions.create(model="m", messages=step1, tools=TOOLS)
        step2 = continue_with(step1, second.choices[0].message, "second result")
        final = await sdk.chat.completions.create(model="m", messages=step2, tools=TOOLS)
        assert final.choices[0].finish_reason == "stop"
    rows = await exchanges_in(db_url)
    assert len({row["trajectory_id"] for row in rows}) == 1, [row["step"] for row in rows]
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert rows[1]["parent_id"] == rows[0]["id"]
    assert await table_count(db_url, choice_states) == 1
    assert await table_count(db_url, conversation_states) == 0  # written through, then forgotten

    # After a restart (nothing in memory): continuing choice 0 is found in `exchanges`, choice 1
    # in `choice_states`; both link to the n=2 exchange (a fork: two continuations).
    async with in_process_proxy(tmp_path, upstream=fake_upstream.base_url, db=db_url) as proxy:
        sdk = proxy.openai()
        again = continue_with(ask, first.choices[0].message, "result of choice 0")
        await sdk.chat.completions.create(model="m", messages=again, tools=TOOLS)
        await sdk.chat.completions.create(model="m", messages=step1, tools=TOOLS)
    rows = await exchanges_in(db_url)
    assert len({row["trajectory_id"] for row in rows}) == 1
    assert sorted(row["parent_id"] == rows[0]["id"] for row in rows[1:]) == [
        False,
        True,
        True,
        True,
    ]

    # The exporter writes each leaf's path: the continued choice, never the unused one.
    out = tmp_path / f"choices-{stream}.jsonl"
    result = run_exporter("export", "--db", db_url, "--out", str(out))
    assert result.returncode == 0, result.stderr
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert samples, result.stdout
    # (The exporter renumbers tool-call ids; the tool results say which choice was continued.)
    texts = [json.dumps(sample) for sample in samples]
    assert len([t for t in texts if "result of choice 1" in t]) == 1, texts
    assert not [t for t in texts if "result of choice 0" in t]  # its branch ends in a call
    assert len(samples) == 1
