"""Offline token estimates for answers without `usage` (`proxy.core.usage`), pure."""

from __future__ import annotations

import tiktoken

from proxy.core.promotion import use_bundled_tiktoken
from proxy.core.usage import estimate_usage


def completion(message: dict[str, object], model: str = "gpt-4.1-mini") -> dict[str, object]:
    return {"model": model, "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}


def test_counts_follow_the_chat_recipe() -> None:
    use_bundled_tiktoken()
    encoding = tiktoken.get_encoding("o200k_base")
    request = {
        "model": "gpt-4.1-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Where is order A1234?"},
        ],
    }
    usage = estimate_usage(request, completion({"role": "assistant", "content": "Delivered."}))
    assert usage is not None
    expected_prompt = 3 + sum(
        3 + len(encoding.encode(m["role"])) + len(encoding.encode(m["content"]))
        for m in request["messages"]
    )
    assert usage["prompt_tokens"] == expected_prompt
    assert usage["completion_tokens"] == len(encoding.encode("assistant")) + len(
        encoding.encode("Delivered.")
    )
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert (usage["estimated"], usage["encoding"]) == (True, "o200k_base")


def test_tools_and_tool_calls_count_and_older_models_use_their_encoding() -> None:
    request = {"model": "gpt-4", "messages": [{"role": "user", "content": "find it"}]}
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        ],
    }
    bare = estimate_usage(request, completion(call, "gpt-4"))
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    offered = estimate_usage({**request, "tools": tools}, completion(call, "gpt-4"))
    assert bare is not None and offered is not None
    assert bare["encoding"] == "cl100k_base"
    assert offered["prompt_tokens"] > bare["prompt_tokens"]
    assert bare["completion_tokens"] > 5  # the tool call's JSON is counted
    unknown = estimate_usage(request, completion({"role": "assistant", "content": "x"}, "llama"))
    assert unknown is not None and unknown["encoding"] == "o200k_base"
    assert estimate_usage(request, {"choices": []}) is None
