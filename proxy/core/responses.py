"""Responses API conversations: input items, their canonical form and rolling hash, and the
conversation a request stands for when it names a `previous_response_id`.

Pure functions, no I/O. Items are stored raw; these functions only read them.

- `input_items(body)`: `input` as a list of items (a string is one user message).
- `canonical_item(item)`: the parts of an item that define the conversation, so that what SDKs
  echo back does not change its hash: `id`, `status`, `encrypted_content`, `annotations`,
  `logprobs`, `phase` and `null` fields are left out, text parts (`input_text`, `output_text`)
  are joined into one string, `arguments` are compact sorted JSON, `developer` is `system`.
  `call_id` is kept: it chains a call to its output. Reasoning items are invisible to the
  conversation (`None`: not hashed; clients drop or keep them at will).
- `prefix_hashes(items)`: the rolling hash `h_i = sha256(h_{i-1} || canon(item_i))`, as chat's;
  `instructions` come first as a system message (they are per request: never inherited).
- `continuation_candidates`: prefixes that end in an item the model produced, longest first.
- `inherited_items(context, body, response)`: what a step hands to the request that names its
  response as `previous_response_id`: its own context, its input, its output (no instructions).
- `conversation_id(body)`: a request created in a conversation sees the conversation's items
  (mirrored by the proxy) before its input; `rebuild_context` reads them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from proxy.core.canonical import canonical_arguments

_ROLE_ALIASES = {"developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")
_DROPPED_FIELDS = frozenset(
    {"id", "status", "encrypted_content", "annotations", "logprobs", "phase", "index"}
)
# Items the model produces (an exchange's state can end in one of them).
MODEL_ITEM_TYPES = frozenset(
    {
        "function_call",
        "custom_tool_call",
        "web_search_call",
        "file_search_call",
        "computer_call",
        "code_interpreter_call",
        "image_generation_call",
        "local_shell_call",
        "shell_call",
        "apply_patch_call",
        "mcp_call",
        "mcp_list_tools",
        "mcp_approval_request",
        "tool_search_call",
    }
)


def item_type(item: Any) -> str | None:
    """An item's type: its `type`, or 'message' for an easy message (`{"role", "content"}`)."""
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if kind is None and "role" in item:
        return "message"
    return kind if isinstance(kind, str) else None


def input_items(body: Mapping[str, Any]) -> list[Any]:
    """The request's `input` as a list of items: a string is one user message, a list is itself,
    anything else (absent) is no items."""
    value = body.get("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list):
        return list(value)
    return []


def instructions_item(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """`instructions` as the system message it is to the model, or None when absent/empty."""
    value = body.get("instructions")
    if isinstance(value, str) and value:
        return {"type": "message", "role": "system", "content": value}
    return None


def output_items(response: Any) -> list[Any]:
    """A `response` object's `output` list ([] when it has none)."""
    if isinstance(response, dict) and isinstance(response.get("output"), list):
        return list(response["output"])
    return []


def _drop(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop(v) for k, v in value.items() if v is not None and k not in _DROPPED_FIELDS}
    if isinstance(value, list):
        return [_drop(v) for v in value]
    return value


def canonical_content(content: Any) -> Any:
    """Message content: one string when it is text only (parts joined), `None` when empty; a list
    of parts with ids, statuses and `null` fields dropped when it holds images, files, ..."""
    if content is None:
        return None
    if isinstance(content, str):
        return content or None
    if isinstance(content, list):
        if all(isinstance(p, dict) and p.get("type") in _TEXT_PARTS for p in content):
            return "".join(str(p.get("text") or "") for p in content) or None
        return [_drop(p) for p in content]
    return content


def canonical_item(item: Any) -> dict[str, Any] | None:
    """The parts of one item that define the conversation (see the module docstring); None for
    items the conversation does not show (reasoning). Never raises."""
    kind = item_type(item)
    if not isinstance(item, dict):
        return {"invalid": item}
    if kind == "reasoning":
        return None
    if kind == "message":
        role = item.get("role")
        out: dict[str, Any] = {
            "type": "message",
            "role": _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role,
        }
        content = canonical_content(item.get("content"))
        if content is not None:
            out["content"] = content
        return out
    if kind == "function_call":
        return {
            "type": kind,
            "call_id": item.get("call_id"),
            "name": item.get("name"),
            "arguments": canonical_arguments(item.get("arguments")),
        }
    if kind in ("function_call_output", "custom_tool_call_output"):
        return {
            "type": kind,
            "call_id": item.get("call_id"),
            "output": canonical_content(item.get("output")) or "",
        }
    if kind == "item_reference":
        return {"type": kind, "id": item.get("id")}
    dropped: dict[str, Any] = _drop(item)
    return dropped


def _item_bytes(canonical: dict[str, Any]) -> bytes:
    return json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass"
    )


def chain_hash(previous: str, item: Any) -> str:
    """`sha256(previous || canon(item))` as hex; `previous` unchanged for an item not hashed."""
    return _chain(previous, item_bytes(item))


def item_bytes(item: Any) -> bytes:
    """An item's canonical bytes as hashed, or b"" for an item that is not hashed."""
    canonical = canonical_item(item)
    return b"" if canonical is None else _item_bytes(canonical)


def _chain(previous: str, data: bytes) -> str:
    if not data:
        return previous
    digest = hashlib.sha256(b"responses:" + previous.encode("ascii"))
    digest.update(data)
    return digest.hexdigest()


def prefix_hashes(
    items: Iterable[Any], item_bytes_of: Callable[[Any], bytes] = item_bytes
) -> list[str]:
    """Rolling hashes of every prefix: element i is the hash of items[0..i] (inclusive).
    item_bytes_of: `item_bytes`, or a `proxy.core.canonical.CanonicalCache` of it."""
    hashes: list[str] = []
    previous = ""
    for item in items:
        previous = _chain(previous, item_bytes_of(item))
        hashes.append(previous)
    return hashes


def is_model_item(item: Any) -> bool:
    """Whether the model produced `item` (an assistant message or a tool call)."""
    kind = item_type(item)
    if kind == "message":
        return isinstance(item, dict) and item.get("role") == "assistant"
    return kind in MODEL_ITEM_TYPES


def continuation_candidates(items: Sequence[Any], hashes: Sequence[str]) -> list[str]:
    """Hashes of the prefixes that end in an item the model produced, longest first (the states
    of earlier exchanges a request could continue)."""
    return [hashes[i] for i in range(len(items) - 1, -1, -1) if is_model_item(items[i])]


def conversation_items(body: Mapping[str, Any], context: Sequence[Any] = ()) -> list[Any]:
    """What the model sees for this request, in order: instructions as a system message, the
    items inherited through `previous_response_id` (`context`), then the request's input."""
    head = instructions_item(body)
    return [*([head] if head else []), *context, *input_items(body)]


def inherited_items(context: Sequence[Any], body: Mapping[str, Any], response: Any) -> list[Any]:
    """What a request naming this exchange's response as `previous_response_id` inherits: the
    exchange's own context, its input items, its output items (its instructions are not)."""
    return [*context, *input_items(body), *output_items(response)]


def resolve_references(items: Sequence[Any], known: Mapping[str, Any]) -> tuple[list[Any], int]:
    """Replace each `item_reference {id}` whose id is in `known` (item id -> recorded item) by
    that item. Returns the items and how many references stayed unresolved."""
    out: list[Any] = []
    unresolved = 0
    for item in items:
        if item_type(item) == "item_reference":
            found = known.get(str(item.get("id")))
            if found is None:
                unresolved += 1
                out.append(item)
            else:
                out.append(found)
        else:
            out.append(item)
    return out, unresolved


def items_by_id(items: Iterable[Any]) -> dict[str, Any]:
    """Items that carry a string `id` (`msg_`, `rs_`, `fc_`, ...), by that id."""
    return {
        item["id"]: item
        for item in items
        if isinstance(item, dict)
        and isinstance(item.get("id"), str)
        and item_type(item) != "item_reference"
    }


_TIED_TO_ISSUER = ("previous_response_id", "conversation", "prompt", "background", "store")


def teacher_input(items: Sequence[Any]) -> list[Any]:
    """The visible history for a teacher (another org or provider): no `item_reference`,
    reasoning or compaction items (encrypted, tied to the org that issued them)."""
    out = []
    for item in items:
        kind = item_type(item)
        if kind in ("item_reference", "reasoning", "compaction"):
            continue
        out.append(item)
    return out


def teacher_request(body: Mapping[str, Any], items: Sequence[Any]) -> dict[str, Any]:
    """A Responses request for the teacher: the body with its conversation rebuilt in `input`
    (see `teacher_input`) and without `previous_response_id`, `conversation`, `prompt`,
    `background`, `store` (they refer to state on the issuer's servers)."""
    request = {k: v for k, v in body.items() if k not in _TIED_TO_ISSUER and k != "input"}
    request["input"] = teacher_input(items)
    return request


def response_key(response_id: str) -> str:
    """The state key under which a response id is findable (`previous_response_id` lookups share
    the state store with content hashes; the prefix keeps the two apart)."""
    return hashlib.sha256(
        b"response-id:" + response_id.encode("utf-8", "surrogatepass")
    ).hexdigest()


def previous_response_id(body: Mapping[str, Any]) -> str | None:
    """The request's `previous_response_id` when it is a non-empty string, else None."""
    value = body.get("previous_response_id")
    return value if isinstance(value, str) and value else None


def conversation_id(body: Mapping[str, Any]) -> str | None:
    """The request's `conversation` (an id string, or `{"id": ...}`) as its id, else None."""
    value = body.get("conversation")
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def needs_history(body: Mapping[str, Any]) -> bool:
    """Whether the request carries only new items, the rest of the conversation being state on
    the upstream's servers (`previous_response_id` or `conversation`): readers then rebuild it
    with `rebuild_context`."""
    return previous_response_id(body) is not None or conversation_id(body) is not None


def rebuild_context(
    exchanges: Mapping[str, Mapping[str, Any]], exchange_id: str
) -> tuple[list[Any], bool]:
    """The items exchange `exchange_id` inherits through `previous_response_id` or
    `conversation`, rebuilt from the recorded exchanges of its trajectory, and whether that
    history is truncated (a parent named by `previous_response_id` was not recorded here, or a
    conversation's items before this exchange are not known to the proxy).

    exchanges: exchange id -> `{"request": dict, "response": dict | None, "parent_id": str | None,
    "conversation_context": list | None}` (the last only for a request naming a `conversation`:
    the conversation's items before it, from `proxy.storage.conversations`). Only
    `previous_response_id` links are followed: a hash-stitched request resent its history.
    """
    chain: list[Mapping[str, Any]] = []
    truncated = False
    current = exchanges.get(exchange_id)
    seen = {exchange_id}
    while current is not None and previous_response_id(current["request"]):
        parent_id = current.get("parent_id")
        parent = exchanges.get(parent_id) if isinstance(parent_id, str) else None
        if parent is None or parent_id in seen:
            truncated = True
            break
        seen.add(parent_id)  # type: ignore[arg-type]
        chain.append(parent)
        current = parent
    context: list[Any] = []
    if not truncated and current is not None and conversation_id(current["request"]):
        known = current.get("conversation_context")
        if isinstance(known, list):
            context = list(known)
        else:
            truncated = True
    for step in reversed(chain):
        context = inherited_items(context, step["request"], step.get("response"))
    return context, truncated


def recorded_exchange(row: Mapping[str, Any]) -> dict[str, Any]:
    """An `exchanges` row (`request_json`, `response_json`, `parent_id`, and the
    `conversation_context` that `Database.exchanges_of` attaches) as `rebuild_context` reads it:
    `{"request": dict, "response": dict | None, "parent_id", "conversation_context"}`; JSON
    that does not decode reads as empty."""

    def load(text: Any) -> Any:
        try:
            return json.loads(text) if isinstance(text, str) else None
        except ValueError:
            return None

    request = load(row.get("request_json"))
    return {
        "request": request if isinstance(request, dict) else {},
        "response": load(row.get("response_json")),
        "parent_id": row.get("parent_id"),
        "conversation_context": row.get("conversation_context"),
    }


def _display_content(content: Any) -> Any:
    """Responses message content as chat content parts for display (text parts, image_url,
    `file`, refusals); unknown parts are kept as they are."""
    if not isinstance(content, list):
        return content
    parts: list[Any] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": str(part.get("text") or "")})
        elif kind == "input_image":
            parts.append(
                {
                    "type": "image_url",
                    "image_url": {"url": part.get("image_url") or part.get("file_id") or ""},
                }
            )
        elif kind == "input_file":
            parts.append(
                {"type": "file", "file": {"filename": part.get("filename") or part.get("file_id")}}
            )
        else:
            parts.append(part)
    return parts


def reasoning_text(item: Mapping[str, Any]) -> str:
    """What a reasoning item shows: its summary texts, and its encrypted content as such
    (`[encrypted reasoning: N characters]`), never decoded."""
    texts = [
        str(part.get("text") or "") for part in item.get("summary") or [] if isinstance(part, dict)
    ]
    encrypted = item.get("encrypted_content")
    if isinstance(encrypted, str) and encrypted:
        texts.append(f"[encrypted reasoning: {len(encrypted):,} characters]")
    return "\n\n".join(t for t in texts if t) or "[reasoning without a summary]"


def display_messages(items: Sequence[Any]) -> list[dict[str, Any]]:
    """Responses items as chat-shaped messages for the dashboard (never raises): messages keep
    their role and content, consecutive `function_call`s join one assistant message's
    `tool_calls` (id from `call_id`), `function_call_output` is a `tool` message, a reasoning
    item becomes the `reasoning` of the assistant message that follows it, and any other item
    (built-in or custom tool calls, compaction, unresolved references) a message whose role is
    its type and whose content is the item itself."""
    messages: list[dict[str, Any]] = []
    reasoning: list[str] = []

    def assistant() -> dict[str, Any]:
        last = messages[-1] if messages else None
        if last is not None and last.get("role") == "assistant" and not reasoning:
            return last
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if reasoning:
            message["reasoning"] = "\n\n".join(reasoning)
            reasoning.clear()
        messages.append(message)
        return message

    for item in items:
        kind = item_type(item)
        if not isinstance(item, dict):
            messages.append({"role": "other", "content": json.dumps(item)})
        elif kind == "reasoning":
            reasoning.append(reasoning_text(item))
        elif kind == "message" and item.get("role") == "assistant":
            message: dict[str, Any] = {
                "role": "assistant",
                "content": _display_content(item.get("content")),
            }
            if reasoning:
                message["reasoning"] = "\n\n".join(reasoning)
                reasoning.clear()
            messages.append(message)
        elif kind == "message":
            messages.append(
                {"role": item.get("role"), "content": _display_content(item.get("content"))}
            )
        elif kind == "function_call":
            assistant().setdefault("tool_calls", []).append(
                {
                    "id": item.get("call_id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")},
                }
            )
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": _display_content(output),
                }
            )
        else:
            messages.append({"role": str(kind or "other"), "content": [item]})
    if reasoning:
        messages.append({"role": "assistant", "content": None, "reasoning": "\n\n".join(reasoning)})
    return messages
