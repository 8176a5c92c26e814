"""Routing: who answers a new trajectory (header, rules, rate), and that every step keeps it.

Pure tests of `proxy.core.routing` first. Then end-to-end agent runs with the official `openai` SDK
through a real proxy process whose teacher is the fake OpenAI upstream reached through litellm
(`--teacher-model openai/fake-teacher --teacher-base-url ... --teacher-api-key ...`) with routing
rules: the header or a rule decides a run's first request and every later step follows, stream or
not, tool calls (parallel ones too) intact, recorded with route and answering model; the teacher
uses its own key. Last, the issue's "Done when" on a second proxy (`--teacher-model o3
--teacher-rate 0.3`, the teacher served by the same fake upstream): ~30% of a 50-conversation
tool-use workload goes to the teacher from first step to last, exactly as `decide_route` predicts,
and `export --route teacher` holds exactly those conversations.

The helpers at the top (`launch_proxy`, `run_agent`, `wait_for_exchanges`, ...) are shared with
`test_teacher.py` and `test_promotion.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.config import RoutingRule, Settings
from proxy.core.canonical import prefix_hashes
from proxy.core.routing import RouteDecision, decide_route, rule_matches, sample_point
from tests.conftest import ROOT, FakeUpstream, ProxyServer, child_env, free_port, start_server
from tests.storage_helpers import whole_requests

# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "search_flights",
            "description": "Find flights between two cities.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_flight",
            "description": "Book a flight found by search_flights.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "step": {"type": "integer"}},
            },
        },
    },
]
SYSTEM = {"role": "system", "content": "You are a travel agent. Use the tools."}
CLIENT_KEY = "sk-client-key-for-tests"


def launch_proxy(
    fake_upstream: FakeUpstream, directory: Path, *, env: dict[str, str] | None = None, **flags: Any
) -> ProxyServer:
    """Start a proxy process (as `start_proxy` does) for fixtures wider than one test."""
    port = free_port()
    db = directory / "understudy.db"
    options = {"port": port, "upstream": fake_upstream.base_url, "db": str(db), **flags}
    args = ["-m", "proxy"]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    process = start_server(args, f"http://127.0.0.1:{port}/health", child_env(**(env or {})))
    return ProxyServer(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}", db, process)


@contextlib.contextmanager
def running(server: ProxyServer) -> Iterator[ProxyServer]:
    """Yield `server`, stop it afterwards (fixtures), failing loudly if it crashed meanwhile."""
    try:
        yield server
    finally:
        output = server.stop()
        assert "Traceback" not in output, output


@dataclass
class Step:
    """One request of an agent run, as the app saw it."""

    route: str
    trajectory_id: str
    exchange_id: str
    teacher_model: str | None
    model: str
    message: dict[str, Any]
    finish_reason: str | None
    request: dict[str, Any] = field(default_factory=dict)


def tool_result(call: dict[str, Any]) -> str:
    """What the app's tool returns for `call` (deterministic, mentions the tool)."""
    return f"{call['function']['name']} ok #{len(call['function']['arguments'])}"


async def _assemble(stream: openai.AsyncStream[Any]) -> tuple[dict[str, Any], str, str | None]:
    """The assistant message from a chat-completion stream, assembled as an app does."""
    parts: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    model, finish = "", None
    async for chunk in stream:
        model = chunk.model or model
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                parts.append(delta.content)
            for tc in delta.tool_calls or []:
                entry = calls.setdefault(
                    tc.index,
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if tc.id:
                    entry["id"] = tc.id
                if tc.function and tc.function.name and not entry["function"]["name"]:
                    entry["function"]["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry["function"]["arguments"] += tc.function.arguments
            if choice.finish_reason:
                finish = choice.finish_reason
    message: dict[str, Any] = {"role": "assistant", "content": "".join(parts) or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message, model, finish


async def run_agent(
    client: openai.AsyncOpenAI,
    user_text: str,
    *,
    model: str = "gpt-4.1-mini",
    stream: bool = False,
    options: Callable[[int], dict[str, Any]] | None = None,
    tools: list[dict[str, Any]] | None = None,
    max_steps: int = 6,
) -> list[Step]:
    """A tool-using agent loop: call, run the tools asked for, call again, until a text answer.

    options(step): extra `create()` arguments for that step (`extra_headers`, `metadata`, `model`,
    ...). Non-stream answers are echoed back as the SDK returned them (`message.to_dict()`, every
    field included), as apps that append the response message do.
    """
    messages: list[dict[str, Any]] = [SYSTEM, {"role": "user", "content": user_text}]
    steps: list[Step] = []
    for number in range(max_steps):
        kwargs: dict[str, Any] = {"model": model, "tools": tools or TOOLS}
        kwargs.update(options(number) if options else {})
        request = {"messages": list(messages), **kwargs}
        raw = await client.chat.completions.with_raw_response.create(
            messages=list(messages),  # type: ignore[arg-type]
            stream=stream,
            **kwargs,
        )
        parsed = raw.parse()
        if isinstance(parsed, openai.AsyncStream):
            message, answered, finish = await _assemble(parsed)
        else:
            completion = parsed
            message = completion.choices[0].message.to_dict()
            answered, finish = completion.model, completion.choices[0].finish_reason
        steps.append(
            Step(
                route=raw.headers["x-understudy-route"],
                trajectory_id=raw.headers["x-understudy-trajectory-id"],
                exchange_id=raw.headers["x-understudy-exchange-id"],
                teacher_model=raw.headers.get("x-understudy-teacher-model"),
                model=answered,
                message=message,
                finish_reason=finish,
                request=request,
            )
        )
        messages.append(message)
        if not message.get("tool_calls"):
            return steps
        for call in message["tool_calls"]:
            messages.append(
                {"role": "tool", "tool_call_id": call["id"], "content": tool_result(call)}
            )
    raise AssertionError(f"agent for {user_text!r} did not finish in {max_steps} steps")


def async_client(server: ProxyServer, key: str = CLIENT_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=key, max_retries=0)


def db_rows(db: Path, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Rows of a query on the proxy's SQLite file (readable while the proxy runs: WAL)."""
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql, list(params))]


async def wait_for_exchanges(
    db: Path, ids: Sequence[str], *, shadow: bool = False, within_s: float = 20.0
) -> list[dict[str, Any]]:
    """The `exchanges` rows of `ids` (in that order) once the recorder has written them all.

    shadow: also wait until each has its shadow answer (or shadow error) written.
    """
    marks = ",".join("?" for _ in ids)
    deadline = time.monotonic() + within_s
    while True:
        rows = {
            r["id"]: r for r in db_rows(db, f"SELECT * FROM exchanges WHERE id IN ({marks})", ids)
        }
        ready = len(rows) == len(set(ids)) and (
            not shadow
            or all(r["shadow_response_json"] or r["shadow_error_json"] for r in rows.values())
        )
        if ready:
            return whole_requests(db, [rows[i] for i in ids])
        if time.monotonic() > deadline:
            raise AssertionError(
                f"exchanges not recorded in {within_s}s: {sorted(set(ids) - set(rows))}"
            )
        await asyncio.sleep(0.05)


def trajectory_row(db: Path, trajectory_id: str) -> dict[str, Any]:
    rows = db_rows(db, "SELECT * FROM trajectories WHERE id = ?", [trajectory_id])
    assert len(rows) == 1, rows
    return rows[0]


def received(fake_upstream: FakeUpstream, marker: str) -> list[dict[str, Any]]:
    """Requests the fake OpenAI upstream got whose user message contains `marker`."""
    return [
        r
        for r in fake_upstream.requests()
        if any(
            m.get("role") == "user" and marker in str(m.get("content"))
            for m in (r["body"] or {}).get("messages", [])
        )
    ]


def first_request_hash(user_text: str) -> str:
    """The stitching hash of an agent run's first request (what the rate is decided from)."""
    return prefix_hashes([SYSTEM, {"role": "user", "content": user_text}])[-1]


def run_exporter(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_user_text(sample: dict[str, Any]) -> str:
    """The first user message's text of an exported sample (OpenAI `messages` or DPO `input`)."""
    messages = sample.get("messages") or (sample.get("input") or {}).get("messages") or []
    for message in messages:
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "".join(str(p.get("text", "")) for p in content)
            return str(content)
    raise AssertionError(f"sample without a user message: {sample}")


# ---------------------------------------------------------------------------------------------
# Pure: decide_route, rule_matches, sample_point
# ---------------------------------------------------------------------------------------------

TEACHER = "openai/fake-teacher"
BODY: dict[str, Any] = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]}
HASH = hashlib.sha256(b"first request").hexdigest()


def settings(**values: Any) -> Settings:
    return Settings(**values)


def hashes(count: int, prefix: str = "conversation") -> list[str]:
    return [hashlib.sha256(f"{prefix} {i}".encode()).hexdigest() for i in range(count)]


def test_header_beats_rules_and_rate() -> None:
    config = settings(
        teacher_model=TEACHER,
        teacher_rate=1.0,
        routing_rules=[RoutingRule(route="teacher")],
    )
    assert decide_route(BODY, "student", HASH, config) == RouteDecision("student", False, "header")
    assert decide_route(BODY, " Teacher ", HASH, config) == RouteDecision(
        "teacher", False, "header"
    )
    assert decide_route(BODY, "SHADOW", HASH, config) == RouteDecision("student", True, "header")


def test_first_matching_rule_decides_in_order() -> None:
    config = settings(
        teacher_model=TEACHER,
        routing_rules=[
            RoutingRule(route="student", metadata={"tier": "free"}),
            RoutingRule(route="teacher", has_tools=True),
            RoutingRule(route="shadow"),
        ],
    )
    tools = {**BODY, "tools": TOOLS}
    free = {**tools, "metadata": {"tier": "free"}}
    assert decide_route(free, None, HASH, config) == RouteDecision("student", False, "rule 1")
    assert decide_route(tools, None, HASH, config) == RouteDecision("teacher", False, "rule 2")
    assert decide_route(BODY, None, HASH, config) == RouteDecision("student", True, "rule 3")


def test_rule_beats_rate_and_rate_beats_default() -> None:
    config = settings(
        teacher_model=TEACHER,
        teacher_rate=1.0,
        routing_rules=[RoutingRule(route="student", model="gpt-4.1-nano")],
    )
    nano = {**BODY, "model": "gpt-4.1-nano"}
    assert decide_route(nano, None, HASH, config) == RouteDecision("student", False, "rule 1")
    assert decide_route(BODY, None, HASH, config) == RouteDecision("teacher", False, "rate")
    none = settings(teacher_model=TEACHER, teacher_rate=0.0)
    assert decide_route(BODY, None, HASH, none) == RouteDecision("student", False, "default")


def test_a_rule_that_does_not_match_falls_through_to_the_rate() -> None:
    config = settings(
        teacher_model=TEACHER,
        teacher_rate=1.0,
        routing_rules=[RoutingRule(route="student", has_tools=True)],
    )
    assert decide_route(BODY, None, HASH, config).reason == "rate"


def test_without_a_teacher_everything_is_student() -> None:
    config = settings(teacher_rate=1.0, routing_rules=[RoutingRule(route="teacher")])
    for header in (None, "teacher", "shadow"):
        assert decide_route(BODY, header, HASH, config) == RouteDecision(
            "student", False, "no teacher"
        )


@pytest.mark.parametrize("teacher", [TEACHER, None])
@pytest.mark.parametrize("header", ["bogus", "", "teacher,student", "o3"])
def test_an_unknown_header_value_is_a_value_error(teacher: str | None, header: str) -> None:
    with pytest.raises(ValueError, match="x-understudy-route"):
        decide_route(BODY, header, HASH, settings(teacher_model=teacher))


@pytest.mark.parametrize(
    ("rule", "body", "matches"),
    [
        (RoutingRule(route="teacher", model="gpt-4.1*"), {"model": "gpt-4.1-mini"}, True),
        (RoutingRule(route="teacher", model="gpt-4.1*"), {"model": "gpt-4o"}, False),
        (RoutingRule(route="teacher", model="gpt-4.1"), {"model": "gpt-4.1-mini"}, False),
        (RoutingRule(route="teacher", model="GPT-4.1*"), {"model": "gpt-4.1"}, False),
        (RoutingRule(route="teacher", model="*mini"), {"model": "o4-mini"}, True),
        (RoutingRule(route="teacher", has_tools=True), {"tools": TOOLS}, True),
        (RoutingRule(route="teacher", has_tools=True), {"tools": []}, False),
        (RoutingRule(route="teacher", has_tools=True), {}, False),
        (RoutingRule(route="teacher", has_tools=False), {}, True),
        (RoutingRule(route="teacher", has_tools=False), {"tools": TOOLS}, False),
        (
            RoutingRule(route="teacher", metadata={"tier": "gold"}),
            {"metadata": {"tier": "gold"}},
            True,
        ),
        (
            RoutingRule(route="teacher", metadata={"tier": "gold"}),
            {"metadata": {"tier": "gold", "team": "x"}},
            True,
        ),
        (
            RoutingRule(route="teacher", metadata={"tier": "gold"}),
            {"metadata": {"tier": "free"}},
            False,
        ),
        (RoutingRule(route="teacher", metadata={"tier": "gold"}), {"metadata": {}}, False),
        (RoutingRule(route="teacher", metadata={"tier": "gold"}), {}, False),
        (RoutingRule(route="teacher", metadata={"tier": "gold"}), {"metadata": "gold"}, False),
        (
            RoutingRule(route="teacher", metadata={"tier": "gold", "team": "x"}),
            {"metadata": {"tier": "gold"}},
            False,
        ),
        (
            RoutingRule(route="teacher", model="gpt-4o*", has_tools=True, metadata={"a": "1"}),
            {"model": "gpt-4o", "tools": TOOLS, "metadata": {"a": "1"}},
            True,
        ),
        (
            RoutingRule(route="teacher", model="gpt-4o*", has_tools=True, metadata={"a": "1"}),
            {"model": "gpt-4o", "metadata": {"a": "1"}},
            False,
        ),
        (RoutingRule(route="teacher"), {"model": "anything"}, True),
    ],
)
def test_rule_matching(rule: RoutingRule, body: dict[str, Any], matches: bool) -> None:
    assert rule_matches(rule, body) is matches


def test_an_absent_metadata_key_does_not_match_the_string_none() -> None:
    """A rule asking for tier "None" must not catch every request that has no tier."""
    rule = RoutingRule(route="teacher", metadata={"tier": "None"})
    assert rule_matches(rule, {"metadata": {"tier": "None"}}) is True
    assert rule_matches(rule, {"metadata": {}}) is False
    assert rule_matches(rule, {"metadata": {"tier": None}}) is False


def test_rate_is_deterministic_from_the_first_request() -> None:
    config = settings(teacher_model=TEACHER, teacher_rate=0.5)
    for request_hash in hashes(200):
        first = decide_route(BODY, None, request_hash, config)
        # Same first request, another settings object, another body shape: same decision.
        again = decide_route(
            {**BODY, "temperature": 0.3},
            None,
            request_hash,
            settings(teacher_model=TEACHER, teacher_rate=0.5),
        )
        assert first == again
        assert sample_point(request_hash) == sample_point(request_hash)
        assert 0.0 <= sample_point(request_hash) < 1.0


def test_a_replayed_conversation_routes_the_same() -> None:
    config = settings(teacher_model=TEACHER, teacher_rate=0.3)
    decisions = {
        text: decide_route(BODY, None, first_request_hash(text), config).route
        for text in (f"replay me {i}" for i in range(100))
    }
    replayed = {
        text: decide_route(BODY, None, first_request_hash(text), config).route for text in decisions
    }
    assert replayed == decisions
    assert set(decisions.values()) == {"student", "teacher"}


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.9])
def test_rate_share_is_close_to_the_rate(rate: float) -> None:
    config = settings(teacher_model=TEACHER, teacher_rate=rate)
    routes = Counter(decide_route(BODY, None, h, config).route for h in hashes(5000))
    assert abs(routes["teacher"] / 5000 - rate) < 0.025, routes


def test_rate_zero_and_one_are_exact() -> None:
    never = settings(teacher_model=TEACHER, teacher_rate=0.0)
    always = settings(teacher_model=TEACHER, teacher_rate=1.0)
    assert {decide_route(BODY, None, h, never).route for h in hashes(500)} == {"student"}
    assert {decide_route(BODY, None, h, always).route for h in hashes(500)} == {"teacher"}


def test_a_rules_rate_takes_its_share_of_matching_trajectories() -> None:
    config = settings(teacher_model=TEACHER, routing_rules=[RoutingRule(route="teacher", rate=0.4)])
    routes = Counter(decide_route(BODY, None, h, config).reason for h in hashes(5000))
    assert abs(routes["rule 1"] / 5000 - 0.4) < 0.025, routes
    assert routes["rule 1"] + routes["default"] == 5000
    zero = settings(
        teacher_model=TEACHER,
        teacher_rate=1.0,
        routing_rules=[RoutingRule(route="student", rate=0.0)],
    )
    assert {decide_route(BODY, None, h, zero).reason for h in hashes(300)} == {"rate"}


def test_rule_and_rate_coins_are_independent() -> None:
    """A rule's coin is salted: at equal rates a rule and the global rate pick different sets."""
    by_rule = settings(
        teacher_model=TEACHER, routing_rules=[RoutingRule(route="teacher", rate=0.5)]
    )
    by_rate = settings(teacher_model=TEACHER, teacher_rate=0.5)
    sample = hashes(400)
    picked_by_rule = {h for h in sample if decide_route(BODY, None, h, by_rule).route == "teacher"}
    picked_by_rate = {h for h in sample if decide_route(BODY, None, h, by_rate).route == "teacher"}
    assert picked_by_rule != picked_by_rate


# ---------------------------------------------------------------------------------------------
# End to end: header and rules, sticky over multi-step agent runs
# ---------------------------------------------------------------------------------------------

TEACHER_KEY = "sk-teacher-key-for-tests"
# Rule 1: metadata tier=gold goes to the teacher; rule 2: so does any gpt-4o* model.
RULES_TOML = """
[[routing_rules]]
route = "teacher"
metadata = { tier = "gold" }

[[routing_rules]]
route = "teacher"
model = "gpt-4o*"
"""


@pytest.fixture(scope="module")
def rules_proxy(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    """A proxy whose teacher is the fake upstream (through litellm), with rules.

    The rules come from a TOML config file and the teacher's key from its environment variable,
    the two other ways (beside flags) settings reach the proxy.
    """
    directory = tmp_path_factory.mktemp("rules")
    config = directory / "understudy.toml"
    config.write_text(RULES_TOML)
    server = launch_proxy(
        fake_upstream,
        directory,
        env={"UNDERSTUDY_TEACHER_API_KEY": TEACHER_KEY},
        config=config,
        teacher_model=TEACHER,
        teacher_base_url=fake_upstream.base_url,
    )
    with running(server):
        yield server


@pytest.fixture
async def client(rules_proxy: ProxyServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with async_client(rules_proxy) as value:
        yield value


async def assert_one_trajectory(
    server: ProxyServer, steps: list[Step], route: str, models: list[str]
) -> list[dict[str, Any]]:
    """Every step in one trajectory, recorded with `route`, answered by `models` (per step)."""
    assert len(steps) == 3, steps  # search, book, answer
    assert [s.route for s in steps] == [route] * 3
    assert len({s.trajectory_id for s in steps}) == 1
    assert [s.model for s in steps] == models
    rows = await wait_for_exchanges(server.db, [s.exchange_id for s in steps])
    assert [(r["step"], r["route"], r["model_answered"]) for r in rows] == [
        (i, route, m) for i, m in enumerate(models)
    ]
    assert {r["trajectory_id"] for r in rows} == {steps[0].trajectory_id}
    assert all(r["outcome"] == "ok" for r in rows)
    trajectory = trajectory_row(server.db, steps[0].trajectory_id)
    assert (trajectory["route"], trajectory["shadow"]) == (route, 0)
    return rows


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_header_on_the_first_request_keeps_the_whole_run_on_the_teacher(
    rules_proxy: ProxyServer,
    client: openai.AsyncOpenAI,
    fake_upstream: FakeUpstream,
    stream: bool,
) -> None:
    text = f"Header-teacher run ({'stream' if stream else 'json'}): Oslo to Rome"
    steps = await run_agent(
        client,
        text,
        stream=stream,
        options=lambda n: {"extra_headers": {"X-Understudy-Route": "teacher"}} if n == 0 else {},
    )
    await assert_one_trajectory(rules_proxy, steps, "teacher", ["fake-teacher"] * 3)
    assert [s.teacher_model for s in steps] == ["fake-teacher"] * 3
    # Tool calls came through the teacher intact: the fake's plan (search, then book, then text).
    assert [c["function"]["name"] for c in steps[0].message["tool_calls"]] == ["search_flights"]
    assert [c["function"]["name"] for c in steps[1].message["tool_calls"]] == ["book_flight"]
    assert (
        steps[2].message["content"].startswith(f"Answer to {text[:60]!r} using search_flights ok")
    )
    upstream = received(fake_upstream, text)
    assert [r["body"]["model"] for r in upstream] == ["fake-teacher"] * 3


async def test_header_student_beats_a_matching_rule_for_the_whole_run(
    rules_proxy: ProxyServer, client: openai.AsyncOpenAI, fake_upstream: FakeUpstream
) -> None:
    text = "Header-student gold run: Lima to Quito"
    steps = await run_agent(
        client,
        text,
        options=lambda n: {
            "metadata": {"tier": "gold"},
            **({"extra_headers": {"X-Understudy-Route": "student"}} if n == 0 else {}),
        },
    )
    await assert_one_trajectory(rules_proxy, steps, "student", ["gpt-4.1-mini"] * 3)
    assert [r["body"]["model"] for r in received(fake_upstream, text)] == ["gpt-4.1-mini"] * 3


async def test_a_metadata_rule_decides_the_first_step_and_later_steps_follow(
    rules_proxy: ProxyServer, client: openai.AsyncOpenAI
) -> None:
    steps = await run_agent(
        client,
        "Gold on the first step only: Cairo to Nairobi",
        options=lambda n: {"metadata": {"tier": "gold"}} if n == 0 else {},
    )
    await assert_one_trajectory(rules_proxy, steps, "teacher", ["fake-teacher"] * 3)


async def test_a_student_run_stays_student_when_later_steps_would_route_to_the_teacher(
    rules_proxy: ProxyServer, client: openai.AsyncOpenAI, fake_upstream: FakeUpstream
) -> None:
    """Later steps ask for gpt-4o, carry tier=gold and the teacher header: still the student."""
    text = "Student run that later looks golden: Perth to Hobart"
    steps = await run_agent(
        client,
        text,
        options=lambda n: (
            {}
            if n == 0
            else {
                "model": "gpt-4o",
                "metadata": {"tier": "gold"},
                "extra_headers": {"X-Understudy-Route": "teacher"},
            }
        ),
    )
    # The student is whatever model the app asks for, step by step.
    await assert_one_trajectory(rules_proxy, steps, "student", ["gpt-4.1-mini", "gpt-4o", "gpt-4o"])
    assert all(s.teacher_model is None for s in steps)
    assert [r["body"]["model"] for r in received(fake_upstream, text)] == [
        "gpt-4.1-mini",
        "gpt-4o",
        "gpt-4o",
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_model_rule_run_stays_on_the_teacher_when_the_app_switches_model(
    rules_proxy: ProxyServer, client: openai.AsyncOpenAI, stream: bool
) -> None:
    steps = await run_agent(
        client,
        f"Model-rule run ({stream}): Quebec to Halifax",
        model="gpt-4o",
        stream=stream,
        options=lambda n: (
            {"model": "gpt-4.1-mini", "extra_headers": {"X-Understudy-Route": "student"}}
            if n
            else {}
        ),
    )
    rows = await assert_one_trajectory(rules_proxy, steps, "teacher", ["fake-teacher"] * 3)
    assert [r["model_requested"] for r in rows] == ["gpt-4o", "gpt-4.1-mini", "gpt-4.1-mini"]
    assert [r["stream"] for r in rows] == [int(stream)] * 3


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_parallel_tool_calls_come_back_from_the_teacher_intact(
    rules_proxy: ProxyServer,
    client: openai.AsyncOpenAI,
    fake_upstream: FakeUpstream,
    stream: bool,
) -> None:
    """The fake answers "parallel" with two calls at once; litellm must not merge or reorder them."""
    text = f"parallel teacher run ({'stream' if stream else 'json'}): Fez to Tunis"
    steps = await run_agent(
        client,
        text,
        stream=stream,
        options=lambda n: {"extra_headers": {"X-Understudy-Route": "teacher"}} if n == 0 else {},
    )
    first = steps[0].message
    assert steps[0].finish_reason == "tool_calls"
    assert [c["function"]["name"] for c in first["tool_calls"]] == ["search_flights", "book_flight"]
    assert [json.loads(c["function"]["arguments"]) for c in first["tool_calls"]] == [
        {"query": text[:40], "step": 0, "n": 0},
        {"query": text[:40], "step": 0, "n": 1},
    ]
    ids = [c["id"] for c in first["tool_calls"]]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    # What the fake upstream (the teacher) answered is what the app got and what was recorded.
    upstream = received(fake_upstream, text)
    assert [r["body"]["model"] for r in upstream] == ["fake-teacher"] * 3
    assert [r["body"].get("stream", False) for r in upstream] == [stream] * 3
    second_request = upstream[1]["body"]["messages"]
    assert [m.get("tool_call_id") for m in second_request if m["role"] == "tool"] == ids
    rows = await assert_one_trajectory(rules_proxy, steps, "teacher", ["fake-teacher"] * 3)
    recorded = json.loads(rows[0]["response_json"])["choices"][0]["message"]
    assert [(c["id"], c["function"]) for c in recorded["tool_calls"]] == [
        (c["id"], c["function"]) for c in first["tool_calls"]
    ]
    assert rows[0]["tool_call_count"] == 2
    assert rows[0]["finish_reason"] == "tool_calls"


async def test_the_teacher_uses_its_own_key_and_the_student_the_clients(
    rules_proxy: ProxyServer, client: openai.AsyncOpenAI, fake_upstream: FakeUpstream
) -> None:
    teacher_text, student_text = (
        "Keyed teacher run: Accra to Dakar",
        "Keyed student run: Accra to Lome",
    )
    teacher = await run_agent(
        client,
        teacher_text,
        options=lambda n: {"extra_headers": {"X-Understudy-Route": "teacher"}} if n == 0 else {},
    )
    student = await run_agent(client, student_text)
    assert {s.route for s in teacher} == {"teacher"} and {s.route for s in student} == {"student"}
    assert {r["headers"]["authorization"] for r in received(fake_upstream, teacher_text)} == {
        f"Bearer {TEACHER_KEY}"
    }
    assert {r["headers"]["authorization"] for r in received(fake_upstream, student_text)} == {
        f"Bearer {CLIENT_KEY}"
    }
    await wait_for_exchanges(rules_proxy.db, [s.exchange_id for s in teacher + student])
    for path in rules_proxy.db.parent.glob("understudy.db*"):
        data = path.read_bytes()
        assert TEACHER_KEY.encode() not in data and CLIENT_KEY.encode() not in data, path


async def test_an_explicit_trajectory_id_keeps_the_route_of_its_first_request(
    rules_proxy: ProxyServer, client: openai.AsyncOpenAI
) -> None:
    """Requests tied by `X-Understudy-Trajectory-Id` (not by hashing) are one trajectory too."""
    tied = {"X-Understudy-Trajectory-Id": "explicit-sequential-1"}
    first = await client.chat.completions.with_raw_response.create(
        model="gpt-4.1-mini",
        messages=[SYSTEM, {"role": "user", "content": "Explicit id, first call: Kyiv to Lviv"}],
        tools=TOOLS,
        extra_headers=tied,
    )
    second = await client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[SYSTEM, {"role": "user", "content": "Explicit id, side call: Kyiv to Odesa"}],
        metadata={"tier": "gold"},
        extra_headers=tied,
    )
    assert [r.headers["x-understudy-trajectory-id"] for r in (first, second)] == [
        "explicit-sequential-1"
    ] * 2
    assert [r.headers["x-understudy-route"] for r in (first, second)] == ["student", "student"]
    assert second.parse().model == "gpt-4o"


async def test_a_concurrent_request_with_the_same_explicit_id_keeps_the_first_route(
    rules_proxy: ProxyServer, client: openai.AsyncOpenAI
) -> None:
    """The first request (student) is still streaming when the second (which a rule would send to
    the teacher) arrives: the trajectory's route is already decided, both stay on the student."""
    tied = {"X-Understudy-Trajectory-Id": "explicit-concurrent-1"}
    slow = await client.chat.completions.with_raw_response.create(
        model="gpt-4.1-mini",
        messages=[SYSTEM, {"role": "user", "content": "Explicit id, slow call: Riga to Tartu"}],
        tools=TOOLS,
        stream=True,
        extra_headers={**tied, "x-fake-chunk-delay-ms": "60"},
    )
    stream = slow.parse()
    assert isinstance(stream, openai.AsyncStream)
    chunks = stream.__aiter__()
    await chunks.__anext__()  # the first request is routed and in flight
    side = await client.chat.completions.with_raw_response.create(
        model="gpt-4.1-mini",
        messages=[SYSTEM, {"role": "user", "content": "Explicit id, side call: Riga to Vilnius"}],
        metadata={"tier": "gold"},
        extra_headers=tied,
    )
    async for _ in chunks:
        pass
    assert slow.headers["x-understudy-route"] == "student"
    assert side.headers["x-understudy-trajectory-id"] == "explicit-concurrent-1"
    assert side.headers["x-understudy-route"] == "student"
    assert side.parse().model == "gpt-4.1-mini"
    rows = db_rows(
        rules_proxy.db, "SELECT route FROM trajectories WHERE id = ?", ["explicit-concurrent-1"]
    )
    exchanges = await wait_for_exchanges(
        rules_proxy.db,
        [slow.headers["x-understudy-exchange-id"], side.headers["x-understudy-exchange-id"]],
    )
    assert [e["route"] for e in exchanges] == ["student", "student"]
    assert rows == [{"route": "student"}]


async def test_an_unknown_route_header_is_a_400_and_is_not_forwarded(
    client: openai.AsyncOpenAI, fake_upstream: FakeUpstream
) -> None:
    text = "Bogus route header: Bern to Basel"
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="gpt-4.1-mini",
            messages=[{"role": "user", "content": text}],
            extra_headers={"X-Understudy-Route": "sometimes"},
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "x-understudy-route"
    assert "teacher" in error["message"]
    assert received(fake_upstream, text) == []


async def test_without_a_teacher_the_header_routes_to_the_student(
    proxy_server: ProxyServer, fake_upstream: FakeUpstream
) -> None:
    text = "No teacher configured: Turin to Milan"
    async with async_client(proxy_server) as app:
        steps = await run_agent(
            app, text, options=lambda n: {"extra_headers": {"X-Understudy-Route": "teacher"}}
        )
    await assert_one_trajectory(proxy_server, steps, "student", ["gpt-4.1-mini"] * 3)
    assert [r["body"]["model"] for r in received(fake_upstream, text)] == ["gpt-4.1-mini"] * 3


# ---------------------------------------------------------------------------------------------
# Done when: --teacher-rate 0.3 over a 50-conversation tool-use workload, then export
# ---------------------------------------------------------------------------------------------

CITIES = ["Oslo", "Lagos", "Lima", "Pune", "Kyiv", "Baku", "Doha", "Riga", "Cork", "Nice"]
WORKLOAD = [
    f"Workload trip {i:02d}: fly from {CITIES[i % 10]} to {CITIES[(i * 3 + 1) % 10]} on day {i + 1}"
    for i in range(50)
]
RATE_TEACHER = "o3"  # litellm name of an OpenAI reasoning teacher; served by the fake upstream


@dataclass
class RateRun:
    """The workload's outcome: each conversation's steps, the stopped proxy, the predictions."""

    server: ProxyServer
    runs: dict[str, list[Step]]
    predicted: dict[str, str]
    upstream: list[dict[str, Any]]


@pytest.fixture(scope="module")
def rate_run(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RateRun]:
    """Run the workload once (10 conversations at a time, odd ones streamed), stop the proxy."""
    server = launch_proxy(
        fake_upstream,
        tmp_path_factory.mktemp("rate"),
        teacher_model=RATE_TEACHER,
        teacher_rate=0.3,
    )
    config = settings(teacher_model=RATE_TEACHER, teacher_rate=0.3)
    predicted = {
        text: decide_route({"model": "gpt-4.1-mini"}, None, first_request_hash(text), config).route
        for text in WORKLOAD
    }

    async def workload() -> list[list[Step]]:
        limit = asyncio.Semaphore(10)

        async def one(app: openai.AsyncOpenAI, index: int, text: str) -> list[Step]:
            async with limit:
                return await run_agent(
                    app,
                    text,
                    stream=index % 2 == 1,
                    options=lambda n: {"temperature": 0.2, "max_tokens": 300},
                )

        async with async_client(server) as app:
            return await asyncio.gather(*(one(app, i, t) for i, t in enumerate(WORKLOAD)))

    with running(server):
        results = asyncio.run(workload())
        server.stop()
        upstream = [r for r in fake_upstream.requests() if "Workload trip" in json.dumps(r["body"])]
        yield RateRun(server, dict(zip(WORKLOAD, results, strict=True)), predicted, upstream)


@pytest.mark.e2e
def test_about_thirty_percent_of_conversations_go_to_the_teacher_as_predicted(
    rate_run: RateRun,
) -> None:
    routes = {text: steps[0].route for text, steps in rate_run.runs.items()}
    assert routes == rate_run.predicted
    share = Counter(routes.values())["teacher"] / len(routes)
    assert 0.15 <= share <= 0.45, share


@pytest.mark.e2e
def test_every_conversation_keeps_its_route_and_model_from_first_step_to_last(
    rate_run: RateRun,
) -> None:
    rows = db_rows(rate_run.server.db, "SELECT * FROM exchanges ORDER BY trajectory_id, step")
    by_trajectory: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_trajectory.setdefault(row["trajectory_id"], []).append(row)
    assert len(by_trajectory) == len(WORKLOAD)
    for text, steps in rate_run.runs.items():
        route = rate_run.predicted[text]
        model = "o3" if route == "teacher" else "gpt-4.1-mini"
        assert len(steps) == 3, (text, steps)
        assert {s.route for s in steps} == {route}, text
        assert {s.model for s in steps} == {model}, text
        recorded = by_trajectory[steps[0].trajectory_id]
        assert [(r["step"], r["route"], r["model_answered"], r["outcome"]) for r in recorded] == [
            (i, route, model, "ok") for i in range(3)
        ], text
        assert [r["id"] for r in recorded] == [s.exchange_id for s in steps]
    trajectories = db_rows(rate_run.server.db, "SELECT id, route, exchange_count FROM trajectories")
    assert {(t["route"], t["exchange_count"]) for t in trajectories} <= {
        ("teacher", 3),
        ("student", 3),
    }
    assert Counter(t["route"] for t in trajectories) == Counter(rate_run.predicted.values())


@pytest.mark.e2e
def test_teacher_requests_are_adapted_for_the_reasoning_teacher(rate_run: RateRun) -> None:
    """The upstream saw o3 requests without temperature, with max_completion_tokens; the student's
    requests are the app's own."""
    teacher = [r["body"] for r in rate_run.upstream if r["body"]["model"] == "o3"]
    student = [r["body"] for r in rate_run.upstream if r["body"]["model"] == "gpt-4.1-mini"]
    assert len(teacher) == 3 * Counter(rate_run.predicted.values())["teacher"]
    assert len(teacher) + len(student) == 3 * len(WORKLOAD)
    streamed = {text: index % 2 == 1 for index, text in enumerate(WORKLOAD)}
    for request in rate_run.upstream:
        body = request["body"]
        # The OpenAI-compatible teacher has no key of its own: it uses the app's.
        assert request["headers"]["authorization"] == f"Bearer {CLIENT_KEY}"
        text = next(t for t in WORKLOAD if t in json.dumps(body["messages"]))
        assert bool(body.get("stream")) is streamed[text]
        assert body["messages"][1] == {"role": "user", "content": text}
    for body in teacher:
        assert "temperature" not in body and "max_tokens" not in body, body
        assert body["max_completion_tokens"] == 300
        assert [t["function"]["name"] for t in body["tools"]] == ["search_flights", "book_flight"]
    for body in student:
        assert (body["temperature"], body["max_tokens"]) == (0.2, 300)
        assert "max_completion_tokens" not in body
        assert body["messages"][0] == SYSTEM


@pytest.mark.e2e
def test_the_reasoning_teacher_gets_the_system_prompt_as_instructions(rate_run: RateRun) -> None:
    """o-series models take `system` (or `developer`) messages; the app's system prompt must not
    reach the teacher disguised as something the user said."""
    teacher = [r["body"] for r in rate_run.upstream if r["body"]["model"] == "o3"]
    assert teacher
    for body in teacher:
        first = body["messages"][0]
        assert first["role"] in ("system", "developer"), first
        assert first["content"] == SYSTEM["content"]


@pytest.mark.e2e
def test_export_route_teacher_holds_exactly_the_teacher_conversations(
    rate_run: RateRun, tmp_path: Path
) -> None:
    out = tmp_path / "teacher.jsonl"
    done = run_exporter(
        "export", "--db", str(rate_run.server.db), "--out", str(out), "--route", "teacher"
    )
    assert done.returncode == 0, done.stderr + done.stdout
    samples = read_jsonl(out)
    expected = sorted(t for t, route in rate_run.predicted.items() if route == "teacher")
    assert sorted(first_user_text(s) for s in samples) == expected
    for sample in samples:
        text = first_user_text(sample)
        final = sample["messages"][-1]
        assert final["role"] == "assistant"
        assert final["content"] == rate_run.runs[text][-1].message["content"]
        calls = [m for m in sample["messages"] if m["role"] == "assistant" and m.get("tool_calls")]
        assert [c["tool_calls"][0]["function"]["name"] for c in calls] == [
            "search_flights",
            "book_flight",
        ]
