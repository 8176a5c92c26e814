"""The fake upstream's Responses API (`POST /v1/responses`, JSON, SSE and WebSocket; background
responses; the Conversations API and responses created with `conversation`), mounted by
`proxy.testing.fake_openai.create_fake_app`. It plays the same
deterministic tool-using "model" as the chat fake (`plan_message`), on Responses items, in the
real wire format (shapes checked against `openai.types.responses` in tests).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.websockets import WebSocket, WebSocketDisconnect

from proxy.testing.fake_openai import (
    BrokenStream,
    _counter,
    _headers,
    _text_of,
    plan_message,
)


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
        {
            "headers": dict(request.headers),
            "body": json.loads(await request.body() or b"null"),
            "path": request.url.path,
            "query": request.url.query,
        }
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
    named, conversation = _conversation(request.app, body)
    if named and conversation is None:
        return _error(
            404,
            "Conversation not found.",
            "invalid_request_error",
            "conversation",
            "conversation_not_found",
        )
    if conversation is not None:
        if previous is not None:
            return _error(
                400,
                "Cannot use both 'previous_response_id' and 'conversation'.",
                "invalid_request_error",
                "conversation",
                None,
            )
        context = list(conversation["items"])
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
    if conversation is not None:
        answer["conversation"] = {"id": conversation["id"]}
        _conversation_add(conversation, [*_response_items(body, []), *answer["output"]])
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
    answer; `?stream=true&starting_after=N` replays the answer's events after N as SSE),
    `DELETE` it, or `POST .../cancel` it."""
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
    if request.query_params.get("stream") == "true":  # the whole answer's events, replayed
        after = int(request.query_params.get("starting_after", "-1"))
        events = [e for e in response_events(held["answer"]) if e["sequence_number"] > after]
        return StreamingResponse(
            _sse_events(events, 0.0),
            media_type="text/event-stream",
            headers=_headers(f"req_fake_{response_id}"),
        )
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


# -- the Conversations API -------------------------------------------------------------------


def _conversation(app: Any, body: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """Whether a Responses body names a conversation, and that conversation (None: unknown)."""
    value = body.get("conversation")
    if isinstance(value, dict):
        value = value.get("id")
    if value is None:
        return False, None
    found: dict[str, Any] | None = app.state.conversations.get(value)
    return True, found


def _conversation_item(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as the upstream stores it (`openai.types.conversations.ConversationItem`):
    with an id and a status; a message's string content as one text part."""
    kind = item.get("type") or ("message" if "role" in item else None)
    out = {**item, "type": kind}
    if kind == "message":
        content = item.get("content")
        if isinstance(content, str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            text_part: dict[str, Any] = {"type": part, "text": content}
            if part == "output_text":
                text_part["annotations"] = []
            out["content"] = [text_part]
        out.setdefault("status", "completed")
    elif kind == "function_call_output":
        out.setdefault("status", "completed")
    prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}.get(
        str(kind), "item"
    )
    out.setdefault("id", f"{prefix}_conv{next(_counter)}")
    return out


def _conversation_add(conversation: dict[str, Any], items: list[Any]) -> list[dict[str, Any]]:
    added = [_conversation_item(item) for item in items if isinstance(item, dict)]
    conversation["items"].extend(added)
    return added


def _item_list(items: list[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else "",
        "last_id": items[-1]["id"] if items else "",
        "has_more": has_more,
    }


async def conversations(request: Request) -> Response:
    """`POST /v1/conversations` (with optional `items` and `metadata`): a new conversation."""
    body = json.loads(await request.body() or b"{}")
    request.app.state.requests.append({"headers": dict(request.headers), "body": body})
    number = next(_counter)
    conversation: dict[str, Any] = {
        "id": f"conv_fake{number}",
        "object": "conversation",
        "created_at": int(time.time()),
        "metadata": body.get("metadata") or {},
        "items": [],
    }
    _conversation_add(conversation, body.get("items") or [])
    request.app.state.conversations[conversation["id"]] = conversation
    public = {k: v for k, v in conversation.items() if k != "items"}
    return JSONResponse(public, headers=_headers(f"req_fake_{number}"))


async def conversation_items(request: Request) -> Response:
    """`POST /v1/conversations/{id}/items` adds `items` (answers the added items, with ids);
    `GET` lists them (`order` desc by default, `limit` 20, `after` an item id)."""
    conversation = request.app.state.conversations.get(request.path_params["conversation_id"])
    if conversation is None:
        return _error(404, "Conversation not found.", "invalid_request_error", None, None)
    if request.method == "POST":
        body = json.loads(await request.body() or b"{}")
        request.app.state.requests.append({"headers": dict(request.headers), "body": body})
        return JSONResponse(_item_list(_conversation_add(conversation, body.get("items") or [])))
    items = list(conversation["items"])
    if request.query_params.get("order", "desc") != "asc":
        items.reverse()
    after = request.query_params.get("after")
    if after:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    limit = int(request.query_params.get("limit", "20"))
    return JSONResponse(_item_list(items[:limit], has_more=len(items) > limit))


CONVERSATION_ROUTES = [
    Route("/v1/conversations", conversations, methods=["POST"]),
    Route("/v1/conversations/{conversation_id}/items", conversation_items, methods=["GET", "POST"]),
]
"""The Conversations API's routes, for `create_fake_app` (conversations live in
`app.state.conversations`: id -> the conversation with its `items`)."""
