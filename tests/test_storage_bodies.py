"""Request bodies cut into content-addressed parts and spliced back (`proxy.core.bodies`, pure)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from proxy.core.bodies import (
    RecentItems,
    ToolLists,
    blob_hash,
    refs_for,
    remembered,
    splice_request,
    split_request,
)
from tests.support.shapes import IMAGE, SHAPES, TOOLS  # noqa: E402,F401


def roundtrip(text: str, kind: str | None = None) -> str:
    split = split_request(text, kind)
    _, refs = refs_for(split, None)
    items = [split.blobs[h] for h in split.item_hashes] if "items" in refs else None
    tools = split.blobs[split.tools_hash] if split.tools_hash else None
    return splice_request(split.options_json, refs, items, tools)


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_a_request_is_rebuilt_json_equal_with_the_same_key_order(
    name: str, ensure_ascii: bool
) -> None:
    body = SHAPES[name]
    sent = json.dumps(body, ensure_ascii=ensure_ascii, indent=None if ensure_ascii else 2)
    rebuilt = roundtrip(sent)
    assert json.loads(rebuilt) == json.loads(sent)
    assert list(json.loads(rebuilt)) == list(json.loads(sent))
    rebuilt.encode("utf-8")  # storable by any driver, lone surrogates escaped
    assert "\x00" not in rebuilt  # JSON escapes NUL: safe in PostgreSQL TEXT


def test_a_key_sent_twice_is_rebuilt_as_json_reads_it() -> None:
    sent = (
        '{"messages": [1], "model": "m", "messages": [{"role": "user"}], "tools": [], "tools": [2]}'
    )
    assert json.loads(roundtrip(sent)) == json.loads(sent)


def test_the_array_and_tools_leave_the_options_as_null_in_place() -> None:
    sent = json.dumps(SHAPES["tools first"])
    split = split_request(sent)
    assert json.loads(split.options_json) == {
        "tools": None,
        "model": "m",
        "messages": None,
        "tool_choice": "auto",
    }
    assert len(split.item_hashes) == 2 and split.tools_hash is not None
    assert split.blobs[split.tools_hash] == json.dumps(TOOLS)  # the span as sent
    for item_hash in split.item_hashes:
        assert item_hash == blob_hash(split.blobs[item_hash])


def test_parts_are_the_spans_sent_and_a_raw_lone_surrogate_is_escaped() -> None:
    sent = '{ "model" : "m" , "messages" : [ {"role": "user",  "content": "é"} , 1 ] }'
    split = split_request(sent)
    assert [split.blobs[h] for h in split.item_hashes] == ['{"role": "user",  "content": "é"}', "1"]
    assert split.options_json == '{ "model" : "m" , "messages" : null }'
    raw = json.dumps(SHAPES["lone surrogate kept"], ensure_ascii=False)  # no UTF-8 can carry it
    split = split_request(raw)
    assert all(text.isascii() for text in split.blobs.values())
    assert json.loads(split.blobs[split.item_hashes[0]])["content"] == "x\udc80y"


@pytest.mark.parametrize(
    "text", ["", "not json", "[1, 2]", '"a string"', "null", '{"model": ', "1e999999"]
)
def test_a_body_that_is_not_an_object_stays_whole(text: str) -> None:
    split = split_request(text)
    assert split.options_json == text and split.blobs == {}
    assert refs_for(split, None) == (False, {})
    assert splice_request(split.options_json, {}, None, None) == text


def test_responses_input_items_are_cut_and_a_string_input_stays_in_the_options() -> None:
    items = {"model": "gpt-5", "input": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    split = split_request(json.dumps(items), "responses")
    assert len(split.item_hashes) == 1 and split.array_field == "input"
    assert json.loads(roundtrip(json.dumps(items), "responses")) == items
    text = {"model": "gpt-5", "input": "just a prompt", "instructions": "be brief"}
    split = split_request(json.dumps(text), "responses")
    assert split.item_hashes == [] and split.array_field is None
    assert json.loads(split.options_json) == text
    # A chat body read as responses keeps its messages whole in the options, and vice versa.
    assert split_request(json.dumps(SHAPES["plain"]), "responses").item_hashes == []


def test_a_continuing_request_references_only_its_new_items() -> None:
    history = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}]
    parent = split_request(json.dumps({"model": "m", "messages": history, "tools": TOOLS}))
    grown = [
        *history,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    child = split_request(json.dumps({"model": "m", "messages": grown, "tools": TOOLS}))
    uses_base, refs = refs_for(child, remembered(parent))
    assert uses_base and refs["items"] == child.item_hashes[2:]
    assert refs["tools"] == parent.tools_hash
    # A request that edits the history does not continue: full list.
    edited = [{"role": "system", "content": "other"}, *grown[1:]]
    other = split_request(json.dumps({"model": "m", "messages": edited}))
    assert refs_for(other, remembered(parent)) == (
        False,
        {"at": other.items_at, "items": other.item_hashes},
    )
    # Shorter than the parent, or the parent had no items: full list.
    short = split_request(json.dumps({"model": "m", "messages": history[:1]}))
    assert refs_for(short, remembered(parent))[0] is False
    empty = split_request(json.dumps({"model": "m", "messages": []}))
    assert refs_for(child, remembered(empty))[0] is False


def split_both_ways(text: str, parent: Any, kind: str | None = None) -> Any:
    """`split_request` of `text` against `parent` (its base) and whole; assert both give the
    same references, options and `remembered` entry; return the one against the base."""
    whole = split_request(text, kind)
    against = split_request(text, kind, parent, TOOL_LISTS)
    assert refs_for(against, parent) == refs_for(whole, parent)
    assert against.options_json == whole.options_json
    assert remembered(against) == remembered(whole)
    assert set(against.blobs) <= set(whole.blobs)
    if whole.tools_hash is not None:  # the tool list found as text or parsed: the same part
        assert against.blobs[whole.tools_hash] == whole.blobs[whole.tools_hash]
    return against


TOOL_LISTS = ToolLists(capacity=4)


@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_a_step_that_starts_with_its_parents_items_text_parses_only_its_new_items(
    kind: str,
) -> None:
    field = "messages" if kind == "chat" else "input"
    history: list[Any] = [
        {"role": "system", "content": "sys é 😀"},
        {"role": "user", "content": "q"},
    ]
    parent = remembered(split_request(json.dumps({"model": "m", field: history}), kind))
    steps = [
        [{"role": "assistant", "content": None}, {"role": "tool", "content": "42"}],
        [{"role": "assistant", "content": "done"}],
        [],  # a retry: the same items
    ]
    for new in steps:
        history = [*history, *new]
        body = {"model": "m", field: history, "tools": TOOLS}
        child = split_both_ways(json.dumps(body), parent, kind)
        assert child.base is parent  # its items were not parsed again
        assert [child.blobs[h] for h in child.item_hashes] == [json.dumps(m) for m in new]
        uses_base, refs = refs_for(child, parent)
        assert uses_base and len(refs["items"]) == len(new)
        parent = remembered(child)
    # The same history re-sent with other whitespace: parsed whole, still continues its parent.
    spaced = f'{{"model": "m", "{field}": [' + ",\n  ".join(map(json.dumps, history)) + "]}"
    child = split_both_ways(spaced, parent, kind)
    assert child.base is None and refs_for(child, parent)[0] is True


def test_a_step_whose_history_differs_from_its_parents_is_split_whole() -> None:
    parent = remembered(split_request('{"messages": [{"role": "user", "content": "a"}, 1]}'))
    for text in (
        '{"messages": [{"role": "user", "content": "b"}, 1]}',  # edited
        '{"messages": [{"role": "user", "content": "a"}, 12]}',  # a number that goes on
        '{"messages": [{"role": "user", "content": "a"}, 1 ]}',  # the same items, a space
        '{"messages": [{"role": "user", "content": "a"}]}',  # shorter
        '{"input": [{"role": "user", "content": "a"}, 1]}',  # another field
        '{"messages": [{"role": "user", "content": "a"}, 1, }',  # broken after the prefix
    ):
        child = split_both_ways(text, parent)
        assert child.base is None or text.endswith("1 ]}"), text


def test_splitting_against_a_base_agrees_with_splitting_whole_on_random_conversations() -> None:
    rng = random.Random(13)
    values: list[Any] = [1, 12, -0.5, "x", "1", True, None, [], {}, {"role": "user"}, [1, [2]]]
    resumed = {True: 0, False: 0}
    for _ in range(300):
        items: list[Any] = []
        parent = None
        for _step in range(6):
            items = items + [rng.choice(values) for _ in range(rng.randint(0, 3))]
            if rng.random() < 0.2 and items:  # an edit, a number that grows, a swap
                items[rng.randrange(len(items))] = rng.choice(values)
            gap = rng.choice([",", ", ", " ,\n"])
            text = '{"model": "m", "messages": [' + gap.join(map(json.dumps, items)) + "]}"
            split = split_both_ways(text, parent)
            resumed[split.base is not None] += 1
            parent = remembered(split)
    assert min(resumed.values()) > 200  # both paths taken many times


def test_a_tool_list_sent_before_is_found_as_text_and_only_that_one() -> None:
    tool_lists = ToolLists(capacity=2)
    lists = [json.dumps(TOOLS), "[1]", "[]", '[{"type": "function"}]']
    for tools in lists:
        body = '{"model": "m", "tools": ' + tools + ', "messages": [{"role": "user"}]}'
        first = split_request(body, None, None, tool_lists)
        assert tool_lists.find(body, body.index("[")) == (tools, first.tools_hash)
        again = split_request(body, None, None, tool_lists)
        assert again == first and again.blobs[again.tools_hash] == tools
    assert tool_lists.find(json.dumps(TOOLS), 0) is None  # forgotten: capacity 2
    # A value that merely starts like a known list is another list: parsed. Text after a known
    # list that is not JSON: the body is kept whole, as without the list known.
    tool_lists = ToolLists()
    tool_lists.add("[1]", blob_hash("[1]"))
    for other, known in (("[1, 2]", False), ("[ 1]", False), ("[1]]", True)):
        text = '{"tools": ' + other + "}"
        assert (tool_lists.find(text, 10) is not None) is known
        with_list = split_request(text, None, None, tool_lists)
        assert with_list == split_request(text)


def test_splicing_refuses_options_that_do_not_match_their_references() -> None:
    split = split_request(json.dumps(SHAPES["plain"]))
    _, refs = refs_for(split, None)
    with pytest.raises(ValueError, match="missing"):
        splice_request(split.options_json, refs, None, None)
    with pytest.raises(ValueError, match="do not match"):
        splice_request(split.options_json, {**refs, "at": 1}, ["{}"], None)


def test_recent_items_keep_the_latest_entries_only() -> None:
    recent = RecentItems(capacity=2)
    entry = remembered(split_request(json.dumps(SHAPES["plain"])))
    assert entry is not None
    for exchange_id in ("a", "b"):
        recent.put(exchange_id, entry)
    assert recent.get("a") == entry  # now the most recent
    recent.put("c", entry)
    assert recent.get("b") is None and recent.get("a") == entry and len(recent) == 2
    assert recent.get(None) is None


def test_random_bodies_round_trip() -> None:
    rng = random.Random(13)
    alphabet = ["a", "é", "\x00", "\n", '"', "\\", "🙂", "\u2028", "\ud800", " "]

    def value(depth: int) -> Any:
        kind = rng.randrange(7 if depth < 4 else 4)
        if kind == 0:
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
        if kind == 1:
            return rng.choice([0, -1, 2**70, 1.5, -0.25, True, False, None])
        if kind == 2:
            return rng.random()
        if kind == 3:
            return ""
        if kind == 4:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {f"k{rng.randrange(9)}": value(depth + 1) for _ in range(rng.randrange(4))}

    for _ in range(300):
        body = {f"o{rng.randrange(5)}": value(1) for _ in range(rng.randrange(4))}
        body["messages"] = [value(1) for _ in range(rng.randrange(5))]
        if rng.random() < 0.5:
            body["tools"] = [value(2) for _ in range(rng.randrange(3))]
        sent = json.dumps(body, ensure_ascii=rng.random() < 0.5)
        assert json.loads(roundtrip(sent)) == json.loads(sent)
