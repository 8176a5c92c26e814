"""Responses API pure logic: stream assembly (`ResponsesStreamAssembler`), canonical items and
their rolling hash, rebuilding a `previous_response_id` history (`proxy.core.responses`).

The event streams are the fake upstream's real wire output, whose shapes are checked against the
`openai` SDK's own types; assembly is checked at every split point of the byte stream.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from proxy.core import responses as core
from proxy.core.sse import ResponsesStreamAssembler
from proxy.testing.fake_responses import build_response, response_events

EVENTS = TypeAdapter(ResponseStreamEvent)
TOOLS = [{"type": "function", "name": "get_weather"}, {"type": "function", "name": "find_museums"}]


def answer(
    text: str = "parallel Paris", *, reasoning: bool = True, tools: bool = True
) -> dict[str, Any]:
    """A whole `response` object as the fake upstream builds it (a text answer without tools,
    function calls with them: two for a text that says "parallel")."""
    body = {
        "model": "m",
        "input": text,
        "tools": TOOLS if tools else [],
        "include": ["reasoning.encrypted_content"],
    }
    items = [{"type": "message", "role": "user", "content": text}]
    return build_response(body, items, 1, reasoning)


def encode(events: list[dict[str, Any]]) -> bytes:
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()


def assemble(data: bytes, cuts: list[int] | None = None) -> ResponsesStreamAssembler:
    assembler = ResponsesStreamAssembler()
    points = [0, *(cuts or []), len(data)]
    for start, end in zip(points, points[1:], strict=False):
        assembler.feed(data[start:end])
    assembler.close()
    return assembler


# -- the fake's events are the SDK's events ------------------------------------------------------


@pytest.mark.parametrize(("text", "tools"), [("parallel Paris", True), ("Paris", False)])
def test_fake_events_and_response_validate_against_the_sdk_types(text: str, tools: bool) -> None:
    whole = answer(text, tools=tools)
    Response.model_validate(whole)
    for event in response_events(whole):
        EVENTS.validate_python(event)


# -- assembly ------------------------------------------------------------------------------------


def test_result_is_the_terminal_response() -> None:
    whole = answer()
    assembler = assemble(encode(response_events(whole)))
    assert assembler.done and assembler.error is None
    assert assembler.result() == whole
    assert assembler.last_sequence_number == len(response_events(whole)) - 1


@pytest.mark.parametrize("tools", [False, True])
def test_assembly_at_every_split_point(tools: bool) -> None:
    whole = answer("Paris", reasoning=False, tools=tools)
    data = encode(response_events(whole))
    for cut in range(1, len(data)):
        assert assemble(data, [cut]).result() == whole, cut


@pytest.mark.parametrize("seed", range(20))
def test_assembly_at_random_split_points(seed: int) -> None:
    whole = answer()
    data = encode(response_events(whole, empty_terminal=seed % 2 == 0))
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), 40))
    assert assemble(data, cuts).result()["output"] == whole["output"]


def test_empty_terminal_output_takes_the_done_items_by_output_index() -> None:
    whole = answer()
    events = response_events(whole, empty_terminal=True)
    done = [e for e in events if e["type"] == "response.output_item.done"]
    shuffled = [e for e in events if e not in done][:-1] + done[::-1] + [events[-1]]
    result = assemble(encode(shuffled)).result()
    assert result["output"] == whole["output"]
    assert result["usage"] == whole["usage"]


def test_encrypted_reasoning_comes_from_the_done_item() -> None:
    whole = answer()
    events = response_events(whole)
    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert "encrypted_content" not in added["item"]
    # A backend whose terminal output lacks the encrypted content: taken from `.done`.
    terminal = events[-1]["response"]
    stripped = [
        {k: v for k, v in i.items() if k != "encrypted_content"} for i in terminal["output"]
    ]
    events[-1] = {**events[-1], "response": {**terminal, "output": stripped}}
    result = assemble(encode(events)).result()
    assert result["output"][0]["encrypted_content"] == whole["output"][0]["encrypted_content"]


def test_a_stream_cut_short_keeps_partial_items() -> None:
    whole = answer("Paris", reasoning=False, tools=False)
    events = response_events(whole)
    cut = next(i for i, e in enumerate(events) if e["type"] == "response.output_text.done")
    assembler = assemble(encode(events[:cut]))
    assert not assembler.done
    result = assembler.result()
    assert result["status"] == "incomplete"
    [message] = result["output"]
    assert message["content"][0]["text"] == whole["output"][0]["content"][0]["text"]
    calls = answer("parallel Paris", reasoning=False)
    events = response_events(calls)
    cut = next(
        i for i, e in enumerate(events) if e["type"] == "response.function_call_arguments.done"
    )
    partial = assemble(encode(events[:cut])).result()["output"][0]
    assert partial["arguments"] == calls["output"][0]["arguments"]
    assert partial["status"] == "incomplete"


def test_error_event_ends_the_stream_as_an_error() -> None:
    events = response_events(answer())[:3]
    events.append(
        {
            "type": "error",
            "code": "server_error",
            "message": "boom",
            "param": None,
            "sequence_number": 3,
        }
    )
    assembler = assemble(encode(events))
    assert assembler.done
    assert assembler.error == {
        "error": {"message": "boom", "type": "error", "param": None, "code": "server_error"}
    }


def test_failed_and_incomplete_terminals() -> None:
    whole = answer()
    failed = {**whole, "status": "failed", "error": {"code": "server_error", "message": "x"}}
    assembler = assemble(
        encode([{"type": "response.failed", "response": failed, "sequence_number": 0}])
    )
    assert assembler.done and assembler.error == {"error": failed["error"]}
    cut = {**whole, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    assembler = assemble(
        encode([{"type": "response.incomplete", "response": cut, "sequence_number": 0}])
    )
    assert assembler.done and assembler.error is None
    assert assembler.result() == cut


def test_invalid_events_are_counted_not_fatal() -> None:
    assembler = assemble(b"data: {not json\n\ndata: [1]\n\n" + encode(response_events(answer())))
    assert assembler.invalid_events == 2
    assert assembler.done


# -- canonical items and hashing -----------------------------------------------------------------


def h(items: list[Any]) -> str:
    return core.prefix_hashes(items)[-1]


def test_echoed_fields_do_not_change_the_hash() -> None:
    sent = [
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "hi", "annotations": [], "logprobs": []}],
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "f",
            "arguments": '{"b": 1, "a": 2}',
            "status": "completed",
        },
    ]
    echoed = [
        {"role": "assistant", "content": "hi"},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"a":2,"b":1}'},
    ]
    assert h(sent) == h(echoed)


def test_call_id_and_content_change_the_hash() -> None:
    call = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
    assert h([call]) != h([{**call, "call_id": "call_2"}])
    assert h([{"role": "user", "content": "a"}]) != h([{"role": "user", "content": "b"}])


def test_input_string_is_one_user_message() -> None:
    assert core.input_items({"input": "hi"}) == [
        {"type": "message", "role": "user", "content": "hi"}
    ]
    assert h(core.input_items({"input": "hi"})) == h(
        [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
    )


def test_developer_is_system_and_reasoning_is_not_hashed() -> None:
    assert h([{"role": "developer", "content": "x"}]) == h([{"role": "system", "content": "x"}])
    user = {"role": "user", "content": "x"}
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"}
    assert h([user, reasoning]) == h([user])
    assert core.canonical_item({"type": "compaction", "encrypted_content": "a"}) == {
        "type": "compaction"
    }


def test_candidates_end_in_model_items_longest_first() -> None:
    items = [
        {"role": "user", "content": "q"},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "r"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
    ]
    hashes = core.prefix_hashes(items)
    assert core.continuation_candidates(items, hashes) == [hashes[3], hashes[1]]


def test_instructions_lead_the_conversation() -> None:
    body = {"instructions": "Be brief.", "input": "hi"}
    assert core.conversation_items(body, [{"role": "user", "content": "0"}]) == [
        {"type": "message", "role": "system", "content": "Be brief."},
        {"role": "user", "content": "0"},
        {"type": "message", "role": "user", "content": "hi"},
    ]


def test_item_references_resolve_through_known_items() -> None:
    known = core.items_by_id(
        [{"type": "message", "id": "msg_1", "role": "assistant", "content": "a"}]
    )
    items, unresolved = core.resolve_references(
        [{"type": "item_reference", "id": "msg_1"}, {"type": "item_reference", "id": "msg_2"}],
        known,
    )
    assert items[0]["id"] == "msg_1" and items[1]["type"] == "item_reference"
    assert unresolved == 1


def test_rebuild_context_follows_previous_response_links_without_instructions() -> None:
    first = {
        "request": {"instructions": "old", "input": "q1"},
        "response": {"output": [{"role": "assistant", "content": "a1"}]},
        "parent_id": None,
    }
    second = {
        "request": {"instructions": "new", "previous_response_id": "r1", "input": "q2"},
        "response": {"output": [{"role": "assistant", "content": "a2"}]},
        "parent_id": "e1",
    }
    third = {
        "request": {"previous_response_id": "r2", "input": "q3"},
        "response": None,
        "parent_id": "e2",
    }
    recorded = {"e1": first, "e2": second, "e3": third}
    context, truncated = core.rebuild_context(recorded, "e3")
    assert not truncated
    assert [i.get("content") for i in context] == ["q1", "a1", "q2", "a2"]
    orphan = {
        "request": {"previous_response_id": "r0", "input": "q"},
        "response": None,
        "parent_id": None,
    }
    assert core.rebuild_context({"e9": orphan}, "e9") == ([], True)


def test_teacher_request_has_no_issuer_state() -> None:
    body = {
        "model": "m",
        "previous_response_id": "r",
        "store": True,
        "instructions": "i",
        "input": "x",
    }
    items = [
        {"role": "user", "content": "q"},
        {"type": "reasoning", "id": "rs", "summary": [], "encrypted_content": "e"},
        {"type": "item_reference", "id": "msg_9"},
        {"type": "compaction", "encrypted_content": "c"},
        {"role": "assistant", "content": "a"},
    ]
    request = core.teacher_request(body, items)
    assert request == {
        "model": "m",
        "instructions": "i",
        "input": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
