"""A fake Anthropic Messages API server that speaks the real wire format, for the litellm teacher tests.

It plays a deterministic tool-using Claude, like `proxy.testing.fake_openai` does for OpenAI:
- `POST /v1/messages` (also `/messages`, for clients whose base URL already ends in /v1).
  Steps since the last user *text* (a user message made only of `tool_result` blocks is a step,
  not a new question): step 0 answers with a short text block and a `tool_use` block for the
  first tool; step 1 calls the second tool (or the first again); step 2 and later answer with text
  quoting the tool results. No tools, or `tool_choice: {"type": "none"}`: a text answer.
  `stop_reason` is `tool_use` or `end_turn`; the requested model name is echoed in `model`.
- `stream: true` answers with Anthropic's SSE events: `message_start`, `content_block_start`,
  `ping`, `content_block_delta` (`text_delta`, and `input_json_delta` with the tool input split
  across events), `content_block_stop`, `message_delta` (`stop_reason`, `usage`), `message_stop`.
- A last user text containing "overloaded": 529 `overloaded_error`, as the real API sends when busy.
- Without an `x-api-key` header (or `Authorization: Bearer`): 401 with Anthropic's error body.
  Without `max_tokens` or `messages`: 400 `invalid_request_error`, as the real API does.
- Every request (headers and body) is kept and listed by `GET /_fake/requests`, cleared by
  `DELETE /_fake/requests`; `GET /health` answers for start-up polling.

Run: `python -m proxy.testing.fake_anthropic --port 9998`.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

_counter = itertools.count(1)


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"type": "error", "error": {"type": kind, "message": message}},
        status_code=status,
        headers={"request-id": "req_fake_error"},
    )


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [block for block in content if isinstance(block, dict)]
    return []


def _result_text(block: dict[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    return "".join(
        str(part.get("text", "")) for part in _blocks(content) if part.get("type") == "text"
    )


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            texts = [b for b in _blocks(message.get("content")) if b.get("type") == "text"]
            if texts:
                return " ".join(str(b.get("text", "")) for b in texts)
    return ""


def plan_content(body: dict[str, Any], number: int) -> tuple[list[dict[str, Any]], str]:
    """The content blocks and stop_reason the fake model answers `body` with."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    last_user = -1
    for i, message in enumerate(messages):
        if message.get("role") == "user" and any(
            b.get("type") == "text" for b in _blocks(message.get("content"))
        ):
            last_user = i
    user_text = ""
    if last_user >= 0:
        user_text = " ".join(
            str(b.get("text", ""))
            for b in _blocks(messages[last_user].get("content"))
            if b.get("type") == "text"
        )
    later = messages[last_user + 1 :]
    step = sum(1 for m in later if m.get("role") == "assistant")
    tools = [t["name"] for t in body.get("tools") or [] if isinstance(t, dict) and t.get("name")]
    choice = body.get("tool_choice") or {}
    if tools and step < 2 and choice.get("type") != "none":
        name = tools[0] if step == 0 else tools[1 % len(tools)]
        tool_input = {"query": user_text[:40], "step": step}
        blocks: list[dict[str, Any]] = []
        if step == 0:
            blocks.append({"type": "text", "text": "Let me look that up."})
        blocks.append(
            {
                "type": "tool_use",
                "id": f"toolu_fake{number}_{step}",
                "name": name,
                "input": tool_input,
            }
        )
        return blocks, "tool_use"
    results = [
        _result_text(b)
        for m in later
        if m.get("role") == "user"
        for b in _blocks(m.get("content"))
        if b.get("type") == "tool_result"
    ]
    answer = f"Claude answers {user_text[:60]!r}" + (
        f" using {'; '.join(results)}" if results else ""
    )
    return [{"type": "text", "text": answer}], "end_turn"


def _usage(body: dict[str, Any], blocks: list[dict[str, Any]]) -> tuple[int, int]:
    return max(1, len(json.dumps(body.get("messages"))) // 4), max(1, len(json.dumps(blocks)) // 4)


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


async def _stream(
    message_id: str, model: str, blocks: list[dict[str, Any]], stop: str, usage: tuple[int, int]
) -> AsyncIterator[bytes]:
    yield _event(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": usage[0], "output_tokens": 1},
            },
        },
    )
    yield _event("ping", {"type": "ping"})
    for index, block in enumerate(blocks):
        start: dict[str, Any]
        deltas: list[dict[str, Any]]
        if block["type"] == "text":
            start = {"type": "text", "text": ""}
            pieces = [block["text"][i : i + 6] for i in range(0, len(block["text"]), 6)]
            deltas = [{"type": "text_delta", "text": piece} for piece in pieces]
        else:
            start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            raw = json.dumps(block["input"])
            pieces = [raw[i : i + 5] for i in range(0, len(raw), 5)]
            deltas = [{"type": "input_json_delta", "partial_json": ""}] + [
                {"type": "input_json_delta", "partial_json": piece} for piece in pieces
            ]
        yield _event(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": start},
        )
        for delta in deltas:
            yield _event(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": usage[1]},
        },
    )
    yield _event("message_stop", {"type": "message_stop"})


async def messages(request: Request) -> Response:
    number = next(_counter)
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError:
        return _error(400, "invalid_request_error", "body is not valid JSON")
    request.app.state.requests.append(
        {"path": request.url.path, "headers": dict(request.headers), "body": body}
    )
    bearer = request.headers.get("authorization", "")
    if not request.headers.get("x-api-key") and not bearer.lower().startswith("bearer "):
        return _error(401, "authentication_error", "x-api-key header is required")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return _error(400, "invalid_request_error", "messages: Field required")
    if not isinstance(body.get("max_tokens"), int):
        return _error(400, "invalid_request_error", "max_tokens: Field required")
    if "overloaded" in _last_user_text(body):
        return _error(529, "overloaded_error", "Overloaded")
    model = str(body.get("model", "claude-fake"))
    blocks, stop = plan_content(body, number)
    usage = _usage(body, blocks)
    message_id = f"msg_fake{number:04d}"
    headers = {"request-id": f"req_fake_anthropic_{number}", "anthropic-organization-id": "fake"}
    if body.get("stream"):
        return StreamingResponse(
            _stream(message_id, model, blocks, stop, usage),
            media_type="text/event-stream",
            headers=headers,
        )
    return JSONResponse(
        {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": blocks,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": usage[0], "output_tokens": usage[1]},
        },
        headers=headers,
    )


async def recorded_requests(request: Request) -> Response:
    if request.method == "DELETE":
        request.app.state.requests.clear()
        return JSONResponse({"cleared": True})
    return JSONResponse(request.app.state.requests)


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})


def create_app() -> Starlette:
    """The fake Anthropic API as an ASGI app (serve it with uvicorn)."""
    app = Starlette(
        routes=[
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/messages", messages, methods=["POST"]),
            Route("/_fake/requests", recorded_requests, methods=["GET", "DELETE"]),
            Route("/health", health, methods=["GET"]),
        ]
    )
    app.state.requests = []
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Fake Anthropic Messages API (no network).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9998)
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
