"""Hugging Face format (TRL `SFTTrainer`, transformers `apply_chat_template`, Axolotl `chat_template`).

Shape: `{"messages": [...], "tools": [...]}` where assistant tool calls carry `arguments` as a JSON
**object** (what chat templates index into), tool messages carry `tool_call_id` and the called
function's `name` (templates such as Llama 3.1 and Gemma read it), assistant messages that only
call tools have `content: ""` (never null: some templates `| trim` it), and `tools` is the list of
OpenAI-style function schemas (`[]` when none, so every row has the same columns).
`weight` (0/1) stays on assistant messages when `--train-on` is not `all` (Axolotl:
`message_field_training: weight`); TRL trains every assistant turn with `assistant_only_loss`.
"""

from __future__ import annotations

import json
from typing import Any

from exporter.samples import Conversation


def render(conversation: Conversation) -> dict[str, Any]:
    """The TRL/transformers record of `conversation`."""
    names: dict[str, str] = {}
    messages: list[dict[str, Any]] = []
    for message in conversation.messages:
        role = message["role"]
        if role == "assistant":
            out: dict[str, Any] = {"role": "assistant", "content": message.get("content", "")}
            calls = message.get("tool_calls")
            if calls:
                out["tool_calls"] = []
                for call in calls:
                    function = call["function"]
                    names[call["id"]] = function["name"]
                    out["tool_calls"].append(
                        {
                            "id": call["id"],
                            "type": "function",
                            "function": {
                                "name": function["name"],
                                "arguments": json.loads(function["arguments"]),
                            },
                        }
                    )
            if "name" in message:
                out["name"] = message["name"]
            if "weight" in message:
                out["weight"] = message["weight"]
            messages.append(out)
        elif role == "tool":
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": message["tool_call_id"],
                    "name": names.get(message["tool_call_id"], ""),
                    "content": message["content"],
                }
            )
        else:
            messages.append(dict(message))
    return {"messages": messages, "tools": conversation.tools}
