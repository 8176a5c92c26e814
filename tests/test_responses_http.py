"""`POST /v1/responses` through the proxy app in-process, in front of the fake upstream speaking
the Responses wire format: what the client gets, and what is recorded and stitched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.responses import exchanges, fake_url, in_process_proxy, sse_events

__all__ = ["fake_url"]

TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
    {
        "type": "function",
        "name": "find_museums",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
]


def call_outputs(response: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"type": "function_call_output", "call_id": item["call_id"], "output": f"result {i}"}
        for i, item in enumerate(response["output"])
        if item["type"] == "function_call"
    ]


async def test_json_answer_is_passed_through_and_recorded(tmp_path: Path, fake_url: str) -> None:
    db = tmp_path / "u.db"
    async with in_process_proxy(db, fake_url) as client:
        reply = await client.post(
            "/responses",
            json={
                "model": "gpt-4.1",
                "input": "Plan Paris",
                "tools": TOOLS,
                "instructions": "Be brief.",
            },
        )
    assert reply.status_code == 200
    body = reply.json()
    assert body["x_fake_extra"] == {"kept": True}
    assert reply.headers["x-request-id"].startswith("req_fake_")
    assert reply.headers["x-understudy-route"] == "student"
    [row] = exchanges(db)
    assert row["kind"] == "responses"
    assert row["path"] == "/v1/responses"
    assert row["response_id"] == body["id"]
    assert row["response"] == body
    assert row["trajectory_id"] == reply.headers["x-understudy-trajectory-id"]
    assert row["prompt_tokens"] == body["usage"]["input_tokens"]
    assert row["completion_tokens"] == body["usage"]["output_tokens"]
    assert row["tool_call_count"] == 1
    assert row["finish_reason"] == "completed"
    assert row["state_hash"]


async def test_stream_is_relayed_and_assembled(tmp_path: Path, fake_url: str) -> None:
    db = tmp_path / "u.db"
    async with in_process_proxy(db, fake_url) as client:
        reply = await client.post(
            "/responses",
            json={"model": "gpt-4.1", "input": "parallel Paris", "tools": TOOLS, "stream": True},
        )
    assert reply.status_code == 200
    events = sse_events(reply.content)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"
    assert b"[DONE]" not in reply.content
    [row] = exchanges(db)
    assert row["stream"] == 1 and row["outcome"] == "ok"
    assert row["response"] == events[-1]["response"]
    assert row["tool_call_count"] == 2  # parallel function calls
    assert row["ttft_ms"] is not None


async def test_empty_terminal_output_is_rebuilt_from_done_items(
    tmp_path: Path, fake_url: str
) -> None:
    db = tmp_path / "u.db"
    async with in_process_proxy(db, fake_url) as client:
        reply = await client.post(
            "/responses",
            headers={"x-fake-empty-terminal": "1", "x-fake-reasoning": "1"},
            json={
                "model": "gpt-4.1",
                "input": "Plan Rome",
                "tools": TOOLS,
                "stream": True,
                "include": ["reasoning.encrypted_content"],
            },
        )
    events = sse_events(reply.content)
    assert events[-1]["response"]["output"] == []
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    [row] = exchanges(db)
    assert row["response"]["output"] == done
    assert row["response"]["output"][0]["encrypted_content"].startswith("gAAAA")
    assert row["tool_call_count"] == 1


async def test_previous_response_id_chain_is_one_trajectory(tmp_path: Path, fake_url: str) -> None:
    db = tmp_path / "u.db"
    async with in_process_proxy(db, fake_url) as client:
        first = (
            await client.post(
                "/responses", json={"model": "gpt-4.1", "input": "Plan Oslo", "tools": TOOLS}
            )
        ).json()
        second = await client.post(
            "/responses",
            json={
                "model": "gpt-4.1",
                "previous_response_id": first["id"],
                "input": call_outputs(first),
                "tools": TOOLS,
                "stream": True,
            },
        )
        second_body = sse_events(second.content)[-1]["response"]
        third = (
            await client.post(
                "/responses",
                json={
                    "model": "gpt-4.1",
                    "previous_response_id": second_body["id"],
                    "input": call_outputs(second_body),
                    "tools": TOOLS,
                },
            )
        ).json()
    assert third["output"][-1]["type"] == "message"
    rows = exchanges(db)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert len({r["trajectory_id"] for r in rows}) == 1
    assert rows[1]["parent_id"] == rows[0]["id"] and rows[2]["parent_id"] == rows[1]["id"]


async def test_full_resend_stitches_by_canonical_items(tmp_path: Path, fake_url: str) -> None:
    """The client echoes output items with ids and statuses, drops the reasoning item, and
    re-serializes arguments: still one trajectory."""
    db = tmp_path / "u.db"
    history: list[dict[str, Any]] = [{"role": "user", "content": "Plan Lima"}]
    async with in_process_proxy(db, fake_url) as client:
        for _ in range(3):
            reply = await client.post(
                "/responses",
                headers={"x-fake-reasoning": "1"},
                json={
                    "model": "gpt-4.1",
                    "instructions": "Be brief.",
                    "input": history,
                    "tools": TOOLS,
                },
            )
            answer = reply.json()
            for item in answer["output"]:
                if item["type"] == "reasoning":
                    continue
                if item["type"] == "function_call":
                    item = {**item, "arguments": item["arguments"].replace(":", ": ")}
                history.append(item)
            history += call_outputs(answer)
    rows = exchanges(db)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert len({r["trajectory_id"] for r in rows}) == 1


async def test_item_reference_resolves_through_recorded_items(
    tmp_path: Path, fake_url: str
) -> None:
    db = tmp_path / "u.db"
    async with in_process_proxy(db, fake_url) as client:
        first = (
            await client.post(
                "/responses", json={"model": "gpt-4.1", "input": "Plan Kyiv", "tools": TOOLS}
            )
        ).json()
        references = [{"type": "item_reference", "id": i["id"]} for i in first["output"]]
        await client.post(
            "/responses",
            json={
                "model": "gpt-4.1",
                "input": [
                    {"role": "user", "content": "Plan Kyiv"},
                    *references,
                    *call_outputs(first),
                ],
                "tools": TOOLS,
            },
        )
    rows = exchanges(db)
    assert rows[1]["parent_id"] == rows[0]["id"]
    assert rows[1]["trajectory_id"] == rows[0]["trajectory_id"]


async def test_unknown_previous_response_makes_a_new_truncated_trajectory(
    tmp_path: Path, fake_url: str
) -> None:
    db = tmp_path / "u.db"
    async with httpx.AsyncClient(base_url=fake_url) as direct:  # answered before the proxy
        earlier = (
            await direct.post("/responses", json={"model": "m", "input": "Plan Baku"})
        ).json()
    async with in_process_proxy(db, fake_url) as client:
        reply = await client.post(
            "/responses",
            json={"model": "m", "previous_response_id": earlier["id"], "input": "and then?"},
        )
        missing = await client.post(
            "/responses", json={"model": "m", "previous_response_id": "resp_nowhere", "input": "x"}
        )
    assert reply.status_code == 200
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "previous_response_not_found"
    rows = exchanges(db)
    assert rows[0]["parent_id"] is None and rows[0]["step"] == 0
    assert rows[1]["outcome"] == "error"
    assert rows[1]["error"]["error"]["code"] == "previous_response_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "input": 3}, "input"),
        ({"model": "m", "input": ["text"]}, "input[0]"),
        ({"model": "m", "input": "x", "instructions": ["a"]}, "instructions"),
        ({"model": "m", "input": "x", "previous_response_id": 7}, "previous_response_id"),
        ({"input": "x"}, "model"),
        ({"model": "m", "input": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "input": "x", "tools": {"a": 1}}, "tools"),
    ],
)
async def test_bad_input_is_an_openai_shaped_400(
    tmp_path: Path, fake_url: str, body: dict[str, Any], param: str
) -> None:
    db = tmp_path / "u.db"
    async with in_process_proxy(db, fake_url) as client:
        reply = await client.post("/responses", json=body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert exchanges(db) == []


async def test_bad_route_header_is_a_400(tmp_path: Path, fake_url: str) -> None:
    async with in_process_proxy(tmp_path / "u.db", fake_url) as client:
        reply = await client.post(
            "/responses",
            headers={"x-understudy-route": "nobody"},
            json={"model": "m", "input": "x"},
        )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "x-understudy-route"


async def test_chat_and_responses_exchanges_keep_their_kind(tmp_path: Path, fake_url: str) -> None:
    db = tmp_path / "u.db"
    async with in_process_proxy(db, fake_url) as client:
        await client.post(
            "/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        )
        await client.post("/responses", json={"model": "m", "input": "hi"})
    assert sorted(r["kind"] for r in exchanges(db)) == ["chat", "responses"]
    chat = next(r for r in exchanges(db) if r["kind"] == "chat")
    assert chat["response_id"] is None


async def test_background_response_is_recorded_when_retrieved(
    tmp_path: Path, fake_url: str
) -> None:
    db = tmp_path / "u.db"
    async with in_process_proxy(db, fake_url) as client:
        queued = await client.post(
            "/responses",
            json={"model": "m", "input": "Plan Tunis", "tools": TOOLS, "background": True},
        )
        assert queued.json()["status"] == "queued"
        response_id = queued.json()["id"]
        polls = [(await client.get(f"/responses/{response_id}")).json() for _ in range(2)]
        assert [p["status"] for p in polls] == ["in_progress", "completed"]
        # the next step continues the retrieved answer
        await client.post(
            "/responses",
            json={
                "model": "m",
                "previous_response_id": response_id,
                "input": call_outputs(polls[1]),
                "tools": TOOLS,
            },
        )
        deleted = await client.delete(f"/responses/{response_id}")
        assert deleted.json()["deleted"] is True
    rows = exchanges(db)
    assert len(rows) == 2
    assert rows[0]["response"] == polls[1]  # the answer as retrieved, not `queued`
    assert rows[0]["response_id"] == response_id and rows[0]["tool_call_count"] == 1
    assert rows[1]["parent_id"] == rows[0]["id"]  # DELETE upstream keeps the record


async def test_background_response_retrieved_as_a_stream_is_recorded(
    tmp_path: Path, fake_url: str
) -> None:
    """`GET /v1/responses/{id}?stream=true&starting_after=N`: the events after N are relayed as
    they come and the held exchange is recorded from the terminal event."""
    db = tmp_path / "u.db"
    async with in_process_proxy(db, fake_url) as client:
        queued = await client.post(
            "/responses",
            json={"model": "m", "input": "Plan Sfax", "tools": TOOLS, "background": True},
        )
        response_id = queued.json()["id"]
        streamed = await client.get(
            f"/responses/{response_id}", params={"stream": "true", "starting_after": "2"}
        )
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = sse_events(streamed.content)
        assert events[0]["sequence_number"] == 3
        final = events[-1]
        assert final["type"] == "response.completed"
        # a second retrieval of the same answer records nothing more
        again = await client.get(f"/responses/{response_id}", params={"stream": "true"})
        assert sse_events(again.content)[-1] == final
    [row] = exchanges(db)
    assert row["response"]["status"] == "completed"
    assert row["response"]["output"] == final["response"]["output"]
    assert row["response_id"] == response_id and row["tool_call_count"] == 1


async def test_background_response_never_retrieved_is_recorded_at_shutdown(
    tmp_path: Path, fake_url: str
) -> None:
    db = tmp_path / "u.db"
    async with in_process_proxy(db, fake_url) as client:
        await client.post("/responses", json={"model": "m", "input": "x", "background": True})
    [row] = exchanges(db)
    assert row["response"]["status"] == "queued"
