"""Output formats: one module per format, each a pure `render` from a `Conversation` to one record.

- `openai`: OpenAI fine-tuning chat JSONL (`messages`, `tools`, `parallel_tool_calls`).
- `hf`: Hugging Face TRL / transformers / Axolotl `chat_template` (`messages` + `tools`, arguments
  as objects).
- `sharegpt`: LLaMA-Factory ShareGPT (`conversations` of human / gpt / function_call /
  observation, `system`, `tools` as a JSON string).
- `dpo`: OpenAI preference fine-tuning (`input`, `preferred_output`, `non_preferred_output`),
  built from exchanges with a shadow answer (`exporter.formats.dpo.build_pair`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exporter.formats import hf, openai, sharegpt
from exporter.samples import Conversation

FORMATS: tuple[str, ...] = ("openai", "hf", "sharegpt", "dpo")
"""Every `--format` value; `dpo` reads shadow pairs instead of leaves."""

RENDERERS: dict[str, Callable[[Conversation], dict[str, Any]]] = {
    "openai": openai.render,
    "hf": hf.render,
    "sharegpt": sharegpt.render,
}
"""Leaf-based formats: name -> `render(conversation) -> record` (raises samples.Rejected)."""

__all__ = ["FORMATS", "RENDERERS"]
