"""Token counts for answers that came without `usage`: a stream sent without
`stream_options.include_usage` gets no usage chunk, so the proxy counts the tokens itself,
offline with tiktoken (encodings bundled in litellm's package), and marks the figure estimated.

The count follows OpenAI's published recipe for chat messages (openai-cookbook, "How to count
tokens with tiktoken"): 3 tokens per message plus its role and content, 1 more for a name, 3 to
prime the reply; tool definitions and tool calls are counted as their JSON text, which is close
to (not exactly) what the API charges. Pure apart from loading an encoding once per model.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from proxy.core.promotion import _bare_model, use_bundled_tiktoken

FALLBACK_ENCODING = "o200k_base"
"""The encoding for models tiktoken does not know (gpt-4o and later use it)."""

_PER_MESSAGE = 3
_PER_NAME = 1
_REPLY_PRIMING = 3


@functools.lru_cache(maxsize=64)
def _encoding(model: str) -> Any:
    use_bundled_tiktoken()
    import tiktoken

    try:
        return tiktoken.encoding_for_model(_bare_model(model))
    except (KeyError, ValueError):
        return tiktoken.get_encoding(FALLBACK_ENCODING)


def _text(value: Any) -> str:
    """The countable text of a message field: strings as they are, text parts joined, anything
    else (tool calls, images' metadata) as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = [p.get("text") for p in value if isinstance(p.get("text"), str)]
        if len(texts) == len(value):
            return "".join(str(t) for t in texts)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _message_tokens(encoding: Any, message: dict[str, Any]) -> int:
    tokens = _PER_MESSAGE
    for key in ("role", "content", "tool_calls", "tool_call_id", "function_call"):
        text = _text(message.get(key))
        if text:
            tokens += len(encoding.encode(text, disallowed_special=()))
    if message.get("name"):
        tokens += _PER_NAME + len(encoding.encode(str(message["name"]), disallowed_special=()))
    return tokens


def estimate_usage(request: dict[str, Any], response: dict[str, Any]) -> dict[str, Any] | None:
    """Estimated `usage` for a `chat.completion` (`response`) answering `request`, or None when
    the answer has no message to count.

    Returns `{"prompt_tokens", "completion_tokens", "total_tokens", "estimated": True,
    "encoding": NAME}`: prompt = request messages (+ tool definitions as JSON), completion =
    every choice's message (content, tool calls).
    """
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    model = str(response.get("model") or request.get("model") or "")
    encoding = _encoding(model)
    messages = request.get("messages")
    prompt = _REPLY_PRIMING
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict):
            prompt += _message_tokens(encoding, message)
    tools = request.get("tools")
    if tools:
        prompt += len(encoding.encode(_text(tools), disallowed_special=()))
    completion = 0
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            completion += _message_tokens(encoding, message) - _PER_MESSAGE
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "estimated": True,
        "encoding": encoding.name,
    }
