"""A fake OpenAI-compatible upstream that speaks the real wire format, for tests, the benchmark and the demo.

It plays a deterministic tool-using "model": given the tools in the request and the conversation
so far, it calls tools for a few steps, then answers. No network, no API key.

Behaviour, chosen by the request:
- Steps since the last user message: step 0 calls the first tool (or, when the user text contains
  "parallel", the first two tools at once); step 1 calls the second tool (or the first again);
  step 2 and later answer with text that quotes the tool results. With no tools: a text answer.
- `stream: true` sends `chat.completion.chunk` SSE events with tool-call arguments split across
  chunks, `finish_reason`, a usage chunk when `stream_options.include_usage`, then `[DONE]`.
- Header `x-fake-chunk-delay-ms: N` waits N ms between chunks (a slow upstream); header
  `x-fake-delay-ms: N` waits N ms before answering at all (a read timeout); header
  `x-fake-break-after: N` drops the connection after N stream chunks (a stream that breaks).
- Model `fake-error-500` / `fake-error-429` answer with OpenAI error bodies (429 has `retry-after`).
- Header `x-fake-fixed: 1` answers with one fixed small completion (for the benchmark).

Responses API (`POST /v1/responses`), the same "model" on items: `input` (a string or items;
`function_call` / `function_call_output` items are its tool calls and results), `instructions`,
flat function tools. `previous_response_id` continues a response kept server-side (unless
`store: false`); an unknown id is a 400 `previous_response_not_found`. The output holds
`function_call` items (parallel ones too) or one assistant `message`; a model whose name contains
"reasoning" (or header `x-fake-reasoning: 1`) also emits a `reasoning` item with a summary, and its
`encrypted_content` when `include` asks for `reasoning.encrypted_content`. `stream: true` sends
the Responses events with `sequence_number` (no `[DONE]`); header `x-fake-empty-terminal: 1`
sends a terminal `response.completed` whose `output` is empty, as several compatible backends do.
`background: true` answers `queued`; `GET /v1/responses/{id}` finds it `in_progress` once, then
answers it; `DELETE` and `POST .../cancel` work on it too.

Every answer carries `x-request-id`, `openai-processing-ms`, `x-ratelimit-*` headers and an
unknown body field (`x_fake_extra`) so fidelity can be checked. Requests are kept in memory and
listed by `GET /_fake/requests` (Authorization included, for assertions) and cleared by
`DELETE /_fake/requests`.

Run: `python -m proxy.testing.fake_openai --port 9999`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

_counter = itertools.count(1)
FIXED_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-fixed",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "fake-fast",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "ok",
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }
).encode()


def _headers(request_id: str) -> dict[str, str]:
    return {
        "x-request-id": request_id,
        "openai-processing-ms": "7",
        "openai-version": "2020-10-01",
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-reset-requests": "6ms",
        "x-ratelimit-limit-tokens": "30000000",
        "x-ratelimit-remaining-tokens": "29999000",
    }


def _tool_names(body: dict[str, Any]) -> list[str]:
    names = []
    for tool in body.get("tools") or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and function.get("name"):
            names.append(function["name"])
    return names


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def plan_message(body: dict[str, Any], request_number: int) -> dict[str, Any]:
    """The assistant message the fake model answers `body` with (see the module docstring)."""
    messages = body.get("messages") or []
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    user_text = _text_of(messages[last_user].get("content")) if last_user >= 0 else ""
    step = sum(1 for m in messages[last_user + 1 :] if m.get("role") == "assistant")
    tools = _tool_names(body)
    if tools and step < 2 and body.get("tool_choice") != "none":
        if step == 0 and "parallel" in user_text and len(tools) > 1:
            chosen = tools[:2]
        elif step == 0:
            chosen = tools[:1]
        else:
            chosen = [tools[1] if len(tools) > 1 else tools[0]]
        calls = [
            {
                "id": f"call_{request_number}_{i}",
                "type": "function",
                "function": {
                    "name": name,
                    "arguments": json.dumps({"query": user_text[:40], "step": step, "n": i}),
                },
            }
            for i, name in enumerate(chosen)
        ]
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": calls,
            "refusal": None,
            "annotations": [],
        }
    results = [
        _text_of(m.get("content")) for m in messages[last_user + 1 :] if m.get("role") == "tool"
    ]
    answer = f"Answer to {user_text[:60]!r}" + (f" using {'; '.join(results)}" if results else "")
    return {"role": "assistant", "content": answer, "refusal": None, "annotations": []}


async def chat_completions(request: Request) -> Response:
    number = next(_counter)
    request_id = f"req_fake_{number}"
    if request.headers.get("x-fake-fixed"):
        await request.body()
        return Response(
            FIXED_COMPLETION, media_type="application/json", headers=_headers(request_id)
        )
    request.app.state.requests.append(
        {"headers": dict(request.headers), "body": json.loads(await request.body() or b"null")}
    )
    body = request.app.state.requests[-1]["body"]
    model = body.get("model", "fake-model")
    if request.headers.get("x-fake-delay-ms"):
        await asyncio.sleep(float(request.headers["x-fake-delay-ms"]) / 1000)
    if model == "fake-error-500":
        return JSONResponse(
            {
                "error": {
                    "message": "The server had an error",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            },
            status_code=500,
            headers=_headers(request_id),
        )
    if model == "fake-error-429":
        return JSONResponse(
            {
                "error": {
                    "message": "Rate limit reached",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            },
            status_code=429,
            headers={**_headers(request_id), "retry-after": "1"},
        )
    message = plan_message(body, number)
    completion_id = f"chatcmpl-fake{number}"
    created = int(time.time())
    prompt_tokens = sum(len(json.dumps(m)) // 4 for m in body.get("messages", []))
    completion_tokens = max(1, len(json.dumps(message)) // 4)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }
    finish_reason = "tool_calls" if message.get("tool_calls") else "stop"
    if body.get("stream"):
        delay = float(request.headers.get("x-fake-chunk-delay-ms", "0")) / 1000
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = _stream_chunks(
            completion_id, created, model, message, finish_reason, usage if include_usage else None
        )
        break_after = request.headers.get("x-fake-break-after")
        return StreamingResponse(
            _sse(chunks, delay, int(break_after) if break_after else None),
            media_type="text/event-stream",
            headers=_headers(request_id),
        )
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            ],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
            "x_fake_extra": {"kept": True},
        },
        headers=_headers(request_id),
    )


def _stream_chunks(
    completion_id: str,
    created: int,
    model: str,
    message: dict[str, Any],
    finish_reason: str,
    usage: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **({"usage": None} if usage is not None else {}),
        }

    chunks = [
        chunk(
            {
                "role": "assistant",
                "content": None if message.get("tool_calls") else "",
                "refusal": None,
            }
        )
    ]
    for index, call in enumerate(message.get("tool_calls") or []):
        arguments = call["function"]["arguments"]
        chunks.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""},
                        }
                    ]
                }
            )
        )
        for start in range(0, len(arguments), 7):
            piece = arguments[start : start + 7]
            chunks.append(
                chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            )
    content = message.get("content") or ""
    for start in range(0, len(content), 5):
        chunks.append(chunk({"content": content[start : start + 5]}))
    chunks.append(chunk({}, finish_reason))
    if usage is not None:
        chunks.append(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": usage,
            }
        )
    return chunks


class BrokenStream(Exception):
    """Raised mid-stream so the server drops the connection (the `x-fake-break-after` fault)."""


async def _sse(
    chunks: list[dict[str, Any]], delay: float, break_after: int | None = None
) -> AsyncIterator[bytes]:
    for number, chunk in enumerate(chunks):
        if break_after is not None and number >= break_after:
            raise BrokenStream(f"connection dropped after {number} chunks")
        yield f"data: {json.dumps(chunk)}\n\n".encode()
        if delay:
            await asyncio.sleep(delay)
    yield b"data: [DONE]\n\n"


def _chat_view(items: list[Any]) -> list[dict[str, Any]]:
    """Responses items as the chat messages `plan_message` reads (roles, tool calls, results)."""
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _text_of(item.get("content"))})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {"role": "tool", "tool_call_id": item.get("call_id"), "content": _text_of(output)}
            )
    return messages


def _response_items(body: dict[str, Any], context: list[Any]) -> list[Any]:
    value = body.get("input")
    own = (
        [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value
    )
    return [*context, *(own or [])]


def plan_output(
    body: dict[str, Any], items: list[Any], number: int, reasoning: bool
) -> list[dict[str, Any]]:
    """The output items the fake model answers a Responses request with."""
    tools = [
        {"type": "function", "function": {"name": t["name"]}}
        for t in body.get("tools") or []
        if isinstance(t, dict) and t.get("type") == "function" and t.get("name")
    ]
    message = plan_message(
        {"messages": _chat_view(items), "tools": tools, "tool_choice": body.get("tool_choice")},
        number,
    )
    output: list[dict[str, Any]] = []
    if reasoning:
        item: dict[str, Any] = {
            "type": "reasoning",
            "id": f"rs_fake{number}",
            "summary": [{"type": "summary_text", "text": f"Planning step {number}."}],
        }
        if "reasoning.encrypted_content" in (body.get("include") or []):
            item["encrypted_content"] = f"gAAAAfake-encrypted-{number}"
        output.append(item)
    for i, call in enumerate(message.get("tool_calls") or []):
        output.append(
            {
                "type": "function_call",
                "id": f"fc_fake{number}_{i}",
                "call_id": call["id"],
                "name": call["function"]["name"],
                "arguments": call["function"]["arguments"],
                "status": "completed",
            }
        )
    if message.get("content"):
        output.append(
            {
                "type": "message",
                "id": f"msg_fake{number}",
                "role": "assistant",
                "status": "completed",
                "content": [
                    {
                        "type": "output_text",
                        "text": message["content"],
                        "annotations": [],
                        "logprobs": [],
                    }
                ],
            }
        )
    return output


def build_response(
    body: dict[str, Any], items: list[Any], number: int, reasoning: bool
) -> dict[str, Any]:
    """The whole `response` object the fake answers `body` with (`items`: its whole input,
    inherited items included), shaped as `openai.types.responses.Response`."""
    model = body.get("model", "fake-model")
    output = plan_output(body, items, number, reasoning)
    input_tokens = max(1, len(json.dumps(items)) // 4)
    output_tokens = max(1, len(json.dumps(output)) // 4)
    reasoning_tokens = 16 if reasoning else 0
    return {
        "id": f"resp_fake{number}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": "medium" if reasoning else None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens + reasoning_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens + reasoning_tokens,
        },
        "user": None,
        "metadata": body.get("metadata") or {},
        "x_fake_extra": {"kept": True},
    }


def _error(status: int, message: str, type_: str, param: str | None, code: str | None) -> Response:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        status_code=status,
    )


async def responses(request: Request) -> Response:
    number = next(_counter)
    request_id = f"req_fake_{number}"
    request.app.state.requests.append(
        {"headers": dict(request.headers), "body": json.loads(await request.body() or b"null")}
    )
    body = request.app.state.requests[-1]["body"]
    model = body.get("model", "fake-model")
    if model == "fake-error-500":
        return _error(500, "The server had an error", "server_error", None, None)
    if model == "fake-error-429":
        response = _error(429, "Rate limit reached", "requests", None, "rate_limit_exceeded")
        response.headers["retry-after"] = "1"
        return response
    stored: dict[str, list[Any]] = request.app.state.responses
    context: list[Any] = []
    previous = body.get("previous_response_id")
    if previous is not None:
        if previous not in stored:
            return _error(
                400,
                f"Previous response with id '{previous}' not found.",
                "invalid_request_error",
                "previous_response_id",
                "previous_response_not_found",
            )
        context = stored[previous]
    items = _response_items(body, context)
    reasoning = "reasoning" in model or bool(request.headers.get("x-fake-reasoning"))
    answer = build_response(body, items, number, reasoning)
    if body.get("store") is not False:
        stored[answer["id"]] = [*items, *answer["output"]]
    if body.get("background") is True:
        request.app.state.background[answer["id"]] = {"answer": answer, "polls": 0}
        queued = {**answer, "status": "queued", "output": [], "usage": None, "background": True}
        return JSONResponse(queued, headers=_headers(request_id))
    if body.get("stream"):
        delay = float(request.headers.get("x-fake-chunk-delay-ms", "0")) / 1000
        events = response_events(
            answer, empty_terminal=bool(request.headers.get("x-fake-empty-terminal"))
        )
        break_after = request.headers.get("x-fake-break-after")
        return StreamingResponse(
            _sse_events(events, delay, int(break_after) if break_after else None),
            media_type="text/event-stream",
            headers=_headers(request_id),
        )
    return JSONResponse(answer, headers=_headers(request_id))


def response_events(
    answer: dict[str, Any], *, empty_terminal: bool = False
) -> list[dict[str, Any]]:
    """The Responses API stream events for `answer`, as OpenAI sends them (`sequence_number`
    from 0; `.added` items without their content or `encrypted_content`; deltas; `.done`)."""
    events: list[dict[str, Any]] = []

    def add(event: dict[str, Any]) -> None:
        events.append({**event, "sequence_number": len(events)})

    pending = {**answer, "status": "in_progress", "output": [], "usage": None}
    add({"type": "response.created", "response": pending})
    add({"type": "response.in_progress", "response": pending})
    for index, item in enumerate(answer["output"]):
        kind = item["type"]
        if kind == "message":
            added = {**item, "status": "in_progress", "content": []}
        elif kind == "function_call":
            added = {**item, "status": "in_progress", "arguments": ""}
        else:
            added = {k: v for k, v in item.items() if k != "encrypted_content"}
            added["summary"] = []
        add({"type": "response.output_item.added", "output_index": index, "item": added})
        if kind == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            text = item["content"][0]["text"]
            add(
                {
                    "type": "response.content_part.added",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "part": part,
                }
            )
            for start in range(0, len(text), 5):
                add(
                    {
                        "type": "response.output_text.delta",
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "delta": text[start : start + 5],
                        "logprobs": [],
                    }
                )
            add(
                {
                    "type": "response.output_text.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "text": text,
                    "logprobs": [],
                }
            )
            add(
                {
                    "type": "response.content_part.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "part": {**part, "text": text},
                }
            )
        elif kind == "function_call":
            arguments = item["arguments"]
            for start in range(0, len(arguments), 7):
                add(
                    {
                        "type": "response.function_call_arguments.delta",
                        "item_id": item["id"],
                        "output_index": index,
                        "delta": arguments[start : start + 7],
                    }
                )
            add(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "name": item["name"],
                    "arguments": arguments,
                }
            )
        elif kind == "reasoning":
            for summary_index, summary in enumerate(item.get("summary") or []):
                add(
                    {
                        "type": "response.reasoning_summary_text.delta",
                        "item_id": item["id"],
                        "output_index": index,
                        "summary_index": summary_index,
                        "delta": summary["text"],
                    }
                )
                add(
                    {
                        "type": "response.reasoning_summary_text.done",
                        "item_id": item["id"],
                        "output_index": index,
                        "summary_index": summary_index,
                        "text": summary["text"],
                    }
                )
        add({"type": "response.output_item.done", "output_index": index, "item": item})
    final = {**answer, "output": []} if empty_terminal else answer
    add({"type": "response.completed", "response": final})
    return events


async def _sse_events(
    events: list[dict[str, Any]], delay: float, break_after: int | None = None
) -> AsyncIterator[bytes]:
    for number, event in enumerate(events):
        if break_after is not None and number >= break_after:
            raise BrokenStream(f"connection dropped after {number} events")
        yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
        if delay:
            await asyncio.sleep(delay)


async def response_by_id(request: Request) -> Response:
    """`GET` a background response (the first poll finds it `in_progress`, later ones get the
    answer), `DELETE` it, or `POST .../cancel` it."""
    response_id = request.path_params["response_id"]
    held = request.app.state.background.get(response_id)
    if held is None and response_id not in request.app.state.responses:
        return _error(
            404, f"No response found with id '{response_id}'.", "invalid_request_error", None, None
        )
    if request.method == "DELETE":
        request.app.state.background.pop(response_id, None)
        request.app.state.responses.pop(response_id, None)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
    if held is None:
        return _error(
            400,
            "only background responses are kept for retrieval here",
            "invalid_request_error",
            None,
            None,
        )
    if request.url.path.endswith("/cancel"):
        held["answer"] = {**held["answer"], "status": "cancelled", "output": []}
        return JSONResponse(held["answer"], headers=_headers(f"req_fake_{response_id}"))
    held["polls"] += 1
    if held["polls"] == 1:
        pending = {**held["answer"], "status": "in_progress", "output": [], "usage": None}
        return JSONResponse(pending, headers=_headers(f"req_fake_{response_id}"))
    return JSONResponse(held["answer"], headers=_headers(f"req_fake_{response_id}"))


async def responses_websocket(websocket: WebSocket) -> None:
    """Responses over WebSocket: each client frame `{"type": "response.create", ...}` is a
    request body; the answer's events come back as text frames (the same JSON as SSE data).
    `generate: false` prewarms: `response.created` and `response.completed` with no output.
    An unknown `previous_response_id` is an `error` event."""
    await websocket.accept()
    app = websocket.app
    while True:
        try:
            text = await websocket.receive_text()
        except WebSocketDisconnect:
            return
        frame = json.loads(text)
        body = {k: v for k, v in frame.items() if k != "type"}
        app.state.requests.append({"headers": dict(websocket.headers), "body": body, "ws": True})
        number = next(_counter)
        previous = body.get("previous_response_id")
        if previous is not None and previous not in app.state.responses:
            await websocket.send_text(
                json.dumps(
                    {
                        "type": "error",
                        "code": "previous_response_not_found",
                        "message": f"Previous response with id '{previous}' not found.",
                        "param": "previous_response_id",
                        "sequence_number": 0,
                    }
                )
            )
            continue
        items = _response_items(body, app.state.responses.get(previous, []))
        answer = build_response(body, items, number, "reasoning" in str(body.get("model")))
        if body.get("generate") is False:
            answer = {**answer, "output": []}
        if body.get("store") is not False:
            app.state.responses[answer["id"]] = [*items, *answer["output"]]
        for event in response_events(answer):
            await websocket.send_text(json.dumps(event))


async def models(request: Request) -> Response:
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"id": "fake-model", "object": "model", "created": 0, "owned_by": "understudy"}
            ],
        },
        headers=_headers("req_fake_models"),
    )


async def embeddings(request: Request) -> Response:
    body = json.loads(await request.body())
    inputs = body.get("input")
    count = len(inputs) if isinstance(inputs, list) else 1
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                for i in range(count)
            ],
            "model": body.get("model"),
            "usage": {"prompt_tokens": count, "total_tokens": count},
        },
        headers=_headers("req_fake_embeddings"),
    )


async def recorded_requests(request: Request) -> Response:
    if request.method == "DELETE":
        request.app.state.requests.clear()
        return JSONResponse({"cleared": True})
    return JSONResponse(request.app.state.requests)


def create_fake_app() -> Starlette:
    """The fake upstream as an ASGI app (serve it with uvicorn); routes under `/v1`."""
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            WebSocketRoute("/v1/responses", responses_websocket),
            Route("/v1/responses/{response_id}", response_by_id, methods=["GET", "DELETE"]),
            Route("/v1/responses/{response_id}/cancel", response_by_id, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/_fake/requests", recorded_requests, methods=["GET", "DELETE"]),
        ]
    )
    app.state.requests = []
    app.state.responses = {}  # response id -> the items a continuation inherits
    app.state.background = {}  # background response id -> {"answer", "polls"}
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Fake OpenAI-compatible upstream (no network, no key)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999)
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(
        create_fake_app(), host=args.host, port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
