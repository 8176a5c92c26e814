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
- Header `x-fake-fail-once: KEY`: the first chat request carrying KEY answers 500, later ones
  answer normally (an upstream error the app, or the SDK's own retry, retries).
- Header `x-fake-fixed: 1` answers with one fixed small completion (for the benchmark).
- Legacy `functions` (no `tools`): the same plan as a `function_call` (finish `function_call`).
- `n: N` answers N choices: choice 0 is the plan above, choice k > 0 the same with
  " (choice k)" after its text and tool-call ids `call_<request>_c<k>_<i>`.
- `modalities: ["text", "audio"]`: a text answer comes as `message.audio` (id, base64 `data`,
  `expires_at`, `transcript`), streamed as `delta.audio` pieces (transcript, then data, then
  `expires_at`) the way OpenAI streams it.
- Azure OpenAI paths: `/openai/deployments/{deployment}/chat/completions` and `.../responses`
  (an `api-version` query is required) and `/openai/v1/chat/completions`, `/openai/v1/responses`
  answer like the OpenAI paths; each needs an `api-key` header (401 as Azure answers otherwise).

Responses API (`POST /v1/responses`, JSON, SSE, WebSocket, background responses): the same
"model" on Responses items, in `proxy.testing.fake_responses`.

Every answer carries `x-request-id`, `openai-processing-ms`, `x-ratelimit-*` headers and an
unknown body field (`x_fake_extra`) so fidelity can be checked. Requests are kept in memory and
listed by `GET /_fake/requests` (headers, Authorization and api-key included, the path and
the query, for assertions) and cleared by
`DELETE /_fake/requests`.

Run: `python -m proxy.testing.fake_openai --port 9999`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute

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


def _legacy_function_names(body: dict[str, Any]) -> list[str]:
    """The names in the deprecated `functions` parameter (answered with `function_call`)."""
    return [
        f["name"]
        for f in body.get("functions") or []
        if isinstance(f, dict) and isinstance(f.get("name"), str)
    ]


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
    legacy = [] if tools else _legacy_function_names(body)
    if legacy and step < 2 and body.get("function_call") != "none":
        return {
            "role": "assistant",
            "content": None,
            "function_call": {
                "name": legacy[0] if step == 0 or len(legacy) == 1 else legacy[1],
                "arguments": json.dumps({"query": user_text[:40], "step": step}),
            },
            "refusal": None,
            "annotations": [],
        }
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
        _text_of(m.get("content"))
        for m in messages[last_user + 1 :]
        if m.get("role") in ("tool", "function")
    ]
    answer = f"Answer to {user_text[:60]!r}" + (f" using {'; '.join(results)}" if results else "")
    return {"role": "assistant", "content": answer, "refusal": None, "annotations": []}


def _choice_variant(message: dict[str, Any], k: int, request_number: int) -> dict[str, Any]:
    """Choice k of an `n > 1` answer: choice 0 is `message`; others differ in text and call ids."""
    if k == 0:
        return message
    variant = json.loads(json.dumps(message))
    if variant.get("content"):
        variant["content"] += f" (choice {k})"
    for i, call in enumerate(variant.get("tool_calls") or []):
        call["id"] = f"call_{request_number}_c{k}_{i}"
    return variant


def _with_audio(message: dict[str, Any], request_number: int, created: int) -> dict[str, Any]:
    """A text answer spoken: the text moves to `audio.transcript`, `content` is None."""
    transcript = message.get("content") or ""
    data = base64.b64encode(f"RIFF-fake-wav-{request_number}-{transcript}".encode()).decode()
    return {
        **message,
        "content": None,
        "audio": {
            "id": f"audio_fake{request_number}",
            "data": data,
            "expires_at": created + 3600,
            "transcript": transcript,
        },
    }


def _finish_reason(message: dict[str, Any]) -> str:
    if message.get("tool_calls"):
        return "tool_calls"
    return "function_call" if message.get("function_call") else "stop"


async def chat_completions(request: Request) -> Response:
    number = next(_counter)
    request_id = f"req_fake_{number}"
    if request.headers.get("x-fake-fixed"):
        await request.body()
        return Response(
            FIXED_COMPLETION, media_type="application/json", headers=_headers(request_id)
        )
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
    if request.headers.get("x-fake-delay-ms"):
        await asyncio.sleep(float(request.headers["x-fake-delay-ms"]) / 1000)
    fail_once = request.headers.get("x-fake-fail-once")
    if fail_once and fail_once not in request.app.state.failed_once:
        request.app.state.failed_once.add(fail_once)
        model = "fake-error-500"
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
    planner = request.app.state.planner
    message = (planner(body, number) if planner is not None else None) or plan_message(body, number)
    completion_id = f"chatcmpl-fake{number}"
    created = int(time.time())
    if "audio" in (body.get("modalities") or []) and not (
        message.get("tool_calls") or message.get("function_call")
    ):
        message = _with_audio(message, number, created)
    n = body.get("n") if isinstance(body.get("n"), int) and 1 <= body["n"] <= 8 else 1
    messages = [_choice_variant(message, k, number) for k in range(n)]
    prompt_tokens = sum(len(json.dumps(m)) // 4 for m in body.get("messages", []))
    completion_tokens = max(1, len(json.dumps(message)) // 4)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }
    finish_reason = _finish_reason(message)
    if body.get("stream"):
        delay = float(request.headers.get("x-fake-chunk-delay-ms", "0")) / 1000
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = _answer_chunks(
            completion_id, created, model, messages, usage if include_usage else None
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
                {"index": k, "message": m, "logprobs": None, "finish_reason": finish_reason}
                for k, m in enumerate(messages)
            ],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
            "x_fake_extra": {"kept": True},
        },
        headers=_headers(request_id),
    )


def _choice_chunks(
    completion_id: str,
    created: int,
    model: str,
    choice_index: int,
    message: dict[str, Any],
    usage: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [
                {"index": choice_index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
            **({"usage": None} if usage is not None else {}),
        }

    calling = message.get("tool_calls") or message.get("function_call") or message.get("audio")
    chunks = [chunk({"role": "assistant", "content": None if calling else "", "refusal": None})]
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
    function_call = message.get("function_call")
    if function_call:
        chunks.append(chunk({"function_call": {"name": function_call["name"], "arguments": ""}}))
        arguments = function_call["arguments"]
        for start in range(0, len(arguments), 7):
            chunks.append(chunk({"function_call": {"arguments": arguments[start : start + 7]}}))
    audio = message.get("audio")
    if audio:
        transcript, data = audio["transcript"], audio["data"]
        chunks.append(chunk({"audio": {"id": audio["id"], "transcript": transcript[:5]}}))
        for start in range(5, len(transcript), 5):
            chunks.append(chunk({"audio": {"transcript": transcript[start : start + 5]}}))
        for start in range(0, len(data), 16):
            chunks.append(chunk({"audio": {"data": data[start : start + 16]}}))
        chunks.append(chunk({"audio": {"expires_at": audio["expires_at"]}}))
    content = message.get("content") or ""
    for start in range(0, len(content), 5):
        chunks.append(chunk({"content": content[start : start + 5]}))
    chunks.append(chunk({}, _finish_reason(message)))
    return chunks


def _stream_chunks(
    completion_id: str,
    created: int,
    model: str,
    message: dict[str, Any],
    finish_reason: str,
    usage: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """The `chat.completion.chunk` objects of a one-choice answer (`finish_reason` follows the
    message: `_finish_reason`)."""
    return _answer_chunks(completion_id, created, model, [message], usage)


def _answer_chunks(
    completion_id: str,
    created: int,
    model: str,
    messages: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """The `chat.completion.chunk` objects of an answer with one choice per message."""
    chunks: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        chunks.extend(_choice_chunks(completion_id, created, model, index, message, usage))
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


def _azure(handler: Callable[[Request], Awaitable[Response]], deployment_path: bool) -> Any:
    """An Azure OpenAI route answering like `handler`: 401 without an `api-key` header (or a
    bearer token, Azure's Entra ID sign-in), 404 on a deployment path without `api-version`, as
    Azure answers them."""

    async def azure(request: Request) -> Response:
        if not request.headers.get("api-key") and not request.headers.get("authorization"):
            return JSONResponse(
                {
                    "error": {
                        "code": "401",
                        "message": "Access denied due to invalid subscription key or wrong API "
                        "endpoint. Make sure to provide a valid key for an active subscription "
                        "and use a correct regional API endpoint for your resource.",
                    }
                },
                status_code=401,
            )
        if deployment_path and "api-version" not in request.query_params:
            return JSONResponse(
                {"error": {"code": "404", "message": "Resource not found"}}, status_code=404
            )
        return await handler(request)

    return azure


async def recorded_requests(request: Request) -> Response:
    if request.method == "DELETE":
        request.app.state.requests.clear()
        return JSONResponse({"cleared": True})
    return JSONResponse(request.app.state.requests)


Planner = Callable[[dict[str, Any], int], "dict[str, Any] | None"]
"""`planner(body, request_number)`: the assistant message for a request, or None for the default."""


def create_fake_app(planner: Planner | None = None) -> Starlette:
    """The fake upstream as an ASGI app (serve it with uvicorn); routes under `/v1`.

    planner: answers chat requests first (the demo's scripted conversations); when it returns
    None, or without one, `plan_message` answers.
    """
    from proxy.testing.fake_responses import (
        CONVERSATION_ROUTES,
        response_by_id,
        responses,
        responses_websocket,
    )

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            WebSocketRoute("/v1/responses", responses_websocket),
            Route("/v1/responses/{response_id}", response_by_id, methods=["GET", "DELETE"]),
            Route("/v1/responses/{response_id}/cancel", response_by_id, methods=["POST"]),
            *CONVERSATION_ROUTES,
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            *(
                Route(path, _azure(handler, "deployments" in path), methods=["POST"])
                for path, handler in (
                    ("/openai/deployments/{deployment}/chat/completions", chat_completions),
                    ("/openai/deployments/{deployment}/responses", responses),
                    ("/openai/deployments/{deployment}/embeddings", embeddings),
                    ("/openai/responses", responses),
                    ("/openai/v1/chat/completions", chat_completions),
                    ("/openai/v1/responses", responses),
                )
            ),
            Route("/_fake/requests", recorded_requests, methods=["GET", "DELETE"]),
        ]
    )
    app.state.requests = []
    app.state.failed_once = set()  # x-fake-fail-once keys already failed
    app.state.responses = {}  # response id -> the items a continuation inherits
    app.state.planner = planner
    app.state.background = {}  # background response id -> {"answer", "polls"}
    app.state.conversations = {}  # conversation id -> the conversation and its items
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
