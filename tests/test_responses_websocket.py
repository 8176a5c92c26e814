"""The Responses API over WebSocket through a real proxy process: a client sending
`response.create` frames (as Codex does) gets the upstream's events as they come, and each
response is recorded as an exchange of kind `responses`, stitched into one trajectory whether
the client chains with `previous_response_id` or resends the conversation; prewarming frames
(`generate: false`) are relayed, not recorded."""

from __future__ import annotations

import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import ProxyServer, wait_recorded

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
