"""Canonical messages and the rolling hash (`proxy.core.canonical`): pure units, no I/O.

Covers what SDKs echo back and must not change a message's identity (absent vs null fields,
`refusal`/`annotations`/`audio`, content string vs text parts, `arguments` whitespace, key order
and object vs string, `developer` vs `system`, SDK `model_dump()` variants), what must change it
(tool-call ids, content, order of calls), and the rolling-hash properties stitching relies on
(prefix hashes, exchange state = hash of request + response, candidates longest first).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletionMessage

from proxy.core.canonical import (
    CanonicalCache,
    canonical_arguments,
    canonical_bytes,
    canonical_content,
    canonical_message,
    chain_hash,
    continuation_candidates,
    prefix_hashes,
)
from proxy.core.memo import SizedMemo

ARGS = '{"city": "Paris", "units": {"temp": "C", "wind": "kmh"}, "days": [1, 2]}'


def assistant_call(
    call_id: str = "call_1", arguments: Any = ARGS, name: str = "weather"
) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        ],
    }


def conversation() -> list[dict[str, Any]]:
    """A two-step tool-use conversation as the API would see it (minimal fields)."""
    return [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Paris?"},
        assistant_call(),
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        {"role": "assistant", "content": "It is 18C and sunny in Paris."},
        {"role": "user", "content": "And tomorrow?"},
    ]


def same(a: Any, b: Any) -> bool:
    return canonical_message(a) == canonical_message(b) and chain_hash("", a) == chain_hash("", b)


# -- absent vs null, response-only fields ---------------------------------------------------------


def test_absent_and_null_fields_are_the_same_message() -> None:
    bare = {"role": "assistant", "content": "hi"}
    nulls = {
        "role": "assistant",
        "content": "hi",
        "name": None,
        "tool_calls": None,
        "function_call": None,
        "tool_call_id": None,
        "refusal": None,
        "audio": None,
        "annotations": None,
    }
    assert same(bare, nulls)
    assert canonical_message(nulls) == {"role": "assistant", "content": "hi"}


def test_empty_tool_calls_list_is_no_tool_calls() -> None:
    assert same(
        {"role": "assistant", "content": "x", "tool_calls": []},
        {"role": "assistant", "content": "x"},
    )


def test_refusal_annotations_and_audio_are_dropped_even_with_values() -> None:
    bare = {"role": "assistant", "content": "See the docs."}
    echoed = {
        **bare,
        "refusal": None,
        "annotations": [
            {
                "type": "url_citation",
                "url_citation": {
                    "start_index": 0,
                    "end_index": 3,
                    "title": "Docs",
                    "url": "https://x.test",
                },
            }
        ],
        "audio": {"id": "audio_1", "data": "AAAA", "expires_at": 1, "transcript": "See the docs."},
        "reasoning_content": "thinking...",
    }
    assert same(bare, echoed)


def test_sdk_model_dump_variants_hash_like_the_raw_api_message() -> None:
    raw = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "annotations": [],
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "weather", "arguments": ARGS},
            },
            {"id": "call_b", "type": "function", "function": {"name": "clock", "arguments": "{}"}},
        ],
    }
    message = ChatCompletionMessage.model_validate(raw)
    for dumped in (
        message.model_dump(),
        message.model_dump(exclude_none=True),
        message.model_dump(exclude_unset=True),
        json.loads(message.model_dump_json()),
        message.to_dict(),
    ):
        assert same(dumped, raw), dumped
    # and the dump really carries the extra fields this test is about
    assert {"refusal", "annotations", "audio", "function_call"} <= message.model_dump().keys()


# -- content ------------------------------------------------------------------------------------------


def test_content_string_equals_list_of_text_parts() -> None:
    as_text = {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"}
    as_parts = {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": [{"type": "text", "text": "18C, sunny"}],
    }
    split_parts = {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": [{"type": "text", "text": "18C, "}, {"type": "text", "text": "sunny"}],
    }
    assert same(as_text, as_parts)
    assert same(as_text, split_parts)


def test_empty_content_equals_null_and_absent() -> None:
    calls = assistant_call()
    empty_contents: tuple[Any, ...] = ("", None, [])
    for content in empty_contents:
        assert same(
            {**calls, "content": content}, {k: v for k, v in calls.items() if k != "content"}
        )
    assert canonical_content("") is None
    assert canonical_content([{"type": "text", "text": ""}]) is None


def test_non_text_parts_are_kept_and_matter() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": None}}
    with_image: dict[str, Any] = {
        "role": "user",
        "content": [{"type": "text", "text": "what is this?"}, image],
    }
    text_only = {"role": "user", "content": "what is this?"}
    assert not same(with_image, text_only)
    assert canonical_content(with_image["content"]) == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
    ]
    other_image = copy.deepcopy(with_image)
    other_image["content"][1]["image_url"]["url"] = "https://x.test/b.png"
    assert not same(with_image, other_image)


def test_different_content_is_a_different_message() -> None:
    assert not same({"role": "user", "content": "a"}, {"role": "user", "content": "b"})
    assert not same({"role": "user", "content": "a"}, {"role": "assistant", "content": "a"})


# -- arguments ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "echoed",
    [
        json.dumps(json.loads(ARGS), indent=2),
        json.dumps(json.loads(ARGS), separators=(",", ":")),
        json.dumps(dict(reversed(list(json.loads(ARGS).items())))),
        json.dumps(json.loads(ARGS), sort_keys=True, indent="\t"),
        "  \n" + ARGS + "\n ",
        json.loads(ARGS),  # an object instead of the JSON string
    ],
    ids=["indent", "compact", "reordered", "sorted-tabs", "padded", "object"],
)
def test_reserialized_arguments_are_the_same_call(echoed: Any) -> None:
    assert same(assistant_call(arguments=ARGS), assistant_call(arguments=echoed))


def test_nested_key_order_does_not_matter() -> None:
    a = '{"outer": {"b": 1, "a": [{"y": 2, "x": 1}]}}'
    b = '{"outer": {"a": [{"x": 1, "y": 2}], "b": 1}}'
    assert (
        canonical_arguments(a) == canonical_arguments(b) == '{"outer":{"a":[{"x":1,"y":2}],"b":1}}'
    )


def test_unicode_arguments_escaped_or_not_are_the_same() -> None:
    value = {"city": "Zürich", "note": "日本"}
    assert canonical_arguments(json.dumps(value)) == canonical_arguments(
        json.dumps(value, ensure_ascii=False)
    )


def test_different_argument_values_are_different_calls() -> None:
    assert not same(
        assistant_call(arguments='{"city": "Paris"}'), assistant_call(arguments='{"city": "Rome"}')
    )
    assert not same(assistant_call(arguments='{"n": 1}'), assistant_call(arguments='{"n": "1"}'))


def test_invalid_json_arguments_are_kept_stripped() -> None:
    assert canonical_arguments('  {"city": "Par') == '{"city": "Par'
    assert same(
        assistant_call(arguments='{"city": "Par'), assistant_call(arguments=' {"city": "Par ')
    )


def test_absent_null_and_empty_arguments_are_the_same_call() -> None:
    """A no-argument call: the API sends "{}", some clients echo "" or null or drop the field."""
    empty_object = assistant_call(arguments="{}")
    no_arguments: tuple[Any, ...] = ("", None, {}, "  ")
    for arguments in no_arguments:
        assert same(empty_object, assistant_call(arguments=arguments)), arguments
    no_field = assistant_call()
    del no_field["tool_calls"][0]["function"]["arguments"]
    assert same(empty_object, no_field)


def test_legacy_function_call_arguments_are_canonical() -> None:
    a = {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "f", "arguments": '{"b": 1, "a": 2}'},
    }
    b = {"role": "assistant", "function_call": {"name": "f", "arguments": {"a": 2, "b": 1}}}
    assert same(a, b)
    assert canonical_message(a)["function_call"] == {"name": "f", "arguments": '{"a":2,"b":1}'}


# -- roles, names, tool-call ids ------------------------------------------------------------------------


def test_developer_is_system() -> None:
    assert same(
        {"role": "developer", "content": "Be brief."}, {"role": "system", "content": "Be brief."}
    )
    assert not same(
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Be brief."}
    )


def test_name_is_kept() -> None:
    assert not same(
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "user", "content": "hi", "name": "bob"},
    )
    assert same({"role": "user", "content": "hi", "name": ""}, {"role": "user", "content": "hi"})


def test_tool_call_ids_are_kept_and_significant() -> None:
    assert canonical_message(assistant_call("call_xyz"))["tool_calls"][0]["id"] == "call_xyz"
    assert not same(assistant_call("call_1"), assistant_call("call_2"))
    result_1 = {"role": "tool", "tool_call_id": "call_1", "content": "ok"}
    result_2 = {"role": "tool", "tool_call_id": "call_2", "content": "ok"}
    assert not same(result_1, result_2)


def test_stream_index_and_default_type_do_not_matter() -> None:
    streamed = assistant_call()
    streamed["tool_calls"][0]["index"] = 0
    no_type = assistant_call()
    del no_type["tool_calls"][0]["type"]
    assert same(assistant_call(), streamed)
    assert same(assistant_call(), no_type)


def test_parallel_call_order_matters() -> None:
    first = {"id": "call_a", "type": "function", "function": {"name": "a", "arguments": "{}"}}
    second = {"id": "call_b", "type": "function", "function": {"name": "b", "arguments": "{}"}}
    ab = {"role": "assistant", "tool_calls": [first, second]}
    ba = {"role": "assistant", "tool_calls": [second, first]}
    assert not same(ab, ba)


def test_custom_tool_calls_keep_their_payload() -> None:
    call = {
        "id": "call_c",
        "type": "custom",
        "custom": {"name": "grep", "input": "foo"},
        "index": 0,
    }
    message: dict[str, Any] = {"role": "assistant", "tool_calls": [call]}
    assert canonical_message(message)["tool_calls"] == [
        {"id": "call_c", "type": "custom", "custom": {"name": "grep", "input": "foo"}}
    ]
    other = copy.deepcopy(message)
    other["tool_calls"][0]["custom"]["input"] = "bar"
    assert not same(message, other)


ODD_MESSAGES: list[Any] = [
    "just a string",
    42,
    None,
    {"content": "no role"},
    {"role": 7},
    {"role": "assistant", "tool_calls": ["x"]},
    {"role": "assistant", "function_call": "x"},
    {"role": "assistant", "tool_calls": [{"id": "c", "function": "f"}]},
    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": 3}}]},
    {"role": "assistant", "tool_calls": "abc"},
    {"role": "assistant", "tool_calls": {"a": 1}},
    {"role": "user", "content": 5},
    {"role": "user", "content": [1, "a", {"type": "text"}]},
    {"role": "user", "name": ["x"]},
]


@pytest.mark.parametrize("message", ODD_MESSAGES, ids=range(len(ODD_MESSAGES)))
def test_odd_input_never_raises(message: Any) -> None:
    """Only `role` is validated before stitching, so any other shape must hash, deterministically."""
    first = prefix_hashes([message, {"role": "user", "content": "next"}])
    assert first == prefix_hashes([copy.deepcopy(message), {"role": "user", "content": "next"}])
    assert len(first) == 2


def test_lone_surrogates_hash() -> None:
    """JSON allows "\\ud83d" alone (half an emoji a client cut); json.loads gives a lone surrogate."""
    message = json.loads('{"role": "user", "content": "broken \\ud83d emoji"}')
    other = json.loads('{"role": "user", "content": "broken \\ud83e emoji"}')
    assert chain_hash("", message) == chain_hash("", copy.deepcopy(message))
    assert chain_hash("", message) != chain_hash("", other)
    call = assistant_call(arguments='{"q": "\\udc00"}')
    assert len(prefix_hashes([message, call])) == 2


def test_odd_messages_hash_apart_and_only_assistant_dicts_are_candidates() -> None:
    hashes = prefix_hashes(ODD_MESSAGES)
    assert len(set(hashes)) == len(ODD_MESSAGES)
    assert canonical_message("just a string") == {"invalid": "just a string"}
    assistants = [
        i
        for i, m in enumerate(ODD_MESSAGES)
        if isinstance(m, dict) and m.get("role") == "assistant"
    ]
    assert continuation_candidates(ODD_MESSAGES, hashes) == [
        hashes[i] for i in reversed(assistants)
    ]
    assert not same(
        {"role": "assistant", "tool_calls": "abc"}, {"role": "assistant", "tool_calls": "abd"}
    )


# -- rolling hash -------------------------------------------------------------------------------------


def test_prefix_hashes_are_a_rolling_chain() -> None:
    messages = conversation()
    hashes = prefix_hashes(messages)
    assert len(hashes) == len(messages)
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in hashes)
    assert len(set(hashes)) == len(hashes)
    previous = ""
    for message, expected in zip(messages, hashes, strict=True):
        previous = chain_hash(previous, message)
        assert previous == expected
    assert prefix_hashes([]) == []


def test_every_prefix_hashes_as_the_prefix_of_the_whole() -> None:
    messages = conversation()
    full = prefix_hashes(messages)
    for k in range(len(messages) + 1):
        assert prefix_hashes(messages[:k]) == full[:k]


def test_state_of_an_exchange_is_the_prefix_hash_of_the_next_request() -> None:
    """What stitching relies on: chain(request hash, response) == hash of request + response."""
    messages = conversation()
    request, response = messages[:2], messages[2]
    state = chain_hash(prefix_hashes(request)[-1], response)
    assert prefix_hashes(messages)[2] == state
    assert state in continuation_candidates(messages, prefix_hashes(messages))


def test_hash_depends_on_order_and_every_message() -> None:
    messages = conversation()
    base = prefix_hashes(messages)[-1]
    swapped = [messages[1], messages[0], *messages[2:]]
    assert prefix_hashes(swapped)[-1] != base
    for i in range(len(messages)):
        changed = copy.deepcopy(messages)
        changed[i]["content"] = "changed"
        assert prefix_hashes(changed)[-1] != base, i


def test_echoed_conversation_hashes_like_the_original() -> None:
    """The same conversation as a client that echoes SDK objects and re-serializes would send it."""
    original = conversation()
    echoed = copy.deepcopy(original)
    echoed[0]["role"] = "developer"
    echoed[1]["content"] = [{"type": "text", "text": "Weather in Paris?"}]
    echoed[2] = ChatCompletionMessage.model_validate(
        {**original[2], "refusal": None, "annotations": []}
    ).model_dump()
    echoed[2]["tool_calls"][0]["function"]["arguments"] = json.dumps(json.loads(ARGS), indent=2)
    echoed[3]["content"] = [{"type": "text", "text": "18C, sunny"}]
    echoed[4] = {
        **original[4],
        "refusal": None,
        "annotations": [],
        "audio": None,
        "function_call": None,
    }
    assert prefix_hashes(echoed) == prefix_hashes(original)


def test_continuation_candidates_are_assistant_prefixes_longest_first() -> None:
    messages = conversation()
    hashes = prefix_hashes(messages)
    assert continuation_candidates(messages, hashes) == [hashes[4], hashes[2]]
    assert continuation_candidates(messages[:2], hashes[:2]) == []
    ends_in_assistant = messages[:5]
    assert continuation_candidates(ends_in_assistant, hashes[:5])[0] == hashes[4]


def test_a_canonical_cache_gives_the_same_hashes_and_canonicalizes_a_resent_message_once() -> None:
    """An agent's history, resent at every step, hashes the same through the cache; each message
    is canonicalized once. What orjson cannot dump (a lone surrogate, an integer beyond 64 bits)
    is canonicalized each time, and a cache over its budget forgets the oldest."""
    canonicalized: list[Any] = []

    def counted(message: Any) -> bytes:
        canonicalized.append(message)
        return canonical_bytes(message)

    cache = CanonicalCache(counted)
    history: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    for step in range(5):
        history.append(assistant_call(f"call_{step}"))
        history.append({"role": "tool", "tool_call_id": f"call_{step}", "content": "sunny"})
        assert prefix_hashes(history, cache) == prefix_hashes(history)
    assert len(canonicalized) == len(history)  # each message once, whatever the step
    assert cache.hits == sum(1 + 2 * k for k in range(1, 5))  # step k resent 2k + 1 known

    odd = [
        json.loads('{"role": "user", "content": "broken \\ud83d emoji"}'),
        {"role": "user", "content": "big", "n": 2**70},
    ]
    for _ in range(2):
        assert prefix_hashes(odd, cache) == prefix_hashes(odd)
    assert canonicalized[-4:] == [*odd, *odd]

    first, second = history[1], history[3]
    sizes = [len(orjson.dumps(m)) + len(canonical_bytes(m)) for m in (first, second)]
    small = CanonicalCache(counted, limit_bytes=sum(sizes) - 1)  # room for one of them
    before = len(canonicalized)
    small(first), small(first), small(second), small(second), small(first)
    assert canonicalized[before:] == [first, second, first]


def test_a_sized_memo_keeps_to_its_budget_and_never_holds_an_entry_bigger_than_it() -> None:
    memo: SizedMemo[bytes, int] = SizedMemo(100)
    memo.put(b"a", 1, 60)
    memo.put(b"a", 1, 60)  # the same key again takes no more room
    memo.put(b"b", 2, 40)
    assert (memo.get(b"a"), memo.get(b"b"), len(memo)) == (1, 2, 2)
    memo.put(b"c", 3, 10)  # past the budget: emptied first
    assert (memo.get(b"a"), memo.get(b"b"), memo.get(b"c"), len(memo)) == (None, None, 3, 1)
    memo.put(b"huge", 4, 101)
    assert memo.get(b"huge") is None and memo.get(b"c") == 3
