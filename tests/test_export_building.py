"""Sample building keeps its output while doing repeated work once: a tool list is normalized,
written and counted once per distinct list (`exporter.building.ToolsCache`), and the CLI loads a
command's libraries only when that command runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from exporter.building import INVALID_TEXT, SampleBuilder, slim_row
from exporter.messages import normalize_tools
from exporter.options import ExportOptions

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str, description: str, minimum: Any = 0) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {"n": {"type": "integer", "description": "how many"}},
                "minimum": minimum,
            },
        },
    }


def _row(n: int, tools: list[dict[str, Any]] | None, **request: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": f"question {n}"},
        ],
        **request,
    }
    if tools is not None:
        body["tools"] = tools
    answer = {"role": "assistant", "content": f"answer {n}"}
    return {
        "id": f"x{n}",
        "trajectory_id": f"t{n}",
        "request_json": json.dumps(body),
        "response_json": json.dumps(
            {"choices": [{"index": 0, "message": answer, "finish_reason": "stop"}]}
        ),
        "outcome": "ok",
    }


def _lines(options: ExportOptions, rows: list[dict[str, Any]]) -> list[Any]:
    built = SampleBuilder(options).build(rows)
    return [json.loads(b[2]) if b[0] == "ok" else b[2] for b in built]


def test_each_distinct_tool_list_keeps_its_own_tools() -> None:
    first = [_tool("lookup", "finds an order")]
    second = [_tool("lookup", "finds a parcel")]  # same name, another description
    legacy = [first[0]["function"]]
    rows = [
        _row(1, first),
        _row(2, second),
        _row(3, first),
        _row(4, None, functions=legacy),
        _row(5, []),
    ]
    samples = _lines(ExportOptions(), rows)
    descriptions = [[t["function"]["description"] for t in s.get("tools", [])] for s in samples]
    assert descriptions == [
        ["finds an order"],
        ["finds a parcel"],
        ["finds an order"],
        ["finds an order"],
        [],
    ]
    stripped = _lines(ExportOptions(strip_tool_descriptions=True), rows[:2])
    assert all("description" not in json.dumps(s["tools"]) for s in stripped)
    # The cached lists are shared between samples: building never changes them.
    assert normalize_tools(json.loads(rows[0]["request_json"])) == samples[0]["tools"]


def test_a_bad_message_is_reported_before_bad_tools_as_before() -> None:
    duplicate = [_tool("lookup", "a"), _tool("lookup", "b")]
    bad_message = _row(1, duplicate)
    body = json.loads(bad_message["request_json"])
    body["messages"].append({"role": "wizard", "content": "?"})
    bad_message["request_json"] = json.dumps(body)
    assert _lines(ExportOptions(), [bad_message, _row(2, duplicate)]) == [
        "unsupported_role",
        "duplicate_tool",
    ]


def test_tool_schemas_with_floats_and_nan_are_written_by_the_standard_library() -> None:
    row = _row(1, [_tool("scale", "scales", minimum=1e-05)])
    nan_row = _row(2, [_tool("scale", "scales", minimum=float("nan"))])
    (line,), (nan_line,) = (
        SampleBuilder(ExportOptions()).build([r])[0][2:3] for r in (row, nan_row)
    )
    line, nan_line = line.decode(), nan_line.decode()  # lines are UTF-8 bytes
    assert '"minimum":1e-05' in line
    assert '"minimum":null' in nan_line  # a stored NaN is written as null: strict JSON


def test_a_worker_gets_only_what_it_builds_from() -> None:
    row = {**_row(1, None), "route": "student", "trajectory_label": None, "step": 2}
    slim = slim_row(row)
    assert set(slim) == {"id", "request_json", "response_json", "outcome"}
    assert SampleBuilder(ExportOptions()).build([slim]) == SampleBuilder(ExportOptions()).build(
        [row]
    )


def test_the_cli_loads_no_command_library_before_a_command_runs() -> None:
    code = (
        "import sys, exporter.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'openai', 'sqlalchemy', 'rich', 'litellm', 'tiktoken', 'aiosqlite'}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"
    listed = subprocess.run(
        [sys.executable, "-m", "exporter", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    for command in ("export", "validate", "stats", "upload", "eval"):
        assert f"    {command} " in listed.stdout


def test_a_text_utf8_cannot_carry_drops_its_sample_with_a_reason() -> None:
    """A stored text may hold a lone surrogate escape (half an emoji a client cut: JSON carries
    it); a UTF-8 training file cannot. That sample is dropped as 'invalid_text', in every format
    and wherever the text is (question or answer), and the rows after it are still built."""
    question = _row(1, None)
    question["request_json"] = question["request_json"].replace("question 1", "half \\ud83d")
    answer = _row(2, None)
    answer["response_json"] = answer["response_json"].replace("answer 2", "half \\udfff")
    for format_name in ("openai", "hf", "axolotl", "sharegpt"):
        built = SampleBuilder(ExportOptions(format=format_name)).build(
            [question, answer, _row(3, None)]
        )
        assert [b[0] for b in built] == ["drop", "drop", "ok"], format_name
        assert built[0][2] == built[1][2] == INVALID_TEXT == "invalid_text"
