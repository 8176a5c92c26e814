"""Responses API exchanges as chat ones: what the exporter's reader applies to `responses` rows so
that samples, formats, filters and token limits treat both kinds alike.

Pure functions, no I/O. The conversation of a Responses leaf is its `instructions` (the first
system message), the items it inherited through `previous_response_id` (rebuilt from the
trajectory's records), its `input` items, then its `output`:

- `message` items -> chat messages (text parts joined; `input_image` -> `image_url` part);
- consecutive `function_call` items -> one assistant message's `tool_calls` (id from `call_id`),
  merged into the assistant text message they follow in the same answer;
- `function_call_output` -> a `tool` message (`tool_call_id` from `call_id`);
- `reasoning` items are dropped (encrypted, or a summary the student is not trained on);
- flat function tools `{"type": "function", "name", ...}` -> nested `{"type": "function",
  "function": {...}}`; tools of other types are left out; `parallel_tool_calls` is copied.

What cannot be trained faithfully raises `Rejected` with its reason, so the export summary counts
it like the exporter's other drops: `custom_tool_call`, `builtin_tool_call`, `compaction`,
`unresolved_item_reference`, `unresolved_prompt` (a stored prompt template the proxy never saw),
`truncated_history` (a `previous_response_id` the proxy did not record), `unsupported_content`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from exporter.messages import Rejected
from proxy.core import responses as core

_TEXT_PARTS = ("input_text", "output_text", "text")


def _content(content: Any, where: str) -> Any:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Rejected("unsupported_content", f"{where}: content is not text or parts")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": str(part.get("text") or "")})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if isinstance(part.get("detail"), str):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "refusal":
            raise Rejected("refusal", f"{where}: the model refused")
        else:
            raise Rejected("unsupported_content", f"{where}: a {kind!r} part")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _output_text(output: Any, where: str) -> str:
    if isinstance(output, str):
        return output
    content = _content(output, where)
    if not isinstance(content, str):
        raise Rejected("unsupported_content", f"{where}: a tool output that is not text")
    return content


def chat_messages(items: Sequence[Any]) -> list[dict[str, Any]]:
    """Responses items as chat messages (see the module docstring). Raises Rejected."""
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        where = f"item {index}"
        kind = core.item_type(item)
        if kind == "reasoning" or not isinstance(item, dict):
            if kind == "reasoning":
                continue
            raise Rejected("invalid_message", f"{where} is not an object")
        if kind == "message":
            role = item.get("role")
            messages.append({"role": role, "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": _output_text(item.get("output"), where),
                }
            )
        elif kind in ("custom_tool_call", "custom_tool_call_output"):
            raise Rejected("custom_tool_call", f"{where}: custom tool calls have no chat form")
        elif kind == "compaction":
            raise Rejected("compaction", f"{where}: the history was compacted upstream")
        elif kind == "item_reference":
            raise Rejected("unresolved_item_reference", f"{where}: {item.get('id')!r} unknown")
        else:
            raise Rejected("builtin_tool_call", f"{where}: a {kind!r} item")
    return messages


def chat_tools(tools: Any) -> list[dict[str, Any]]:
    """Flat Responses function tools as nested chat tools; other tool types are left out."""
    out = []
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        function = {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool
        }
        out.append({"type": "function", "function": function})
    return out


def chat_request(body: dict[str, Any], context: Sequence[Any] = ()) -> dict[str, Any]:
    """A Responses request (with the items it inherited) as a chat-completions request: `model`,
    `messages`, `tools`, `parallel_tool_calls`. Raises Rejected."""
    if body.get("prompt") is not None:
        raise Rejected("unresolved_prompt", "the request used a stored prompt template")
    items = [item for item in core.input_items(body) if core.item_type(item) != "reasoning"]
    known = core.items_by_id([*context, *items])
    own, _ = core.resolve_references(items, known)
    request: dict[str, Any] = {
        "model": body.get("model"),
        "messages": chat_messages(core.conversation_items({**body, "input": own}, context)),
    }
    tools = chat_tools(body.get("tools"))
    if tools:
        request["tools"] = tools
    if isinstance(body.get("parallel_tool_calls"), bool):
        request["parallel_tool_calls"] = body["parallel_tool_calls"]
    return request


def _finish_reason(response: dict[str, Any], message: dict[str, Any]) -> str | None:
    status = response.get("status")
    if status == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        return "content_filter" if reason == "content_filter" else "length"
    if status not in (None, "completed"):
        return str(status)
    return "tool_calls" if message.get("tool_calls") else "stop"


def chat_completion(response: Any) -> dict[str, Any] | None:
    """A Responses `response` as a `chat.completion` whose one message is the whole output
    (text and function calls of one answer merged). None when there is no output. Raises
    Rejected."""
    if not isinstance(response, dict):
        return None
    messages = chat_messages(core.output_items(response))
    if not messages:
        return None
    if any(m["role"] != "assistant" for m in messages):
        raise Rejected("invalid_message", "the response holds a non-assistant message")
    message = messages[0]
    for more in messages[1:]:  # several assistant messages in one answer: one turn
        texts = [t for t in (message.get("content"), more.get("content")) if t]
        message = {
            "role": "assistant",
            "content": "\n\n".join(texts) if texts else None,
            **(
                {"tool_calls": [*message.get("tool_calls", []), *more.get("tool_calls", [])]}
                if message.get("tool_calls") or more.get("tool_calls")
                else {}
            ),
        }
    raw_usage = response.get("usage")
    usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
    return {
        "id": response.get("id"),
        "object": "chat.completion",
        "model": response.get("model"),
        "choices": [
            {"index": 0, "message": message, "finish_reason": _finish_reason(response, message)}
        ],
        "usage": {
            "prompt_tokens": usage.get("input_tokens"),
            "completion_tokens": usage.get("output_tokens"),
            "total_tokens": usage.get("total_tokens"),
        },
    }


def as_chat(
    body: dict[str, Any], response: Any, context: Sequence[Any] = (), *, truncated: bool = False
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(chat request, chat.completion or None) for one Responses exchange. Raises Rejected,
    among others `truncated_history` when `truncated`."""
    if truncated:
        raise Rejected("truncated_history", "a previous_response_id the proxy never recorded")
    return chat_request(body, context), chat_completion(response)
