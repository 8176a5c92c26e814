"""Server-sent events: assemble a chat-completions stream into one `chat.completion`, and a
Responses API stream into one `response` (`ResponsesStreamAssembler`).

Pure, incremental, no I/O. Feed the (decoded) bytes of the stream as they arrive; the assembler
keeps the per-choice state: content and refusal concatenated, tool calls keyed by their `index`
with `arguments` concatenated across chunks (parallel calls too), `finish_reason`, `logprobs`
and the final `usage` chunk that `stream_options.include_usage` adds. Every other delta field
(`audio`, `reasoning_content`, ...) is merged as the openai SDK's accumulator merges it
(`merge_delta`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from proxy.core.fastjson import loads, may_hold_a_long_integer

DONE = "[DONE]"
_DONE_BYTES = DONE.encode()


class SSEParser:
    """Splits a byte stream into SSE events; yields each event's `data` (lines joined by "\\n").

    Handles events split across reads, CRLF line ends and comment lines (`: keep-alive`).
    Events without a data field are skipped. `feed_raw` / `close_raw` give each payload as the
    stream's bytes (what the assemblers parse: no decoding, no re-encoding for the JSON parser);
    `feed` / `close` as text (UTF-8, invalid bytes replaced).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self.event_names: list[str] = []

    def feed_raw(self, chunk: bytes) -> list[bytes]:
        """Parse `chunk`; return the data payloads of the events it completed, in order, as
        bytes.

        Linear in the size of `chunk`: a large read holding many events is split once, not
        re-copied per line.
        """
        if b"\n" not in chunk:
            self._buffer += chunk
            return []
        lines = (self._buffer + chunk).split(b"\n")
        self._buffer = lines.pop()  # the unterminated rest, b"" when chunk ended a line
        out: list[bytes] = []
        data = self._data
        for line in lines:
            if line[:5] == b"data:":  # the usual line first: one slice, one comparison
                value = line[5:].rstrip(b"\r")
                data.append(value[1:] if value[:1] == b" " else value)
                continue
            line = line.rstrip(b"\r")
            if not line:
                if data:
                    out.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = self._data = []
                continue
            if line[:1] == b":":
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                self.event_names.append(value.decode("utf-8", errors="replace"))
        return out

    def close_raw(self) -> list[bytes]:
        """End of stream: return a last event that was not followed by a blank line."""
        return self.feed_raw(b"\n\n") if self._buffer or self._data else []

    def feed(self, chunk: bytes) -> list[str]:
        """`feed_raw` with each payload decoded (UTF-8, invalid bytes replaced)."""
        return [payload.decode("utf-8", errors="replace") for payload in self.feed_raw(chunk)]

    def close(self) -> list[str]:
        """`close_raw` with the payload decoded."""
        return [payload.decode("utf-8", errors="replace") for payload in self.close_raw()]

    @property
    def partial(self) -> bool:
        """An event has begun (a line or data lines) and not yet ended with its blank line."""
        return bool(self._buffer or self._data)


def _exact(payloads: list[bytes]) -> bool:
    """Whether orjson reads each of `payloads` to the value `json.loads` gives (or refuses it):
    no integer beyond 64 bits in any (one look over them all, `fastjson.may_hold_a_long_integer`;
    a stream's many small events are not looked at one by one)."""
    return bool(payloads) and not may_hold_a_long_integer(
        payloads[0] if len(payloads) == 1 else b"\n".join(payloads)
    )


def _event_json(payload: bytes, exact: bool = False) -> Any:
    """The JSON value of an event's data, as `json.loads` gives it for the payload decoded
    with invalid UTF-8 replaced (`fastjson.loads` on the bytes; the decoded text when they are
    not UTF-8). exact: `_exact` said so for the payload (orjson's value is taken as it is).
    Raises ValueError when it is not JSON."""
    if exact:
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            pass  # NaN, a lone surrogate, bad UTF-8 or not JSON: as below
    try:
        return loads(payload)
    except ValueError:
        text = payload.decode("utf-8", errors="replace")
        if text.encode() == payload:
            raise
        return loads(text)


# Keys whose value names a thing rather than adding to it: kept once, never concatenated.
_IDENTITY_KEYS = frozenset({"id", "type", "index", "expires_at"})


class _Text(list[str]):
    """Text pieces of one delta field, joined once by `result()` (linear, not quadratic)."""


def merge_delta(current: Any, value: Any) -> Any:
    """`current` with one more delta `value` of a message field merged in, the way openai-python's
    stream accumulator (`openai.lib.streaming._deltas.accumulate_delta`) merges it: text
    concatenated, objects merged key by key (e.g. `delta.audio`: `transcript` and `data`
    concatenated, `id` and `expires_at` kept), lists of objects merged by their `index`, other
    lists extended. Unlike the SDK, `id`, `type`, `index` and `expires_at` are kept once (the SDK
    would add repeated numbers or concatenate a repeated id), and numbers are replaced. Pure; text
    is held as a `_Text` until `_joined`."""
    if current is None:
        if isinstance(value, str):
            current = _Text()
        elif isinstance(value, (dict, list)):
            current = type(value)()
        else:
            return value
    if isinstance(current, _Text) and isinstance(value, str):
        current.append(value)
        return current
    if isinstance(current, dict) and isinstance(value, dict):
        for key, item in value.items():
            if item is None:
                continue
            if key in _IDENTITY_KEYS and key in current:
                continue
            current[key] = merge_delta(current.get(key), item)
        return current
    if isinstance(current, list) and isinstance(value, list):
        for entry in value:
            if isinstance(entry, dict) and isinstance(entry.get("index"), int):
                at = next(
                    (
                        i
                        for i, e in enumerate(current)
                        if isinstance(e, dict) and e.get("index") == entry["index"]
                    ),
                    None,
                )
                if at is not None:
                    current[at] = merge_delta(current[at], entry)
                    continue
                entry = merge_delta(None, entry)
            current.append(entry)
        return current
    return value  # a number or a changed kind: the latest value


def _joined(value: Any) -> Any:
    """A merged delta value with its text pieces joined (see `merge_delta`)."""
    if isinstance(value, _Text):
        return "".join(value)
    if isinstance(value, dict):
        return {key: _joined(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_joined(item) for item in value]
    return value


_NOT_TOP_LEVEL: Final = frozenset({"choices", "usage", "object"})
"""Chunk keys that are not copied to the assembled completion's top level as they are."""


@dataclass(slots=True)
class _ToolCallState:
    """One tool call of a choice (or its legacy `function_call`), as its deltas arrived:
    `arguments` in pieces."""

    id: str | None = None
    type: str = "function"
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def function(self) -> dict[str, str]:
        """`{"name", "arguments"}`: a tool call's `function`, or a legacy `function_call`."""
        return {"name": self.name, "arguments": "".join(self.arguments)}

    def as_dict(self) -> dict[str, Any]:
        """The call in a `chat.completion` message's shape."""
        return {"id": self.id, "type": self.type, "function": self.function()}


@dataclass
class _ChoiceState:
    index: int
    role: str | None = None
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    tool_calls: dict[int, _ToolCallState] = field(default_factory=dict)
    function_call: _ToolCallState | None = None
    finish_reason: str | None = None
    logprobs: dict[str, list[Any]] | None = None


class StreamAssembler:
    """Assembles `chat.completion.chunk` events into the `chat.completion` they add up to.

    Usage: call `feed(bytes)` for each piece of the decoded stream, then `result()`.
    `done` turns true when `data: [DONE]` arrives; `error` holds an `{"error": ...}` object the
    stream carried instead of chunks; `chunks` counts the chunk objects seen.
    """

    def __init__(self) -> None:
        self._parser = SSEParser()
        self._choices: dict[int, _ChoiceState] = {}
        self._top: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.error: Any = None
        self.done = False
        self.chunks = 0
        self.invalid_events = 0

    def feed(self, data: bytes) -> None:
        """Consume raw (decoded) stream bytes."""
        payloads = self._parser.feed_raw(data)
        exact = _exact(payloads)
        for payload in payloads:
            self._event(payload, exact)

    def close(self) -> None:
        """Flush an unterminated last event (streams that end without a blank line)."""
        for payload in self._parser.close_raw():
            self._event(payload)

    @property
    def partial(self) -> bool:
        """Bytes fed so far end inside an event (see `SSEParser.partial`)."""
        return self._parser.partial

    def _event(self, payload: bytes, exact: bool = False) -> None:
        if payload[:1] != b"{" and payload.strip() == _DONE_BYTES:  # a chunk is never [DONE]
            self.done = True
            return
        try:
            chunk = _event_json(payload, exact)
        except ValueError:
            self.invalid_events += 1
            return
        if not isinstance(chunk, dict):
            self.invalid_events += 1
            return
        if "error" in chunk and "choices" not in chunk:
            self.error = chunk
            return
        self.chunks += 1
        top = self._top
        for key, value in chunk.items():
            if (value is not None or key not in top) and key not in _NOT_TOP_LEVEL:
                top[key] = value
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        choices = chunk.get("choices")
        if choices:
            for choice in choices:
                if isinstance(choice, dict):
                    self._choice(choice)

    def _choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        state = self._choices.get(index)
        if state is None:
            state = self._choices[index] = _ChoiceState(index=index)
        delta = choice.get("delta")
        if delta:
            for key, value in delta.items():
                if value is None:
                    continue
                if key == "content":  # the usual delta first
                    state.content.append(value)
                elif key == "tool_calls":
                    for position, call in enumerate(value):
                        self._tool_call(state, position, call)
                elif key == "role":
                    state.role = value
                elif key == "refusal":
                    state.refusal.append(value)
                elif key == "function_call" and isinstance(value, dict):  # legacy functions
                    fc = state.function_call
                    if fc is None:
                        fc = state.function_call = _ToolCallState()
                    if value.get("name") and not fc.name:
                        fc.name = value["name"]
                    arguments = value.get("arguments")
                    if arguments:
                        fc.arguments.append(arguments)  # joined once, by `result()`
                else:  # audio, reasoning_content and any other field: merged as the SDK does
                    state.extra[key] = merge_delta(state.extra.get(key), value)
        finish_reason = choice.get("finish_reason")
        if finish_reason is not None:
            state.finish_reason = finish_reason
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            if state.logprobs is None:
                state.logprobs = {}
            for key, items in logprobs.items():
                if isinstance(items, list):
                    state.logprobs.setdefault(key, []).extend(items)

    @staticmethod
    def _tool_call(state: _ChoiceState, position: int, call: dict[str, Any]) -> None:
        index = call.get("index", position)
        current = state.tool_calls.get(index)
        if current is None:
            current = state.tool_calls[index] = _ToolCallState()
        if call.get("id") and not current.id:
            current.id = call["id"]
        if call.get("type"):
            current.type = call["type"]
        function = call.get("function")
        if function:
            if function.get("name") and not current.name:
                current.name = function["name"]
            arguments = function.get("arguments")
            if arguments:
                current.arguments.append(arguments)  # joined once, by `result()`

    def result(self) -> dict[str, Any]:
        """The assembled response as a `chat.completion` object (OpenAI's non-stream shape)."""
        choices = []
        for index in sorted(self._choices):
            state = self._choices[index]
            message: dict[str, Any] = {
                "role": state.role or "assistant",
                "content": "".join(state.content) if state.content else None,
                "refusal": "".join(state.refusal) if state.refusal else None,
            }
            for key, value in state.extra.items():
                message[key] = _joined(value)
            if state.tool_calls:
                message["tool_calls"] = [
                    state.tool_calls[i].as_dict() for i in sorted(state.tool_calls)
                ]
            if state.function_call is not None:
                message["function_call"] = state.function_call.function()
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": state.logprobs,
                    "finish_reason": state.finish_reason,
                }
            )
        completion: dict[str, Any] = {"id": self._top.get("id"), "object": "chat.completion"}
        for key, value in self._top.items():
            if key != "id":
                completion[key] = value
        completion["choices"] = choices
        completion["usage"] = self.usage
        return completion


RESPONSES_TERMINAL = ("response.completed", "response.incomplete", "response.failed")
_RESPONSE_SNAPSHOTS = ("response.created", "response.in_progress", "response.queued")


class ResponsesStreamAssembler:
    """Assembles a Responses API event stream into the `response` object it adds up to.

    Events are JSON objects with a `type` and a `sequence_number`; there is no `[DONE]`. The
    stream ends with a terminal event (`response.completed`, `response.incomplete`,
    `response.failed`) carrying the whole `response`, or with an `error` event. `result()` is the
    terminal `response` when its `output` is non-empty, else that response (or the latest
    `response.created`/`in_progress` snapshot) with `output` made of the items of the
    `response.output_item.done` events by `output_index` (several compatible backends send an
    empty terminal output); items that never got their `.done` (a stream cut short) are the
    `.added` item with its text and argument deltas joined. A reasoning item's
    `encrypted_content` is taken from its `.done` event (`.added` does not carry it).

    `done`: a terminal or `error` event arrived. `error`: `{"error": {...}}` from an `error`
    event or a failed response's `error`, else None. `chunks`: events that parsed.
    """

    def __init__(self) -> None:
        self._parser = SSEParser()
        self._response: dict[str, Any] | None = None
        self._added: dict[int, dict[str, Any]] = {}
        self._done_items: dict[int, dict[str, Any]] = {}
        self._text: dict[tuple[int, int], list[str]] = {}
        self._arguments: dict[int, list[str]] = {}
        self.error: Any = None
        self.done = False
        self.chunks = 0
        self.invalid_events = 0
        self.last_sequence_number: int | None = None

    def feed(self, data: bytes) -> None:
        """Consume raw (decoded) stream bytes."""
        payloads = self._parser.feed_raw(data)
        exact = _exact(payloads)
        for payload in payloads:
            self._event(payload, exact)

    def close(self) -> None:
        """Flush an unterminated last event (streams that end without a blank line)."""
        for payload in self._parser.close_raw():
            self._event(payload)

    @property
    def partial(self) -> bool:
        """Bytes fed so far end inside an event (see `SSEParser.partial`)."""
        return self._parser.partial

    def _event(self, payload: bytes, exact: bool = False) -> None:
        try:
            event = _event_json(payload, exact)
        except ValueError:
            self.invalid_events += 1
            return
        if not isinstance(event, dict):
            self.invalid_events += 1
            return
        self.chunks += 1
        if isinstance(event.get("sequence_number"), int):
            self.last_sequence_number = event["sequence_number"]
        kind = event.get("type")
        response = event.get("response")
        index = event.get("output_index")
        if kind in RESPONSES_TERMINAL or kind in _RESPONSE_SNAPSHOTS:
            if isinstance(response, dict):
                self._response = response
            if kind in RESPONSES_TERMINAL:
                self.done = True
                if kind == "response.failed" and isinstance(response, dict):
                    error = response.get("error") or {"message": "response failed"}
                    self.error = {"error": error}
        elif kind == "error" or (kind is None and "error" in event):
            nested = event.get("error")
            detail: dict[str, Any] = nested if isinstance(nested, dict) else event
            self.error = {
                "error": {
                    "message": detail.get("message"),
                    "type": detail.get("type") or "error",
                    "param": detail.get("param"),
                    "code": detail.get("code"),
                }
            }
            self.done = True
        elif not isinstance(index, int):
            return
        elif kind == "response.output_item.added" and isinstance(event.get("item"), dict):
            self._added[index] = event["item"]
        elif kind == "response.output_item.done" and isinstance(event.get("item"), dict):
            self._done_items[index] = event["item"]
        elif kind == "response.output_text.delta" and isinstance(event.get("delta"), str):
            part = event.get("content_index", 0)
            key = (index, part if isinstance(part, int) else 0)
            self._text.setdefault(key, []).append(event["delta"])
        elif kind == "response.function_call_arguments.delta" and isinstance(
            event.get("delta"), str
        ):
            self._arguments.setdefault(index, []).append(event["delta"])

    def _partial(self, index: int, item: dict[str, Any]) -> dict[str, Any]:
        """An item that never got its `.done`: the `.added` item with its deltas joined."""
        item = dict(item)
        if item.get("type") == "message":
            parts = sorted(key[1] for key in self._text if key[0] == index)
            if parts:
                item["content"] = [
                    {
                        "type": "output_text",
                        "text": "".join(self._text[(index, p)]),
                        "annotations": [],
                    }
                    for p in parts
                ]
        elif item.get("type") == "function_call" and index in self._arguments:
            item["arguments"] = "".join(self._arguments[index])
        item["status"] = "incomplete"
        return item

    def output_items(self) -> list[dict[str, Any]]:
        """The output items seen as events, by `output_index` (done items, else partial ones)."""
        indexes = sorted(set(self._added) | set(self._done_items))
        return [
            self._done_items[i] if i in self._done_items else self._partial(i, self._added[i])
            for i in indexes
        ]

    def result(self) -> dict[str, Any]:
        """The assembled `response` object (the Responses API's non-stream shape)."""
        response: dict[str, Any] = dict(self._response or {"object": "response"})
        output = response.get("output")
        if isinstance(output, list) and output:
            encrypted = {
                item.get("id"): item["encrypted_content"]
                for item in self._done_items.values()
                if item.get("type") == "reasoning" and item.get("encrypted_content")
            }
            if encrypted:
                response["output"] = [
                    {**item, "encrypted_content": encrypted[item.get("id")]}
                    if isinstance(item, dict)
                    and item.get("type") == "reasoning"
                    and not item.get("encrypted_content")
                    and item.get("id") in encrypted
                    else item
                    for item in output
                ]
        else:
            response["output"] = self.output_items()
        if not self.done and self._response is not None:
            response["status"] = "incomplete"
        return response


CHAT_TERMINAL_MARKERS = (b"[DONE]",)
"""Bytes every chunk holding a chat stream's terminal event (`data: [DONE]`) contains."""
RESPONSES_TERMINAL_MARKERS = (*(kind.encode() for kind in RESPONSES_TERMINAL), b"error", b"\\u")
"""Bytes every chunk holding a Responses stream's terminal event contains (its type, or an
`error` event); a `\\u` escape could spell a type in other bytes, so it counts as one too."""


class DeferredAssembly:
    """An assembler (`StreamAssembler`, `ResponsesStreamAssembler`: with `partial`) fed lazily: the stream's
    decoded bytes are collected as they arrive and handed to it in one piece when a chunk may
    hold the terminal event (one of `markers` appears in it, also across the boundary with the
    chunk before), at `close()`, or when `error`, `chunks` or `result()` are asked for. The
    answer is the same as feeding each chunk at once; `done` turns true on the same chunk.

    For a stream of many small reads this parses once instead of once per read (the events are
    still parsed before the chunk holding the terminal event is passed on, so the exchange can
    be recorded first). What is collected is also parsed once it reaches `flush_bytes`, so a
    long stream (a file written through a tool call, a long reasoning answer) is parsed in
    bounded steps as it goes, not in one stall of the event loop at its end. markers: non-empty
    byte strings.
    """

    FLUSH_BYTES: Final = 64 * 1024
    """Default `flush_bytes`: about 1-2 ms of parsing at a time on a 2-vCPU VM (bench/)."""

    def __init__(
        self, assembler: Any, markers: tuple[bytes, ...], flush_bytes: int = FLUSH_BYTES
    ) -> None:
        self._assembler = assembler
        self._markers = markers
        self._overlap = max(map(len, markers)) - 1
        self._flush_bytes = flush_bytes
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._tail = b""
        self._eager = False  # the last parse ended inside an event: parse the next chunk too

    def feed(self, data: bytes) -> None:
        """Collect raw (decoded) stream bytes; parse what was collected when `data` may end the
        stream, or may end an event begun in what was parsed last (a marker seen before its
        event's blank line arrived)."""
        if not data:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        # one look per marker, at the read and the end of the one before (a marker may straddle)
        window = self._tail + data if self._tail else data
        if self._eager or any(marker in window for marker in self._markers):
            self._flush()
            self._eager = bool(self._assembler.partial)
        elif self._pending_bytes >= self._flush_bytes:
            self._flush()  # no marker in it: nothing here can end the stream
        if len(data) >= self._overlap:
            self._tail = data[len(data) - self._overlap :] if self._overlap else b""
        else:
            self._tail = (self._tail + data)[-self._overlap :]

    def _flush(self) -> None:
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending = []
            self._pending_bytes = 0
            self._assembler.feed(data)

    @property
    def pending_bytes(self) -> int:
        """Bytes collected and not parsed yet (below `flush_bytes` after each `feed`)."""
        return self._pending_bytes

    def close(self) -> None:
        """End of stream: parse what is collected, then flush an unterminated last event."""
        self._flush()
        self._assembler.close()

    @property
    def done(self) -> bool:
        """The terminal event arrived (in a chunk already fed)."""
        return bool(self._assembler.done)

    @property
    def error(self) -> Any:
        self._flush()
        return self._assembler.error

    @property
    def chunks(self) -> int:
        self._flush()
        return int(self._assembler.chunks)

    def result(self) -> dict[str, Any]:
        """The assembled answer of everything fed so far (see the wrapped assembler)."""
        self._flush()
        result: dict[str, Any] = self._assembler.result()
        return result
