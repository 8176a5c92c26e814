"""Replay evaluation, pure parts: step comparison, schema-typed arguments, rates and intervals."""

from __future__ import annotations

import json
from typing import Any

import pytest

from exporter.evaluation.compare import (
    FINAL,
    TOOL_CALL,
    StepComparison,
    canonical_json,
    coerce,
    compare_messages,
    tool_schemas,
)
from exporter.evaluation.metrics import StepOutcome, summarize, wilson_interval
from exporter.evaluation.replay import fingerprint, public_url
from exporter.evaluation.selection import candidate_request
from tests.support.evaluation import TOOLS

REQUEST: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}


def calls(*pairs: tuple[str, Any]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": f"c{i}",
                "type": "function",
                "function": {
                    "name": name,
                    "arguments": args if isinstance(args, str) else json.dumps(args),
                },
            }
            for i, (name, args) in enumerate(pairs)
        ],
    }


FINAL_ANSWER = {"role": "assistant", "content": "done"}


def test_same_calls_in_other_order_and_spelling_agree() -> None:
    ref = calls(("get_weather", {"city": "Oslo", "days": 2}), ("search", {"query": "x"}))
    cand = calls(("search", '{"query":"x"}'), ("get_weather", '{"days": 2.0, "city": "Oslo"}'))
    c = compare_messages(ref, cand, REQUEST)
    assert (c.decision_agree, c.names_agree, c.arguments_agree, c.typed_agree) == (
        True,
        True,
        True,
        True,
    )
    assert c.agrees and c.invalid_json == 0 and c.unknown_tools == 0
    assert c.per_tool["search"].argument_matches == 1


def test_string_for_integer_is_counted_apart_from_a_wrong_value() -> None:
    ref = calls(("get_weather", {"city": "Rome", "days": 3}))
    typed_only = compare_messages(
        ref, calls(("get_weather", {"city": "Rome", "days": "3"})), REQUEST
    )
    assert typed_only.names_agree and not typed_only.arguments_agree and typed_only.typed_agree
    wrong = compare_messages(ref, calls(("get_weather", {"city": "Rome", "days": "4"})), REQUEST)
    assert wrong.names_agree and not wrong.arguments_agree and not wrong.typed_agree


def test_decisions_invalid_json_and_unknown_tools() -> None:
    ref = calls(("search", {"query": "x"}))
    final = compare_messages(ref, FINAL_ANSWER, REQUEST)
    assert final.reference_decision == TOOL_CALL and final.candidate_decision == FINAL
    assert not final.decision_agree and final.names_agree is False and not final.agrees
    invalid = compare_messages(ref, calls(("search", '{"query": ')), REQUEST)
    assert invalid.names_agree and not invalid.arguments_agree and invalid.invalid_json == 1
    unknown = compare_messages(FINAL_ANSWER, calls(("rm_rf", {})), REQUEST)
    assert not unknown.decision_agree and unknown.unknown_tools == 1
    assert unknown.names_agree is None  # nothing to compare on a final-answer step
    both_final = compare_messages(FINAL_ANSWER, {"role": "assistant", "content": "ok"}, REQUEST)
    assert both_final.agrees and both_final.arguments_agree is None


def test_duplicate_calls_compare_as_a_multiset() -> None:
    ref = calls(("search", {"query": "a"}), ("search", {"query": "a"}))
    once = compare_messages(ref, calls(("search", {"query": "a"})), REQUEST)
    assert not once.names_agree and once.per_tool["search"].name_matches == 1
    assert once.per_tool["search"].argument_matches == 1


def test_coerce_follows_the_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "x": {"type": "number"},
            "ok": {"type": "boolean"},
            "name": {"type": "string"},
            "ids": {"type": "array", "items": {"type": "integer"}},
            "maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        },
    }
    value = {"n": "5", "x": "2.5", "ok": "true", "name": 7, "ids": ["1", 2], "maybe": "3"}
    assert coerce(value, schema) == {
        "n": 5,
        "x": 2.5,
        "ok": True,
        "name": "7",
        "ids": [1, 2],
        "maybe": 3,
    }
    assert coerce({"n": "five"}, schema) == {"n": "five"}  # not an integer: left as it is
    assert canonical_json({"b": 1.0, "a": [2.0, "é"]}) == '{"a":[2,"é"],"b":1}'


def test_tool_schemas_read_tools_and_legacy_functions() -> None:
    assert set(tool_schemas(REQUEST)) == {"get_weather", "search"}
    legacy = {"functions": [{"name": "f", "parameters": {"type": "object"}}]}
    assert tool_schemas(legacy) == {"f": {"type": "object"}}


def test_comparison_round_trips_through_json() -> None:
    c = compare_messages(calls(("search", {"query": "a"})), FINAL_ANSWER, REQUEST)
    again = StepComparison.from_dict(json.loads(json.dumps(c.as_dict())))
    assert again == c


def test_wilson_interval_known_values() -> None:
    assert wilson_interval(0, 0) is None
    assert wilson_interval(8, 10) == (0.4902, 0.9433)
    assert wilson_interval(10, 10) == (0.7225, 1.0)
    low, high = wilson_interval(0, 5) or (1, 1)
    assert low == 0.0 and 0.4 < high < 0.45


def test_summarize_rates_exclude_errors() -> None:
    agree = compare_messages(
        calls(("search", {"query": "a"})), calls(("search", {"query": "a"})), REQUEST
    )
    differ = compare_messages(
        calls(("search", {"query": "a"})), calls(("search", {"query": "b"})), REQUEST
    )
    outcomes = [
        StepOutcome("t1", agree, latency_ms=100.0, prompt_tokens=10, completion_tokens=5),
        StepOutcome("t1", differ, latency_ms=300.0, prompt_tokens=10, completion_tokens=5),
        StepOutcome("t2", None, error_type="http_500"),
    ]
    report = summarize(outcomes, "gpt-4.1-mini")
    assert report["steps"] == 3 and report["answered"] == 2 and report["trajectories"] == 2
    assert report["argument_agreement"] == 0.5 and report["tool_name_agreement"] == 1.0
    assert report["errors"] == 1 and report["error_types"] == {"http_500": 1}
    assert report["latency_ms"]["candidate"]["p50"] == 200.0
    assert report["tokens"]["candidate"] == {"prompt": 20, "completion": 10}
    assert report["cost_usd"]["candidate"] is not None and report["cost_usd"]["reference"] is None


def test_candidate_request_replaces_model_and_drops_recording_fields() -> None:
    recorded = {
        "model": "o3",
        "messages": [],
        "tools": TOOLS,
        "stream": True,
        "stream_options": {"include_usage": True},
        "metadata": {"trajectory_id": "abc"},
        "temperature": 0.2,
        "parallel_tool_calls": False,
    }
    body = candidate_request(recorded, "student-1")
    assert body == {
        "model": "student-1",
        "messages": [],
        "tools": TOOLS,
        "temperature": 0.2,
        "parallel_tool_calls": False,
    }


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:sk-secret@api.example.com/v1/?key=sk-x#f", "https://api.example.com/v1"),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
    ],
)
def test_public_url_drops_credentials(url: str, shown: str) -> None:
    assert public_url(url) == shown


def test_fingerprint_ignores_the_key_and_follows_the_filters() -> None:
    from exporter.evaluation.replay import EvalConfig
    from exporter.options import ExportOptions

    a = EvalConfig(base_url="http://h/v1", model="m", api_key="sk-1")
    assert fingerprint(a) == fingerprint(
        EvalConfig(base_url="http://h/v1", model="m", api_key="sk-2")
    )
    other = EvalConfig(
        base_url="http://h/v1", model="m", api_key="sk-1", options=ExportOptions(seed=3)
    )
    assert fingerprint(a) != fingerprint(other)
