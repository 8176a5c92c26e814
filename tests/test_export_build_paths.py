"""Sample building's short cuts give what the plain rules give: every line is the standard
library's JSON of the rendered record (tools last), every token count the cookbook recipe
written out plainly, for every format and `--train-on`, on messages that take the fast paths
and on those that leave them (content parts, images, names, legacy `function_call`, weights,
floats, non-ASCII, special-token text). Renumbered ids, tool-call errors and float-free
formats are pinned too."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.building import SampleBuilder
from exporter.formats import FLOAT_FREE_FORMATS, RENDERERS, TRAIN_ON_SUPPORT
from exporter.messages import normalize_message
from exporter.options import ExportOptions
from exporter.samples import Rejected, apply_options, build_conversation
from exporter.tokens import TokenCounter

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Find ✓ an order.",
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string", "description": "query"}},
                "minimum": 1e-05,
            },
        },
    },
    {"type": "function", "function": {"name": "track-2", "parameters": {"type": "object"}}},
]

TRICKY: list[dict[str, Any]] = [
    {"role": "developer", "content": [{"type": "text", "text": "Be brief. <|endoftext|>"}]},
    {"role": "user", "name": "ana_1", "content": "Order 3.5e2 \u2028 \x00 ünï 😀?"},
    {
        "role": "assistant",
        "name": "bot",
        "content": "Looking 1.0 up.",
        "tool_calls": [
            {
                "id": "a",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"q": "é 0.5"}'},
            },
            {
                "id": "b",
                "function": {"name": "track-2", "arguments": {"n": 2.5, "k": "ü", "big": 10**20}},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "in transit"}]},
    {"role": "tool", "tool_call_id": "a", "content": {"status": 1.25, "where": "Zürich"}},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "this one?"},
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64,AAA", "detail": "low"},
            },
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "lookup", "arguments": '  {"q": 1e-7}'},
    },
    {"role": "function", "name": "lookup", "content": "42"},
]


def _row(messages: list[dict[str, Any]], answer: Any = "Done: 2.0 ✓", n: int = 0) -> dict[str, Any]:
    body = {"model": "m", "messages": messages, "tools": TOOLS, "parallel_tool_calls": True}
    message = {"role": "assistant", "content": answer, "refusal": None}
    response = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    return {
        "id": f"x{n}",
        "trajectory_id": f"t{n}",
        "request_json": json.dumps(body, ensure_ascii=n % 2 == 0),
        "response_json": json.dumps(response),
        "outcome": "ok",
    }


def _plain_line(record: dict[str, Any]) -> bytes:
    """The standard library's line of `record` (its values are finite: the rows here are written
    by `json.dumps`), its top-level tools list written last."""
    if isinstance(record.get("tools"), list) and record["tools"]:
        record = {**{k: v for k, v in record.items() if k != "tools"}, "tools": record["tools"]}
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


def _plain_count(
    counter: TokenCounter, messages: list[dict[str, Any]], tools: Any
) -> tuple[int, int]:
    """OpenAI's cookbook recipe, message by message, as `TokenCounter.count` documents it."""
    fixed, trained_fixed, prompt, trained = 3, 0, [], []
    for message in messages:
        is_trained = message["role"] == "assistant" and message.get("weight", 1) != 0
        texts = trained if is_trained else prompt
        overhead = 3 + 1
        content = message.get("content")
        if isinstance(content, str) and message["role"] == "system":
            overhead += counter.count_text(content)
        elif isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content if isinstance(p.get("text"), str))
        if "name" in message:
            texts.append(message["name"])
            overhead += 1
        for call in message.get("tool_calls") or ():
            texts += [call["function"]["name"], call["function"]["arguments"]]
            overhead += 3
        fixed += overhead
        trained_fixed += overhead if is_trained else 0
    if tools:
        fixed += counter.count_text(json.dumps(tools, ensure_ascii=False, separators=(",", ":")))
    prompt_tokens = counter.count_text("\n".join(prompt))
    trained_tokens = counter.count_text("\n".join(trained))
    return fixed + prompt_tokens + trained_tokens, trained_tokens + trained_fixed


def _check(options: ExportOptions, rows: list[dict[str, Any]]) -> int:
    """Builds `rows` and checks each sample against the plain rules; returns how many built."""
    counter = TokenCounter()
    built = SampleBuilder(options).build(rows)
    checked = 0
    for row, result in zip(rows, built, strict=True):
        try:
            conversation = build_conversation(
                json.loads(row["request_json"]),
                json.loads(row["response_json"]),
                require_final_answer=not options.include_incomplete,
            )
            conversation = apply_options(
                conversation,
                train_on=options.train_on,
                system_prompt=options.system_prompt,
                drop_system=options.drop_system,
                strip_tool_descriptions=options.strip_tool_descriptions,
            )
            record = RENDERERS[options.format](conversation)
        except Rejected as exc:
            assert result == ("drop", row["id"], exc.reason)
            continue
        assert result[0] == "ok"
        assert result[2] == _plain_line(record)
        assert result[3:5] == _plain_count(counter, conversation.messages, conversation.tools)
        checked += 1
    return checked


@pytest.mark.parametrize(
    ("fmt", "train_on"),
    [(fmt, train_on) for fmt in RENDERERS for train_on in TRAIN_ON_SUPPORT[fmt]],
)
@pytest.mark.parametrize(
    "extra",
    [{}, {"drop_system": True, "strip_tool_descriptions": True}, {"system_prompt": "Sé brief"}],
)
def test_lines_and_counts_are_the_plain_rules_on_tricky_messages(
    fmt: str, train_on: str, extra: dict[str, Any]
) -> None:
    rows = [
        _row(TRICKY, n=0),
        _row(TRICKY[:5], answer=[{"type": "text", "text": "parts ✓ 1.5"}], n=1),
        _row(TRICKY[1:6], n=2),  # no system message, an image
        _row([{"role": "user", "content": "hi"}], n=3),
    ]
    built = _check(ExportOptions(format=fmt, train_on=train_on, **extra), rows)
    # sharegpt cannot hold text beside tool calls nor images; a lone answer trains no tool call
    assert built == (1 if fmt == "sharegpt" else 3 if train_on == "tool-calls" else 4)


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | _text


@settings(max_examples=150, deadline=None)
@given(
    user=_text,
    said=_text,
    result=_text,
    arguments=st.dictionaries(_text, _scalars, max_size=4),
    as_string=st.booleans(),
    fmt=st.sampled_from(sorted(RENDERERS)),
)
def test_any_text_and_arguments_give_the_plain_line_and_count(
    user: str, said: str, result: str, arguments: dict[str, Any], as_string: bool, fmt: str
) -> None:
    stored = json.dumps(arguments, ensure_ascii=False) if as_string else arguments
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": user},
        {
            "role": "assistant",
            "content": said,
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "lookup", "arguments": stored}}
            ],
        },
        {"role": "tool", "tool_call_id": "1", "content": result},
    ]
    rows = [_row(messages, answer=f"{said}!"), _row(messages[:2], answer=user + ".", n=1)]
    for train_on in TRAIN_ON_SUPPORT[fmt]:
        _check(ExportOptions(format=fmt, train_on=train_on), rows)


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return []


@pytest.mark.parametrize("fmt", sorted(FLOAT_FREE_FORMATS))
def test_float_free_formats_hold_no_float_whatever_was_recorded(fmt: str) -> None:
    """Their lines skip the look for floats (`json_bytes(floats=False)`): true only while
    every value they write is a string, a boolean, a small integer or null."""
    sharegpt_safe = [TRICKY[1], *TRICKY[6:]]
    conversation = build_conversation(
        {"messages": TRICKY if fmt == "openai" else sharegpt_safe, "tools": TOOLS},
        {
            "choices": [
                {"message": {"role": "assistant", "content": "2.5"}, "finish_reason": "stop"}
            ]
        },
    )
    for train_on in TRAIN_ON_SUPPORT[fmt]:
        record = RENDERERS[fmt](apply_options(conversation, train_on=train_on))
        assert _floats({k: v for k, v in record.items() if k != "tools"}) == []
        assert "1.25" in json.dumps(record) or fmt == "sharegpt"  # the floats became text
    hf = RENDERERS["hf"](conversation)  # hf parses arguments: it may hold floats
    assert "hf" not in FLOAT_FREE_FORMATS and _floats(hf["messages"]) != []


def test_ids_past_the_precomputed_ones_are_numbered_alike() -> None:
    calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        for i in range(300)
    ]
    messages = [
        {"role": "user", "content": "many"},
        {"role": "assistant", "tool_calls": calls},
        *({"role": "tool", "tool_call_id": f"c{i}", "content": "ok"} for i in reversed(range(300))),
    ]
    conversation = build_conversation(
        {"messages": messages, "tools": TOOLS},
        {
            "choices": [
                {"message": {"role": "assistant", "content": "done"}, "finish_reason": "stop"}
            ]
        },
    )
    ids = [c["id"] for c in conversation.messages[1]["tool_calls"]]
    assert ids == [f"call{n:05d}" for n in range(1, 301)]
    assert [m["tool_call_id"] for m in conversation.messages[2:-1]] == ids[::-1]


@pytest.mark.parametrize(
    ("call", "reason", "detail"),
    [
        ("x", "invalid_tool_call", "message 3 tool call 1 is not an object"),
        ({"type": "custom"}, "unsupported_tool", "message 3 tool call 1 has type 'custom'"),
        ({"function": "f"}, "invalid_tool_call", "message 3 tool call 1 has no function"),
        (
            {"function": {"name": "bad name", "arguments": "{}"}},
            "invalid_name",
            "message 3 tool call 1 name 'bad name' is not ^[a-zA-Z0-9_-]{1,64}$",
        ),
        (
            {"function": {"name": "f"}},
            "invalid_arguments",
            "message 3 tool call 1 has no arguments",
        ),
        (
            {"function": {"name": "f", "arguments": 5}},
            "invalid_arguments",
            "message 3 tool call 1 arguments are a int",
        ),
        (
            {"function": {"name": "f", "arguments": "[1]"}},
            "invalid_arguments",
            "message 3 tool call 1 arguments are not a JSON object",
        ),
        (
            {"function": {"name": "f", "arguments": "{oops"}},
            "invalid_arguments",
            "message 3 tool call 1 arguments are not valid JSON",
        ),
    ],
)
def test_a_bad_tool_call_is_named_by_its_place(call: Any, reason: str, detail: str) -> None:
    good = {"id": "a", "function": {"name": "f", "arguments": "{}"}}
    message = {"role": "assistant", "content": None, "tool_calls": [good, call]}
    with pytest.raises(Rejected) as info:
        normalize_message(message, 3)
    assert (info.value.reason, info.value.detail) == (reason, detail)
    legacy = {"role": "assistant", "function_call": call if isinstance(call, dict) else None}
    if isinstance(call, dict) and "function" in call and isinstance(call["function"], dict):
        with pytest.raises(Rejected) as info:
            normalize_message({**legacy, "function_call": call["function"]}, 3)
        assert info.value.detail == detail.replace("tool call 1", "function_call")


def test_arguments_the_fast_check_leaves_are_still_kept_or_dumped() -> None:
    kept = ['  {"q": 1}', '{"a": NaN}', '{"x": 12345678901234567890123}', '{"é":"ü"}']
    for arguments in kept:  # JSON objects as written (the standard library reads them all)
        message = {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "f", "arguments": arguments}}],
        }
        assert normalize_message(message, 0)["tool_calls"][0]["function"]["arguments"] == arguments
    dumped = {
        "role": "assistant",
        "tool_calls": [{"function": {"name": "f", "arguments": {"é": 1.5}}}],
    }
    assert normalize_message(dumped, 0)["tool_calls"][0]["function"]["arguments"] == '{"é":1.5}'
