"""The Responses API over WebSocket through a real proxy process: a client sending
`response.create` frames (as Codex does) gets the upstream's events as they come, and each
response is recorded as an exchange of kind `responses`, stitched into one trajectory whether
the client chains with `previous_response_id` or resends the conversation; prewarming frames
(`generate: false`) are relayed, not recorded. A trajectory routed to the teacher is answered by
the teacher over the socket (a failing teacher by an `error` event)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.support.processes import FakeUpstream, ProxyServer
from tests.support.records import wait_recorded
from tests.support.responses import exchanges

pytestmark = pytest.mark.e2e

TOOLS = [
    {"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
    {"type": "function", "name": "find_museums", "parameters": {"type": "object"}},
]


async def create(ws: ClientConnection, **body: Any) -> list[dict[str, Any]]:
    """Send one `response.create` frame; return the events up to the terminal one."""
    await ws.send(json.dumps({"type": "response.create", **body}))
    events = []
    while True:
        event = json.loads(await ws.recv())
        events.append(event)
        if event["type"] in ("response.completed", "response.failed", "error"):
            return events


def outputs(response: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"type": "function_call_output", "call_id": i["call_id"], "output": f"{i['name']} ok"}
        for i in response["output"]
        if i["type"] == "function_call"
    ]


@pytest.mark.parametrize("chained", [True, False], ids=["previous_response_id", "full_resend"])
async def test_websocket_responses_are_recorded_and_stitched(
    proxy_server: ProxyServer, chained: bool
) -> None:
    url = proxy_server.base_url.replace("http", "ws", 1) + "/responses"
    async with connect(url, additional_headers={"authorization": "Bearer sk-test-ws"}) as ws:
        prewarm = await create(ws, model="m", input="", generate=False, tools=TOOLS)
        assert prewarm[-1]["response"]["output"] == []
        history: list[Any] = [{"role": "user", "content": "parallel trip over ws"}]
        first = await create(ws, model="m", input=history, tools=TOOLS)
        answer = first[-1]["response"]
        assert [e["sequence_number"] for e in first] == list(range(len(first)))
        history += [*answer["output"], *outputs(answer)]
        second_body: dict[str, Any] = {"model": "m", "tools": TOOLS}
        if chained:
            second_body |= {"previous_response_id": answer["id"], "input": outputs(answer)}
        else:
            second_body |= {"input": history}
        second = await create(ws, **second_body)
    rows = wait_recorded(proxy_server.db, lambda rows: len(rows) >= 2)
    assert len(rows) == 2  # the prewarm is not an exchange
    assert all(r["kind"] == "responses" and r["stream"] == 1 for r in rows)
    assert [r["outcome"] for r in rows] == ["ok", "ok"]
    assert rows[0]["response"] == answer
    assert rows[1]["response"] == second[-1]["response"]
    assert rows[1]["parent_id"] == rows[0]["id"]
    assert rows[0]["trajectory_id"] == rows[1]["trajectory_id"]
    assert rows[0]["tool_call_count"] == 2


# -- the teacher route over WebSocket ------------------------------------------------------------

TEACHER = "gpt-4.1-teacher"


async def test_teacher_answers_over_the_websocket(
    start_proxy: Callable[..., ProxyServer], fake_upstream: FakeUpstream
) -> None:
    """A trajectory routed to the teacher is answered by the teacher over the socket, every
    step, with the whole history; the upstream's socket never sees its frames."""
    fake_upstream.clear()
    proxy = start_proxy(teacher_model=TEACHER, teacher_base_url=fake_upstream.base_url)
    try:
        ws_url = proxy.base_url.replace("http", "ws", 1) + "/responses"
        headers = {"authorization": "Bearer sk-test-ws", "x-understudy-route": "teacher"}
        async with connect(ws_url, additional_headers=headers) as ws:
            first = await create(
                ws, model="m", instructions="Be brief.", input="parallel trip", tools=TOOLS
            )
            answer = first[-1]["response"]
            assert first[-1]["type"] == "response.completed"
            assert [i["type"] for i in answer["output"]] == ["function_call", "function_call"]
            second = await create(
                ws,
                model="m",
                previous_response_id=answer["id"],
                input=outputs(answer),
                tools=TOOLS,
            )
            assert second[-1]["type"] == "response.completed"
    finally:
        proxy.stop()
    received = fake_upstream.requests()
    assert not [r for r in received if r.get("ws")]  # nothing went to the upstream's socket
    teacher = [r["body"] for r in received if r["body"].get("model") == TEACHER]
    assert len(teacher) == 2
    assert "previous_response_id" not in teacher[1]
    assert [i.get("type") or "message" for i in teacher[1]["input"]] == [
        "message",
        "function_call",
        "function_call",
        "function_call_output",
        "function_call_output",
    ]
    rows = exchanges(proxy.db)
    assert [r["route"] for r in rows] == ["teacher", "teacher"]
    assert [r["outcome"] for r in rows] == ["ok", "ok"]
    assert rows[1]["parent_id"] == rows[0]["id"]
    assert rows[0]["response"]["output"] == answer["output"]
    assert rows[1]["response"]["output"] == second[-1]["response"]["output"]


async def test_a_failing_teacher_answers_with_an_error_event(
    start_proxy: Callable[..., ProxyServer], fake_upstream: FakeUpstream
) -> None:
    proxy = start_proxy(teacher_model="fake-error-500", teacher_base_url=fake_upstream.base_url)
    try:
        ws_url = proxy.base_url.replace("http", "ws", 1) + "/responses"
        headers = {"authorization": "Bearer sk-test-ws", "x-understudy-route": "teacher"}
        async with connect(ws_url, additional_headers=headers) as ws:
            events = await create(ws, model="m", input="hello")
    finally:
        proxy.stop()
    [event] = events
    assert event["type"] == "error"
    assert event["message"].startswith("teacher openai/fake-error-500")
    [row] = exchanges(proxy.db)
    assert row["route"] == "teacher" and row["outcome"] == "error"
    assert "teacher openai/fake-error-500" in row["error"]["error"]["message"]
