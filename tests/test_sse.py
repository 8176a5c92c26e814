"""SSE parsing and stream assembly (`proxy.core.sse`): pure units, no I/O.

Parser: events split across arbitrary byte boundaries (every boundary and random ones), CRLF,
comments, multi-line data, fields without a space or value, UTF-8 split mid-character, a last
event without a blank line, and cost linear in the size of one large read. Assembler: content, refusal, tool-call arguments split across chunks,
parallel calls keyed by `index` (interleaved), the usage chunk, `finish_reason`, `[DONE]`, error
events, several choices, logprobs; checked against hand-written expectations, against the
fake upstream's real wire output, and against the `openai` SDK's own accumulator.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from proxy.core.sse import (
    CHAT_TERMINAL_MARKERS,
    RESPONSES_TERMINAL_MARKERS,
    DeferredAssembly,
    ResponsesStreamAssembler,
    SSEParser,
    StreamAssembler,
)
from proxy.testing.fake_openai import _stream_chunks, plan_message
from tests.support.scripted import LONG_TOOL_ARGUMENTS, long_tool_sse_events


def chunk(
    delta: dict[str, Any] | None = None,
    *,
    index: int = 0,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    choices: list[dict[str, Any]] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """A `chat.completion.chunk` with one choice (or `choices` as given)."""
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-4.1-mini-2025-04-14",
        "system_fingerprint": "fp_1",
        **top,
    }
    if choices is None:
        choices = [
            {"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
        ]
    body["choices"] = choices
    if usage is not None:
        body["usage"] = usage
    return body


def sse(events: list[Any], *, newline: str = "\n") -> bytes:
    """Encode chunks (dicts) and raw payloads (str, e.g. "[DONE]") as an SSE byte stream."""
    out = []
    for event in events:
        payload = event if isinstance(event, str) else json.dumps(event)
        out.append(f"data: {payload}{newline}{newline}")
    return "".join(out).encode()


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def parse_all(parts: list[bytes]) -> list[str]:
    parser = SSEParser()
    out: list[str] = []
    for part in parts:
        out.extend(parser.feed(part))
    out.extend(parser.close())
    return out


def assemble(data: bytes | list[bytes]) -> StreamAssembler:
    assembler = StreamAssembler()
    for part in [data] if isinstance(data, bytes) else data:
        assembler.feed(part)
    assembler.close()
    return assembler


USAGE = {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}
WEATHER_ARGS = '{"city": "Paris", "days": 3}'
CLOCK_ARGS = '{"timezone": "Europe/Paris"}'


def parallel_tool_stream() -> list[Any]:
    """Two parallel calls whose argument pieces interleave, then finish, usage chunk and [DONE]."""
    return [
        chunk({"role": "assistant", "content": None, "refusal": None}, usage=None),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_w",
                        "type": "function",
                        "function": {"name": "weather", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": WEATHER_ARGS[:9]}}]}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_c",
                        "type": "function",
                        "function": {"name": "clock", "arguments": CLOCK_ARGS[:5]},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": WEATHER_ARGS[9:]}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": CLOCK_ARGS[5:]}}]}),
        chunk({}, finish="tool_calls"),
        chunk(choices=[], usage=USAGE),
        "[DONE]",
    ]


EXPECTED_PARALLEL_MESSAGE = {
    "role": "assistant",
    "content": None,
    "refusal": None,
    "tool_calls": [
        {
            "id": "call_w",
            "type": "function",
            "function": {"name": "weather", "arguments": WEATHER_ARGS},
        },
        {
            "id": "call_c",
            "type": "function",
            "function": {"name": "clock", "arguments": CLOCK_ARGS},
        },
    ],
}


# -- parser ---------------------------------------------------------------------------------------


def test_parser_yields_each_event_data() -> None:
    assert parse_all([b"data: one\n\ndata: two\n\n"]) == ["one", "two"]


def test_parser_keeps_an_event_until_its_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: one\n") == []
    assert parser.feed(b"\n") == ["one"]
    assert parser.feed(b"data: tw") == []
    assert parser.feed(b"o\n\n") == ["two"]


def test_parser_crlf_and_comments_and_multiline_data() -> None:
    data = (
        b": keep-alive\r\n\r\n"
        b"data: first line\r\n"
        b"data: second line\r\n"
        b": a comment inside an event\r\n"
        b"\r\n"
        b":ping\n\n"
        b"data:no-space\n\n"
        b"data\n\n"
        b"event: message\nid: 7\nretry: 1000\ndata:  two spaces\n\n"
    )
    parser = SSEParser()
    assert parser.feed(data) == ["first line\nsecond line", "no-space", "", " two spaces"]
    assert parser.event_names == ["message"]


def test_parser_skips_events_without_data() -> None:
    assert parse_all([b"event: ping\n\nid: 3\n\ndata: x\n\n"]) == ["x"]


def test_parser_close_flushes_an_unterminated_last_event() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n\ndata: last") == ["a"]
    assert parser.close() == ["last"]
    assert SSEParser().close() == []


def test_parser_utf8_split_inside_a_character() -> None:
    data = "data: café 日本\n\n".encode()
    split_at = data.index("é".encode()) + 1  # between the two bytes of é
    assert parse_all([data[:split_at], data[split_at:]]) == ["café 日本"]
    assert parse_all([data[i : i + 1] for i in range(len(data))]) == ["café 日本"]


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_parser_every_single_split_point(newline: str) -> None:
    data = sse(parallel_tool_stream(), newline=newline)
    whole = parse_all([data])
    assert len(whole) == 9 and whole[-1] == "[DONE]"
    for cut in range(1, len(data)):
        assert parse_all(pieces(data, [cut])) == whole, cut


@pytest.mark.parametrize("seed", range(25))
def test_parser_random_split_points(seed: int) -> None:
    rng = random.Random(seed)
    newline = rng.choice(["\n", "\r\n"])
    data = sse(parallel_tool_stream(), newline=newline) + b": trailing comment\n\n"
    cuts = [rng.randrange(1, len(data)) for _ in range(rng.randrange(1, 60))]
    assert parse_all(pieces(data, cuts)) == parse_all([data])


def test_parser_is_linear_in_a_large_read() -> None:
    """A fast upstream can hand over megabytes in one read: parsing it whole must cost about what
    parsing it in small reads costs (a parser that re-copies its buffer per line is quadratic)."""
    event = sse([chunk({"content": "abcde"})])
    data = event * 40_000  # about 5 MB
    start = time.perf_counter()
    whole = SSEParser().feed(data)
    one_read = time.perf_counter() - start
    start = time.perf_counter()
    parser = SSEParser()
    pieces_parsed = [p for i in range(0, len(data), 4096) for p in parser.feed(data[i : i + 4096])]
    small_reads = time.perf_counter() - start
    assert len(whole) == 40_000
    assert pieces_parsed == whole
    assert one_read < 5 * small_reads + 0.5, (one_read, small_reads)


# -- assembler ------------------------------------------------------------------------------------


def test_assembles_parallel_tool_calls_split_across_chunks() -> None:
    assembler = assemble(sse(parallel_tool_stream()))
    result = assembler.result()
    assert assembler.done
    assert assembler.error is None
    assert assembler.chunks == 8
    assert result["object"] == "chat.completion"
    assert result["id"] == "chatcmpl-1"
    assert result["model"] == "gpt-4.1-mini-2025-04-14"
    assert result["created"] == 1_700_000_000
    assert result["system_fingerprint"] == "fp_1"
    assert result["usage"] == USAGE
    assert result["choices"] == [
        {
            "index": 0,
            "message": EXPECTED_PARALLEL_MESSAGE,
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ]


@pytest.mark.parametrize("seed", range(40))
def test_assembly_does_not_depend_on_split_points(seed: int) -> None:
    rng = random.Random(1000 + seed)
    data = sse(parallel_tool_stream(), newline=rng.choice(["\n", "\r\n"]))
    cuts = [rng.randrange(1, len(data)) for _ in range(rng.randrange(1, 80))]
    assert assemble(pieces(data, cuts)).result() == assemble(data).result()


def test_calls_keyed_by_index_not_by_arrival_order() -> None:
    """Index 1 starts before index 0: the calls still come out in index order."""
    events = [
        chunk({"role": "assistant"}),
        chunk(
            {
                "tool_calls": [
                    {"index": 1, "id": "call_b", "function": {"name": "b", "arguments": '{"x"'}}
                ]
            }
        ),
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_a", "function": {"name": "a", "arguments": "{}"}}
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": ": 1}"}}]}),
        chunk({}, finish="tool_calls"),
        "[DONE]",
    ]
    calls = assemble(sse(events)).result()["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_a", "a", "{}"),
        ("call_b", "b", '{"x": 1}'),
    ]
    assert all(c["type"] == "function" for c in calls)


def test_several_calls_in_one_delta() -> None:
    events = [
        chunk(
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "a", "arguments": "{"},
                    },
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "b", "arguments": "{"},
                    },
                ],
            }
        ),
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "function": {"arguments": "}"}},
                    {"index": 1, "function": {"arguments": "}"}},
                ]
            }
        ),
        chunk({}, finish="tool_calls"),
        "[DONE]",
    ]
    calls = assemble(sse(events)).result()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == ["{}", "{}"]
    assert [c["id"] for c in calls] == ["call_a", "call_b"]


def test_text_content_finish_reason_and_done() -> None:
    words = ["Hel", "lo, ", "wor", "ld", "!"]
    events: list[Any] = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": w}) for w in words]
    events += [chunk({}, finish="stop"), "[DONE]"]
    assembler = StreamAssembler()
    assembler.feed(sse(events[:-1]))
    assert not assembler.done
    assembler.feed(sse(events[-1:]))
    assert assembler.done
    result = assembler.result()
    message = result["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hello, world!", "refusal": None}
    assert result["choices"][0]["finish_reason"] == "stop"
    assert result["usage"] is None


def test_refusal_is_concatenated() -> None:
    events = [
        chunk({"role": "assistant", "content": None, "refusal": ""}),
        chunk({"refusal": "I can't "}),
        chunk({"refusal": "help with that."}),
        chunk({}, finish="stop"),
        "[DONE]",
    ]
    message = assemble(sse(events)).result()["choices"][0]["message"]
    assert message["refusal"] == "I can't help with that."
    assert message["content"] is None


def test_usage_chunk_with_empty_choices_and_null_usage_on_others() -> None:
    events: list[Any] = [
        chunk({"role": "assistant", "content": "hi"}, usage=None),
        chunk({}, finish="stop"),
        chunk(choices=[], usage=USAGE),
        "[DONE]",
    ]
    events[1]["usage"] = None
    result = assemble(sse(events)).result()
    assert result["usage"] == USAGE
    assert result["choices"][0]["message"]["content"] == "hi"
    assert len(result["choices"]) == 1


def test_error_event_is_kept_apart() -> None:
    error = {
        "error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}
    }
    assembler = assemble(sse([chunk({"role": "assistant", "content": "par"}), error]))
    assert assembler.error == error
    assert assembler.chunks == 1
    assert not assembler.done
    assert assembler.result()["choices"][0]["message"]["content"] == "par"


def test_invalid_events_are_counted_not_fatal() -> None:
    assembler = assemble(sse(["not json", "[1, 2]", chunk({"content": "ok"}), "[DONE]"]))
    assert assembler.invalid_events == 2
    assert assembler.chunks == 1
    assert assembler.result()["choices"][0]["message"]["content"] == "ok"


def test_stream_without_trailing_blank_line_needs_close() -> None:
    data = sse([chunk({"role": "assistant", "content": "a"})]) + b"data: [DONE]"
    assembler = StreamAssembler()
    assembler.feed(data)
    assert not assembler.done
    assembler.close()
    assert assembler.done


def test_several_choices_and_logprobs() -> None:
    def lp(token: str) -> dict[str, Any]:
        return {
            "content": [{"token": token, "logprob": -0.1, "bytes": None, "top_logprobs": []}],
            "refusal": None,
        }

    events: list[Any] = [
        chunk(
            choices=[
                {
                    "index": 1,
                    "delta": {"role": "assistant", "content": "B"},
                    "logprobs": lp("B"),
                    "finish_reason": None,
                },
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "A"},
                    "logprobs": lp("A"),
                    "finish_reason": None,
                },
            ]
        ),
        chunk({"content": "a"}, index=0),
        chunk({"content": "b"}, index=1),
        chunk({}, index=0, finish="stop"),
        chunk({}, index=1, finish="length"),
        "[DONE]",
    ]
    events[1]["choices"][0]["logprobs"] = lp("a")
    choices = assemble(sse(events)).result()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["message"]["content"] for c in choices] == ["Aa", "Bb"]
    assert [c["finish_reason"] for c in choices] == ["stop", "length"]
    assert [t["token"] for t in choices[0]["logprobs"]["content"]] == ["A", "a"]
    assert [t["token"] for t in choices[1]["logprobs"]["content"]] == ["B"]


def test_provider_text_fields_and_legacy_function_call() -> None:
    events = [
        chunk({"role": "assistant", "reasoning_content": "think"}),
        chunk({"reasoning_content": "ing", "function_call": {"name": "f", "arguments": '{"a"'}}),
        chunk({"function_call": {"arguments": ": 1}"}}),
        chunk({}, finish="function_call"),
        "[DONE]",
    ]
    message = assemble(sse(events)).result()["choices"][0]["message"]
    assert message["reasoning_content"] == "thinking"
    assert message["function_call"] == {"name": "f", "arguments": '{"a": 1}'}


def test_a_legacy_function_call_in_many_pieces_and_one_not_an_object() -> None:
    pieces = ['{"path": "', *("a" for _ in range(5000)), '"}']
    events = [
        chunk({"role": "assistant", "function_call": {"name": "write", "arguments": ""}}),
        *(chunk({"function_call": {"arguments": piece}}) for piece in pieces),
        chunk({"function_call": {"name": "not the first name"}}, finish="function_call"),
        "[DONE]",
    ]
    message = assemble(sse(events)).result()["choices"][0]["message"]
    assert message["function_call"] == {"name": "write", "arguments": "".join(pieces)}
    # An upstream's malformed delta is kept as it came, never a crash of the record.
    odd = assemble(sse([chunk({"function_call": "f"}, finish="stop"), "[DONE]"]))
    assert odd.result()["choices"][0]["message"]["function_call"] == "f"


def test_later_null_top_level_fields_do_not_erase_earlier_values() -> None:
    events = [
        chunk({"role": "assistant", "content": "x"}, service_tier="default"),
        chunk({}, finish="stop", service_tier=None, system_fingerprint=None),
        "[DONE]",
    ]
    result = assemble(sse(events)).result()
    assert result["service_tier"] == "default"
    assert result["system_fingerprint"] == "fp_1"


# -- against real wire output and the SDK's own accumulator ---------------------------------------


def fake_stream(user_text: str, tools: list[str], *, usage: bool) -> tuple[bytes, dict[str, Any]]:
    """The fake upstream's SSE bytes for one request, and the message it planned."""
    body = {
        "messages": [{"role": "user", "content": user_text}],
        "tools": [{"type": "function", "function": {"name": n, "parameters": {}}} for n in tools],
    }
    message = plan_message(body, 7)
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    events: list[Any] = _stream_chunks(
        "chatcmpl-7", 1, "fake", message, finish, USAGE if usage else None
    )
    return sse([*events, "[DONE]"]), message


@pytest.mark.parametrize(
    ("user_text", "tools"),
    [("hello there", []), ("look it up", ["search"]), ("do both in parallel", ["search", "fetch"])],
    ids=["text", "one-call", "parallel"],
)
@pytest.mark.parametrize("usage", [True, False], ids=["usage", "no-usage"])
def test_fake_upstream_stream_assembles_to_the_planned_message(
    user_text: str, tools: list[str], usage: bool
) -> None:
    data, planned = fake_stream(user_text, tools, usage=usage)
    rng = random.Random(user_text)
    cuts = [rng.randrange(1, len(data)) for _ in range(30)]
    result = assemble(pieces(data, cuts)).result()
    message = result["choices"][0]["message"]
    assert (message["content"] or None) == planned["content"]
    assert message.get("tool_calls") == planned.get("tool_calls")
    assert result["usage"] == (USAGE if usage else None)
    if planned.get("tool_calls"):
        assert len(message["tool_calls"]) == (2 if "parallel" in user_text else 1)


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_openai_sdk_accumulator(seed: int) -> None:
    """The SDK's ChatCompletionStreamState is what `.stream()` clients echo back: agree with it."""
    events = parallel_tool_stream()
    if seed % 2:
        events = [
            chunk({"role": "assistant", "content": ""}),
            *[chunk({"content": w}) for w in ["Par", "is ", "is ", "sunny"]],
            chunk({}, finish="stop"),
            chunk(choices=[], usage=USAGE),
            "[DONE]",
        ]
    data = sse(events)
    rng = random.Random(seed)
    ours = assemble(pieces(data, [rng.randrange(1, len(data)) for _ in range(20)])).result()

    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for event in events:
        if isinstance(event, dict):
            state.handle_chunk(ChatCompletionChunk.model_validate(event))
    theirs = state.get_final_completion()

    sdk_message = theirs.choices[0].message
    assert ours["choices"][0]["message"]["content"] == sdk_message.content
    assert ours["choices"][0]["finish_reason"] == theirs.choices[0].finish_reason
    assert ours["usage"] == (theirs.usage.model_dump(exclude_none=True) if theirs.usage else None)
    sdk_calls = [
        {
            "id": c.id,
            "type": c.type,
            "function": {"name": c.function.name, "arguments": c.function.arguments},
        }
        for c in sdk_message.tool_calls or []
    ]
    assert (ours["choices"][0]["message"].get("tool_calls") or []) == sdk_calls


# -- deferred assembly (one parse when the terminal event may have arrived) ----------------------


def feed_deferred(
    parts: list[bytes], make: Any, markers: tuple[bytes, ...]
) -> tuple[DeferredAssembly, Any, list[bool], list[bool]]:
    """Feed `parts` to a DeferredAssembly and to a plain assembler; (deferred, plain, `done`
    after each part for both)."""
    deferred, plain = DeferredAssembly(make(), markers), make()
    done_deferred, done_plain = [], []
    for part in parts:
        deferred.feed(part)
        plain.feed(part)
        done_deferred.append(deferred.done)
        done_plain.append(plain.done)
    return deferred, plain, done_deferred, done_plain


@pytest.mark.parametrize("seed", range(30))
def test_deferred_chat_assembly_turns_done_on_the_same_chunk_with_the_same_answer(
    seed: int,
) -> None:
    """Split anywhere (also inside `[DONE]`): `done` turns true on the chunk that completes
    the terminal event, as with per-chunk feeding, and the answer is the same."""
    rng = random.Random(7000 + seed)
    data = sse(parallel_tool_stream(), newline=rng.choice(["\n", "\r\n"]))
    done_at = data.index(b"[DONE]")
    cuts = [rng.randrange(1, len(data)) for _ in range(rng.randrange(1, 40))]
    cuts += [done_at + rng.randrange(0, 6)]  # a cut inside the marker itself
    deferred, plain, done_deferred, done_plain = feed_deferred(
        pieces(data, cuts), StreamAssembler, CHAT_TERMINAL_MARKERS
    )
    assert done_deferred == done_plain
    assert any(done_deferred)
    assert deferred.result() == plain.result()
    assert deferred.chunks == plain.chunks


def test_deferred_assembly_waits_for_the_marker_then_parses_everything() -> None:
    """Before a marker nothing is parsed (done stays false); the result asked early parses what
    was collected; close() flushes a stream that never ends with [DONE]."""
    events = parallel_tool_stream()
    head = sse(events[:-1])
    deferred = DeferredAssembly(StreamAssembler(), CHAT_TERMINAL_MARKERS)
    deferred.feed(head)
    assert not deferred.done
    assert deferred.result()["choices"][0]["message"] == EXPECTED_PARALLEL_MESSAGE
    deferred.feed(b"data: [DO")
    assert not deferred.done
    deferred.feed(b"NE]\n\n")
    assert deferred.done
    unfinished = DeferredAssembly(StreamAssembler(), CHAT_TERMINAL_MARKERS)
    unfinished.feed(head + b'data: {"id": "x", "choices": []}')  # no blank line, no [DONE]
    unfinished.close()
    assert unfinished.chunks == assemble(head + b'data: {"id": "x", "choices": []}').chunks


def test_deferred_assembly_sees_an_error_event() -> None:
    data = sse([{"error": {"message": "overloaded", "type": "server_error"}}])
    deferred = DeferredAssembly(StreamAssembler(), CHAT_TERMINAL_MARKERS)
    deferred.feed(data)
    assert deferred.error == {"error": {"message": "overloaded", "type": "server_error"}}


@pytest.mark.parametrize("seed", range(20))
def test_deferred_responses_assembly_matches_per_chunk_feeding(seed: int) -> None:
    """The fake upstream's Responses stream (function call, text) split anywhere: `done` on the
    same chunk, the same response; an escaped type still ends the stream on time."""
    rng = random.Random(9000 + seed)
    events = [
        {"type": "response.created", "sequence_number": 0, "response": {"id": "r", "output": []}},
        {
            "type": "response.output_item.added",
            "sequence_number": 1,
            "output_index": 0,
            "item": {"type": "message", "id": "m", "content": []},
        },
        {
            "type": "response.output_text.delta",
            "sequence_number": 2,
            "output_index": 0,
            "content_index": 0,
            "delta": "hello é",
        },
        {
            "type": "response.completed",
            "sequence_number": 3,
            "response": {"id": "r", "status": "completed", "output": []},
        },
    ]
    text = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)
    if seed % 2:  # the terminal type spelled with escapes only: no marker but `\u`
        text = text.replace('"type": "response.completed"', '"type": "response\\u002ecompleted"')
        text = text.replace("event: response.completed", "event: done")
    data = text.encode()
    cuts = [rng.randrange(1, len(data)) for _ in range(rng.randrange(1, 30))]
    deferred, plain, done_deferred, done_plain = feed_deferred(
        pieces(data, cuts), ResponsesStreamAssembler, RESPONSES_TERMINAL_MARKERS
    )
    assert done_deferred == done_plain
    assert done_deferred[-1]
    assert deferred.result() == plain.result()


def test_a_payload_that_is_not_utf8_reads_as_its_text_with_replacements() -> None:
    """Invalid UTF-8 inside a chunk's JSON string: the record holds U+FFFD where the bad byte
    was (the payload decoded with replacement, then parsed), as before the assemblers parsed
    payload bytes directly; valid payloads around it are unaffected."""
    good = json.dumps(chunk({"content": "fine "})).encode()
    bad = json.dumps(chunk({"content": "caf\u00e9"})).encode().replace(b"\\u00e9", b"\xe9")
    stream = b"data: " + good + b"\r\n\r\ndata: " + bad + b"\n\ndata: [DONE]\n\n"
    assembler = StreamAssembler()
    for part in pieces(stream, [7, 40, len(good) + 9]):
        assembler.feed(part)
    assembler.close()
    assert assembler.done and assembler.invalid_events == 0
    assert assembler.result()["choices"][0]["message"]["content"] == "fine caf\ufffd"


def test_a_long_stream_is_parsed_in_bounded_steps_as_it_arrives() -> None:
    """A 31 KB file written through a tool call (~940 KB of SSE), one event per read: what
    waits unparsed stays under `flush_bytes` after every read (no single parse of the whole
    stream at its end, which held the event loop for ~0.5 s at 400 KB), `done` turns true on
    the [DONE] read, and the answer is the plain assembler's, the arguments joined exactly."""
    reads = long_tool_sse_events()
    deferred, plain, done_deferred, done_plain = feed_deferred(
        reads, StreamAssembler, CHAT_TERMINAL_MARKERS
    )
    assert done_deferred == done_plain == [False] * (len(reads) - 1) + [True]
    assert deferred.result() == plain.result()
    message = deferred.result()["choices"][0]["message"]
    assert message["tool_calls"][0]["function"] == {
        "name": "write_file",
        "arguments": LONG_TOOL_ARGUMENTS,
    }
    pending = []
    bounded = DeferredAssembly(StreamAssembler(), CHAT_TERMINAL_MARKERS)
    for read in reads:
        bounded.feed(read)
        pending.append(bounded.pending_bytes)
    assert max(pending) < DeferredAssembly.FLUSH_BYTES
    assert sum(map(len, reads)) > 10 * DeferredAssembly.FLUSH_BYTES  # it did flush on the way


@pytest.mark.parametrize("seed", range(10))
def test_a_small_flush_size_changes_nothing_but_when_events_are_parsed(seed: int) -> None:
    """Flushing after every few bytes, reads cut anywhere (inside events and inside [DONE]):
    the same `done` per read and the same answer as per-read feeding."""
    rng = random.Random(11_000 + seed)
    arguments = json.dumps({"path": "src/app.py", "content": "print('é')\n" * 160})
    data = b"".join(long_tool_sse_events(arguments, newline=rng.choice([b"\n", b"\r\n"])))
    parts = pieces(data, [rng.randrange(1, len(data)) for _ in range(60)])
    deferred = DeferredAssembly(
        StreamAssembler(), CHAT_TERMINAL_MARKERS, flush_bytes=rng.randrange(1, 400)
    )
    plain = StreamAssembler()
    for part in parts:
        deferred.feed(part)
        plain.feed(part)
        assert deferred.done == plain.done
    assert deferred.done
    assert deferred.result() == plain.result()


def test_integers_beyond_64_bits_and_nan_in_a_read_of_many_events_stay_exact() -> None:
    """One look for long integers covers a whole read: an event holding 2**64 (orjson would make
    it a float) is read exactly, the events around it too, and a NaN literal (not JSON, which
    the standard library reads) is kept; a read without them is read by orjson alone."""
    big = 2**64
    events = [
        chunk({"role": "assistant", "content": "a"}),
        chunk({"content": "b"}, seed_value=big),
        chunk({"content": "c"}),
        chunk({}, finish="stop", usage={"prompt_tokens": big + 1, "completion_tokens": 1}),
        "[DONE]",
    ]
    data = sse(events)
    nan_event = b'data: {"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":NaN}}\n\n'
    for feed in ([data], [data[:300], data[300:]]):
        result = assemble(feed).result()
        assert result["seed_value"] == big and isinstance(result["seed_value"], int)
        assert result["usage"]["prompt_tokens"] == big + 1
        assert result["choices"][0]["message"]["content"] == "abc"
    with_nan = assemble([sse(events[:1]) + nan_event]).result()
    assert with_nan["usage"]["prompt_tokens"] != with_nan["usage"]["prompt_tokens"]  # NaN


def test_a_long_responses_stream_is_parsed_in_bounded_steps_too() -> None:
    """A Responses function call of ~200 KB of arguments, one event per read: what waits stays
    under `flush_bytes`, `done` turns true on the `response.completed` read, and the response is
    the plain assembler's, arguments whole."""
    arguments = json.dumps({"path": "notes.md", "content": "- item\n" * 28_000})
    item = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "write_file"}
    events: list[dict[str, Any]] = [
        {
            "type": "response.created",
            "response": {"id": "r", "status": "in_progress", "output": []},
        },
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item, "arguments": ""},
        },
    ]
    for start in range(0, len(arguments), 8):
        events.append(
            {
                "type": "response.function_call_arguments.delta",
                "output_index": 0,
                "delta": arguments[start : start + 8],
            }
        )
    done_item = {**item, "arguments": arguments, "status": "completed"}
    events += [
        {"type": "response.output_item.done", "output_index": 0, "item": done_item},
        {
            "type": "response.completed",
            "response": {"id": "r", "status": "completed", "output": []},
        },
    ]
    reads = [
        f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': n})}\n\n".encode()
        for n, e in enumerate(events)
    ]
    deferred, plain, done_deferred, done_plain = feed_deferred(
        reads, ResponsesStreamAssembler, RESPONSES_TERMINAL_MARKERS
    )
    assert done_deferred == done_plain == [False] * (len(reads) - 1) + [True]
    assert deferred.result() == plain.result()
    assert deferred.result()["output"] == [done_item]
    bounded = DeferredAssembly(ResponsesStreamAssembler(), RESPONSES_TERMINAL_MARKERS)
    most = 0
    for read in reads:
        bounded.feed(read)
        most = max(most, bounded.pending_bytes)
    assert most < DeferredAssembly.FLUSH_BYTES
    assert sum(map(len, reads)) > 10 * DeferredAssembly.FLUSH_BYTES
