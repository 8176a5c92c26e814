"""Pure tests of sample building: every OpenAI-format rule the exporter applies."""

from __future__ import annotations

import json
from typing import Any

import pytest

from exporter.formats import openai as openai_format
from exporter.messages import MAX_TOOL_CALLS, TOOL_CALL_ID_PATTERN, tool_call_id
from exporter.samples import (
    Conversation,
    Rejected,
    apply_options,
    arguments_string,
    build_conversation,
    set_weights,
    strip_descriptions,
)
from exporter.validate import validate_record

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Find.",
            "parameters": {
                "type": "object",
                "properties": {
                    "q": {"type": "string", "description": "query"},
                    "description": {"type": "string", "description": "a field called description"},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "fetch", "parameters": {"type": "object", "properties": {}}},
    },
]


def call(call_id: str, name: str = "lookup", arguments: Any = '{"q":"x"}') -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def answer(content: str = "Done.", **extra: Any) -> dict[str, Any]:
    return {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, **extra},
                "finish_reason": "stop",
            }
        ]
    }


def request(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4.1-mini", "messages": messages, "tools": TOOLS, **extra}


def build(
    messages: list[dict[str, Any]], response: dict[str, Any] | None = None, **extra: Any
) -> Conversation:
    return build_conversation(request(messages, **extra), response or answer())


def reason_of(
    messages: list[dict[str, Any]], response: dict[str, Any] | None = None, **extra: Any
) -> str:
    with pytest.raises(Rejected) as info:
        build(messages, response, **extra)
    return info.value.reason


BASE = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]


def test_leaf_request_plus_response_is_the_conversation() -> None:
    conv = build(BASE)
    assert conv.messages == [*BASE, {"role": "assistant", "content": "Done."}]
    assert conv.tools == TOOLS
    assert validate_record(openai_format.render(conv)) == []


def test_arguments_become_json_strings_and_strings_are_kept_byte_for_byte() -> None:
    assert arguments_string({"q": "é", "n": 1}, "x") == '{"q":"é","n":1}'
    assert arguments_string('{ "q" : 1 }', "x") == '{ "q" : 1 }'
    for bad, reason in (
        ("not json", "not valid JSON"),
        ("[1]", "not a JSON object"),
        ("", "no arguments"),
        (5, "int"),
    ):
        with pytest.raises(Rejected, match=reason):
            arguments_string(bad, "x")
    conv = build(
        [
            *BASE,
            {"role": "assistant", "tool_calls": [call("a", arguments={"q": "x"})]},
            {"role": "tool", "tool_call_id": "a", "content": "r"},
        ]
    )
    assert conv.messages[2]["tool_calls"][0]["function"]["arguments"] == '{"q":"x"}'
    assert (
        reason_of(
            [
                *BASE,
                {"role": "assistant", "tool_calls": [call("a", arguments="{oops")]},
                {"role": "tool", "tool_call_id": "a", "content": "r"},
            ]
        )
        == "invalid_arguments"
    )


def test_content_parts_are_flattened_and_response_only_fields_dropped() -> None:
    conv = build(
        [
            {
                "role": "developer",
                "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "kind"}],
            },
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "annotations": [],
                "audio": None,
                "function_call": None,
                "tool_calls": [call("a")],
                "reasoning_content": "hmm",
            },
            {
                "role": "tool",
                "tool_call_id": "a",
                "content": [{"type": "text", "text": "res"}, {"type": "text", "text": "ult"}],
                "name": "lookup",
            },
        ],
        answer("ok", refusal=None, annotations=[], audio=None),
    )
    assert conv.messages == [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [call("call00001")]},
        {"role": "tool", "tool_call_id": "call00001", "content": "result"},
        {"role": "assistant", "content": "ok"},
    ]


def test_user_images_are_kept_as_parts_other_media_rejected() -> None:
    image = {
        "role": "user",
        "content": [
            {"type": "text", "text": "see"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
        ],
    }
    conv = build([image])
    assert conv.messages[0]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "https://x/y.png", "detail": "low"},
    }
    audio = {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "..."}}]}
    assert reason_of([audio]) == "unsupported_content"
    assert (
        reason_of(
            [
                {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "a", "content": [{"type": "image_url"}]},
            ]
        )
        == "unsupported_content"
    )


def test_tool_call_ids_renumbered_uniquely_with_pairs_kept_even_when_the_app_reuses_ids() -> None:
    conv = build(
        [
            *BASE,
            {"role": "assistant", "tool_calls": [call("call_0"), call("call_1", "fetch", "{}")]},
            {"role": "tool", "tool_call_id": "call_1", "content": "fetched"},
            {"role": "tool", "tool_call_id": "call_0", "content": "looked"},
            {"role": "assistant", "tool_calls": [call("call_0")]},
            {"role": "tool", "tool_call_id": "call_0", "content": "again"},
        ]
    )
    msgs = conv.messages
    assert [c["id"] for c in msgs[2]["tool_calls"]] == ["call00001", "call00002"]
    assert (msgs[3]["tool_call_id"], msgs[3]["content"]) == ("call00002", "fetched")
    assert (msgs[4]["tool_call_id"], msgs[4]["content"]) == ("call00001", "looked")
    assert msgs[5]["tool_calls"][0]["id"] == "call00003" and msgs[6]["tool_call_id"] == "call00003"
    assert validate_record(openai_format.render(conv)) == []


def test_renumbered_ids_are_nine_alphanumeric_characters_as_mistral_requires() -> None:
    ids = [tool_call_id(n) for n in (1, 2, 10, 12_345, MAX_TOOL_CALLS)]
    assert ids == ["call00001", "call00002", "call00010", "call12345", "call99999"]
    assert all(TOOL_CALL_ID_PATTERN.match(i) for i in ids) and len(set(ids)) == len(ids)
    with pytest.raises(Rejected, match="too_many_tool_calls"):
        tool_call_id(MAX_TOOL_CALLS + 1)


def test_unanswered_orphan_and_duplicate_calls_are_rejected() -> None:
    unanswered = [
        *BASE,
        {"role": "assistant", "tool_calls": [call("a"), call("b")]},
        {"role": "tool", "tool_call_id": "a", "content": "r"},
    ]
    assert reason_of(unanswered) == "unanswered_tool_call"
    orphan = [*BASE, {"role": "tool", "tool_call_id": "zzz", "content": "r"}]
    assert reason_of(orphan) == "orphan_tool_message"
    late = [
        *BASE,
        {"role": "assistant", "tool_calls": [call("a")]},
        {"role": "user", "content": "wait"},
        {"role": "tool", "tool_call_id": "a", "content": "r"},
    ]
    assert reason_of(late) == "unanswered_tool_call"
    duplicate = [
        *BASE,
        {"role": "assistant", "tool_calls": [call("a"), call("a")]},
        {"role": "tool", "tool_call_id": "a", "content": "r"},
    ]
    assert reason_of(duplicate) == "duplicate_tool_call_id"


def test_names_tools_and_parallel_flag() -> None:
    bad_name = [
        *BASE,
        {"role": "assistant", "tool_calls": [call("a", "bad name!")]},
        {"role": "tool", "tool_call_id": "a", "content": "r"},
    ]
    assert reason_of(bad_name) == "invalid_name"
    undeclared = [
        *BASE,
        {"role": "assistant", "tool_calls": [call("a", "other")]},
        {"role": "tool", "tool_call_id": "a", "content": "r"},
    ]
    assert reason_of(undeclared) == "undeclared_tool"
    parallel = [
        *BASE,
        {"role": "assistant", "tool_calls": [call("a"), call("b", "fetch", "{}")]},
        {"role": "tool", "tool_call_id": "a", "content": "1"},
        {"role": "tool", "tool_call_id": "b", "content": "2"},
    ]
    assert build(parallel, parallel_tool_calls=True).parallel_tool_calls is True
    assert len(build(parallel).messages[2]["tool_calls"]) == 2
    assert build(parallel).parallel_tool_calls is None
    assert reason_of(parallel, parallel_tool_calls=False) == "parallel_calls_disallowed"
    record = openai_format.render(build(BASE, parallel_tool_calls=False))
    assert record["parallel_tool_calls"] is False
    no_tools = build_conversation({"messages": BASE, "parallel_tool_calls": True}, answer())
    assert openai_format.render(no_tools) == {
        "messages": [*BASE, {"role": "assistant", "content": "Done."}]
    }


def _choice(message: dict[str, Any], finish: str) -> dict[str, Any]:
    return {"choices": [{"message": {"role": "assistant", **message}, "finish_reason": finish}]}


CALLS = _choice({"content": None, "tool_calls": [call("z")]}, "tool_calls")


def test_incomplete_leaves_are_dropped_with_their_own_reason() -> None:
    cases = [
        (None, "error"),
        (CALLS, "pending_tool_call"),
        (_choice({"content": "half"}, "length"), "length"),
        (_choice({"content": "hidden"}, "content_filter"), "content_filter"),
        (_choice({"content": None, "refusal": "I can't help with that."}, "stop"), "refusal"),
        (
            _choice({"content": [{"type": "refusal", "refusal": "no"}]}, "stop"),
            "refusal",
        ),
        (
            _choice({"content": None, "audio": {"id": "audio_1", "transcript": "hi"}}, "stop"),
            "audio",
        ),
        (answer("   "), "empty_assistant_message"),
    ]
    for response, reason in cases:
        with pytest.raises(Rejected) as info:
            build_conversation(request(BASE), response)
        assert info.value.reason == reason, response
    for outcome in ("error", "cancelled"):
        with pytest.raises(Rejected) as info:
            build_conversation(request(BASE), answer(), outcome=outcome)
        assert info.value.reason == outcome


def test_include_incomplete_ends_in_a_call_but_never_trains_a_cut_or_failed_answer() -> None:
    ends_in_call = build_conversation(request(BASE), CALLS, require_final_answer=False)
    assert ends_in_call.messages[-1]["tool_calls"][0]["id"] == "call00001"
    assert ends_in_call.cut is None
    assert validate_record(openai_format.render(ends_in_call)) == []
    history = [
        *BASE,
        {"role": "assistant", "tool_calls": [call("a")]},
        {"role": "tool", "tool_call_id": "a", "content": "r"},
    ]
    for finish in ("length", "content_filter"):
        truncated = _choice({"content": "The answer is half wri"}, finish)
        kept = build_conversation(request(history), truncated, require_final_answer=False)
        assert kept.cut == finish
        assert kept.messages[-1]["role"] == "assistant" and len(kept.messages) == 3
        assert "half wri" not in json.dumps(kept.messages)
        with pytest.raises(Rejected) as info:  # nothing before it to train
            build_conversation(request(BASE), truncated, require_final_answer=False)
        assert info.value.reason == finish
    refused = _choice({"content": None, "refusal": "no"}, "stop")
    assert build_conversation(request(history), refused, require_final_answer=False).cut == (
        "refusal"
    )
    # an error leaf is never a sample, even when its request holds a complete prefix
    for response, outcome in ((None, "error"), (answer(), "error"), (answer(), "cancelled")):
        with pytest.raises(Rejected) as info:
            build_conversation(
                request(history), response, require_final_answer=False, outcome=outcome
            )
        assert info.value.reason == outcome


def test_empty_assistant_and_unknown_roles() -> None:
    assert (
        reason_of(
            [
                *BASE,
                {"role": "assistant", "content": "", "tool_calls": []},
                {"role": "user", "content": "x"},
            ]
        )
        == "empty_assistant_message"
    )
    assert reason_of([{"role": "critic", "content": "x"}]) == "unsupported_role"
    refusal = {
        "choices": [
            {
                "message": {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
                "finish_reason": "stop",
            }
        ]
    }
    with pytest.raises(Rejected):
        build(BASE, refusal)


def test_legacy_functions_become_tools() -> None:
    conv = build_conversation(
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "function_call": {"name": "lookup", "arguments": '{"q":"x"}'},
                },
                {"role": "function", "name": "lookup", "content": "found"},
            ],
            "functions": [{"name": "lookup", "parameters": {"type": "object"}}],
        },
        answer(),
    )
    assert conv.messages[1]["tool_calls"][0]["id"] == "call00001"
    assert conv.messages[2] == {"role": "tool", "tool_call_id": "call00001", "content": "found"}
    assert conv.tools == [
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    ]


@pytest.mark.parametrize(
    ("train_on", "weights"),
    [("final", [0, 0, 1]), ("tool-calls", [1, 1, 0]), ("last", [0, 0, 1])],
)
def test_train_on_sets_weights_on_assistant_messages_only(
    train_on: str, weights: list[int]
) -> None:
    conv = build(
        [
            *BASE,
            {"role": "assistant", "tool_calls": [call("a")]},
            {"role": "tool", "tool_call_id": "a", "content": "r"},
            {"role": "assistant", "content": "thinking", "tool_calls": [call("b")]},
            {"role": "tool", "tool_call_id": "b", "content": "r"},
        ]
    )
    out = apply_options(conv, train_on=train_on)
    assert [m["weight"] for m in out.messages if m["role"] == "assistant"] == weights
    assert all("weight" not in m for m in out.messages if m["role"] != "assistant")
    assert validate_record(openai_format.render(out)) == []
    assert "weight" not in json.dumps(apply_options(conv, train_on="all").messages)


def test_nothing_to_train_is_rejected() -> None:
    with pytest.raises(Rejected, match="nothing_to_train"):
        set_weights(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tool-calls"
        )


def test_system_prompt_replace_and_drop() -> None:
    conv = build(
        [
            {"role": "system", "content": "a"},
            {"role": "user", "content": "q"},
            {"role": "developer", "content": "b"},
        ]
    )
    replaced = apply_options(conv, system_prompt="NEW")
    assert [m for m in replaced.messages if m["role"] == "system"] == [
        {"role": "system", "content": "NEW"}
    ]
    assert replaced.messages[0]["content"] == "NEW"
    dropped = apply_options(conv, drop_system=True)
    assert [m["role"] for m in dropped.messages] == ["user", "assistant"]
    inserted = apply_options(build([{"role": "user", "content": "q"}]), system_prompt="NEW")
    assert inserted.messages[0] == {"role": "system", "content": "NEW"}


def test_strip_tool_descriptions_keeps_a_property_named_description() -> None:
    out = apply_options(build(BASE), strip_tool_descriptions=True)
    function = out.tools[0]["function"]
    assert "description" not in function
    assert function["parameters"]["properties"] == {
        "q": {"type": "string"},
        "description": {"type": "string"},
    }
    assert strip_descriptions({"anyOf": [{"description": "x", "type": "string"}]}) == {
        "anyOf": [{"type": "string"}]
    }
    assert TOOLS[0]["function"]["description"] == "Find."  # the input is not mutated


def test_special_token_text_is_counted_as_text() -> None:
    from exporter.tokens import (
        TokenCounter,
        base_model_name,
        encoding_name,
        token_limit,
        training_price,
    )

    counter = TokenCounter()
    assert counter.count_text("<|endoftext|>") > 1
    counted = counter.count(
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there", "weight": 1},
        ]
    )
    assert counted.total > counted.trained > 0
    assert base_model_name("ft:gpt-4.1-mini-2025-04-14:org::abc") == "gpt-4.1-mini"
    assert (
        encoding_name("gpt-4.1"),
        encoding_name("gpt-4o-mini"),
        encoding_name("gpt-3.5-turbo"),
    ) == ("o200k_base", "o200k_base", "cl100k_base")
    assert (
        token_limit("gpt-4.1-2025-04-14"),
        token_limit("gpt-4.1-nano"),
        token_limit("llama"),
    ) == (65_536, 32_768, None)
    assert training_price("gpt-4.1-mini") == 5.0 and training_price("qwen") is None
    assert counter._encoding.encode_ordinary(" to") == [316]
