"""proxy.core.fastjson.loads gives exactly what json.loads gives (the exporter's output stays
byte-identical), including the inputs orjson alone would read differently or refuse."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.fastjson import loads
from proxy.recording.journal import Journal
from proxy.recording.recorder import _line_bytes

EDGE_CASES = [
    '{"seed": 123456789012345678901234567890}',  # orjson alone: a float
    "[18446744073709551616, -9223372036854775809]",  # just past 64 bits
    "[18446744073709551615, 9223372036854775807, -9223372036854775808]",
    '{"a":-123456789012345678901234567890,"b":[1,\n123456789012345678901234567890]}',
    "[\t123456789012345678901234567890]",
    '{"id": "chatcmpl-Mock0000000000000000000000", "at": "t 12345678901234567890123"}',
    # a run inside a string first, then a number beyond 64 bits (found after skipping the run)
    '{"id": "x00000000000000000000000000000000000000", "n": 123456789012345678901234567890}',
    '{"id": "x00000000000000000000000000000000000000"}',
    "123456789012345678901234567890",  # at the very start
    "[1e400, -1e400]",  # orjson alone refuses: the standard library gives inf
    "[0.1, 1e16, -0.0, 5e-324, 1.7976931348623157e308, 1E-7]",
    '"\\ud800"',  # lone surrogate
    '{"a": 1, "a": 2}',  # the last duplicate wins
    '"\\u0000 nul"',
    " [1] ",
    b'{"bytes": [1, 2]}',
]


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and repr(a) == repr(b)


@pytest.mark.parametrize("text", EDGE_CASES)
def test_loads_equals_the_standard_library(text: str | bytes) -> None:
    assert _same(loads(text), json.loads(text))


def test_nan_literals_read_as_the_standard_library_reads_them() -> None:
    value = loads("[NaN, Infinity, -Infinity]")
    assert math.isnan(value[0]) and value[1:] == [math.inf, -math.inf]


@pytest.mark.parametrize("text", ["{bad", "", "[1,]", '"\\x"', "[1] 2"])
def test_bad_json_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        loads(text)


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_any_document_reads_back_as_json_loads_reads_it(value: object) -> None:
    text = json.dumps(value)
    assert repr(loads(text)) == repr(json.loads(text))


@pytest.mark.parametrize(
    "value",
    [
        {"exchange": {"id": "x", "request_json": '{"a":"é ☃"}', "duration_ms": 1.25}},
        {"exchange": {"id": "x", "end_user": "lone \ud800 surrogate"}},  # orjson refuses
        {"exchange": {"id": "x", "seed": 2**70}},  # beyond 64 bits: orjson refuses
    ],
)
def test_write_ahead_lines_read_back_exactly(tmp_path: Path, value: dict[str, object]) -> None:
    """The recorder's lines (orjson, else the standard library) are what replay reads back."""
    path = tmp_path / "journal.jsonl"
    path.write_bytes(_line_bytes(value) + _line_bytes({"second": True}))
    assert list(Journal.read(path)) == [value, {"second": True}]
