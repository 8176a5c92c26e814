"""Canonical chat messages and the rolling hash that stitches exchanges into trajectories.

Pure functions, no I/O. A message is canonicalized so that what SDKs echo back does not change its
hash: absent vs `null` fields, response-only fields (`refusal`, `annotations`, `audio`), content as
a string vs a list of text parts, `arguments` JSON whitespace and key order, `developer` vs
`system`. Tool-call ids are kept: they chain a call to its result.

Hashes are SHA-256 hex strings (64 characters). For messages m_1..m_n the prefix hashes are
`h_i = sha256(h_{i-1} || canon(m_i))` with `h_0 = ""`; an exchange's *state* is the hash of its
request messages followed by its response message.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from proxy.core.memo import SizedMemo

# Fields a message can carry that matter to the conversation. Everything else (refusal,
# annotations, audio, reasoning fields some providers add, SDK extras) is left out of the hash.
_ROLE_ALIASES = {"developer": "system"}


def canonical_arguments(arguments: Any) -> str:
    """Tool-call `arguments` as compact JSON with sorted keys.

    Accepts the JSON string the API sends or an already-parsed object (some clients re-serialize).
    No arguments (absent, `null` or an empty / blank string, which some clients echo for a call the
    API sent as "{}") is "{}". A string that is not valid JSON is kept as it is, stripped of
    surrounding white space.
    """
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        if not arguments.strip():
            return "{}"
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return arguments.strip()
    else:
        parsed = arguments
    return json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_content(content: Any) -> Any:
    """Message content as one string when it is text only; `None` when empty.

    A list of `{"type": "text", "text": ...}` parts becomes the concatenation of the texts (the
    model sees them joined). A list with other parts (images, audio, files) is kept as a list of
    parts with `None` fields dropped.
    """
    if content is None:
        return None
    if isinstance(content, str):
        return content or None
    if isinstance(content, list):
        if all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            text = "".join(str(p.get("text") or "") for p in content)
            return text or None
        return [_drop_nones(p) for p in content]
    return content


def _drop_nones(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nones(v) for v in value]
    return value


def _canonical_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    if not isinstance(function, dict):  # malformed: keep it as sent, hashing must not fail
        return _drop_nones({k: v for k, v in call.items() if k != "index"})
    out: dict[str, Any] = {
        "id": call.get("id"),
        "type": call.get("type") or "function",
        "function": {
            "name": function.get("name"),
            "arguments": canonical_arguments(function.get("arguments")),
        },
    }
    if out["type"] != "function":  # e.g. custom tools: keep their payload as sent
        out = _drop_nones({k: v for k, v in call.items() if k != "index"})
    return out


def canonical_message(message: Any) -> dict[str, Any]:
    """The parts of one chat message that define the conversation, in a fixed shape.

    Shape: `{"role", "content"?, "name"?, "tool_calls"?, "tool_call_id"?, "function_call"?}`;
    keys with empty values are omitted. A message that is not an object is wrapped as
    `{"invalid": <value>}` so hashing never fails on odd input.
    """
    if not isinstance(message, dict):
        return {"invalid": message}
    role = message.get("role")
    out: dict[str, Any] = {"role": _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role}
    content = canonical_content(message.get("content"))
    if content is not None:
        out["content"] = content
    name = message.get("name")
    if name:
        out["name"] = name
    tool_calls = message.get("tool_calls")
    if tool_calls and isinstance(tool_calls, list):
        out["tool_calls"] = [
            _canonical_tool_call(c) if isinstance(c, dict) else c for c in tool_calls
        ]
    elif tool_calls:
        out["tool_calls"] = tool_calls
    tool_call_id = message.get("tool_call_id")
    if tool_call_id:
        out["tool_call_id"] = tool_call_id
    function_call = message.get("function_call")
    if function_call and isinstance(function_call, dict):
        out["function_call"] = {
            "name": function_call.get("name"),
            "arguments": canonical_arguments(function_call.get("arguments")),
        }
    elif function_call:
        out["function_call"] = function_call
    return out


def canonical_bytes(message: Any) -> bytes:
    """`canonical_message(message)` as the bytes hashed: JSON, sorted keys, compact, UTF-8."""
    # surrogatepass: JSON may carry a lone surrogate escape ("\ud83d", half an emoji cut by a
    # client); it must hash, not raise.
    return json.dumps(
        canonical_message(message), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8", "surrogatepass")


def chain_hash(previous: str, message: Any) -> str:
    """`sha256(previous || canon(message))` as hex: one step of the rolling hash."""
    return _chain(previous, canonical_bytes(message))


def _chain(previous: str, data: bytes) -> str:
    digest = hashlib.sha256(previous.encode("ascii"))
    digest.update(data)
    return digest.hexdigest()


def prefix_hashes(
    messages: Iterable[Any], message_bytes: Callable[[Any], bytes] = canonical_bytes
) -> list[str]:
    """Rolling hashes of every prefix: element i is the hash of messages[0..i] (inclusive).
    message_bytes: a message's canonical bytes (a `CanonicalCache` of them, or computed)."""
    hashes: list[str] = []
    previous = ""
    for message in messages:
        previous = _chain(previous, message_bytes(message))
        hashes.append(previous)
    return hashes


class CanonicalCache:
    """The canonical bytes of messages (or Responses items) seen lately, by their compact JSON.

    An agent resends its whole history at every step. Canonicalizing is the costly part of a
    message's hash (keys sorted, `arguments` parsed and dumped again), so with this cache each
    message is canonicalized once, and a later step pays a compact dump (orjson) and a lookup per
    message it resends. Equal compact JSON means equal messages, so the bytes are the same ones
    `canonical(message)` gives. A message orjson cannot dump (a lone surrogate, an integer beyond
    64 bits) is canonicalized each time. At most `limit_bytes` of keys and values are kept
    (`proxy.core.memo.SizedMemo`). Not thread-safe (one per event loop).
    """

    def __init__(self, canonical: Callable[[Any], bytes], limit_bytes: int = 8 << 20) -> None:
        self._canonical = canonical
        self._memo: SizedMemo[bytes, bytes] = SizedMemo(limit_bytes)
        self.hits = 0

    def __call__(self, message: Any) -> bytes:
        try:
            key = orjson.dumps(message)
        except TypeError:
            return self._canonical(message)
        found = self._memo.get(key)
        if found is not None:
            self.hits += 1
            return found
        value = self._canonical(message)
        self._memo.put(key, value, len(key) + len(value))
        return value


def continuation_candidates(messages: Sequence[Any], hashes: Sequence[str]) -> list[str]:
    """Hashes of the prefixes that end in an assistant message, longest first.

    These are the states of earlier exchanges that a request could continue.
    """
    return [
        hashes[i]
        for i in range(len(messages) - 1, -1, -1)
        if isinstance(messages[i], dict) and messages[i].get("role") == "assistant"
    ]


def response_message(response: Any) -> dict[str, Any] | None:
    """`choices[0].message` of a `chat.completion` dict (the answer a state hash ends with), or
    None when `response` has no such message."""
    if not isinstance(response, dict):
        return None
    choices = response.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict):
            return message
    return None
