"""OpenAI fine-tuning chat format: one JSON object per line.

Shape: `{"messages": [...], "tools"?: [...], "parallel_tool_calls"?: bool}`. Messages are exactly
the `Conversation`'s (arguments as JSON strings, tool content as strings, `weight` 0/1 on assistant
messages when `--train-on` is not `all`). `tools` and `parallel_tool_calls` appear only when the
recorded request had tools. Source: OpenAI fine-tuning guide, "chat-input" reference.
"""

from __future__ import annotations

from typing import Any

from exporter.samples import Conversation


def render(conversation: Conversation) -> dict[str, Any]:
    """The OpenAI fine-tuning record of `conversation`."""
    record: dict[str, Any] = {"messages": conversation.messages}
    if conversation.tools:
        record["tools"] = conversation.tools
        if conversation.parallel_tool_calls is not None:
            record["parallel_tool_calls"] = conversation.parallel_tool_calls
    return record
