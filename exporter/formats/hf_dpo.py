"""TRL's conversational preference layout (`DPOTrainer`), from the same shadow pairs as `dpo`.

Shape: `{"prompt": [...], "chosen": [assistant message], "rejected": [assistant message],
"tools": [...]}`: message lists in chat-template form (`exporter.formats.hf.chat_messages`:
tool-call `arguments` as JSON objects, tool messages with the called function's `name`,
`content: ""` beside tool calls), `tools` the OpenAI-style function schemas (`[]` when none,
which TRL passes to the chat template per row). The chosen answer is the teacher's shadow
answer, the rejected one the student's answer the app received. `--format dpo` is OpenAI's
preference layout (`input` / `preferred_output` / `non_preferred_output`, arguments as strings);
this is the one TRL, and trainers that read TRL's layout, take. Source: TRL documentation,
"Dataset formats and types" (preference, conversational).
"""

from __future__ import annotations

from typing import Any

from exporter.formats.hf import chat_messages


def render_pair(record: dict[str, Any]) -> dict[str, Any]:
    """The TRL preference record of an OpenAI preference record (`formats.dpo.build_pair`)."""
    prompt = record["input"]["messages"]
    chosen = chat_messages([*prompt, *record["preferred_output"]])
    rejected = chat_messages([*prompt, *record["non_preferred_output"]])
    return {
        "prompt": chosen[: len(prompt)],
        "chosen": chosen[len(prompt) :],
        "rejected": rejected[len(prompt) :],
        "tools": record["input"].get("tools") or [],
    }
