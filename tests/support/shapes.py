"""Request bodies of many shapes (odd unicode, NUL, a large image, missing tools, `input` as a
string, ...) for the content-addressed storage tests: `SHAPES` by name, and the `TOOLS` they use."""

from __future__ import annotations

import base64
import random
from typing import Any

from proxy.core.redaction import storable

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
]
IMAGE = "data:image/png;base64," + base64.b64encode(random.Random(7).randbytes(150_000)).decode()

SHAPES: dict[str, Any] = {
    "plain": {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]},
    "tools first": {
        "tools": TOOLS,
        "model": "m",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        "tool_choice": "auto",
    },
    "odd unicode": {
        "model": "m",
        "messages": [{"role": "user", "content": 'é漢字🙂\u200b\u2028\u2029\ufeff"\\/\t\n'}],
        "user": "ñ",
    },
    "made-storable surrogate": {
        "model": "m",
        "messages": [{"role": "user", "content": storable("half \ud83d emoji")}],
    },
    "lone surrogate kept": {"model": "m", "messages": [{"role": "user", "content": "x\udc80y"}]},
    "nul everywhere": {
        "model": "m",
        "user": "a\x00b",
        "messages": [
            {"role": "user", "content": "nul \x00 here"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"q": "\\u0000x\x00"}'},
                    }
                ],
            },
        ],
        "tools": TOOLS,
    },
    "huge image": {
        "model": "gpt-4o",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": IMAGE}},
                ],
            }
        ],
    },
    "missing tools": {"model": "m", "messages": [], "metadata": {"k": "v"}},
    "tools null": {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": None},
    "tools not a list": {"model": "m", "messages": [], "tools": {"odd": True}},
    "messages not a list": {"model": "m", "messages": "just text", "tools": TOOLS},
    "no messages": {"model": "m", "temperature": 0.0, "n": 2, "stop": ["\n"]},
    "numbers": {
        "model": "m",
        "messages": [{"role": "user", "content": "n"}],
        "temperature": 1e-7,
        "top_p": 0.30000000000000004,
        "seed": 12345678901234567890123,
        "logit_bias": {"316": -0.0, "17": 100},
    },
    "nested and empty": {
        "model": "m",
        "messages": [{"role": "user", "content": [[], {}, [{"a": [1, [2, [3]]]}]]}, {}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {}}},
    },
    "keys that look like ours": {
        "messages": [{"role": "user", "content": '"messages":null,"tools":null'}],
        "tools": [],
        "x": {"messages": None, "tools": None},
        "model": "m",
    },
}
