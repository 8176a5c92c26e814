"""An agent loop over the official `openai` SDK, and the tool schemas it offers: what the demo, the
tests and `bench/` play through the proxy.

    steps = await run_agent(openai.AsyncOpenAI(base_url=..., api_key=...), "Book me a flight")
    message, model, finish = assemble_chunks(client.chat.completions.create(stream=True, ...))

The loop is what apps do: call with the conversation so far, run the tools the answer asks for,
append their results (`role: tool`, one per call id), call again, until an answer without tool
calls. Streams are assembled as apps assemble them (content pieces joined, tool-call arguments
concatenated per index).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import openai

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "search_flights",
            "description": "Find flights between two cities.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_flight",
            "description": "Book a flight found by search_flights.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "step": {"type": "integer"}},
            },
        },
    },
]
"""Two travel tools (the fake upstream fills `query` and `step` in its arguments)."""

SYSTEM = {"role": "system", "content": "You are a travel agent. Use the tools."}
"""The system message `run_agent` starts with unless told otherwise."""


@dataclass
class Step:
    """One request of an agent run, as the app saw it.

    route / trajectory_id / exchange_id / teacher_model: the proxy's `X-Understudy-*` response
    headers. model: the answering model. message: the assistant message (a dict, as echoed back).
    request: the request's messages and options as sent.
    """

    route: str
    trajectory_id: str
    exchange_id: str
    teacher_model: str | None
    model: str
    message: dict[str, Any]
    finish_reason: str | None
    request: dict[str, Any] = field(default_factory=dict)


class _Assembly:
    """Accumulates `chat.completion.chunk`s into one assistant message."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.model = ""
        self.finish: str | None = None

    def add(self, chunk: Any) -> None:
        self.model = getattr(chunk, "model", None) or self.model
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                self.parts.append(delta.content)
            for call in delta.tool_calls or []:
                entry = self.calls.setdefault(
                    call.index,
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if call.id:
                    entry["id"] = call.id
                if call.function and call.function.name and not entry["function"]["name"]:
                    entry["function"]["name"] = call.function.name
                if call.function and call.function.arguments:
                    entry["function"]["arguments"] += call.function.arguments
            if choice.finish_reason:
                self.finish = choice.finish_reason

    def result(self) -> tuple[dict[str, Any], str, str | None]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.parts) or None}
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return message, self.model, self.finish


def assemble_chunks(chunks: Iterable[Any]) -> tuple[dict[str, Any], str, str | None]:
    """(assistant message, answering model, finish_reason) from the SDK's stream of
    `ChatCompletionChunk`s (a usage-only chunk, with no choices, is skipped)."""
    assembly = _Assembly()
    for chunk in chunks:
        assembly.add(chunk)
    return assembly.result()


async def assemble_async_chunks(
    chunks: AsyncIterable[Any],
) -> tuple[dict[str, Any], str, str | None]:
    """`assemble_chunks` for the async SDK's stream."""
    assembly = _Assembly()
    async for chunk in chunks:
        assembly.add(chunk)
    return assembly.result()


def tool_result(call: dict[str, Any]) -> str:
    """What the app's tool returns for `call` (deterministic, names the tool)."""
    return f"{call['function']['name']} ok #{len(call['function']['arguments'])}"


async def run_agent(
    client: openai.AsyncOpenAI,
    user_text: str,
    *,
    model: str = "gpt-4.1-mini",
    stream: bool = False,
    options: Callable[[int], dict[str, Any]] | None = None,
    tools: list[dict[str, Any]] | None = None,
    system: dict[str, Any] | None = SYSTEM,
    results: Callable[[dict[str, Any]], str] = tool_result,
    max_steps: int = 6,
) -> list[Step]:
    """A tool-using agent loop: call, run the tools asked for, call again, until a text answer.

    options(step): extra `create()` arguments for that step (`extra_headers`, `metadata`, `model`,
    ...). results(call): the tool's output for a call. Non-stream answers are echoed back as the
    SDK returned them (`message.to_dict()`, every field included), as apps that append the
    response message do. Raises AssertionError when no text answer comes within `max_steps`.
    """
    messages: list[dict[str, Any]] = [
        *([system] if system else []),
        {"role": "user", "content": user_text},
    ]
    steps: list[Step] = []
    for number in range(max_steps):
        kwargs: dict[str, Any] = {"model": model, "tools": tools or TOOLS}
        kwargs.update(options(number) if options else {})
        request = {"messages": list(messages), **kwargs}
        raw = await client.chat.completions.with_raw_response.create(
            messages=list(messages),  # type: ignore[arg-type]
            stream=stream,
            **kwargs,
        )
        parsed = raw.parse()
        if isinstance(parsed, openai.AsyncStream):
            message, answered, finish = await assemble_async_chunks(parsed)
        else:
            message = parsed.choices[0].message.to_dict()
            answered, finish = parsed.model, parsed.choices[0].finish_reason
        steps.append(
            Step(
                route=raw.headers["x-understudy-route"],
                trajectory_id=raw.headers["x-understudy-trajectory-id"],
                exchange_id=raw.headers["x-understudy-exchange-id"],
                teacher_model=raw.headers.get("x-understudy-teacher-model"),
                model=answered,
                message=message,
                finish_reason=finish,
                request=request,
            )
        )
        messages.append(message)
        if not message.get("tool_calls"):
            return steps
        for call in message["tool_calls"]:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": results(call)})
    raise AssertionError(f"agent for {user_text!r} did not finish in {max_steps} steps")
