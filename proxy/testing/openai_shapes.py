"""Bodies in the shape the OpenAI API sends them, every field included: what a recorded answer
really weighs (`bench/`), and what storage must give back exactly (tests). Pure: no I/O."""

from __future__ import annotations

from typing import Any

MODEL_SNAPSHOT = "gpt-4.1-mini-2025-04-14"
SYSTEM_FINGERPRINT = "fp_6f2eabb9a5"


def openai_usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> dict[str, Any]:
    """A chat.completion's `usage`, with the token details OpenAI sends (counts in tokens)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_completion(
    message: dict[str, Any],
    *,
    completion_id: str,
    created: int,
    usage: dict[str, Any],
    model: str = MODEL_SNAPSHOT,
) -> dict[str, Any]:
    """A whole `chat.completion` body with one choice holding the assistant `message` (as
    given: add `refusal` / `annotations` for the API's exact shape); finish_reason
    `tool_calls` when the message calls tools, else `stop`. created: Unix seconds."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
            }
        ],
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
