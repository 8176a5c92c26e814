"""End to end: the real proxy process in front of the fake upstream, driven by the `openai` SDK.

Agent loops run with the sync and async clients, streamed and not, with parallel tool calls,
echoing the SDK's own message objects back (`model_dump()` with `refusal: None`,
`annotations: []`, ...; the stream accumulator's parsed messages), tool results as content-part
arrays and re-serialized arguments. For each conversation the database must hold one
trajectory, steps 0..n chained by `parent_id`, each request exactly as sent and each answer as
the client got it, and the `X-Understudy-Trajectory-Id` / `X-Understudy-Exchange-Id` response
headers must name the stored rows. Also: explicit ids (header, `metadata.trajectory_id`, header
wins), forks (two leaves), stitching across a proxy restart, the per-row fields (models, stream
flag, durations, usage, user, metadata, `X-Understudy-*` headers) and that no API key reaches the
database files.

Conversations share one module-scoped proxy and are told apart by their trajectory ids (waiting
for the recorder's batch); tests about whole database files or restarts run their own proxies.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from proxy.core.canonical import canonical_message
from tests.support.processes import FakeUpstream, ProxyServer, launch_proxy
from tests.support.records import (
    conversation,
    database_bytes,
    db_rows,
    leaves,
    path_to,
    recorded_exchanges,
    response_message,
    wait_for_ids,
    wait_recorded,
)

pytestmark = pytest.mark.e2e

API_KEY = "sk-test-e2e-0123456789abcdefSECRET"
MODEL = "gpt-4.1-mini"


def tool(name: str, description: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "step": {"type": "integer"},
                    "n": {"type": "integer"},
                },
                "required": ["query", "step", "n"],
            },
        },
    }


TOOLS = [
    tool("get_weather", "Weather for a city."),
    tool("find_museums", "Museums in a city."),
    tool("book_table", "Book a restaurant."),
]

# How a client echoes the assistant message it got into its next request.
Echo = Callable[[Any], dict[str, Any]]


def reserialize(arguments: str) -> str:
    parsed = json.loads(arguments)
    return json.dumps(dict(reversed(list(parsed.items()))), indent=2)


def echo_model_dump(message: Any) -> dict[str, Any]:
    """The SDK object as is: refusal None, annotations [], audio None, function_call None, ..."""
    dumped: dict[str, Any] = message.model_dump()
    return dumped


def echo_minimal(message: Any) -> dict[str, Any]:
    """Only the fields the API needs, as a hand-written client would build them."""
    out: dict[str, Any] = {"role": "assistant", "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in message.tool_calls
        ]
    return out


def echo_reserialized(message: Any) -> dict[str, Any]:
    """model_dump(exclude_none) with arguments parsed and dumped again (indent, other key order)."""
    dumped: dict[str, Any] = message.model_dump(exclude_none=True)
    for call in dumped.get("tool_calls") or []:
        call["function"]["arguments"] = reserialize(call["function"]["arguments"])
        call["function"].pop("parsed_arguments", None)
    return dumped


ECHOES: dict[str, Echo] = {
    "model_dump": echo_model_dump,
    "minimal": echo_minimal,
    "reserialized": echo_reserialized,
}


def tool_result(call: Any, parts: bool) -> dict[str, Any]:
    args = json.loads(call.function.arguments)
    text = f"{call.function.name}({args['query']}, step {args['step']}) = ok-{call.id}"
    content: Any = [{"type": "text", "text": text}] if parts else text
    return {"role": "tool", "tool_call_id": call.id, "content": content}


@dataclass
class Turn:
    """One call as the client saw it."""

    trajectory_id: str
    exchange_id: str
    stream: bool
    message: Any  # the SDK message object
    raw_message: dict[str, Any] | None = None  # the JSON message (non-stream answers)
    raw_body: bytes | None = None


@dataclass
class Run:
    """A whole client conversation: the messages sent on each step and what came back."""

    requests: list[list[dict[str, Any]]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)

    @property
    def trajectory_id(self) -> str:
        return self.turns[0].trajectory_id


def _turn_from_json(raw: Any) -> Turn:
    completion = raw.parse()
    body = raw.http_response.content
    return Turn(
        raw.headers["x-understudy-trajectory-id"],
        raw.headers["x-understudy-exchange-id"],
        False,
        completion.choices[0].message,
        json.loads(body)["choices"][0]["message"],
        body,
    )


def call_sync(
    client: openai.OpenAI, messages: list[dict[str, Any]], stream: bool, kwargs: dict[str, Any]
) -> Turn:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, stream=stream, **kwargs
    )
    if not stream:
        return _turn_from_json(raw)
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in raw.parse():
        state.handle_chunk(chunk)
    message = state.get_final_completion().choices[0].message
    return Turn(
        raw.headers["x-understudy-trajectory-id"],
        raw.headers["x-understudy-exchange-id"],
        True,
        message,
    )


async def call_async(
    client: openai.AsyncOpenAI,
    messages: list[dict[str, Any]],
    stream: bool,
    kwargs: dict[str, Any],
) -> Turn:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, stream=stream, **kwargs
    )
    if not stream:
        return _turn_from_json(raw)
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    async for chunk in raw.parse():
        state.handle_chunk(chunk)
    message = state.get_final_completion().choices[0].message
    return Turn(
        raw.headers["x-understudy-trajectory-id"],
        raw.headers["x-understudy-exchange-id"],
        True,
        message,
    )


def first_messages(text: str, system_role: str = "system") -> list[dict[str, Any]]:
    return [
        {"role": system_role, "content": "You plan city trips with tools."},
        {"role": "user", "content": text},
    ]


def next_messages(
    messages: list[dict[str, Any]], turn: Turn, echo: Echo, parts: bool
) -> list[dict[str, Any]]:
    return [
        *messages,
        echo(turn.message),
        *[tool_result(c, parts) for c in turn.message.tool_calls or []],
    ]


def converse(
    client: openai.OpenAI,
    text: str,
    *,
    stream: bool = False,
    echo: Echo = echo_model_dump,
    parts: bool = False,
    system_role: str = "system",
    run: Run | None = None,
    **kwargs: Any,
) -> Run:
    """Run the agent loop until the model answers without tool calls (sync client)."""
    kwargs.setdefault("tools", TOOLS)
    run = run or Run()
    messages = first_messages(text, system_role)
    if run.turns:  # a new user turn in the same conversation
        messages = [
            *run.requests[-1],
            echo(run.turns[-1].message),
            {"role": "user", "content": text},
        ]
    for _ in range(6):
        run.requests.append(messages)
        turn = call_sync(client, messages, stream, kwargs)
        run.turns.append(turn)
        if not turn.message.tool_calls:
            return run
        messages = next_messages(messages, turn, echo, parts)
    raise AssertionError("the fake upstream should answer within three steps")


async def converse_async(
    client: openai.AsyncOpenAI,
    text: str,
    *,
    stream: bool = False,
    echo: Echo = echo_model_dump,
    parts: bool = False,
    **kwargs: Any,
) -> Run:
    """Run the agent loop until the model answers without tool calls (async client)."""
    kwargs.setdefault("tools", TOOLS)
    run = Run()
    messages = first_messages(text)
    for _ in range(6):
        run.requests.append(messages)
        turn = await call_async(client, messages, stream, kwargs)
        run.turns.append(turn)
        if not turn.message.tool_calls:
            return run
        messages = next_messages(messages, turn, echo, parts)
    raise AssertionError("the fake upstream should answer within three steps")


def client_view(message: Any) -> dict[str, Any]:
    """The parts of an SDK message a client relies on, for exact comparison."""
    return {
        "content": message.content or None,
        "tool_calls": [
            (c.id, c.type, c.function.name, c.function.arguments) for c in message.tool_calls or []
        ],
    }


def recorded_view(message: dict[str, Any]) -> dict[str, Any]:
    return {
        "content": message.get("content") or None,
        "tool_calls": [
            (c["id"], c["type"], c["function"]["name"], c["function"]["arguments"])
            for c in message.get("tool_calls") or []
        ],
    }


def assert_recorded(rows: list[dict[str, Any]], run: Run) -> list[dict[str, Any]]:
    """The trajectory of `run` is single, complete, chained, and equals what the client saw."""
    tid = run.trajectory_id
    assert {t.trajectory_id for t in run.turns} == {tid}, "one trajectory id for every step"
    mine = [row for row in rows if row["trajectory_id"] == tid]
    assert len(mine) == len(run.turns)
    assert [row["step"] for row in mine] == list(range(len(run.turns)))
    assert [row["id"] for row in mine] == [t.exchange_id for t in run.turns]
    assert mine[0]["parent_id"] is None
    for parent, child in zip(mine, mine[1:], strict=False):
        assert child["parent_id"] == parent["id"]
    for row, sent, turn in zip(mine, run.requests, run.turns, strict=True):
        assert row["request"]["messages"] == sent  # the request exactly as the client sent it
        recorded = response_message(row)
        assert recorded_view(recorded) == client_view(turn.message)
        assert canonical_message(recorded) == canonical_message(turn.message.model_dump())
        if turn.raw_message is not None:
            assert recorded == turn.raw_message
            assert row["response_json"].encode() == turn.raw_body  # byte for byte
        assert row["stream"] == int(turn.stream)
        assert (row["status_code"], row["outcome"]) == (200, "ok")
        assert row["path"] == "/v1/chat/completions"
        assert row["state_hash"] and row["request_hash"]
    leaf_rows = leaves(mine)
    assert leaf_rows == [mine[-1]]
    assert path_to(mine, mine[-1]) == mine
    # the leaf alone is the whole conversation, message for message
    leaf_conversation = conversation(mine[-1])
    client_conversation = [*run.requests[-1], run.turns[-1].message.model_dump()]
    assert leaf_conversation[:-1] == client_conversation[:-1]
    assert [canonical_message(m) for m in leaf_conversation] == [
        canonical_message(m) for m in client_conversation
    ]
    return mine


def trajectory_row(proxy: ProxyServer, trajectory_id: str) -> dict[str, Any]:
    (row,) = db_rows(proxy.db, "SELECT * FROM trajectories WHERE id = ?", (trajectory_id,))
    return row


def recorded(proxy: ProxyServer, *runs: Run) -> list[dict[str, Any]]:
    """All exchanges of a running proxy once every call of `runs` is written."""
    wait_for_ids(proxy.db, *[t.exchange_id for run in runs for t in run.turns])
    return recorded_exchanges(proxy.db)


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream
) -> Iterator[ProxyServer]:
    """One proxy for the conversations of this module; each test finds its own trajectories."""
    server = launch_proxy(tmp_path_factory.mktemp("e2e"), upstream=fake_upstream.base_url)
    yield server
    server.stop()


@pytest.fixture
def client(shared: ProxyServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=shared.base_url, api_key=API_KEY, max_retries=0) as c:
        yield c


# -- sync client ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "echo", "parts"),
    [
        (False, "model_dump", False),
        (False, "minimal", True),
        (False, "reserialized", False),
        (True, "model_dump", False),
        (True, "reserialized", True),
    ],
    ids=[
        "json-dump",
        "json-minimal-parts",
        "json-reserialized",
        "sse-dump",
        "sse-reserialized-parts",
    ],
)
def test_sync_tool_loop_is_one_exact_trajectory(
    shared: ProxyServer, client: openai.OpenAI, stream: bool, echo: str, parts: bool
) -> None:
    text = f"Plan a day in Paris ({echo}, {'stream' if stream else 'json'}, parts={parts})"
    run = converse(client, text, stream=stream, echo=ECHOES[echo], parts=parts)
    assert len(run.turns) == 3  # call, call, answer
    assert "using" in run.turns[-1].message.content  # the answer quotes the tool results
    rows = assert_recorded(recorded(shared, run), run)
    assert [row["tool_call_count"] for row in rows] == [1, 1, 0]
    assert [row["finish_reason"] for row in rows] == ["tool_calls", "tool_calls", "stop"]
    trajectory = trajectory_row(shared, run.trajectory_id)
    assert trajectory["exchange_count"] == 3
    assert trajectory["tool_call_count"] == 2
    assert trajectory["id_source"] == "hash"


def test_parallel_calls_streamed_and_not_with_developer_role(
    shared: ProxyServer, client: openai.OpenAI
) -> None:
    runs = [
        converse(
            client,
            f"Do it in parallel please ({role})",
            stream=stream,
            system_role=role,
            parts=stream,
        )
        for stream, role in ((False, "developer"), (True, "system"))
    ]
    for run in runs:
        first = run.turns[0].message.tool_calls
        assert [c.function.name for c in first] == ["get_weather", "find_museums"]
        assert len({c.id for c in first}) == 2
    rows = recorded(shared, *runs)
    for run in runs:
        mine = assert_recorded(rows, run)
        assert [row["tool_call_count"] for row in mine] == [2, 1, 0]
        calls = response_message(mine[0])["tool_calls"]
        assert [json.loads(c["function"]["arguments"])["n"] for c in calls] == [0, 1]
        assert trajectory_row(shared, run.trajectory_id)["tool_call_count"] == 3
    assert runs[0].trajectory_id != runs[1].trajectory_id


def test_new_user_turn_continues_the_trajectory(shared: ProxyServer, client: openai.OpenAI) -> None:
    run = converse(client, "Plan a day in Rome")
    run = converse(client, "Now do both in parallel", run=run, stream=True)
    assert len(run.turns) == 6
    rows = assert_recorded(recorded(shared, run), run)
    assert [row["stream"] for row in rows] == [0, 0, 0, 1, 1, 1]
    assert [row["tool_call_count"] for row in rows] == [1, 1, 0, 2, 1, 0]


def test_sdk_stream_helper_echo_is_stitched(shared: ProxyServer, client: openai.OpenAI) -> None:
    """`client.chat.completions.stream()` gives ParsedChatCompletionMessage (parsed, parsed_arguments)."""
    marker = "Plan a day in Oslo (stream helper)"
    messages = first_messages(marker)
    requests, answers = [], []
    for _ in range(3):
        requests.append(messages)
        with client.chat.completions.stream(model=MODEL, messages=messages, tools=TOOLS) as stream:
            for _event in stream:
                pass
            message = stream.get_final_completion().choices[0].message
        answers.append(message)
        if not message.tool_calls:
            break
        messages = [
            *messages,
            message.model_dump(),  # includes parsed: None and parsed_arguments
            *[tool_result(c, False) for c in message.tool_calls],
        ]
    assert "parsed" in answers[0].model_dump()
    assert "parsed_arguments" in answers[0].model_dump()["tool_calls"][0]["function"]
    # the helper hides the response headers: find the calls by their requests
    rows = wait_recorded(
        shared.db, lambda rows: sum(marker in r["request_json"] for r in rows) >= len(requests)
    )
    mine = [row for row in rows if marker in row["request_json"]]
    assert len({row["trajectory_id"] for row in mine}) == 1
    assert recorded_exchanges(shared.db, mine[0]["trajectory_id"]) == mine
    assert [row["step"] for row in mine] == [0, 1, 2]
    assert [row["parent_id"] for row in mine] == [None, mine[0]["id"], mine[1]["id"]]
    assert [row["request"]["messages"] for row in mine] == requests
    for row, message in zip(mine, answers, strict=True):
        assert recorded_view(response_message(row)) == client_view(message)


# -- async client ---------------------------------------------------------------------------------


async def test_async_concurrent_conversations_stay_apart(shared: ProxyServer) -> None:
    specs = [
        ("Trip to Lisbon", False, "model_dump", False),
        ("Trip to Porto in parallel", True, "model_dump", True),
        ("Trip to Madrid", True, "reserialized", False),
        ("Trip to Seville in parallel", False, "reserialized", True),
        ("Trip to Bilbao", True, "minimal", True),
        ("Trip to Valencia in parallel", False, "minimal", False),
    ]
    async with openai.AsyncOpenAI(
        base_url=shared.base_url, api_key=API_KEY, max_retries=0
    ) as aclient:
        runs = await asyncio.gather(
            *[
                converse_async(
                    aclient,
                    text,
                    stream=stream,
                    echo=ECHOES[echo],
                    parts=parts,
                    stream_options={"include_usage": True} if stream else openai.omit,
                )
                for text, stream, echo, parts in specs
            ]
        )
    assert sum(len(run.turns) for run in runs) == 18
    assert len({run.trajectory_id for run in runs}) == len(specs)
    rows = await asyncio.to_thread(recorded, shared, *runs)
    for run in runs:
        mine = assert_recorded(rows, run)
        assert all(row["usage"] and row["total_tokens"] > 0 for row in mine)
        assert trajectory_row(shared, run.trajectory_id)["exchange_count"] == 3


async def test_async_stream_records_timings_and_usage(shared: ProxyServer) -> None:
    async with openai.AsyncOpenAI(
        base_url=shared.base_url, api_key=API_KEY, max_retries=0
    ) as aclient:
        streamed = await converse_async(
            aclient, "Plan Berlin", stream=True, stream_options={"include_usage": True}
        )
        plain = await converse_async(aclient, "Plan Hamburg", stream=True)
        whole = await converse_async(aclient, "Plan Munich")
    rows = await asyncio.to_thread(recorded, shared, streamed, plain, whole)
    for run in (streamed, plain, whole):
        assert_recorded(rows, run)
    by_trajectory: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_trajectory.setdefault(row["trajectory_id"], []).append(row)
    for row in by_trajectory[streamed.trajectory_id]:
        assert row["stream"] == 1
        assert 0 < row["ttft_ms"] <= row["duration_ms"]
        assert row["usage"]["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"] > 0
        assert row["response"]["usage"] == row["usage"]
    for row in by_trajectory[plain.trajectory_id]:
        assert row["ttft_ms"] is not None
        assert row["usage"]["estimated"] is True and row["total_tokens"] > 0  # not asked for
    for row in by_trajectory[whole.trajectory_id]:
        assert row["stream"] == 0
        assert row["ttft_ms"] is None
        assert row["duration_ms"] > 0
        assert row["usage"]["total_tokens"] > 0
        assert row["model_requested"] == row["model_answered"] == MODEL


# -- explicit ids, forks, restarts ----------------------------------------------------------------


def test_explicit_header_id_wins_and_is_echoed(shared: ProxyServer, client: openai.OpenAI) -> None:
    run = converse(
        client, "Plan Vienna", extra_headers={"X-Understudy-Trajectory-Id": "run-header-1"}
    )
    assert run.trajectory_id == "run-header-1"
    rows = assert_recorded(recorded(shared, run), run)
    assert all(row["headers"]["x-understudy-trajectory-id"] == "run-header-1" for row in rows)
    assert trajectory_row(shared, "run-header-1")["id_source"] == "header"


def test_metadata_trajectory_id_and_header_precedence(
    shared: ProxyServer, client: openai.OpenAI
) -> None:
    by_metadata = converse(
        client, "Plan Prague", metadata={"trajectory_id": "run-meta-1", "team": "a"}
    )
    both = converse(
        client,
        "Plan Brno",
        metadata={"trajectory_id": "run-meta-2"},
        extra_headers={"X-Understudy-Trajectory-Id": "run-header-2"},
    )
    assert by_metadata.trajectory_id == "run-meta-1"
    assert both.trajectory_id == "run-header-2"
    rows = recorded(shared, by_metadata, both)
    assert_recorded(rows, by_metadata)
    assert_recorded(rows, both)
    assert trajectory_row(shared, "run-meta-1")["id_source"] == "metadata"
    assert trajectory_row(shared, "run-header-2")["id_source"] == "header"
    assert not db_rows(shared.db, "SELECT id FROM trajectories WHERE id = 'run-meta-2'")
    meta_rows = [row for row in rows if row["trajectory_id"] == "run-meta-1"]
    assert all(row["metadata"] == {"trajectory_id": "run-meta-1", "team": "a"} for row in meta_rows)


def test_explicit_id_splits_what_hashing_would_join(
    shared: ProxyServer, client: openai.OpenAI
) -> None:
    messages = first_messages("Plan Bern")
    first = call_sync(client, messages, False, {"tools": TOOLS})
    step1 = next_messages(messages, first, echo_model_dump, False)
    hashed = call_sync(client, step1, False, {"tools": TOOLS})
    explicit = call_sync(
        client,
        step1,
        False,
        {"tools": TOOLS, "extra_headers": {"X-Understudy-Trajectory-Id": "run-split-1"}},
    )
    assert hashed.trajectory_id == first.trajectory_id
    assert explicit.trajectory_id == "run-split-1"
    rows = wait_for_ids(shared.db, first.exchange_id, hashed.exchange_id, explicit.exchange_id)
    assert rows[hashed.exchange_id]["parent_id"] == first.exchange_id
    assert (rows[explicit.exchange_id]["parent_id"], rows[explicit.exchange_id]["step"]) == (
        None,
        0,
    )


def test_fork_gives_two_leaves(shared: ProxyServer, client: openai.OpenAI) -> None:
    messages = first_messages("Plan Kyoto")
    root = call_sync(client, messages, False, {"tools": TOOLS})
    (call,) = root.message.tool_calls
    branches = []
    for result in ("sunny", "typhoon"):
        step1 = [
            *messages,
            echo_model_dump(root.message),
            {"role": "tool", "tool_call_id": call.id, "content": result},
        ]
        branches.append(call_sync(client, step1, True, {"tools": TOOLS}))
    assert {b.trajectory_id for b in branches} == {root.trajectory_id}
    wait_for_ids(shared.db, root.exchange_id, *[b.exchange_id for b in branches])
    rows = recorded_exchanges(shared.db, root.trajectory_id)
    assert len(rows) == 3
    leaf_rows = leaves(rows)
    assert sorted(row["id"] for row in leaf_rows) == sorted(b.exchange_id for b in branches)
    for row in leaf_rows:
        assert (row["parent_id"], row["step"]) == (root.exchange_id, 1)
        assert [r["id"] for r in path_to(rows, row)] == [root.exchange_id, row["id"]]
    assert trajectory_row(shared, root.trajectory_id)["exchange_count"] == 3


def test_stitching_survives_a_proxy_restart(
    start_proxy: Callable[..., ProxyServer], tmp_path: Any
) -> None:
    db = tmp_path / "shared.db"
    first_proxy = start_proxy(db=db)
    with openai.OpenAI(base_url=first_proxy.base_url, api_key=API_KEY, max_retries=0) as c:
        messages = first_messages("Plan Nice")
        first = call_sync(c, messages, False, {"tools": TOOLS})
    first_proxy.stop()

    second_proxy = start_proxy(db=db)
    with openai.OpenAI(base_url=second_proxy.base_url, api_key=API_KEY, max_retries=0) as c:
        step1 = next_messages(messages, first, echo_reserialized, True)
        second = call_sync(c, step1, True, {"tools": TOOLS})
    second_proxy.stop()
    assert second.trajectory_id == first.trajectory_id
    rows = recorded_exchanges(db)
    assert [(r["id"], r["parent_id"], r["step"]) for r in rows] == [
        (first.exchange_id, None, 0),
        (second.exchange_id, first.exchange_id, 1),
    ]


# -- what a row holds, what it must not hold ------------------------------------------------------


def test_row_fields_user_metadata_and_control_headers(
    shared: ProxyServer, client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.clear()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=first_messages("Plan Athens"),
        tools=TOOLS,
        user="user-77",
        metadata={"app": "trips", "tenant": "t1"},
        extra_headers={"X-Understudy-Tag": "nightly", "X-Understudy-Note": "from test"},
    )
    assert raw.status_code == 200
    (forwarded,) = fake_upstream.requests()
    exchange_id = raw.headers["x-understudy-exchange-id"]
    row = wait_for_ids(shared.db, exchange_id)[exchange_id]
    assert row["trajectory_id"] == raw.headers["x-understudy-trajectory-id"]
    assert row["end_user"] == "user-77"
    assert row["metadata"] == {"app": "trips", "tenant": "t1"}
    assert row["headers"] == {"x-understudy-tag": "nightly", "x-understudy-note": "from test"}
    assert row["model_requested"] == MODEL
    assert row["model_answered"] == MODEL
    assert row["upstream_request_id"] == raw.headers["x-request-id"]
    assert row["usage"] == json.loads(raw.http_response.content)["usage"]
    assert row["prompt_tokens"] == row["usage"]["prompt_tokens"]
    assert row["stream"] == 0 and row["ttft_ms"] is None and row["duration_ms"] > 0
    assert row["started_utc"].endswith("+00:00")
    # control headers stay with the proxy; the client's key goes upstream, since none is configured
    assert not any(name.startswith("x-understudy-") for name in forwarded["headers"])
    assert forwarded["headers"]["authorization"] == f"Bearer {API_KEY}"
    assert forwarded["body"] == json.loads(row["request_json"])


# -- what a row must not hold: run on their own proxies, to read the whole database files ----------


def _assert_no_secret(proxy: ProxyServer, *secrets: str) -> None:
    """Grep the raw bytes of the database files (main, -wal, -shm) for the keys."""
    data = database_bytes(proxy.db)
    assert len(data) > 4096
    assert re.search(rb"sk-[A-Za-z0-9_-]{12,}", data) is None  # nothing key-shaped
    for secret in secrets:
        assert secret.encode() not in data
        assert secret.split("-", 2)[-1].encode() not in data  # not even the tail of it
    assert b"Bearer" not in data
    assert b"authorization" not in data.lower()


def test_no_api_key_is_stored(proxy_server: ProxyServer) -> None:
    pasted = "sk-proj-PastedByTheUser0123456789abcdefXYZ"  # a user pastes a key into the chat
    with openai.OpenAI(base_url=proxy_server.base_url, api_key=API_KEY, max_retries=0) as client:
        converse(
            client, "Plan Dublin in parallel", stream=True, stream_options={"include_usage": True}
        )
        pasted_run = converse(client, f"Plan Cork, my key is {pasted}", stream=True)
        converse(client, "Plan Galway", extra_headers={"X-Understudy-Tag": "keys"})
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="fake-error-500", messages=first_messages("x"))
    proxy_server.stop()
    rows = recorded_exchanges(proxy_server.db)
    assert len(rows) == 10
    # the pasted key is masked in storage, yet the conversation still stitches
    mine = [row for row in rows if row["trajectory_id"] == pasted_run.trajectory_id]
    assert [row["step"] for row in mine] == [0, 1, 2]
    _assert_no_secret(proxy_server, API_KEY, pasted)


def test_upstream_key_replaces_the_client_key_and_neither_is_stored(
    start_proxy: Callable[..., ProxyServer], fake_upstream: FakeUpstream
) -> None:
    proxy_key = "sk-proxy-owned-key-9876543210SECRET"
    proxy = start_proxy(env={"UNDERSTUDY_UPSTREAM_API_KEY": proxy_key})
    fake_upstream.clear()
    with openai.OpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0) as c:
        run = converse(c, "Plan Tallinn", stream=True)
    seen = [request["headers"].get("authorization") for request in fake_upstream.requests()]
    assert seen == [f"Bearer {proxy_key}"] * len(run.turns)
    proxy.stop()
    assert_recorded(recorded_exchanges(proxy.db), run)
    _assert_no_secret(proxy, API_KEY, proxy_key)
