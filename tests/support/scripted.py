"""`ScriptedUpstream`: an in-process upstream whose behaviour each request picks (`x-script`)."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

SCRIPTED_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-scripted",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "scripted-model",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "scripted answer", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    "x_scripted_extra": [1, 2, 3],
}


def scripted_sse_events() -> list[bytes]:
    """The SSE events of the scripted stream: role, two content pieces, finish, usage, [DONE]."""
    base = {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "scripted-model",
    }

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n".encode()

    usage = {**base, "choices": [], "usage": SCRIPTED_COMPLETION["usage"]}
    return [
        event({"role": "assistant", "content": ""}),
        event({"content": "scripted "}),
        event({"content": "answer"}),
        event({}, "stop"),
        f"data: {json.dumps(usage)}\n\n".encode(),
        b"data: [DONE]\n\n",
    ]


LONG_TOOL_ARGUMENTS = json.dumps(
    {"path": "src/report.py", "content": "total = sum(values)  # €\n" * 1_000}
)
"""The arguments of the `long-tool-sse` stream's one tool call (~31 KB: a file written)."""


def long_tool_sse_events(
    arguments: str = LONG_TOOL_ARGUMENTS, newline: bytes = b"\n"
) -> list[bytes]:
    """A stream whose one tool call writes a file: `arguments` in 8-character deltas (one event
    each: ~3,900 events, ~940 KB of SSE for `LONG_TOOL_ARGUMENTS`), then finish and [DONE];
    lines end with `newline`."""
    end = newline * 2
    base = {"id": "chatcmpl-long", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + json.dumps({**base, "choices": [choice]}).encode() + end

    call = {"index": 0, "id": "call_long", "type": "function"}
    events = [
        event({"role": "assistant", "tool_calls": [{**call, "function": {"name": "write_file"}}]})
    ]
    for start in range(0, len(arguments), 8):
        piece = arguments[start : start + 8]
        events.append(event({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
    return [*events, event({}, "tool_calls"), b"data: [DONE]" + end]


@dataclass
class ScriptedUpstream:
    """An in-process upstream whose behaviour each request picks with the `x-script` header.

    `x-script`: `json` (default; also sends two `set-cookie` headers), `gzip-json`, `gzip-sse`
    (gzip, flushed per event), `sse-break` (two events, then the connection is dropped),
    `not-json` (a 200 text body), `html-502` (a load balancer's HTML error page),
    `long-tool-sse` (a tool call of ~31 KB of arguments, 8 characters per event,
    `long_tool_sse_events`). `x-script-delay-ms: N` waits before answering at all.
    `received` holds each request: method, path, query, headers (raw pairs), body (bytes).
    """

    base_url: str
    received: list[dict[str, Any]]


def create_scripted_app(received: list[dict[str, Any]]) -> Starlette:
    """The ASGI app of `ScriptedUpstream` (routes under /v1)."""
    headers = {"x-request-id": "req_scripted", "x-ratelimit-remaining-requests": "41"}

    async def handler(request: Request) -> Response:
        body = await request.body()
        received.append(
            {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "headers": list(request.headers.items()),
                "body": body,
            }
        )
        delay = float(request.headers.get("x-script-delay-ms", "0")) / 1000
        if delay:
            await asyncio.sleep(delay)
        script = request.headers.get("x-script", "json")
        completion = json.dumps(SCRIPTED_COMPLETION).encode()
        if script == "gzip-json":
            return Response(
                gzip.compress(completion),
                media_type="application/json",
                headers={**headers, "content-encoding": "gzip"},
            )
        if script == "gzip-sse":

            async def gzipped() -> AsyncIterator[bytes]:
                compressor = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
                for event in scripted_sse_events():
                    yield compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH)
                yield compressor.flush()

            return StreamingResponse(
                gzipped(),
                media_type="text/event-stream",
                headers={**headers, "content-encoding": "gzip"},
            )
        if script == "sse-break":

            async def breaking() -> AsyncIterator[bytes]:
                for event in scripted_sse_events()[:2]:
                    yield event
                raise RuntimeError("upstream dropped the connection (scripted)")

            return StreamingResponse(breaking(), media_type="text/event-stream", headers=headers)
        if script == "long-tool-sse":

            async def long_stream() -> AsyncIterator[bytes]:
                for event in long_tool_sse_events():
                    yield event

            return StreamingResponse(long_stream(), media_type="text/event-stream", headers=headers)
        if script == "not-json":
            return Response(b"upstream says: not json", media_type="text/plain", headers=headers)
        if script == "html-502":
            page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            return Response(page, status_code=502, media_type="text/html", headers=headers)
        response = Response(completion, media_type="application/json", headers=headers)
        response.raw_headers.extend([(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")])
        return response

    return Starlette(routes=[Route("/v1/{path:path}", handler, methods=["GET", "POST"])])
