"""A fake candidate model for replay evaluation: an OpenAI-compatible chat completions server
scripted per step.

Each request is keyed by the text of its last message (the user message or tool result the
candidate answers); the script gives the assistant message to answer with, and optionally HTTP
errors to return first (429 with `retry-after-ms`, 5xx), so tests know every agreement rate in
advance. `hang_after` holds every request after the first N open (a candidate that stalls while a
run is killed). Serve it with uvicorn (e.g. `tests.conftest.serve_in_thread`) at `/v1`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DEFAULT_ANSWER: dict[str, Any] = {"role": "assistant", "content": "I cannot tell."}


def tool_call(name: str, arguments: str | dict[str, Any], call_id: str = "") -> dict[str, Any]:
    """A `tool_calls` entry; an object `arguments` is dumped, a string kept as written."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {
        "id": call_id or f"call_{abs(hash((name, text))) % 10**8}",
        "type": "function",
        "function": {"name": name, "arguments": text},
    }


def last_text(body: Any) -> str:
    """The text of the last message of a chat request (text parts joined); '' when none."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return ""
    content = messages[-1].get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


@dataclass
class CandidateScript:
    """What the fake answers.

    answers: last-message text -> assistant message (`content` and/or `tool_calls`).
    failures: last-message text -> HTTP statuses returned, one per attempt, before the answer.
    usage: (prompt_tokens, completion_tokens) of every answer. hang_after: answer this many
    requests, then hold each later one open until `release()`. received: every request as
    `{"key", "body", "authorization", "status"}`, in arrival order.
    """

    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, list[int]] = field(default_factory=dict)
    usage: tuple[int, int] = (10, 5)
    hang_after: int | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _released: threading.Event = field(default_factory=threading.Event, repr=False)

    def release(self) -> None:
        """Let held requests go (they then answer 503)."""
        self._released.set()

    def keys_received(self, status: int | None = 200) -> list[str]:
        """Keys of the requests answered with `status` (None: all), in order."""
        with self._lock:
            return [r["key"] for r in self.received if status is None or r["status"] == status]


def _completion(message: dict[str, Any], model: str, usage: tuple[int, int]) -> dict[str, Any]:
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    return {
        "id": "chatcmpl-candidate",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "refusal": None, **message},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": usage[0] + usage[1],
        },
    }


def _error(status: int) -> Response:
    kind = "rate_limit_exceeded" if status == 429 else "server_error"
    return JSONResponse(
        {"error": {"message": f"scripted {status}", "type": kind, "param": None, "code": kind}},
        status_code=status,
        headers={"retry-after-ms": "1"},
    )


def create_candidate_app(script: CandidateScript) -> Starlette:
    """The fake candidate as an ASGI app: `POST /v1/chat/completions` (JSON only)."""

    async def chat(request: Request) -> Response:
        body = await request.json()
        key = last_text(body)
        entry = {
            "key": key,
            "body": body,
            "authorization": request.headers.get("authorization"),
            "status": 200,
        }
        with script._lock:
            script.received.append(entry)
            answered = sum(1 for r in script.received if r["status"] == 200) - 1
            pending = script.failures.get(key)
            status = pending.pop(0) if pending else 200
            entry["status"] = status
            hang = script.hang_after is not None and status == 200 and answered >= script.hang_after
            if hang:
                entry["status"] = "held"
        if hang:
            await asyncio.to_thread(script._released.wait, 600)
            return _error(503)
        if status != 200:
            return _error(status)
        message = script.answers.get(key, DEFAULT_ANSWER)
        return JSONResponse(_completion(message, str(body.get("model")), script.usage))

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
