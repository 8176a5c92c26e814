"""Hugging Face format for TRL's `SFTTrainer` (and transformers' `apply_chat_template`).

Messages are in chat-template form: assistant tool calls carry `arguments` as a JSON **object**
(what chat templates index into), tool messages carry `tool_call_id` and the called function's
`name` (templates such as Llama 3.1 and Gemma read it), assistant messages that only call tools
have `content: ""` (never null: some templates `| trim` it), and `tools` is the list of
OpenAI-style function schemas (`[]` when none, so every row has the same columns).

Shape, by `--train-on` (what TRL can express):
- `all`: `{"messages": [...], "tools": [...]}`, TRL's conversational language-modeling layout;
  train with `assistant_only_loss=True` to train every assistant turn.
- `last`: `{"prompt": [...], "completion": [last assistant message], "tools": [...]}`, TRL's
  conversational prompt-completion layout: `SFTTrainer` trains the completion only
  (`completion_only_loss`, its default for this layout).
- `final` / `tool-calls`: TRL cannot train some assistant turns and not others; the options check
  refuses them for this format (`--format axolotl` carries them per message).
Source: TRL documentation, "Dataset formats and types".
"""

from __future__ import annotations

from typing import Any

from exporter.samples import Conversation
from proxy.core.fastjson import loads


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-form messages in chat-template form (see the module docstring); `weight` dropped."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "assistant":
            item: dict[str, Any] = {"role": "assistant", "content": message.get("content", "")}
            calls = message.get("tool_calls")
            if calls:
                item["tool_calls"] = []
                for call in calls:
                    function = call["function"]
                    names[call["id"]] = function["name"]
                    item["tool_calls"].append(
                        {
                            "id": call["id"],
                            "type": "function",
                            "function": {
                                "name": function["name"],
                                "arguments": loads(function["arguments"]),
                            },
                        }
                    )
            if "name" in message:
                item["name"] = message["name"]
            out.append(item)
        elif role == "tool":
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": message["tool_call_id"],
                    "name": names.get(message["tool_call_id"], ""),
                    "content": message["content"],
                }
            )
        else:
            out.append(dict(message))
    return out


def render(conversation: Conversation) -> dict[str, Any]:
    """The TRL record of `conversation`: `messages`, or `prompt` + `completion` when assistant
    messages carry weights (`--train-on last`: only the last one has weight 1).

    Raises ValueError for any other weights (the options check refuses them first).
    """
    messages = chat_messages(conversation.messages)
    if not any("weight" in m for m in conversation.messages):
        return {"messages": messages, "tools": conversation.tools}
    assistants = [i for i, m in enumerate(conversation.messages) if m["role"] == "assistant"]
    last = assistants[-1]
    if any(conversation.messages[i].get("weight", 1) for i in assistants[:-1]) or not (
        conversation.messages[last].get("weight", 1)
    ):
        raise ValueError("the hf format trains every assistant message or only the last one")
    return {"prompt": messages[:last], "completion": messages[last:], "tools": conversation.tools}
