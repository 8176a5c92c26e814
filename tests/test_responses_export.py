"""A Responses trajectory exports to the same samples as a chat one (`exporter.responses`,
applied by `exporter.reader`): pure conversion units, then conversations recorded through the
proxy in both APIs, exported in every format and checked by `python -m exporter validate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exporter.api import export_samples
from exporter.messages import Rejected
from exporter.options import ExportOptions
from exporter.responses import as_chat, chat_completion, chat_messages, chat_tools
from proxy.storage import Database
from tests.support.inprocess import run_exporter as run_cli
from tests.support.responses import fake_url, in_process_proxy

__all__ = ["fake_url"]

FLAT_TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        "strict": False,
    },
    {
        "type": "function",
        "name": "find_museums",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
]
NESTED_TOOLS = [
    {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
    for t in FLAT_TOOLS
]
INSTRUCTIONS = "You plan city trips."


# -- conversion units ----------------------------------------------------------------------------


def test_items_become_chat_messages() -> None:
    items = [
        {"role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
        {"type": "message", "role": "user", "content": "q"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_a",
            "name": "f",
            "arguments": "{}",
        },
        {
            "type": "function_call",
            "id": "fc_2",
            "call_id": "call_b",
            "name": "g",
            "arguments": "{}",
        },
        {"type": "function_call_output", "call_id": "call_a", "output": "A"},
        {
            "type": "function_call_output",
            "call_id": "call_b",
            "output": [{"type": "input_text", "text": "B"}],
        },
    ]
    assert chat_messages(items) == [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "A"},
        {"role": "tool", "tool_call_id": "call_b", "content": "B"},
    ]


def test_request_has_instructions_first_nested_tools_and_parallel_flag() -> None:
    body = {
        "model": "m",
        "instructions": INSTRUCTIONS,
        "input": "q",
        "tools": [*FLAT_TOOLS, {"type": "web_search"}],
        "parallel_tool_calls": False,
    }
    request, response = as_chat(body, None, [{"role": "user", "content": "earlier"}])
    assert request == {
        "model": "m",
        "messages": [
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": "earlier"},
            {"role": "user", "content": "q"},
        ],
        "tools": NESTED_TOOLS,
        "parallel_tool_calls": False,
    }
    assert response is None
    assert chat_tools([{"type": "file_search"}]) == []


def test_response_becomes_one_chat_completion() -> None:
    response = {
        "id": "resp_1",
        "model": "m",
        "status": "completed",
        "output": [
            {"type": "reasoning", "id": "rs", "summary": []},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        ],
        "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
    }
    completion = chat_completion(response)
    assert completion is not None
    [choice] = completion["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["id"] == "c1"
    assert completion["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    cut = {
        **response,
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
    }
    assert chat_completion(cut)["choices"][0]["finish_reason"] == "length"  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            {"input": [{"type": "custom_tool_call", "call_id": "c", "name": "x", "input": "y"}]},
            "custom_tool_call",
        ),
        (
            {"input": [{"type": "web_search_call", "id": "ws", "status": "completed"}]},
            "builtin_tool_call",
        ),
        ({"input": [{"type": "compaction", "encrypted_content": "e"}]}, "compaction"),
        ({"input": [{"type": "item_reference", "id": "msg_x"}]}, "unresolved_item_reference"),
        ({"prompt": {"id": "pmpt_1"}, "input": "x"}, "unresolved_prompt"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "unsupported_content",
        ),
    ],
)
def test_what_cannot_be_trained_is_rejected_with_its_reason(
    body: dict[str, Any], reason: str
) -> None:
    with pytest.raises(Rejected) as caught:
        as_chat({"model": "m", **body}, None)
    assert caught.value.reason == reason


def test_truncated_history_is_rejected() -> None:
    with pytest.raises(Rejected) as caught:
        as_chat({"model": "m", "input": "x"}, None, truncated=True)
    assert caught.value.reason == "truncated_history"


# -- recorded through the proxy, exported --------------------------------------------------------


async def record_chat(client: Any, text: str) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": text},
    ]
    while True:
        answer = (
            await client.post(
                "/chat/completions",
                json={"model": "m", "messages": messages, "tools": NESTED_TOOLS},
            )
        ).json()["choices"][0]["message"]
        messages.append(answer)
        if not answer.get("tool_calls"):
            return
        for call in answer["tool_calls"]:
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call["id"],
                    "content": f"{call['function']['name']} ok",
                }
            )


async def record_responses(client: Any, text: str, *, chained: bool, stream: bool) -> None:
    history: list[Any] = [{"role": "user", "content": text}]
    previous: str | None = None
    new_items: list[Any] = list(history)
    while True:
        body: dict[str, Any] = {
            "model": "m",
            "instructions": INSTRUCTIONS,
            "input": new_items if chained else history,
            "tools": FLAT_TOOLS,
            "stream": stream,
        }
        if chained and previous:
            body["previous_response_id"] = previous
        reply = await client.post("/responses", json=body)
        if stream:
            events = [
                json.loads(line[6:])
                for line in reply.text.splitlines()
                if line.startswith("data: ")
            ]
            answer = events[-1]["response"]
        else:
            answer = reply.json()
        previous = answer["id"]
        outputs = [
            {"type": "function_call_output", "call_id": i["call_id"], "output": f"{i['name']} ok"}
            for i in answer["output"]
            if i["type"] == "function_call"
        ]
        history += [*answer["output"], *outputs]
        new_items = outputs
        if not outputs:
            return


async def samples(
    db: Path, fmt: str = "openai", **options: Any
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    database = await Database.open(str(db))
    try:
        lines, summary = await export_samples(database, ExportOptions(format=fmt, **options))
    finally:
        await database.close()
    return [json.loads(line) for line in lines], dict(summary.dropped)


@pytest.mark.parametrize(("chained", "stream"), [(False, False), (True, False), (True, True)])
async def test_responses_trajectory_exports_like_the_chat_one(
    tmp_path: Path, fake_url: str, chained: bool, stream: bool
) -> None:
    chat_db, responses_db = tmp_path / "chat.db", tmp_path / "responses.db"
    async with in_process_proxy(chat_db, fake_url) as client:
        await record_chat(client, "parallel Paris")
    async with in_process_proxy(responses_db, fake_url) as client:
        await record_responses(client, "parallel Paris", chained=chained, stream=stream)
    for fmt in ("openai", "hf", "sharegpt"):
        from_chat, _ = await samples(chat_db, fmt)
        from_responses, dropped = await samples(responses_db, fmt)
        assert dropped == {}
        assert len(from_chat) == 1
        assert from_responses == from_chat, fmt
    [sample] = (await samples(responses_db))[0]
    assert sample["messages"][0] == {"role": "system", "content": INSTRUCTIONS}
    assert len(sample["messages"][2]["tool_calls"]) == 2


async def test_export_cli_validates_and_counts_truncated(tmp_path: Path, fake_url: str) -> None:
    import httpx

    db = tmp_path / "u.db"
    async with httpx.AsyncClient(base_url=fake_url) as direct:
        earlier = (
            await direct.post("/responses", json={"model": "m", "input": "Plan Baku"})
        ).json()
    async with in_process_proxy(db, fake_url) as client:
        for city in range(10):  # validate wants at least 10 samples
            await record_responses(client, f"Plan city {city}", chained=city % 2 == 0, stream=False)
        await client.post(
            "/responses",
            json={"model": "m", "previous_response_id": earlier["id"], "input": "and then?"},
        )
    _, dropped = await samples(db)
    assert dropped == {"truncated_history": 1}
    # worker processes that read the rows themselves rebuild the chained histories alike
    for include_truncated in (False, True):
        in_process = await samples(db, include_truncated=include_truncated)
        assert await samples(db, include_truncated=include_truncated, workers=2) == in_process
    out = tmp_path / "train.jsonl"
    done = run_cli("export", "--db", str(db), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "truncated_history" in done.stdout + done.stderr
    checked = run_cli("validate", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert len(out.read_text().splitlines()) == 10
    opted_in = tmp_path / "all.jsonl"
    done = run_cli("export", "--db", str(db), "--out", str(opted_in), "--include-truncated")
    assert done.returncode == 0, done.stderr
    assert len(opted_in.read_text().splitlines()) == 11
