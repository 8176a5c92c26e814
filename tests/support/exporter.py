"""Helpers for the exporter tests: an agent loop with the official SDK, rows written through the
storage API, and the expected sample computed independently (the CLI itself runs in-process:
`tests.support.inprocess.run_exporter`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai

from proxy.recording.recorder import ExchangeRecord, trajectory_meta, trajectory_rows
from proxy.storage import Database, new_id
from proxy.testing.agent import assemble_chunks
from proxy.testing.servers import REPOSITORY_ROOT

ROOT = REPOSITORY_ROOT

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "search_orders",
            "description": "Find a customer's orders.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "free text"},
                    "step": {"type": "integer"},
                    "n": {"type": "integer"},
                },
                "required": ["query"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "refund_order",
            "description": "Refund one order.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    },
]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _complete(
    client: openai.OpenAI,
    messages: list[dict[str, Any]],
    *,
    stream: bool,
    tools: list[dict[str, Any]] | None,
    **extra: Any,
) -> dict[str, Any]:
    """One call; returns the assistant message as a plain dict, as the client assembled it."""
    kwargs: dict[str, Any] = {"model": "gpt-4.1-mini", "messages": messages, **extra}
    if tools:
        kwargs["tools"] = tools
    if not stream:
        completion = client.chat.completions.create(**kwargs)
        return completion.choices[0].message.model_dump()
    stream_ = client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs
    )
    return assemble_chunks(stream_)[0]


def run_agent(
    client: openai.OpenAI,
    user: str,
    *,
    system: str | None = "You are a support agent. Use tools.",
    tools: list[dict[str, Any]] | None = TOOLS,
    stream: bool = False,
    echo_sdk_objects: bool = False,
    tool_results_as_parts: bool = False,
    reserialize_arguments: bool = False,
    follow_up: str | None = None,
    **extra: Any,
) -> list[dict[str, Any]]:
    """An agent loop: call, run the tools, repeat until a text answer; optionally a second user turn.

    Returns the whole conversation as the client holds it (its last request's messages plus the
    final answer). echo_sdk_objects: append the SDK's full message dump (refusal, annotations,
    audio, function_call: None) instead of a minimal dict.
    """
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    turns = [follow_up] if follow_up else []
    while True:
        answer = _complete(client, messages, stream=stream, tools=tools, **extra)
        if echo_sdk_objects:
            echoed = dict(answer)
            echoed.setdefault("refusal", None)
            echoed.setdefault("annotations", [])
        else:
            echoed = {"role": "assistant", "content": answer.get("content")}
            if answer.get("tool_calls"):
                echoed["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": dict(c["function"])}
                    for c in answer["tool_calls"]
                ]
        if reserialize_arguments:
            for call in echoed.get("tool_calls") or ():
                call["function"]["arguments"] = json.dumps(
                    json.loads(call["function"]["arguments"]), indent=1
                )
        messages.append(echoed)
        if answer.get("tool_calls"):
            for call in answer["tool_calls"]:
                result = f"{call['function']['name']} found order #{call['id'][-3:]}"
                content: Any = (
                    [{"type": "text", "text": result}] if tool_results_as_parts else result
                )
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})
            continue
        if turns:
            messages.append({"role": "user", "content": turns.pop()})
            continue
        return messages


def expected_openai_sample(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """What the exporter must write for a conversation, computed here independently.

    Ids renumbered call00001.. in order; tool content joined to a string; only the format's keys.
    """
    out: list[dict[str, Any]] = []
    ids: dict[str, str] = {}
    counter = 0
    for message in messages:
        role = message["role"]
        if role == "assistant":
            item: dict[str, Any] = {"role": "assistant"}
            if message.get("content"):
                item["content"] = message["content"]
            if message.get("tool_calls"):
                item["tool_calls"] = []
                for call in message["tool_calls"]:
                    counter += 1
                    ids[call["id"]] = f"call{counter:05d}"
                    item["tool_calls"].append(
                        {
                            "id": f"call{counter:05d}",
                            "type": "function",
                            "function": {
                                "name": call["function"]["name"],
                                "arguments": call["function"]["arguments"],
                            },
                        }
                    )
        elif role == "tool":
            content = message["content"]
            if isinstance(content, list):
                content = "".join(p["text"] for p in content)
            item = {
                "role": "tool",
                "tool_call_id": ids[message["tool_call_id"]],
                "content": content,
            }
        else:
            item = {
                "role": "system" if role == "developer" else role,
                "content": message["content"],
            }
        out.append(item)
    sample: dict[str, Any] = {"messages": out}
    if tools:
        sample["tools"] = tools
    return sample


# -- rows written directly (routes, labels, shadows and promotion the proxy may not produce yet) --


def completion(message: dict[str, Any], model: str = "gpt-4.1-mini") -> dict[str, Any]:
    """A `chat.completion` dict answering with `message`."""
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    return {
        "id": f"chatcmpl-{new_id()[:8]}",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": {"refusal": None, **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def record(
    trajectory_id: str,
    request: dict[str, Any],
    response: dict[str, Any] | None,
    *,
    parent_id: str | None = None,
    step: int = 0,
    route: str = "student",
    outcome: str = "ok",
    started_utc: str = "2026-11-20T10:00:00.000+00:00",
    injected_logit_bias: dict[str, int] | None = None,
    **extra_columns: Any,
) -> tuple[ExchangeRecord, dict[str, Any]]:
    """An exchange as the recorder builds it (`ExchangeRecord.to_row`), plus extra columns."""
    rec = ExchangeRecord(
        id=new_id(),
        trajectory_id=trajectory_id,
        parent_id=parent_id,
        step=step,
        new_trajectory=parent_id is None,
        id_source="hash",
        route=route,
        shadow=False,
        started_utc=started_utc,
        path="/v1/chat/completions",
        stream=False,
        request=request,
        request_text=json.dumps(request),
        request_hash=new_id(),
        status_code=200 if outcome == "ok" else 500,
        outcome=outcome,
        response=response,
        state_hash=new_id(),
        injected_logit_bias=injected_logit_bias,
    )
    row = rec.to_row()
    row.update(extra_columns)
    return rec, row


async def write_records(
    db_path: Path,
    items: list[tuple[ExchangeRecord, dict[str, Any]]],
    labels: dict[str, str] | None = None,
) -> None:
    """Write exchanges through `Database.write_exchanges` (the recorder's path) and set labels."""
    db = await Database.open(str(db_path))
    try:
        rows = [row for _, row in items]
        shadow_keys = (
            "shadow_model",
            "shadow_response_json",
            "shadow_error_json",
            "shadow_duration_ms",
        )
        shadows = [
            {"id": row["id"], **{k: row.pop(k, None) for k in shadow_keys}}
            for row in rows
            if row.get("shadow_response_json") is not None
        ]
        await db.write_exchanges(
            rows, trajectory_rows([(row, trajectory_meta(rec)) for rec, row in items]), shadows
        )
        if labels:
            from proxy.storage.schema import trajectories

            async with db.engine.begin() as conn:
                for trajectory_id, label in labels.items():
                    await conn.execute(
                        trajectories.update()
                        .where(trajectories.c.id == trajectory_id)
                        .values(label=label)
                    )
    finally:
        await db.close()


def write_records_sync(
    db_path: Path,
    items: list[tuple[ExchangeRecord, dict[str, Any]]],
    labels: dict[str, str] | None = None,
) -> None:
    asyncio.run(write_records(db_path, items, labels))


def simple_trajectory(
    question: str,
    answer: str,
    *,
    route: str = "student",
    model: str = "gpt-4.1-mini",
    answered_by: str | None = None,
    **kwargs: Any,
) -> list[tuple[ExchangeRecord, dict[str, Any]]]:
    """A one-exchange trajectory: system + user -> answer (by `answered_by`, default `model`)."""
    request = {
        "model": model,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": question},
        ],
    }
    return [
        record(
            new_id(),
            request,
            completion({"role": "assistant", "content": answer}, answered_by or model),
            route=route,
            **kwargs,
        )
    ]
