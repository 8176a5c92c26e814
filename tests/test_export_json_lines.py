"""The exporter's JSON lines stay byte-identical to the standard library's
(`json.dumps(ensure_ascii=False, separators=(",", ":"))`) now that orjson writes most of them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.building import SampleBuilder, json_bytes
from exporter.building import json_line as _json_line
from exporter.options import ExportOptions
from proxy.core.fastjson import loads_checked


def _stdlib(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@pytest.mark.parametrize(
    "value",
    [
        {"minimum": 1e-05, "maximum": 1e16, "step": 0.1},  # floats orjson writes differently
        [1.0, -0.0, 5e-324, 12345678901234567.0],
        {"text": "lone \ud800 surrogate"},  # orjson refuses
        {"big": 2**70},  # orjson refuses
        {1: "int key"},  # orjson refuses; the standard library writes "1"
        {"text": 'control \x00\x1f\x7f \u2028 é ☃ "quoted" \\ /'},
        {"nested": [{"a": None, "b": True, "c": [1, 2, {"d": "e"}]}]},
    ],
)
def test_json_line_is_the_standard_librarys(value: Any) -> None:
    assert _json_line(value) == _stdlib(value)
    if "\ud800" not in _stdlib(value):  # the bytes the export writes: the same text in UTF-8
        assert json_bytes(value) == _stdlib(value).encode()


def test_non_finite_numbers_take_the_standard_library() -> None:
    value = {"a": float("nan"), "b": float("inf")}
    # Only strict JSON (read by orjson) is written the fast way: NaN and infinities are not.
    assert not loads_checked('{"a": NaN}')[1] and not loads_checked("[-Infinity]")[1]
    assert not loads_checked("[1e400]")[1]
    assert loads_checked('{"a": 1.5, "b": "NaN"}')[1]
    # Stored by older proxies, never written: a training file is strict JSON (issue 11, item 9).
    assert _json_line(value, fast=False) == '{"a":null,"b":null}'


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(_values)
def test_any_finite_document_is_written_as_the_standard_library_writes_it(value: Any) -> None:
    text = _stdlib(value)
    assert _json_line(value, fast=loads_checked(text)[1]) == text


def test_a_sample_with_float_and_nan_schemas_is_written_as_before() -> None:
    """A stored request whose tool schema holds 1e-05 and NaN: the line is the standard
    library's (orjson alone would write 0.00001), the stored NaN written as null."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "scale",
                "description": "scale a value",
                "parameters": {
                    "type": "object",
                    "properties": {"f": {"type": "number", "minimum": 1e-05, "default": "NaN"}},
                },
            },
        }
    ]
    request_json = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "scale it"}], "tools": tools}
    ).replace('"NaN"', "NaN")
    response = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "done: 0.5"},
                "finish_reason": "stop",
            }
        ],
    }
    row = {
        "id": "x1",
        "trajectory_id": "t1",
        "request_json": request_json,
        "response_json": json.dumps(response),
        "outcome": "ok",
    }
    [built] = SampleBuilder(ExportOptions()).build([row])
    assert built[0] == "ok"
    line = built[2].decode()  # lines are UTF-8 bytes
    assert "1e-05" in line and '"default":null' in line
    assert line == _stdlib(json.loads(line))
    json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in a training line"))
