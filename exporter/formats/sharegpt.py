"""LLaMA-Factory ShareGPT format (`formatting: sharegpt` in `dataset_info.json`).

Shape: `{"conversations": [{"from": "human"|"gpt"|"function_call"|"observation", "value": str}],
"system"?: str, "tools"?: str}`. Turns alternate: human or observation, then gpt or function_call,
ending with gpt or function_call (LLaMA-Factory skips a sample whose turns do not alternate, so
several results are never several observation turns). A `function_call` value is the JSON of
`{"name", "arguments"}` (arguments as an object), or of a list of them for parallel calls, which
LLaMA-Factory's function formatter takes; the results of parallel calls become one
`observation` whose value is the JSON array of the result strings, in the order of the calls,
mirroring the list of calls. No model family's tags (such as Qwen's `<tool_response>`) are
written into the data: each LLaMA-Factory template wraps the observation in its own. `tools` is
a JSON string of the function schemas (`[{"name", "description", "parameters"}]`). Dataset
config: `"formatting": "sharegpt", "columns": {"messages": "conversations", "system": "system",
"tools": "tools"}`. `--train-on last` is LLaMA-Factory's `mask_history: true` (a training
setting, not a field of the data: the export summary says so).

What ShareGPT cannot hold raises Rejected('sharegpt_unrepresentable'): a system message after the
first turn, assistant text beside tool calls, images, turns that do not alternate.
"""

from __future__ import annotations

import json
from typing import Any

from exporter.messages import Rejected
from exporter.samples import Conversation
from proxy.core.fastjson import loads


def observation_value(results: list[str]) -> str:
    """The value of the observation turn answering one function_call turn: the result itself for
    one call, the JSON array of the results (in call order) for parallel calls."""
    if len(results) == 1:
        return results[0]
    return json.dumps(results, ensure_ascii=False)


def _unrepresentable(detail: str) -> Rejected:
    return Rejected("sharegpt_unrepresentable", detail)


def render(conversation: Conversation) -> dict[str, Any]:
    """The ShareGPT record of `conversation`. Raises Rejected (see the module docstring)."""
    messages = conversation.messages
    system: str | None = None
    if messages and messages[0]["role"] == "system":
        system = messages[0]["content"]
        messages = messages[1:]
    turns: list[dict[str, str]] = []
    index = 0
    while index < len(messages):
        message = messages[index]
        role = message["role"]
        index += 1
        if role == "system":
            raise _unrepresentable("a system message after the first turn")
        if role == "user":
            if not isinstance(message["content"], str):
                raise _unrepresentable("a user message with images")
            turns.append({"from": "human", "value": message["content"]})
        elif role == "assistant" and message.get("tool_calls"):
            if message.get("content"):
                raise _unrepresentable("assistant text beside tool calls")
            calls = [
                {"name": c["function"]["name"], "arguments": loads(c["function"]["arguments"])}
                for c in message["tool_calls"]
            ]
            value = calls[0] if len(calls) == 1 else calls
            turns.append({"from": "function_call", "value": json.dumps(value, ensure_ascii=False)})
            results = []
            while index < len(messages) and messages[index]["role"] == "tool":
                results.append(messages[index]["content"])
                index += 1
            if results:
                turns.append({"from": "observation", "value": observation_value(results)})
        elif role == "assistant":
            turns.append({"from": "gpt", "value": message["content"]})
        else:
            raise _unrepresentable(f"a {role} message out of place")
    for position, turn in enumerate(turns):
        expected = ("human", "observation") if position % 2 == 0 else ("gpt", "function_call")
        if turn["from"] not in expected:
            raise _unrepresentable(
                f"turn {position} is {turn['from']}, expected {' or '.join(expected)}"
            )
    if not turns or len(turns) % 2:
        raise _unrepresentable("the conversation does not end with an assistant turn")
    record: dict[str, Any] = {"conversations": turns}
    if system is not None:
        record["system"] = system
    if conversation.tools:
        record["tools"] = json.dumps(
            [t["function"] for t in conversation.tools], ensure_ascii=False
        )
    return record
