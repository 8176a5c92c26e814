"""The replay-evaluation scenario shared by the eval tests: recorded trajectories whose every
step the fake candidate (`proxy.testing.fake_candidate`) answers in a scripted way, so every
rate of the report is known in advance (`EXPECTED`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from proxy.testing.fake_candidate import CandidateScript, tool_call
from tests.support.exporter import completion, record, write_records_sync

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    },
]

SECRET_KEY = "sk-evalsecret-0123456789abcdefghijklmnop"
CANDIDATE_MODEL = "gpt-4.1-mini"
TEACHER_MODEL = "o3"


def call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def tool(call_id: str, text: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def assistant(content: str | None = None, *calls: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = list(calls)
    return message


# (trajectory id, route, [(incoming messages, reference answer)]): each step's key is the text
# of its last incoming message.
TRAJECTORIES: list[tuple[str, str, list[tuple[list[dict[str, Any]], dict[str, Any]]]]] = [
    (
        "eval-t1",
        "teacher",
        [
            (
                [user("s1 weather Paris")],
                assistant(None, call("w1", "get_weather", {"city": "Paris", "days": 5})),
            ),
            ([tool("w1", "r1 sunny")], assistant("Sunny in Paris.")),
        ],
    ),
    (
        "eval-t2",
        "teacher",
        [
            (
                [user("s2 weather Rome")],
                assistant(None, call("w2", "get_weather", {"city": "Rome", "days": 3})),
            ),
            (
                [tool("w2", "r2 rainy")],
                assistant(None, call("q2", "search", {"query": "umbrella shops"})),
            ),
            ([tool("q2", "r3 found shops")], assistant("Take an umbrella.")),
        ],
    ),
    (
        "eval-t3",
        "teacher",
        [
            (
                [user("s3 weather Oslo")],
                assistant(None, call("w3", "get_weather", {"city": "Oslo", "days": 1})),
            ),
            (
                [tool("w3", "r4 cold")],
                assistant(
                    None,
                    call("w4", "get_weather", {"city": "Oslo", "days": 2}),
                    call("q4", "search", {"query": "oslo coats"}),
                ),
            ),
            ([tool("w4", "r5a colder"), tool("q4", "r5b coats")], assistant("Wear a coat.")),
            (
                [user("s3b and Bergen?")],
                assistant(None, call("q5", "search", {"query": "bergen"})),
            ),
            ([tool("q5", "r6 bergen results")], assistant("Bergen is rainy.")),
        ],
    ),
    ("eval-t4", "student", [([user("s4 hello")], assistant("Hi there."))]),
]

# A student trajectory whose one step has a shadow teacher answer (a tool call).
SHADOW_TRAJECTORY = "eval-t5"
SHADOW_KEY = "s5 weather Lima"
SHADOW_ANSWER = assistant(None, call("w9", "get_weather", {"city": "Lima", "days": 2}))


def candidate_script() -> CandidateScript:
    """The fake candidate's answers, step by step (see `EXPECTED` for what they add up to)."""
    return CandidateScript(
        answers={
            # agrees: same call, other key order and spacing
            "s1 weather Paris": assistant(
                None, tool_call("get_weather", '{ "days": 5,  "city": "Paris" }')
            ),
            "r1 sunny": assistant("It is sunny."),  # agrees: final answer, other words
            # names agree; arguments differ in type only ("3" for an integer)
            "s2 weather Rome": assistant(
                None, tool_call("get_weather", {"city": "Rome", "days": "3"})
            ),
            # names agree; arguments are not JSON
            "r2 rainy": assistant(None, tool_call("search", '{"query": "umbrella')),
            # decision disagrees: a call (to an unknown tool) instead of the final answer
            "r3 found shops": assistant(None, tool_call("launch_rockets", {})),
            # decision disagrees: a final answer instead of a call
            "s3 weather Oslo": assistant("Probably cold."),
            # agrees: parallel calls in the other order, 2.0 for 2 (after two 429s)
            "r4 cold": assistant(
                None,
                tool_call("search", {"query": "oslo coats"}),
                tool_call("get_weather", '{"days": 2.0, "city": "Oslo"}'),
            ),
            "r5b coats": assistant("Coat."),  # agrees
            # names disagree: the wrong tool
            "s3b and Bergen?": assistant(
                None, tool_call("get_weather", {"city": "Bergen", "days": 1})
            ),
            "r6 bergen results": assistant("Rainy."),  # agrees
            "s4 hello": assistant("Hello!"),  # only asked with --reference any/student
            # agrees with the shadow teacher's call
            SHADOW_KEY: assistant(None, tool_call("get_weather", {"city": "Lima", "days": 2})),
        },
        failures={"r4 cold": [429, 429]},
    )


STEP_KEYS_TEACHER = [
    "s1 weather Paris",
    "r1 sunny",
    "s2 weather Rome",
    "r2 rainy",
    "r3 found shops",
    "s3 weather Oslo",
    "r4 cold",
    "r5b coats",
    "s3b and Bergen?",
    "r6 bergen results",
    SHADOW_KEY,
]

EXPECTED: dict[str, Any] = {
    "trajectories": 4,
    "steps": 11,
    "answered": 11,
    "tool_call_steps": 7,
    "decision_agreement": round(9 / 11, 4),
    "tool_name_agreement": round(5 / 7, 4),
    "argument_agreement": round(3 / 7, 4),
    "argument_agreement_typed": round(4 / 7, 4),
    "step_agreement": round(6 / 11, 4),
    "type_only_disagreements": 1,
    "invalid_json": 1,
    "unknown_tools": 1,
    "errors": 0,
    "decisions": {
        "final->final": 3,
        "final->tool_call": 1,
        "tool_call->final": 1,
        "tool_call->tool_call": 6,
    },
    "per_tool": {
        "get_weather": {
            "reference_calls": 5,
            "candidate_calls": 5,
            "name_matches": 4,
            "argument_matches": 3,
            "typed_matches": 4,
        },
        "search": {
            "reference_calls": 3,
            "candidate_calls": 2,
            "name_matches": 2,
            "argument_matches": 1,
            "typed_matches": 1,
        },
        "launch_rockets": {
            "reference_calls": 0,
            "candidate_calls": 1,
            "name_matches": 0,
            "argument_matches": 0,
            "typed_matches": 0,
        },
    },
}


def record_scenario(db_path: Path) -> None:
    """Write the scenario's trajectories into a SQLite file, through the recorder's row path."""
    items = []
    minute = 0
    for trajectory_id, route, turns in TRAJECTORIES:
        messages: list[dict[str, Any]] = [{"role": "system", "content": "You plan tool use."}]
        parent = None
        for step, (incoming, answer) in enumerate(turns):
            messages = [*messages, *incoming]
            request = {"model": "gpt-4.1-mini", "messages": messages, "tools": TOOLS}
            model = TEACHER_MODEL if route == "teacher" else "gpt-4.1-mini"
            rec, row = record(
                trajectory_id,
                request,
                completion(answer, model=model),
                parent_id=parent,
                step=step,
                route=route,
                started_utc=f"2026-11-20T10:{minute:02d}:00.000+00:00",
                duration_ms=800.0,
            )
            minute += 1
            items.append((rec, row))
            parent = rec.id
            messages = [*messages, answer]
    request = {
        "model": "gpt-4.1-mini",
        "messages": [{"role": "system", "content": "You plan tool use."}, user(SHADOW_KEY)],
        "tools": TOOLS,
    }
    items.append(
        record(
            SHADOW_TRAJECTORY,
            request,
            completion(assistant("I do not know."), model="gpt-4.1-mini"),
            route="student",
            started_utc=f"2026-11-20T10:{minute:02d}:00.000+00:00",
            duration_ms=300.0,
            shadow_model=TEACHER_MODEL,
            shadow_response_json=json.dumps(completion(SHADOW_ANSWER, model=TEACHER_MODEL)),
            shadow_duration_ms=2000.0,
        )
    )
    write_records_sync(db_path, items)
