"""Records -> rows: how an exchange the request path saw becomes an `exchanges` row, per kind.

Runs in the recorder's writer task, off the request path. Each kind of exchange (`chat`,
`responses`) has its own answer shape; `answer_summary` reads the columns the dashboard and the
exporter filter on (answering model, token counts, finish reason, tool-call count) from it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.core.canonical import chain_hash
from proxy.core.redaction import storable
from proxy.core.usage import estimate_usage
from proxy.http.paths import azure_deployment

if TYPE_CHECKING:
    from proxy.recording.recorder import ExchangeRecord


@dataclass(frozen=True)
class AnswerSummary:
    """Columns read from an answer. Tokens: prompt (input) and completion (output) counts as the
    provider reported them, None when it did not; usage: the provider's usage object as is."""

    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    tool_call_count: int = 0


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return storable(value if isinstance(value, str) else str(value))


def _int(usage: dict[str, Any] | None, key: str) -> int | None:
    if not usage:
        return None
    value = usage.get(key)
    return value if isinstance(value, int) else None


def chat_summary(response: dict[str, Any]) -> AnswerSummary:
    """Summary of a `chat.completion` dict: usage `prompt_tokens`/`completion_tokens`, the first
    choice's `finish_reason` and tool calls (its `tool_calls`, or 1 for a legacy `function_call`
    answering the deprecated `functions` parameter)."""
    usage = response.get("usage") if isinstance(response.get("usage"), dict) else None
    choices = response.get("choices") or []
    first = (
        choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    )
    message = first.get("message") or {}
    tool_calls = message.get("tool_calls") if isinstance(message, dict) else None
    return AnswerSummary(
        model=_text(response.get("model")),
        prompt_tokens=_int(usage, "prompt_tokens"),
        completion_tokens=_int(usage, "completion_tokens"),
        total_tokens=_int(usage, "total_tokens"),
        usage=usage,
        finish_reason=_text(first.get("finish_reason")),
        tool_call_count=len(tool_calls) if isinstance(tool_calls, list) else _legacy_call(message),
    )


def _legacy_call(message: Any) -> int:
    """1 when a chat message holds a legacy `function_call` (a named call), else 0."""
    call = message.get("function_call") if isinstance(message, dict) else None
    return 1 if isinstance(call, dict) and call.get("name") else 0


_TOOL_CALL_ITEMS = ("function_call", "custom_tool_call")


def responses_summary(response: dict[str, Any]) -> AnswerSummary:
    """Summary of a Responses `response` object: usage `input_tokens` -> prompt tokens,
    `output_tokens` -> completion tokens (cached and reasoning token details stay in `usage`);
    finish reason is `status` (`completed`, `incomplete: <reason>`, `failed`); tool calls are the
    `function_call` and `custom_tool_call` output items."""
    usage = response.get("usage") if isinstance(response.get("usage"), dict) else None
    output = response.get("output")
    items = output if isinstance(output, list) else []
    status = response.get("status")
    details = response.get("incomplete_details")
    if status == "incomplete" and isinstance(details, dict) and details.get("reason"):
        status = f"incomplete: {details['reason']}"
    return AnswerSummary(
        model=_text(response.get("model")),
        prompt_tokens=_int(usage, "input_tokens"),
        completion_tokens=_int(usage, "output_tokens"),
        total_tokens=_int(usage, "total_tokens"),
        usage=usage,
        finish_reason=_text(status),
        tool_call_count=sum(
            1 for i in items if isinstance(i, dict) and i.get("type") in _TOOL_CALL_ITEMS
        ),
    )


SUMMARIES = {"chat": chat_summary, "responses": responses_summary}


def choice_state_rows(request_hash: str, response: Any) -> list[list[Any]]:
    """`[[index, state_hash], ...]` for the choices after the first of a `chat.completion`
    (`n > 1`): each choice's message closes a conversation state of its own, as choice 0's does
    (`exchanges.state_hash`); [] for one choice. Pure (`canonical.chain_hash`)."""
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or len(choices) < 2:
        return []
    out = []
    for position, choice in enumerate(choices[1:], start=1):
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            index = choice.get("index")
            out.append(
                [index if isinstance(index, int) else position, chain_hash(request_hash, message)]
            )
    return out


def exchange_row(record: ExchangeRecord) -> dict[str, Any]:
    """The `exchanges` row for `record` (see `proxy.storage.schema.exchanges` for the columns),
    plus `choice_states` (`choice_state_rows`: not a column, written to `choice_states`)."""
    response = record.response or {}
    summary = SUMMARIES[record.kind](response) if response else AnswerSummary()
    if summary.usage is None and record.kind == "chat" and record.stream and record.outcome == "ok":
        # A stream sent without stream_options.include_usage: counted here, marked estimated.
        estimated = estimate_usage(record.request, response) if response else None
        if estimated is not None:
            summary = chat_summary({**response, "usage": estimated})
    metadata = record.request.get("metadata")
    user = record.request.get("user")
    row: dict[str, Any] = {
        "id": record.id,
        "trajectory_id": record.trajectory_id,
        "parent_id": record.parent_id,
        "step": record.step,
        "started_utc": record.started_utc,
        "duration_ms": record.duration_ms,
        "ttft_ms": record.ttft_ms,
        "path": record.path,
        "stream": record.stream,
        "status_code": record.status_code,
        "outcome": record.outcome,
        "route": record.route,
        # An Azure deployment path names the model asked (Azure ignores the body's `model`).
        "model_requested": _text(azure_deployment(record.path) or record.request.get("model")),
        "model_answered": summary.model,
        "request_json": record.request_text,
        "response_json": record.response_text
        if record.response_text is not None
        else (json.dumps(record.response) if record.response is not None else None),
        "error_json": record.error_text,
        "request_headers_json": json.dumps(record.control_headers)
        if record.control_headers
        else None,
        "upstream_request_id": record.upstream_request_id,
        "end_user": _text(user) if user is not None else None,
        "metadata_json": json.dumps(metadata) if metadata is not None else None,
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "total_tokens": summary.total_tokens,
        "usage_json": json.dumps(summary.usage) if summary.usage is not None else None,
        "finish_reason": summary.finish_reason,
        "tool_call_count": summary.tool_call_count,
        "request_hash": record.request_hash,
        "state_hash": record.state_hash,
        "injected_logit_bias_json": json.dumps(record.injected_logit_bias)
        if record.injected_logit_bias
        else None,
        "kind": record.kind,
        "response_id": _text(response.get("id"))
        if response and record.kind == "responses"
        else None,
    }
    if record.kind == "chat" and record.state_hash and record.outcome == "ok":
        row["choice_states"] = choice_state_rows(record.request_hash, response)
    return row


def trajectory_meta(record: ExchangeRecord) -> dict[str, Any]:
    """What a new trajectory row needs beyond the exchange row: how it was identified, its route."""
    return {"id_source": record.id_source, "route": record.route, "shadow": record.shadow}


def trajectory_rows(entries: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-trajectory increments for a batch of (exchange row, trajectory meta) pairs
    (see `Database.write_exchanges`)."""
    out: dict[str, dict[str, Any]] = {}
    for row, meta in entries:
        entry = out.get(row["trajectory_id"])
        if entry is None:
            entry = out[row["trajectory_id"]] = {
                "id": row["trajectory_id"],
                "created_utc": row["started_utc"],
                "updated_utc": row["started_utc"],
                "id_source": meta["id_source"],
                "route": meta["route"],
                "shadow": meta["shadow"],
                "exchange_count": 0,
                "error_count": 0,
                "tool_call_count": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
            }
        entry["created_utc"] = min(entry["created_utc"], row["started_utc"])
        entry["updated_utc"] = max(entry["updated_utc"], row["started_utc"])
        entry["exchange_count"] += 1
        entry["error_count"] += row["outcome"] != "ok"
        entry["tool_call_count"] += row["tool_call_count"]
        entry["prompt_tokens"] += row["prompt_tokens"] or 0
        entry["completion_tokens"] += row["completion_tokens"] or 0
    return list(out.values())


def batch_rows(
    entries: Iterable[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """`(exchange_rows, trajectory_rows, shadow_rows)` for `Database.write_exchanges` from
    journal entries (`{"exchange": row, "trajectory": meta}` or `{"shadow": row}`)."""
    pairs = [(entry["exchange"], entry["trajectory"]) for entry in entries if "exchange" in entry]
    shadows = [entry["shadow"] for entry in entries if "shadow" in entry]
    return [row for row, _ in pairs], trajectory_rows(pairs), shadows
