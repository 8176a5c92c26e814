"""Unmodified clients on `/v1/responses` through the proxy (the app served by uvicorn in a thread,
real HTTP on loopback): the official `openai` SDK
(`responses.create`, streamed and not, full resend and `previous_response_id`) and openai-agents
with its default model (`OpenAIResponsesModel`) and real function tools (`Runner.run`,
`run_streamed`, `auto_previous_response_id=True`). Each conversation must be one trajectory whose
export equals the conversation the client saw; the module's export passes `exporter validate`.
Runs share one proxy; each is found by a marker in its input.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import (
    Agent,
    FunctionTool,
    Runner,
    ToolCallItem,
    ToolCallOutputItem,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

from exporter.api import export_samples
from exporter.options import ExportOptions
from proxy.storage import Database
from tests.support.inprocess import ThreadedProxy, served_proxy
from tests.support.inprocess import run_exporter as run_cli
from tests.support.processes import FakeUpstream
from tests.support.records import wait_recorded

MODEL = "gpt-4.1-mini"
INSTRUCTIONS = "You plan city trips. Use the tools, then answer in one sentence."
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for the city in the query.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "step": {"type": "integer"},
                "n": {"type": "integer"},
            },
        },
    },
    {
        "type": "function",
        "name": "find_museums",
        "description": "Museums in the city in the query.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "step": {"type": "integer"},
                "n": {"type": "integer"},
            },
        },
    },
]


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream
) -> Iterator[ThreadedProxy]:
    server = served_proxy(tmp_path_factory.mktemp("responses-sdk"), upstream=fake_upstream.base_url)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def agents_client(proxy: ThreadedProxy) -> Iterator[None]:
    """The agents SDK's default client points at the proxy (its default API is Responses)."""
    set_tracing_disabled(True)
    set_default_openai_api("responses")
    set_default_openai_client(
        AsyncOpenAI(base_url=proxy.base_url, api_key="sk-test-responses"), use_for_tracing=False
    )
    yield


def client(proxy: ThreadedProxy) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=proxy.base_url, api_key="sk-test-responses", max_retries=0)


def trajectory_rows(proxy: ThreadedProxy, marker: str, calls: int) -> list[dict[str, Any]]:
    """The exchanges whose requests carry `marker`, once `calls` are written; they must form
    one chain of one trajectory of kind `responses`."""
    rows = wait_recorded(proxy.db, lambda rows: any(marker in r["request_json"] for r in rows))
    mine = [r for r in rows if marker in r["request_json"]]
    # previous_response_id steps do not resend the marker: take the whole trajectory
    assert len({r["trajectory_id"] for r in mine}) == 1
    tid = mine[0]["trajectory_id"]
    rows = wait_recorded(
        proxy.db, lambda rows: sum(r["trajectory_id"] == tid for r in rows) >= calls
    )
    mine = [r for r in rows if r["trajectory_id"] == tid]
    assert len(mine) == calls
    assert [r["step"] for r in mine] == list(range(calls))
    assert all(r["kind"] == "responses" and r["outcome"] == "ok" for r in mine)
    for parent, child in zip(mine, mine[1:], strict=False):
        assert child["parent_id"] == parent["id"]
    return mine


async def exported(proxy: ThreadedProxy, trajectory_id: str) -> dict[str, Any]:
    database = await Database.open(str(proxy.db))
    try:
        lines, summary = await export_samples(
            database, ExportOptions(trajectory_ids=(trajectory_id,))
        )
    finally:
        await database.close()
    assert dict(summary.dropped) == {}
    [line] = lines
    sample: dict[str, Any] = json.loads(line)
    return sample


def sample_calls(sample: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for m in sample["messages"]
        for c in m.get("tool_calls") or []
    ]


def sample_results(sample: dict[str, Any]) -> list[str]:
    return [m["content"] for m in sample["messages"] if m["role"] == "tool"]


# -- the openai SDK ------------------------------------------------------------------------------


async def sdk_conversation(
    proxy: ThreadedProxy, marker: str, *, chained: bool, stream: bool
) -> tuple[list[tuple[str, dict[str, Any]]], list[str], str]:
    """Run a tool loop with `responses.create`; return (calls, results, final text) as seen."""
    openai = client(proxy)
    history: list[Any] = [{"role": "user", "content": f"parallel trip {marker}"}]
    new_items: list[Any] = list(history)
    previous: str | None = None
    calls: list[tuple[str, dict[str, Any]]] = []
    results: list[str] = []
    while True:
        kwargs: dict[str, Any] = {
            "model": MODEL,
            "instructions": INSTRUCTIONS,
            "tools": TOOLS,
            "input": new_items if chained else history,
        }
        if previous:
            kwargs["previous_response_id"] = previous
        if stream:
            async with openai.responses.stream(**kwargs) as events:
                async for _event in events:
                    pass
                response = await events.get_final_response()
        else:
            response = await openai.responses.create(**kwargs)
        outputs = []
        for item in response.output:
            if item.type == "function_call":
                calls.append((item.name, json.loads(item.arguments)))
                result = f"{item.name} says fine"
                results.append(result)
                outputs.append(
                    {"type": "function_call_output", "call_id": item.call_id, "output": result}
                )
        history += [*response.output, *outputs]
        new_items = outputs
        previous = response.id if chained else None
        if not outputs:
            await openai.close()
            return calls, results, response.output_text


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
@pytest.mark.parametrize("chained", [False, True], ids=["full_resend", "previous_response_id"])
async def test_openai_sdk_conversation_is_one_trajectory(
    proxy: ThreadedProxy, chained: bool, stream: bool
) -> None:
    marker = uuid.uuid4().hex[:8]
    calls, results, final = await sdk_conversation(proxy, marker, chained=chained, stream=stream)
    assert len(calls) == 3  # two parallel calls, then one
    rows = trajectory_rows(proxy, marker, 3)
    assert all(r["stream"] == int(stream) for r in rows)
    sample = await exported(proxy, rows[0]["trajectory_id"])
    assert sample["messages"][0] == {"role": "system", "content": INSTRUCTIONS}
    assert sample_calls(sample) == calls
    assert sample_results(sample) == results
    assert sample["messages"][-1] == {"role": "assistant", "content": final}
    assert [t["function"]["name"] for t in sample["tools"]] == ["get_weather", "find_museums"]


# -- openai-agents, default model ---------------------------------------------------------------


class TripTools:
    """Real tools; each call is logged so the test can check they ran as the model asked."""

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

        self.tools: list[FunctionTool] = [get_weather, find_museums]


@pytest.mark.parametrize("mode", ["run", "run_streamed", "auto_previous_response_id"])
async def test_agent_run_is_one_trajectory_equal_to_the_run(
    proxy: ThreadedProxy, mode: str
) -> None:
    marker = uuid.uuid4().hex[:8]
    tools = TripTools()
    agent: Agent[Any] = Agent(
        name="trip planner", instructions=INSTRUCTIONS, model=MODEL, tools=list(tools.tools)
    )
    text = f"parallel trip {marker}"
    if mode == "run_streamed":
        result: Any = Runner.run_streamed(agent, text)
        async for _event in result.stream_events():
            pass
    else:
        result = await Runner.run(
            agent, text, auto_previous_response_id=mode == "auto_previous_response_id"
        )
    assert len(tools.calls) == 3
    rows = trajectory_rows(proxy, marker, 3)
    if mode == "auto_previous_response_id":
        assert rows[1]["request"].get("previous_response_id") == rows[0]["response_id"]
    sample = await exported(proxy, rows[0]["trajectory_id"])
    run_calls = [
        (item.raw_item.name, json.loads(item.raw_item.arguments))
        for item in result.new_items
        if isinstance(item, ToolCallItem)
    ]
    run_results = [
        str(item.output) for item in result.new_items if isinstance(item, ToolCallOutputItem)
    ]
    assert sample_calls(sample) == run_calls
    assert sample_results(sample) == run_results
    assert sample["messages"][-1] == {"role": "assistant", "content": result.final_output}
    assert sample["messages"][:2] == [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": text},
    ]


# -- LangChain, Responses API ------------------------------------------------------------------


async def test_langchain_responses_api_with_bound_tools_is_one_trajectory(
    proxy: ThreadedProxy,
) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(query: str, step: int, n: int) -> str:
        """Weather forecast for the city named in the query."""
        return f"weather for {query!r}: 21C"

    @tool
    def find_museums(query: str, step: int, n: int) -> str:
        """Museums worth visiting in the city named in the query."""
        return "Louvre, Orsay"

    tools = {"get_weather": get_weather, "find_museums": find_museums}
    marker = uuid.uuid4().hex[:8]
    llm = ChatOpenAI(
        model=MODEL,
        base_url=proxy.base_url,
        api_key="sk-test-responses",  # type: ignore[arg-type]
        use_responses_api=True,
        max_retries=0,
    ).bind_tools(list(tools.values()))
    messages: list[Any] = [
        SystemMessage(INSTRUCTIONS),
        HumanMessage(f"parallel trip {marker}"),
    ]
    seen_calls: list[tuple[str, dict[str, Any]]] = []
    seen_results: list[str] = []
    for _ in range(5):
        answer = await llm.ainvoke(messages)
        messages.append(answer)
        if not answer.tool_calls:  # type: ignore[attr-defined]
            break
        for call in answer.tool_calls:  # type: ignore[attr-defined]
            result = tools[call["name"]].invoke(call["args"])
            seen_calls.append((call["name"], call["args"]))
            seen_results.append(str(result))
            messages.append(ToolMessage(str(result), tool_call_id=call["id"]))
    assert len(seen_calls) == 3
    rows = trajectory_rows(proxy, marker, 3)
    sample = await exported(proxy, rows[0]["trajectory_id"])
    assert sample_calls(sample) == seen_calls
    assert sample_results(sample) == seen_results
    assert sample["messages"][-1] == {"role": "assistant", "content": messages[-1].text}


async def test_module_export_validates(proxy: ThreadedProxy, tmp_path: Path) -> None:
    """Runs after the conversations above: add a few so `validate` has its 10 samples."""
    for _ in range(3):
        await sdk_conversation(proxy, uuid.uuid4().hex[:8], chained=True, stream=False)
    wait_recorded(proxy.db, lambda rows: len({r["trajectory_id"] for r in rows}) >= 10)
    out = tmp_path / "train.jsonl"
    done = run_cli("export", "--db", str(proxy.db), "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(out.read_text().splitlines()) >= 10
    checked = run_cli("validate", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
