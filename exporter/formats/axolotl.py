"""Axolotl `chat_template` format, with the turns to train marked on every message.

Shape: `{"messages": [...], "tools": [...]}` as in `exporter.formats.hf` (arguments as objects,
tool messages with `name`), plus `"training": true|false` on every message: true on the
assistant messages `--train-on` chooses (weight 1), false on every other message. Axolotl reads
the flag with `message_field_training: training` in the dataset config, and trains exactly those
messages, whatever `roles_to_train` says. Dataset config:

    datasets:
      - path: train.jsonl
        type: chat_template
        field_messages: messages
        message_field_training: training

Source: Axolotl documentation, "Conversation" dataset formats (`chat_template`).
"""

from __future__ import annotations

from typing import Any

from exporter.formats.hf import chat_messages
from exporter.samples import Conversation

TRAINING_FIELD = "training"
"""The per-message field Axolotl's `message_field_training` names."""


def render(conversation: Conversation) -> dict[str, Any]:
    """The Axolotl record of `conversation` (every message marked trained or not)."""
    messages = chat_messages(conversation.messages)
    for source, message in zip(conversation.messages, messages, strict=True):
        message[TRAINING_FIELD] = source["role"] == "assistant" and source.get("weight", 1) != 0
    return {"messages": messages, "tools": conversation.tools}
