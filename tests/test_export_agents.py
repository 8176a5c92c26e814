"""An openai-agents run through the proxy (the app served by uvicorn in a thread) comes out of the
exporter (its `main`, in-process) as one sample per run, with every tool call (parallel too),
every tool result and the final answer, valid in every format."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    Runner,
    ToolCallItem,
    ToolCallOutputItem,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

from tests.support.exporter import read_jsonl
from tests.support.inprocess import ThreadedProxy
from tests.support.inprocess import run_exporter as run_cli


@pytest.fixture(autouse=True)
def no_tracing() -> Iterator[None]:
    set_tracing_disabled(True)
    yield


@function_tool
def lookup_order(query: str, step: int, n: int) -> str:
    """Look the customer's order up."""
    return f"order for {query!r}: shipped (step {step}, call {n})"


@function_tool
def track_parcel(query: str, step: int, n: int) -> str:
    """Where the parcel is."""
    return json.dumps({"depot": "Lyon", "step": step, "n": n})


async def test_agent_runs_export_exactly(
    serve_proxy: Callable[..., ThreadedProxy], tmp_path: Path
) -> None:
    proxy_server = serve_proxy()
    client = AsyncOpenAI(base_url=proxy_server.base_url, api_key="sk-test-agents")
    agent: Agent[Any] = Agent(
        name="support",
        instructions="You are a support agent. Use the tools.",
        model=OpenAIChatCompletionsModel(model="gpt-4.1-mini", openai_client=client),
        tools=[lookup_order, track_parcel],
    )
    runs = []
    for text, stream in (("where is order 1?", False), ("parallel: order 2?", True)):
        if stream:
            streamed = Runner.run_streamed(agent, text)
            async for _ in streamed.stream_events():
                pass
            runs.append(streamed)
        else:
            runs.append(await Runner.run(agent, text))
    proxy_server.stop()

    out = tmp_path / "train.jsonl"
    result = run_cli("export", "--db", str(proxy_server.db), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    samples = read_jsonl(out)
    assert len(samples) == 2
    for run, sample in zip(runs, samples, strict=True):
        calls = [item.raw_item for item in run.new_items if isinstance(item, ToolCallItem)]
        outputs = [
            str(item.output) for item in run.new_items if isinstance(item, ToolCallOutputItem)
        ]
        messages = sample["messages"]
        exported_calls = [c["function"] for m in messages for c in m.get("tool_calls") or ()]
        assert [(c["name"], json.loads(c["arguments"])) for c in exported_calls] == [
            (c.name, json.loads(c.arguments))  # type: ignore[union-attr]
            for c in calls
        ]
        assert [m["content"] for m in messages if m["role"] == "tool"] == outputs
        assert messages[0] == {
            "role": "system",
            "content": "You are a support agent. Use the tools.",
        }
        assert messages[-1] == {"role": "assistant", "content": run.final_output}
        assert {t["function"]["name"] for t in sample["tools"]} == {"lookup_order", "track_parcel"}
    assert max(len(m.get("tool_calls") or ()) for m in samples[1]["messages"]) == 2
    assert run_cli("validate", str(out), "--min-samples", "2").returncode == 0
    for fmt in ("hf", "sharegpt"):
        other = tmp_path / f"{fmt}.jsonl"
        assert (
            run_cli(
                "export",
                "--db",
                str(proxy_server.db),
                "--out",
                str(other),
                "--format",
                fmt,
                "--quiet",
            ).returncode
            == 0
        )
        check = run_cli("validate", str(other), "--format", fmt, "--min-samples", "2")
        assert check.returncode == 0, check.stdout
