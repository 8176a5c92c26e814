"""openai-agents through the proxy (the app served by uvicorn in a thread): an `Agent` with real `@function_tool` Python functions, run by
`Runner` on `OpenAIChatCompletionsModel` with an `AsyncOpenAI` client whose base_url is the proxy.

The agents SDK builds every request itself (its own converter echoes tool calls and results), so
this is the realistic stitching check: the stored trajectory must be single and complete (one
exchange per model call, chained), its tool calls and tool results must equal the run's items,
its last answer the run's final output, and the tools must really have run with the arguments
the model chose. Covered with plain and streamed runs, parallel calls, and a second user turn.
The runs share one proxy; each is found by a marker in its user input.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from agents import (
    Agent,
    FunctionTool,
    ItemHelpers,
    OpenAIChatCompletionsModel,
    Runner,
    ToolCallItem,
    ToolCallOutputItem,
    function_tool,
    set_tracing_disabled,
)
from agents.result import RunResult, RunResultStreaming
from openai import AsyncOpenAI

from tests.support.inprocess import ThreadedProxy, served_proxy
from tests.support.processes import FakeUpstream
from tests.support.records import db_rows, leaves, path_to, recorded_exchanges, wait_recorded

API_KEY = "sk-test-agents"
MODEL = "gpt-4.1-mini"
INSTRUCTIONS = "You plan city trips. Use the tools, then answer in one sentence."


@pytest.fixture(autouse=True)
def no_tracing() -> Iterator[None]:
    set_tracing_disabled(True)
    yield


class TripTools:
    """Three real tools; each call is logged so the test can check they ran as the model asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, int]] = []

        @function_tool
        def get_weather(query: str, step: int, n: int) -> str:
            """Weather forecast for the city named in the query."""
            self.calls.append(("get_weather", query, step, n))
            return f"weather for {query!r}: 21C and sunny"

        @function_tool
        def find_museums(query: str, step: int, n: int) -> str:
            """Museums worth visiting in the city named in the query."""
            self.calls.append(("find_museums", query, step, n))
            return json.dumps({"museums": ["Louvre", "Orsay"], "step": step})

        @function_tool
        def book_table(query: str, step: int, n: int) -> str:
            """Book a restaurant table in the city named in the query."""
            self.calls.append(("book_table", query, step, n))
            return "table booked for 8pm"

        self.tools: list[FunctionTool] = [get_weather, find_museums, book_table]


def make_agent(client: AsyncOpenAI, tools: TripTools) -> Agent[Any]:
    return Agent(
        name="trip planner",
        instructions=INSTRUCTIONS,
        model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
        tools=list(tools.tools),
    )


async def run_agent(
    agent: Agent[Any], user_input: Any, stream: bool
) -> RunResult | RunResultStreaming:
    if not stream:
        return await Runner.run(agent, user_input)
    streamed = Runner.run_streamed(agent, user_input)
    async for _event in streamed.stream_events():
        pass
    return streamed


def run_tool_calls(result: RunResult | RunResultStreaming) -> list[tuple[str, str, str]]:
    """(call_id, name, arguments) of each tool call the run made, in order."""
    out = []
    for item in result.new_items:
        if isinstance(item, ToolCallItem):
            raw = item.raw_item
            out.append((raw.call_id, raw.name, raw.arguments))  # type: ignore[union-attr]
    return out


def run_tool_outputs(result: RunResult | RunResultStreaming) -> list[tuple[str, str]]:
    """(call_id, output) of each tool result the run produced, in order."""
    out = []
    for item in result.new_items:
        if isinstance(item, ToolCallOutputItem):
            raw: Any = item.raw_item
            out.append((raw["call_id"], str(item.output)))
    return out


def recorded_tool_calls(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [
        (call["id"], call["function"]["name"], call["function"]["arguments"])
        for row in rows
        for call in row["response"]["choices"][0]["message"].get("tool_calls") or []
    ]


def leaf_tool_results(leaf: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (
            m["tool_call_id"],
            m["content"]
            if isinstance(m["content"], str)
            else "".join(p["text"] for p in m["content"]),
        )
        for m in leaf["request"]["messages"]
        if m["role"] == "tool"
    ]


def trajectory_of(proxy: ThreadedProxy, marker: str, model_calls: int) -> list[dict[str, Any]]:
    """The exchanges of the one trajectory whose requests carry `marker` (waits until
    `model_calls` of them are written); fails if they are spread over several trajectories."""
    rows = wait_recorded(
        proxy.db, lambda rows: sum(marker in r["request_json"] for r in rows) >= model_calls
    )
    mine = [row for row in rows if marker in row["request_json"]]
    assert len(mine) == model_calls
    trajectory_ids = {row["trajectory_id"] for row in mine}
    assert len(trajectory_ids) == 1, "the run was split over several trajectories"
    (trajectory_id,) = trajectory_ids
    assert recorded_exchanges(proxy.db, trajectory_id) == mine  # and holds nothing else
    (trajectory,) = db_rows(proxy.db, "SELECT * FROM trajectories WHERE id = ?", (trajectory_id,))
    assert trajectory["exchange_count"] == model_calls
    return mine


def assert_single_complete_trajectory(
    proxy: ThreadedProxy, marker: str, result: RunResult | RunResultStreaming, model_calls: int
) -> list[dict[str, Any]]:
    assert len(result.raw_responses) == model_calls
    rows = trajectory_of(proxy, marker, model_calls)
    (leaf,) = leaves(rows)
    assert path_to(rows, leaf) == rows
    assert [row["step"] for row in rows] == list(range(model_calls))
    assert all(row["outcome"] == "ok" and row["status_code"] == 200 for row in rows)
    # each request is the previous one plus its answer plus the tool results
    for parent, child in zip(rows, rows[1:], strict=False):
        sent = child["request"]["messages"]
        assert sent[: len(parent["request"]["messages"])] == parent["request"]["messages"]
    messages = leaf["request"]["messages"]
    assert messages[0] == {"role": "system", "content": INSTRUCTIONS}
    assert recorded_tool_calls(rows) == run_tool_calls(result)
    assert leaf_tool_results(leaf) == run_tool_outputs(result)
    final = leaf["response"]["choices"][0]["message"]
    assert final["content"] == result.final_output
    assert not final.get("tool_calls")
    tool_names = {t["function"]["name"] for t in leaf["request"]["tools"]}
    assert tool_names == {"get_weather", "find_museums", "book_table"}
    return rows


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream
) -> Iterator[ThreadedProxy]:
    """One proxy for the agent runs of this module; each run is found by a marker in its input."""
    server = served_proxy(tmp_path_factory.mktemp("agents"), upstream=fake_upstream.base_url)
    yield server
    server.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["run", "run_streamed"])
async def test_agent_run_is_one_complete_trajectory(proxy: ThreadedProxy, stream: bool) -> None:
    tools = TripTools()
    marker = f"Plan a day in Paris ({'streamed' if stream else 'plain'} run)"
    async with AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0) as client:
        result = await run_agent(make_agent(client, tools), marker, stream)
    assert [name for name, *_ in tools.calls] == ["get_weather", "find_museums"]
    assert [(step, n) for _, _, step, n in tools.calls] == [(0, 0), (1, 0)]
    assert "21C and sunny" in result.final_output
    rows = await asyncio.to_thread(assert_single_complete_trajectory, proxy, marker, result, 3)
    assert [row["stream"] for row in rows] == [int(stream)] * 3
    # what the tools received is what the model asked for, as recorded
    for (_, name, arguments), call in zip(recorded_tool_calls(rows), tools.calls, strict=True):
        assert (name, *json.loads(arguments).values()) == call


async def test_agent_parallel_tool_calls(proxy: ThreadedProxy) -> None:
    tools = TripTools()
    marker = "Check weather and museums in parallel for Lyon"
    async with AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0) as client:
        result = await Runner.run(make_agent(client, tools), marker)
    assert sorted(name for name, *_ in tools.calls) == [
        "find_museums",
        "find_museums",
        "get_weather",
    ]
    rows = await asyncio.to_thread(assert_single_complete_trajectory, proxy, marker, result, 3)
    first = rows[0]["response"]["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in first] == ["get_weather", "find_museums"]
    # the two parallel calls were echoed back in one assistant message, both answered
    echoed = [m for m in rows[1]["request"]["messages"] if m["role"] == "assistant"]
    assert len(echoed) == 1 and len(echoed[0]["tool_calls"]) == 2
    assert [row["tool_call_count"] for row in rows] == [2, 1, 0]


async def test_agent_second_user_turn_continues_the_trajectory(proxy: ThreadedProxy) -> None:
    tools = TripTools()
    marker = "Plan a day in Rome (two turns)"
    async with AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0) as client:
        agent = make_agent(client, tools)
        first = await Runner.run(agent, marker)
        follow_up = [
            *first.to_input_list(),
            {"role": "user", "content": "And a dinner, in parallel"},
        ]
        second = await run_agent(agent, follow_up, stream=True)
    assert len(tools.calls) == 2 + 3
    assert second.final_output.startswith("Answer to 'And a dinner")
    rows = await asyncio.to_thread(trajectory_of, proxy, marker, 6)
    (leaf,) = leaves(rows)
    assert path_to(rows, leaf) == rows
    assert [row["step"] for row in rows] == list(range(6))
    assert [row["stream"] for row in rows] == [0, 0, 0, 1, 1, 1]
    assert recorded_tool_calls(rows) == run_tool_calls(first) + run_tool_calls(second)
    assert leaf["response"]["choices"][0]["message"]["content"] == second.final_output
    assert ItemHelpers.text_message_outputs(first.new_items) == first.final_output
