"""Pure tests of the validator: each common rejection is reported, good files pass."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from exporter.tokens import TokenCounter
from exporter.validate import guess_format, validate_record
from exporter.validate_file import validate_lines

TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
    }
]
GOOD: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "r"},
        {"role": "assistant", "content": "a", "weight": 1},
    ],
    "tools": TOOLS,
    "parallel_tool_calls": True,
}


def broken(path: list[Any], value: Any = None, delete: bool = False) -> dict[str, Any]:
    record = copy.deepcopy(GOOD)
    target = record
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return record


def test_good_record_passes() -> None:
    assert validate_record(GOOD) == []


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        (broken(["extra"], 1), "unknown top-level keys"),
        (broken(["messages", 1, "role"], "critic"), "role 'critic'"),
        (broken(["messages", 0, "role"], "developer"), "role 'developer'"),
        (broken(["messages", 4, "refusal"], None), "unknown keys ['refusal']"),
        (broken(["messages", 2, "annotations"], []), "unknown keys ['annotations']"),
        (broken(["messages", 2, "function_call"], None), "null function_call"),
        (broken(["messages", 1, "weight"], 1), "weight is allowed on assistant messages only"),
        (broken(["messages", 4, "weight"], 2), "weight must be 0 or 1"),
        (
            broken(["messages", 2, "tool_calls", 0, "function", "arguments"], {"a": 1}),
            "must be a JSON string",
        ),
        (
            broken(["messages", 2, "tool_calls", 0, "function", "arguments"], "[1]"),
            "must hold a JSON object",
        ),
        (broken(["messages", 2, "tool_calls", 0, "function", "arguments"], "{x"), "not valid JSON"),
        (
            broken(["messages", 2, "tool_calls", 0, "function", "name"], "bad name"),
            "does not match",
        ),
        (
            broken(["messages", 2, "tool_calls", 0, "function", "name"], "other"),
            "tools do not declare",
        ),
        (broken(["messages", 3, "tool_call_id"], "call_9"), "orphan"),
        (
            broken(["messages", 3, "content"], [{"type": "text", "text": "r"}]),
            "tool content must be a string",
        ),
        (broken(["messages", 3, "role"], "user"), "not answered"),
        (
            broken(["messages", 4], {"role": "user", "content": "more"}),
            "last message must be from the assistant",
        ),
        (broken(["messages", 4, "weight"], 0) | {}, None),
        (broken(["tools", 0, "function", "name"], "x y"), "does not match"),
        (broken(["tools"], [*TOOLS, *TOOLS]), "declared twice"),
        (broken(["parallel_tool_calls"], "yes"), "true or false"),
    ],
)
def test_common_rejections(record: dict[str, Any], needle: str | None) -> None:
    errors = validate_record(record)
    if needle is None:  # weight 0 on the answer is fine: the tool-call message still trains
        assert errors == []
        return
    assert any(needle in e for e in errors), errors


def test_structural_rejections() -> None:
    only_user = {"messages": [{"role": "user", "content": "q"}]}
    assert any("no assistant message" in e for e in validate_record(only_user))
    zero = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "weight": 0},
        ]
    }
    assert any("nothing to train" in e for e in validate_record(zero))
    dup = copy.deepcopy(GOOD)
    dup["messages"][4] = {"role": "assistant", "tool_calls": dup["messages"][2]["tool_calls"]}
    assert any("used twice" in e for e in validate_record(dup))
    parallel = copy.deepcopy(GOOD)
    parallel["parallel_tool_calls"] = False
    parallel["messages"][2]["tool_calls"].append(
        {"id": "call_2", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    )
    parallel["messages"].insert(4, {"role": "tool", "tool_call_id": "call_2", "content": "r2"})
    assert any("parallel_tool_calls is false" in e for e in validate_record(parallel))
    parallel["parallel_tool_calls"] = True
    assert validate_record(parallel) == []
    empty = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}
    assert any("neither content nor tool calls" in e for e in validate_record(empty))
    assert validate_record([]) == ["a record must be a JSON object"]
    ends_in_call = {"messages": GOOD["messages"][:3], "tools": TOOLS}
    assert validate_record(ends_in_call) == []


def test_file_rules_errors_by_line_and_token_stats() -> None:
    lines = [json.dumps(GOOD)] * 10
    report = validate_lines(lines, "openai", TokenCounter())
    assert report.ok and report.samples == 10
    stats = report.token_stats()
    assert stats["total"] == 10 * stats["max"] and stats["trained"] > 0
    few = validate_lines(lines[:3], "openai", TokenCounter())
    assert few.errors == ["3 samples: at least 10 are required"]
    bad = validate_lines(
        [*lines, "{not json", "", json.dumps(broken(["extra"], 1))], "openai", TokenCounter()
    )
    assert "line 11: not valid JSON" in bad.errors[0]
    assert "line 12: empty line" in bad.errors
    assert any(e.startswith("line 13: unknown top-level keys") for e in bad.errors)
    over = validate_lines(lines, "openai", TokenCounter(), limit=10)
    assert over.over_limit == 10 and "over the 10-token limit" in over.errors[0]


def test_wrong_format_gets_a_hint() -> None:
    hf = copy.deepcopy(GOOD)
    hf["messages"][2]["tool_calls"][0]["function"]["arguments"] = {}
    del hf["parallel_tool_calls"]
    assert guess_format(hf) == "hf"
    report = validate_lines([json.dumps(hf)] * 10, "openai", None)
    assert "pass --format hf" in report.errors[0]
    assert validate_lines([json.dumps(hf)] * 10, "hf", None).ok


def test_sharegpt_and_dpo_rules() -> None:
    share = {
        "conversations": [
            {"from": "human", "value": "q"},
            {
                "from": "function_call",
                "value": json.dumps(
                    [{"name": "lookup", "arguments": {}}, {"name": "lookup", "arguments": {}}]
                ),
            },
            {"from": "observation", "value": "r"},
            {"from": "gpt", "value": "a"},
        ],
        "system": "s",
        "tools": json.dumps([TOOLS[0]["function"]]),
    }
    assert validate_record(share, "sharegpt") == []
    swapped = copy.deepcopy(share)
    swapped["conversations"][1]["from"] = "human"
    assert any("expected gpt or function_call" in e for e in validate_record(swapped, "sharegpt"))
    assert any("not in tools" in e for e in validate_record({**share, "tools": "[]"}, "sharegpt"))
    dpo = {
        "input": {"messages": [{"role": "user", "content": "q"}], "tools": TOOLS},
        "preferred_output": [
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": "{}"},
                    }
                ],
            }
        ],
        "non_preferred_output": [{"role": "assistant", "content": "I guess"}],
    }
    assert validate_record(dpo, "dpo") == []
    assert any(
        "exactly one assistant" in e
        for e in validate_record({**dpo, "preferred_output": []}, "dpo")
    )
    ends_assistant = {
        **dpo,
        "input": {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]
        },
    }
    assert any("must end with a user or tool" in e for e in validate_record(ends_assistant, "dpo"))
