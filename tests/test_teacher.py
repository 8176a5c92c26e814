"""The teacher through litellm: request adaptation, a provider with another wire format, shadows.

Pure tests of `teacher_params` first. Then one proxy process whose teacher is
`anthropic/claude-sonnet-4-5` at the fake Anthropic Messages server (`proxy.testing.fake_anthropic`),
with the routing rule `[{"route": "shadow"}]`, driven by the official `openai` SDK:
- `X-Understudy-Route: teacher` on a run's first request: Claude's answers reach the app as
  OpenAI chat completions (tool calls included, streamed or not) for every step, and are recorded;
- no header: the student (the fake OpenAI upstream) answers, Claude's answer to the same request
  is stored in `exchanges.shadow_response_json` and never returned; `--format dpo` exports them.
The teacher at an OpenAI-compatible upstream is covered in `test_routing.py`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.http.teacher import teacher_params
from proxy.testing.fake_anthropic import create_app as create_anthropic_app
from proxy.testing.servers import serve_in_thread
from tests.support.agents import (
    CLIENT_KEY,
    SYSTEM,
    TOOLS,
    Step,
    async_client,
    first_user_text,
    launch_proxy,
    read_jsonl,
    received,
    run_agent,
    run_exporter,
    running,
    tool_result,
    trajectory_row,
    wait_for_exchanges,
)
from tests.support.inprocess import ThreadedProxy
from tests.support.processes import FakeUpstream
from tests.support.waiting import poll_async

# ---------------------------------------------------------------------------------------------
# Pure: teacher_params
# ---------------------------------------------------------------------------------------------

MESSAGES = [SYSTEM, {"role": "user", "content": "Book me a flight"}]
SAMPLING = {
    "temperature": 0.2,
    "top_p": 0.9,
    "logit_bias": {"316": 5},
    "presence_penalty": 0.1,
    "frequency_penalty": 0.2,
    "logprobs": True,
    "top_logprobs": 2,
}
CLIENT_BODY: dict[str, Any] = {
    "model": "gpt-4.1-mini",
    "messages": MESSAGES,
    "tools": TOOLS,
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "max_tokens": 100,
    "seed": 7,
    "stream": True,
    "stream_options": {"include_usage": True},
    "metadata": {"tier": "gold"},
    "store": True,
    "user": "user-42",
    **SAMPLING,
}
KEPT = {
    "messages": MESSAGES,
    "tools": TOOLS,
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "seed": 7,
    "user": "user-42",
}


@pytest.mark.parametrize(
    "model", ["openai/fake-teacher", "gpt-4.1", "anthropic/claude-sonnet-4-5", "gpt-5-chat-latest"]
)
def test_a_non_reasoning_teacher_gets_the_request_as_sent(model: str) -> None:
    """Only the model changes; stream, stream_options, metadata and store are not passed on."""
    assert teacher_params(CLIENT_BODY, model) == {
        "model": model,
        **KEPT,
        "max_tokens": 100,
        **SAMPLING,
    }


def same_conversation(messages: list[dict[str, Any]]) -> bool:
    """`messages` are MESSAGES, the system prompt given as `system` or `developer` (o-series)."""
    first, rest = messages[0], messages[1:]
    return (
        first["role"] in ("system", "developer")
        and first["content"] == SYSTEM["content"]
        and rest == MESSAGES[1:]
    )


@pytest.mark.parametrize("model", ["o3", "openai/o3", "openai/o4-mini", "o1-mini", "gpt-5"])
def test_a_reasoning_teacher_gets_max_completion_tokens_and_no_sampling(model: str) -> None:
    params = teacher_params(CLIENT_BODY, model)
    assert same_conversation(params.pop("messages"))
    assert params == {
        "model": model,
        **{k: v for k, v in KEPT.items() if k != "messages"},
        "max_completion_tokens": 100,
    }


def test_the_clients_max_completion_tokens_wins_over_max_tokens() -> None:
    body = {**CLIENT_BODY, "max_completion_tokens": 50}
    params = teacher_params(body, "o3")
    assert params["max_completion_tokens"] == 50
    assert "max_tokens" not in params


def test_teacher_params_leave_the_request_alone() -> None:
    body = copy.deepcopy(CLIENT_BODY)
    teacher_params(body, "o3")
    teacher_params(body, "anthropic/claude-sonnet-4-5")
    assert body == CLIENT_BODY


def test_a_request_without_optional_fields_gets_only_model_and_messages() -> None:
    body = {"model": "gpt-4.1-mini", "messages": MESSAGES, "user": None}
    params = teacher_params(body, "o3")
    assert same_conversation(params.pop("messages"))
    assert params == {"model": "o3"}


# ---------------------------------------------------------------------------------------------
# End to end: an Anthropic teacher, translated by litellm
# ---------------------------------------------------------------------------------------------

CLAUDE = "claude-sonnet-4-5"
ANTHROPIC_KEY = "some-test-key"


@dataclass
class FakeAnthropic:
    """The fake Anthropic server (`proxy.testing.fake_anthropic`); `url` has no path."""

    url: str

    def requests(self, marker: str) -> list[dict[str, Any]]:
        """Requests it got (`{"path", "headers", "body"}`) whose messages mention `marker`."""
        every = httpx.get(f"{self.url}/_fake/requests").json()
        return [r for r in every if marker in json.dumps(r["body"].get("messages"))]


@pytest.fixture(scope="module")
def fake_anthropic() -> Iterator[FakeAnthropic]:
    with serve_in_thread(create_anthropic_app()) as url:
        yield FakeAnthropic(url)


@pytest.fixture(scope="module")
def claude_proxy(
    fake_upstream: FakeUpstream,
    fake_anthropic: FakeAnthropic,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ThreadedProxy]:
    server = launch_proxy(
        fake_upstream,
        tmp_path_factory.mktemp("claude"),
        env={"ANTHROPIC_API_KEY": ANTHROPIC_KEY},
        teacher_model=f"anthropic/{CLAUDE}",
        teacher_base_url=fake_anthropic.url,
        routing_rules=json.dumps([{"route": "shadow"}]),
    )
    with running(server):
        yield server


@pytest.fixture
async def client(claude_proxy: ThreadedProxy) -> AsyncIterator[openai.AsyncOpenAI]:
    async with async_client(claude_proxy) as value:
        yield value


def teacher_first(step: int) -> dict[str, Any]:
    return {"extra_headers": {"X-Understudy-Route": "teacher"}} if step == 0 else {}


def claude_answer(text: str, steps: list[Step]) -> str:
    """The final text the fake Claude writes after the app ran the tools of `steps`."""
    calls = [c for s in steps for c in s.message.get("tool_calls") or []]
    return f"Claude answers {text[:60]!r} using {'; '.join(tool_result(c) for c in calls)}"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_claude_answers_a_whole_agent_run_as_openai_chat_completions(
    claude_proxy: ThreadedProxy,
    client: openai.AsyncOpenAI,
    fake_anthropic: FakeAnthropic,
    fake_upstream: FakeUpstream,
    stream: bool,
) -> None:
    text = f"Claude run ({'stream' if stream else 'json'}): Seoul to Busan"
    steps = await run_agent(client, text, stream=stream, options=teacher_first)

    # The app saw OpenAI chat completions from Claude, with the tool calls intact, at every step.
    assert len(steps) == 3
    assert [s.route for s in steps] == ["teacher"] * 3
    assert [s.model for s in steps] == [CLAUDE] * 3
    assert [s.teacher_model for s in steps] == [CLAUDE] * 3
    assert [s.finish_reason for s in steps] == ["tool_calls", "tool_calls", "stop"]
    first, second, final = (s.message for s in steps)
    assert first["content"] == "Let me look that up."
    assert [
        (c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in first["tool_calls"]
    ] == [("function", "search_flights", {"query": text[:40], "step": 0})]
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in second["tool_calls"]
    ] == [("book_flight", {"query": text[:40], "step": 1})]
    assert first["tool_calls"][0]["id"].startswith("toolu_fake")
    assert final["content"] == claude_answer(text, steps)
    assert not final.get("tool_calls")

    # Claude got Anthropic's wire format, with its own key, never the app's.
    calls = sorted(fake_anthropic.requests(text), key=lambda c: len(c["body"]["messages"]))
    assert len(calls) == 3
    for call in calls:
        assert call["path"] == "/v1/messages"
        assert call["headers"]["x-api-key"] == ANTHROPIC_KEY
        assert "anthropic-version" in call["headers"]
        assert CLIENT_KEY not in json.dumps(call["headers"])
        assert call["body"]["model"] == CLAUDE
        assert bool(call["body"].get("stream")) is stream
        assert call["body"]["system"] in (
            SYSTEM["content"],
            [{"type": "text", "text": SYSTEM["content"]}],
        )
        assert [(t["name"], t["input_schema"]) for t in call["body"]["tools"]] == [
            (t["function"]["name"], t["function"]["parameters"]) for t in TOOLS
        ]
    # Step 2's request carries step 1's tool_use and the app's tool_result, chained by id.
    history = calls[1]["body"]["messages"]
    tool_use = [b for m in history if m["role"] == "assistant" for b in m["content"]]
    assert [b for b in tool_use if b["type"] == "tool_use"] == [
        {
            "type": "tool_use",
            "id": first["tool_calls"][0]["id"],
            "name": "search_flights",
            "input": {"query": text[:40], "step": 0},
        }
    ]
    results = [
        b
        for m in history
        if m["role"] == "user" and isinstance(m["content"], list)
        for b in m["content"]
        if b["type"] == "tool_result"
    ]
    assert [r["tool_use_id"] for r in results] == [first["tool_calls"][0]["id"]]
    assert received(fake_upstream, text) == []  # the student was never asked

    # Recorded: one teacher trajectory, each exchange with Claude's OpenAI-shaped answer.
    rows = await wait_for_exchanges(claude_proxy.db, [s.exchange_id for s in steps])
    assert [(r["step"], r["route"], r["model_requested"], r["model_answered"]) for r in rows] == [
        (i, "teacher", "gpt-4.1-mini", CLAUDE) for i in range(3)
    ]
    assert {r["trajectory_id"] for r in rows} == {steps[0].trajectory_id}
    assert [r["tool_call_count"] for r in rows] == [1, 1, 0]
    assert [r["stream"] for r in rows] == [int(stream)] * 3
    assert all(r["shadow_model"] is None for r in rows)
    recorded = [json.loads(r["response_json"]) for r in rows]
    assert all(r["choices"][0]["message"]["tool_calls"] for r in recorded[:2])
    assert (
        recorded[0]["choices"][0]["message"]["tool_calls"][0]["id"] == first["tool_calls"][0]["id"]
    )
    assert recorded[2]["choices"][0]["message"]["content"] == final["content"]
    assert all(isinstance(r["usage"]["prompt_tokens"], int) for r in recorded)
    assert trajectory_row(claude_proxy.db, steps[0].trajectory_id)["route"] == "teacher"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_teacher_error_reaches_the_app_as_an_openai_error_and_is_recorded(
    claude_proxy: ThreadedProxy, client: openai.AsyncOpenAI, stream: bool
) -> None:
    text = f"Claude is overloaded ({stream}): Lyon to Nice"
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(
            model="gpt-4.1-mini",
            messages=[SYSTEM, {"role": "user", "content": text}],
            tools=TOOLS,
            stream=stream,
            extra_headers={"X-Understudy-Route": "teacher"},
        )
    error = caught.value
    assert error.status_code >= 500
    assert error.response.headers["x-understudy-route"] == "teacher"
    body = error.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert body["error"]["type"] == "teacher_error"
    assert "Overloaded" in body["error"]["message"]
    exchange_id = error.response.headers["x-understudy-exchange-id"]
    (row,) = await wait_for_exchanges(claude_proxy.db, [exchange_id])
    assert (row["route"], row["outcome"], row["status_code"]) == (
        "teacher",
        "error",
        error.status_code,
    )
    assert json.loads(row["error_json"]) == body


# ---------------------------------------------------------------------------------------------
# End to end: shadow answers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_shadow_run_returns_the_student_and_stores_claude_beside_it(
    claude_proxy: ThreadedProxy,
    client: openai.AsyncOpenAI,
    fake_anthropic: FakeAnthropic,
    fake_upstream: FakeUpstream,
    stream: bool,
) -> None:
    text = f"Shadowed run ({'stream' if stream else 'json'}): Porto to Faro"
    steps = await run_agent(client, text, stream=stream)

    # The app got the student's answers only.
    assert [s.route for s in steps] == ["student"] * 3
    assert [s.model for s in steps] == ["gpt-4.1-mini"] * 3
    assert all(s.teacher_model is None for s in steps)
    assert steps[2].message["content"].startswith(f"Answer to {text[:60]!r}")
    assert "Claude" not in json.dumps([s.message for s in steps])
    assert "toolu_" not in json.dumps([s.message for s in steps])
    assert [r["body"]["model"] for r in received(fake_upstream, text)] == ["gpt-4.1-mini"] * 3

    # Claude answered the same requests in the background (never streamed) ...
    rows = await wait_for_exchanges(claude_proxy.db, [s.exchange_id for s in steps], shadow=True)
    calls = sorted(fake_anthropic.requests(text), key=lambda c: len(c["body"]["messages"]))
    assert len(calls) == 3
    assert not any(c["body"].get("stream") for c in calls)
    # ... the very requests the student got: step 1's history holds the student's tool call.
    student_call = steps[0].message["tool_calls"][0]
    history = calls[1]["body"]["messages"]
    assert [
        (b["id"], b["name"], b["input"])
        for m in history
        if m["role"] == "assistant" and isinstance(m["content"], list)
        for b in m["content"]
        if b["type"] == "tool_use"
    ] == [(student_call["id"], "search_flights", json.loads(student_call["function"]["arguments"]))]

    # ... and its answers are stored beside the student's, not instead of them.
    assert [(r["route"], r["model_answered"], r["shadow_model"]) for r in rows] == [
        ("student", "gpt-4.1-mini", CLAUDE)
    ] * 3
    assert all(r["shadow_error_json"] is None for r in rows)
    shadows = [json.loads(r["shadow_response_json"]) for r in rows]
    assert [s["model"] for s in shadows] == [CLAUDE] * 3
    assert shadows[0]["choices"][0]["message"]["content"] == "Let me look that up."
    assert shadows[0]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == (
        "search_flights"
    )
    assert shadows[2]["choices"][0]["message"]["content"].startswith(
        f"Claude answers {text[:60]!r}"
    )
    answers = [json.loads(r["response_json"])["choices"][0]["message"] for r in rows]
    assert answers[0]["tool_calls"][0]["id"] == student_call["id"]
    assert answers[2]["content"] == steps[2].message["content"]
    trajectory = trajectory_row(claude_proxy.db, steps[0].trajectory_id)
    assert (trajectory["route"], trajectory["shadow"]) == ("student", 1)


async def test_a_run_started_as_student_gets_no_shadow_at_any_step(
    claude_proxy: ThreadedProxy, client: openai.AsyncOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """The shadow rule matches every request, but a rule only decides a new trajectory."""
    text = "Unshadowed run: Graz to Linz"
    steps = await run_agent(
        client,
        text,
        options=lambda n: {"extra_headers": {"X-Understudy-Route": "student"}} if n == 0 else {},
    )
    rows = await wait_for_exchanges(claude_proxy.db, [s.exchange_id for s in steps])
    assert [(r["route"], r["shadow_model"]) for r in rows] == [("student", None)] * 3
    assert trajectory_row(claude_proxy.db, steps[0].trajectory_id)["shadow"] == 0
    # a stray shadow call would be a background task, started before its answer was sent
    await poll_async(lambda: claude_proxy.background_tasks() == 0, what="background tasks to end")
    assert fake_anthropic.requests(text) == []
    assert all(
        r["shadow_response_json"] is None
        for r in await wait_for_exchanges(claude_proxy.db, [s.exchange_id for s in steps])
    )


async def test_dpo_export_pairs_claude_preferred_with_the_student(
    claude_proxy: ThreadedProxy, client: openai.AsyncOpenAI, tmp_path: Path
) -> None:
    text = "DPO run: Split to Zadar"
    steps = await run_agent(client, text)
    await wait_for_exchanges(claude_proxy.db, [s.exchange_id for s in steps], shadow=True)
    out = tmp_path / "dpo.jsonl"
    done = run_exporter(
        "export", "--db", str(claude_proxy.db), "--out", str(out), "--format", "dpo", "--quiet"
    )
    assert done.returncode == 0, done.stderr + done.stdout
    pairs = [p for p in read_jsonl(out) if first_user_text(p) == text]
    assert len(pairs) == 3, pairs
    for pair in pairs:
        assert set(pair) >= {"input", "preferred_output", "non_preferred_output"}
        assert pair["input"]["messages"][-1]["role"] in ("user", "tool")
        assert [m["role"] for m in pair["preferred_output"]] == ["assistant"]
        assert [m["role"] for m in pair["non_preferred_output"]] == ["assistant"]
        assert [t["function"]["name"] for t in pair["input"]["tools"]] == [
            "search_flights",
            "book_flight",
        ]
    by_length = sorted(pairs, key=lambda p: len(p["input"]["messages"]))
    # Step 0: Claude writes a sentence and calls search_flights; the student only calls it.
    preferred, student = (
        by_length[0]["preferred_output"][0],
        by_length[0]["non_preferred_output"][0],
    )
    assert preferred["content"] == "Let me look that up."
    assert [c["function"]["name"] for c in preferred["tool_calls"]] == ["search_flights"]
    assert not student.get("content")
    assert json.loads(student["tool_calls"][0]["function"]["arguments"]) == {
        "query": text[:40],
        "step": 0,
        "n": 0,
    }
    # Last step: Claude's final answer preferred over the student's.
    last = by_length[-1]
    assert last["preferred_output"][0]["content"].startswith(f"Claude answers {text[:60]!r}")
    assert last["non_preferred_output"][0]["content"] == steps[2].message["content"]
    # Its input is the conversation the app really had: the student's tool calls, not Claude's.
    assert "toolu_" not in json.dumps(last["input"])
    assert "Claude" not in json.dumps(last["input"])
