"""A fast mock OpenAI upstream for the benchmark: raw asyncio HTTP/1.1, fixed answers, keep-alive.

It is deliberately not the project's `proxy.testing.fake_openai` (a Starlette app that plans tool
calls): this one must never be the bottleneck, so it answers from pre-encoded bytes.

    POST /v1/chat/completions   JSON `chat.completion` with one tool call (about 800 bytes), or,
                                when the body has `"stream": true`, the same answer as an SSE
                                stream (chunked, one write per event, `[DONE]` last; with
                                `--pace-ms N`, each event N ms after the one before).
    POST /v1/responses          the same answer as a Responses API `response` (one
                                `function_call` item), or its event stream with
                                `sequence_number`s (no `[DONE]`) for `"stream": true`.
    GET  /v1/models             a one-model list (readiness probe).
    GET  /_stats                `{"chat": N, "chat_stream": N, "responses": N,
                                "responses_stream": N}`: requests answered so far.

Headers are the ones OpenAI sends (`x-request-id`, `openai-processing-ms`, `x-ratelimit-*`,
`cf-ray`, ...), `x-request-id` unique per answer. Uses uvloop when it is installed.

Run: `python -m bench.mock_upstream --port 9100` (127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import socket
import time
from email.utils import formatdate
from typing import Any, cast

from proxy.testing.openai_shapes import MODEL_SNAPSHOT, chat_completion, openai_usage

COMPLETION_ID = "chatcmpl-BenchMock0000000000000000000"
MODEL = MODEL_SNAPSHOT
TOOL_ARGUMENTS = json.dumps({"order_id": "A-10442", "fields": ["status", "eta", "carrier"]})
USAGE = openai_usage(512, 27)
TOOL_CALL = {
    "id": "call_Zb9lQ2mX0Tq7fJ3kR8vN1sPc",
    "type": "function",
    "function": {"name": "lookup_order", "arguments": TOOL_ARGUMENTS},
}


def completion_body() -> bytes:
    """The JSON answer: an assistant message with one tool call, as OpenAI formats it."""
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [TOOL_CALL],
        "refusal": None,
        "annotations": [],
    }
    body = chat_completion(message, completion_id=COMPLETION_ID, created=1_750_000_000, usage=USAGE)
    return json.dumps(body, indent=2).encode() + b"\n"


def stream_events() -> list[bytes]:
    """The same answer as SSE events (`data: ...\\n\\n`), arguments split in 6-character pieces."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": COMPLETION_ID,
            "object": "chat.completion.chunk",
            "created": 1_750_000_000,
            "model": MODEL,
            "service_tier": "default",
            "system_fingerprint": "fp_6f2eabb9a5",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": None,
        }

    first_call = {
        "index": 0,
        "id": TOOL_CALL["id"],
        "type": "function",
        "function": {"name": "lookup_order", "arguments": ""},
    }
    chunks = [
        chunk({"role": "assistant", "content": None, "tool_calls": [first_call], "refusal": None}),
    ]
    for start in range(0, len(TOOL_ARGUMENTS), 6):
        piece = TOOL_ARGUMENTS[start : start + 6]
        chunks.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
    chunks.append(chunk({}, "tool_calls"))
    chunks.append({**chunk({}), "choices": [], "usage": USAGE})
    events = [f"data: {json.dumps(c, separators=(',', ':'))}\n\n".encode() for c in chunks]
    return [*events, b"data: [DONE]\n\n"]


RESPONSE = {
    "id": "resp_BenchMock0000000000000000000",
    "object": "response",
    "created_at": 1_750_000_000,
    "status": "completed",
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "model": MODEL,
    "output": [
        {
            "type": "function_call",
            "id": "fc_BenchMock000000000000000000",
            "call_id": TOOL_CALL["id"],
            "name": "lookup_order",
            "arguments": TOOL_ARGUMENTS,
            "status": "completed",
        }
    ],
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
    "usage": {
        "input_tokens": 512,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 27,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 539,
    },
}


def response_events() -> list[bytes]:
    """The Responses answer as SSE events, arguments split in 6-character pieces."""
    item = RESPONSE["output"][0]  # type: ignore[index]
    pending = {**RESPONSE, "status": "in_progress", "output": [], "usage": None}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": pending},
        {"type": "response.in_progress", "response": pending},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item, "arguments": "", "status": "in_progress"},
        },
    ]
    for start in range(0, len(TOOL_ARGUMENTS), 6):
        events.append(
            {
                "type": "response.function_call_arguments.delta",
                "item_id": item["id"],
                "output_index": 0,
                "delta": TOOL_ARGUMENTS[start : start + 6],
            }
        )
    events += [
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": RESPONSE},
    ]
    return [
        f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': n}, separators=(',', ':'))}\n\n".encode()
        for n, e in enumerate(events)
    ]


COMPLETION = completion_body()
RESPONSE_BODY = json.dumps(RESPONSE, indent=2).encode() + b"\n"
RESPONSE_CHUNKS = [b"%x\r\n%s\r\n" % (len(event), event) for event in response_events()]
EVENTS = stream_events()
# Each SSE event is one HTTP chunk, as OpenAI's servers send them.
STREAM_CHUNKS = [b"%x\r\n%s\r\n" % (len(event), event) for event in EVENTS]
MODELS = json.dumps(
    {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "system"}],
    }
).encode()

PACE_S = 0.0
"""Seconds between a stream's events (`--pace-ms`); 0: all written at once."""

_request_ids = itertools.count(1)
_date = {"second": 0, "value": b""}


def _http_date() -> bytes:
    now = int(time.time())
    if now != _date["second"]:
        _date["second"], _date["value"] = now, formatdate(now, usegmt=True).encode()
    return _date["value"]  # type: ignore[return-value]


def _openai_headers(content_type: bytes) -> bytes:
    """The header block OpenAI sends (minus content-length / transfer-encoding)."""
    number = next(_request_ids)
    return b"".join(
        [
            b"date: ",
            _http_date(),
            b"\r\n",
            b"content-type: ",
            content_type,
            b"\r\n",
            b"connection: keep-alive\r\n",
            b"access-control-expose-headers: X-Request-ID\r\n",
            b"openai-organization: user-benchmock\r\n",
            b"openai-processing-ms: 412\r\n",
            b"openai-project: proj_BenchMock000000000000\r\n",
            b"openai-version: 2020-10-01\r\n",
            b"x-envoy-upstream-service-time: 415\r\n",
            b"x-ratelimit-limit-requests: 10000\r\n",
            b"x-ratelimit-limit-tokens: 30000000\r\n",
            b"x-ratelimit-remaining-requests: 9999\r\n",
            b"x-ratelimit-remaining-tokens: 29999488\r\n",
            b"x-ratelimit-reset-requests: 6ms\r\n",
            b"x-ratelimit-reset-tokens: 1ms\r\n",
            b"x-request-id: req_%032x\r\n" % number,
            b"strict-transport-security: max-age=31536000; includeSubDomains; preload\r\n",
            b"cf-cache-status: DYNAMIC\r\n",
            b"x-content-type-options: nosniff\r\n",
            b"server: cloudflare\r\n",
            b"cf-ray: 8f%014x-SJC\r\n" % number,
            b'alt-svc: h3=":443"; ma=86400\r\n',
        ]
    )


class Stats:
    chat = 0
    chat_stream = 0
    responses = 0
    responses_stream = 0


class MockProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests need a Content-Length (no chunked uploads)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : line_end if line_end >= 0 else None])
            elif b"\r\ntransfer-encoding:" in head:
                self._send(b"411 Length Required", b"text/plain", b"length required\n", close=True)
                return
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            self._handle(head, body)

    def _handle(self, head: bytes, body: bytes) -> None:
        request_line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
        method, _, rest = request_line.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        close = b"\r\nconnection: close" in head
        if method == b"post" and path == b"/v1/chat/completions":
            if b'"stream":true' in body or b'"stream": true' in body:
                Stats.chat_stream += 1
                self._stream(close)
            else:
                Stats.chat += 1
                self._send(b"200 OK", b"application/json", COMPLETION, close=close)
        elif method == b"post" and path == b"/v1/responses":
            if b'"stream":true' in body or b'"stream": true' in body:
                Stats.responses_stream += 1
                self._stream(close, RESPONSE_CHUNKS)
            else:
                Stats.responses += 1
                self._send(b"200 OK", b"application/json", RESPONSE_BODY, close=close)
        elif method == b"get" and path == b"/v1/models":
            self._send(b"200 OK", b"application/json", MODELS, close=close)
        elif method == b"get" and path == b"/_stats":
            stats = json.dumps(
                {
                    "chat": Stats.chat,
                    "chat_stream": Stats.chat_stream,
                    "responses": Stats.responses,
                    "responses_stream": Stats.responses_stream,
                }
            ).encode()
            self._send(b"200 OK", b"application/json", stats, close=close)
        else:
            error = b'{"error":{"message":"unknown path","type":"invalid_request_error"}}'
            self._send(b"404 Not Found", b"application/json", error, close=close)

    def _send(self, status: bytes, content_type: bytes, body: bytes, *, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %s\r\n%scontent-length: %d\r\n\r\n%s"
            % (status, _openai_headers(content_type), len(body), body)
        )
        if close:
            self.transport.close()
            self.transport = None

    def _stream(self, close: bool, chunks: list[bytes] | None = None) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\n%stransfer-encoding: chunked\r\n\r\n"
            % _openai_headers(b"text/event-stream; charset=utf-8")
        )
        pieces = [*(chunks or STREAM_CHUNKS), b"0\r\n\r\n"]
        if PACE_S > 0:
            self._paced(pieces, 0, self.transport, close)
            return
        for piece in pieces:
            self.transport.write(piece)
        if close:
            self.transport.close()
            self.transport = None

    def _paced(
        self, pieces: list[bytes], at: int, transport: asyncio.Transport, close: bool
    ) -> None:
        """Write `pieces[at]`, and the next one `PACE_S` later (`--pace-ms`)."""
        if self.transport is not transport:  # the connection went away meanwhile
            return
        transport.write(pieces[at])
        if at + 1 < len(pieces):
            asyncio.get_running_loop().call_later(
                PACE_S, self._paced, pieces, at + 1, transport, close
            )
        elif close:
            transport.close()
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MockProtocol, host, port, backlog=1024, reuse_address=True)
    print(f"mock upstream listening on http://{host}:{port}/v1", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="Fast mock OpenAI upstream for the benchmark.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument(
        "--pace-ms",
        type=float,
        default=0.0,
        help="write a stream's events this many ms apart, as a model writes tokens (default: "
        "all at once)",
    )
    args = parser.parse_args()
    global PACE_S
    PACE_S = max(0.0, args.pace_ms) / 1000
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.host, args.port))


if __name__ == "__main__":
    main()
