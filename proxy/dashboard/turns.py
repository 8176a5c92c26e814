"""The trajectory page's chat turns: one branch's messages with step details, each tool result
placed beside its call. Pure; every captured value stays data for the templates to escape."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from proxy.core.responses import display_messages, output_items
from proxy.dashboard.view import messages_of, parse_json, pretty_json, response_message


def _describe_media(part: Mapping[str, Any]) -> str:
    kind = part.get("type")
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        url = str(url or "")
        if url.startswith("data:"):
            return f"image ({url.split(';', 1)[0][5:] or 'data'}, {len(url) * 3 // 4 // 1024:,} KB inline)"
        return f"image: {url[:200]}"
    if kind == "input_audio":
        return "audio input"
    if kind == "file":
        file = part.get("file")
        name = file.get("filename") if isinstance(file, dict) else None
        return f"file: {name}" if name else "file"
    return str(kind)


def content_parts(content: Any, json_pretty: bool) -> list[dict[str, str]]:
    """A message `content` as display parts `{"kind": "text"|"json"|"media"|"refusal", "text"}`.

    json_pretty: show text that is a JSON object or array indented (for tool results).
    """
    if content is None:
        return []
    if isinstance(content, str):
        return [_text_part(content, json_pretty)]
    if isinstance(content, list):
        parts: list[dict[str, str]] = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(_text_part(str(part.get("text", "")), json_pretty))
            elif isinstance(part, dict) and part.get("type") == "refusal":
                parts.append({"kind": "refusal", "text": str(part.get("refusal", ""))})
            elif isinstance(part, dict) and part.get("type") in (
                "image_url",
                "input_audio",
                "file",
            ):
                parts.append({"kind": "media", "text": _describe_media(part)})
            elif isinstance(part, str):
                parts.append(_text_part(part, json_pretty))
            else:
                parts.append({"kind": "json", "text": pretty_json(part)})
        return parts
    return [{"kind": "json", "text": pretty_json(content)}]


def _text_part(text: str, json_pretty: bool) -> dict[str, str]:
    if json_pretty and text.lstrip()[:1] in ("{", "["):
        value = parse_json(text)
        if isinstance(value, dict | list):
            return {"kind": "json", "text": pretty_json(value)}
    return {"kind": "text", "text": text}


def _tool_call(call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    function = function if isinstance(function, dict) else {}
    arguments = function.get("arguments")
    valid = True
    if isinstance(arguments, str):
        value = parse_json(arguments)
        if value is None and arguments.strip() not in ("null",):
            valid = False
            pretty = arguments
        else:
            pretty = pretty_json(value)
    elif arguments is None:
        pretty = ""
    else:
        pretty = pretty_json(arguments)
    return {
        "id": call.get("id") if isinstance(call, dict) else None,
        "type": call.get("type", "function") if isinstance(call, dict) else "function",
        "name": function.get("name")
        or (call.get("name") if isinstance(call, dict) else None)
        or "?",
        "arguments": pretty,
        "arguments_valid": valid,
        "result": None,
    }


def _without_messages(request: Any) -> Any:
    """The request body with `messages` summarized: the conversation is shown as turns already,
    and repeating every step's whole history would make a long trajectory's page quadratic."""
    if isinstance(request, dict) and isinstance(request.get("input"), list):
        count = len(request["input"])
        return {**request, "input": f"({count} items, shown as the conversation)"}
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        return request
    count = len(request["messages"])
    return {**request, "messages": f"({count} messages, shown as the conversation)"}


def step_info(exchange: Mapping[str, Any]) -> dict[str, Any]:
    """What the page shows about the exchange behind an assistant turn (times in ms)."""
    shadow_message = None
    if exchange.get("shadow_response") is not None:
        shadow = exchange.get("shadow_response")
        if exchange.get("kind") == "responses":
            shown = display_messages(output_items(shadow))
            shadow_message = shown[-1] if shown else None
        else:
            shadow_message = response_message({"response": shadow})
    return {
        "exchange_id": exchange.get("id"),
        "step": exchange.get("step"),
        "kind": exchange.get("kind") or "chat",
        "truncated": bool(exchange.get("truncated")),
        # Responses API: a stored prompt template the proxy never saw (shown as unresolved)
        "prompt_template": exchange.get("kind") == "responses"
        and isinstance(exchange.get("request"), dict)
        and exchange["request"].get("prompt") is not None,
        "started_utc": exchange.get("started_utc"),
        "duration_ms": exchange.get("duration_ms"),
        "ttft_ms": exchange.get("ttft_ms"),
        "route": exchange.get("route"),
        "model_requested": exchange.get("model_requested"),
        "model_answered": exchange.get("model_answered"),
        "stream": bool(exchange.get("stream")),
        "status_code": exchange.get("status_code"),
        "outcome": exchange.get("outcome"),
        "prompt_tokens": exchange.get("prompt_tokens"),
        "completion_tokens": exchange.get("completion_tokens"),
        "finish_reason": exchange.get("finish_reason"),
        "injected_logit_bias": exchange.get("injected_logit_bias"),
        "upstream_request_id": exchange.get("upstream_request_id"),
        "error": pretty_json(exchange["error"]) if exchange.get("error") is not None else None,
        "shadow_model": exchange.get("shadow_model"),
        "shadow_duration_ms": exchange.get("shadow_duration_ms"),
        "shadow_turn": _turn(shadow_message, -1) if shadow_message else None,
        "shadow_error": pretty_json(exchange["shadow_error"])
        if exchange.get("shadow_error") is not None
        else None,
        "request_pretty": pretty_json(_without_messages(exchange.get("request"))),
        "response_pretty": pretty_json(exchange.get("response"))
        if exchange.get("response") is not None
        else None,
    }


def _turn(message: Any, index: int) -> dict[str, Any]:
    if not isinstance(message, dict):
        return {
            "role": "other",
            "index": index,
            "name": None,
            "parts": [{"kind": "json", "text": pretty_json(message)}],
            "reasoning": None,
            "tool_calls": [],
            "tool_call_id": None,
            "step": None,
            "recorded": False,
            "diverged": False,
        }
    role = str(message.get("role") or "other")
    calls = message.get("tool_calls")
    tool_calls = [_tool_call(c) for c in calls] if isinstance(calls, list) else []
    if isinstance(message.get("function_call"), dict):
        legacy = message["function_call"]
        tool_calls.append(_tool_call({"id": None, "type": "function", "function": legacy}))
    parts = content_parts(message.get("content"), json_pretty=role in ("tool", "function"))
    if message.get("refusal"):
        parts.append({"kind": "refusal", "text": str(message["refusal"])})
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    return {
        "role": role,
        "index": index,
        "name": message.get("name"),
        "parts": parts,
        "reasoning": str(reasoning) if reasoning else None,
        "tool_calls": tool_calls,
        "tool_call_id": message.get("tool_call_id"),
        "step": None,
        "recorded": False,
        "diverged": False,
    }


def chat_turns(payload: Mapping[str, Any], leaf_id: str | None = None) -> dict[str, Any]:
    """The page view of one branch: its chat turns with step details, tool results beside calls.

    Returns `{"branch": <branch entry>, "turns": [...], "tools": [...], "options": {...},
    "metadata": ...}`; `turns` hold `role`, `parts`, `tool_calls` (each with its `result`
    turn or None), `step` (the exchange that produced an assistant turn, see `step_info`),
    `recorded` and `diverged` (after this branch's fork point). A leaf whose answer failed ends
    with a turn of role `error`. Raises KeyError for a `leaf_id` that is not a leaf.
    """
    all_branches = payload["branches"]
    if not all_branches:
        return {"branch": None, "turns": [], "tools": [], "options": {}, "metadata": None}
    branch = (
        all_branches[0]
        if leaf_id is None
        else next((b for b in all_branches if b["leaf_id"] == leaf_id), None)
    )
    if branch is None:
        raise KeyError(leaf_id)
    by_id = {e["id"]: e for e in payload["exchanges"]}
    leaf = by_id[branch["leaf_id"]]
    messages = messages_of(leaf)
    answer = response_message(leaf)
    position: dict[int, Mapping[str, Any]] = {}
    for exchange_id in branch["chain"]:
        exchange = by_id[exchange_id]
        position[len(messages_of(exchange))] = exchange
    diverge_at: int | None = None
    if branch.get("fork_exchange_id") in by_id:
        diverge_at = len(messages_of(by_id[branch["fork_exchange_id"]])) + 1

    turns: list[dict[str, Any]] = []
    open_calls: dict[str, dict[str, Any]] = {}
    for index, message in enumerate([*messages, *([answer] if answer is not None else [])]):
        turn = _turn(message, index)
        turn["diverged"] = diverge_at is not None and index >= diverge_at
        if turn["role"] == "assistant" and index in position:
            turn["step"] = step_info(position[index])
            turn["recorded"] = True
        if turn["role"] == "tool" and turn["tool_call_id"] in open_calls:
            open_calls.pop(turn["tool_call_id"])["result"] = turn
            continue
        for call in turn["tool_calls"]:
            if call["id"]:
                open_calls[str(call["id"])] = call
        turns.append(turn)
    if answer is None:
        error = _turn({"role": "error", "content": None}, len(messages))
        error["step"] = step_info(leaf)
        error["recorded"] = True
        turns.append(error)

    request = leaf.get("request") if isinstance(leaf.get("request"), dict) else {}
    tools = []
    for tool in request.get("tools") or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if function is None and isinstance(tool, dict) and tool.get("type") == "function":
            function = tool  # Responses API: flat function tools
        if isinstance(function, dict):
            tools.append(
                {
                    "name": str(function.get("name") or "?"),
                    "description": str(function.get("description") or ""),
                    "parameters": pretty_json(function.get("parameters"))
                    if function.get("parameters") is not None
                    else "",
                }
            )
    options = {
        key: json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
        for key, value in request.items()
        if key not in ("messages", "input", "tools", "metadata")
    }
    metadata = request.get("metadata")
    return {
        "branch": branch,
        "turns": turns,
        "tools": tools,
        "options": options,
        "metadata": pretty_json(metadata) if metadata is not None else None,
    }
