"""Output formats: one module per format, each a pure `render` from a `Conversation` to one record.

Supervised fine-tuning, one sample per trajectory leaf:
- `openai`: OpenAI fine-tuning chat JSONL (`messages`, `tools`, `parallel_tool_calls`; arguments
  as JSON strings, `weight` for `--train-on`).
- `hf`: Hugging Face TRL `SFTTrainer` / transformers chat templates (`messages` + `tools`,
  arguments as objects; `prompt` + `completion` for `--train-on last`).
- `axolotl`: Axolotl `chat_template` (`hf`'s messages, each marked `training: true|false`).
- `sharegpt`: LLaMA-Factory ShareGPT (`conversations` of human / gpt / function_call /
  observation, `system`, `tools` as a JSON string).
Preference pairs, from exchanges with a shadow (teacher) answer (`exporter.formats.dpo.build_pair`):
- `dpo`: OpenAI preference fine-tuning (`input`, `preferred_output`, `non_preferred_output`).
- `hf-dpo`: TRL `DPOTrainer`'s conversational preference layout (`prompt`, `chosen`,
  `rejected` as message lists, `tools`, arguments as objects, tool messages with `name`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exporter.formats import axolotl, hf, openai, sharegpt
from exporter.samples import Conversation

FORMATS: tuple[str, ...] = ("openai", "hf", "axolotl", "sharegpt", "dpo", "hf-dpo")
"""Every `--format` value; the preference formats read shadow pairs instead of leaves."""

PREFERENCE_FORMATS: tuple[str, ...] = ("dpo", "hf-dpo")
"""Formats built from shadow pairs (`proxy.storage.reading.shadow_query`), not leaves."""

RENDERERS: dict[str, Callable[[Conversation], dict[str, Any]]] = {
    "openai": openai.render,
    "hf": hf.render,
    "axolotl": axolotl.render,
    "sharegpt": sharegpt.render,
}
"""Leaf-based formats: name -> `render(conversation) -> record` (raises samples.Rejected)."""

FLOAT_FREE_FORMATS: frozenset[str] = frozenset({"openai", "sharegpt"})
"""Leaf-based formats whose records never hold a float, whatever was recorded: every value is a
string (content, names, arguments as JSON strings), a boolean, a 0/1 weight or null, and the
tools (`openai`) are written apart. (`hf` and `axolotl` parse `arguments` into objects, which
may hold floats.) Their lines need no look for floats (`exporter.building.json_bytes`)."""

TRAIN_ON_SUPPORT: dict[str, tuple[str, ...]] = {
    "openai": ("all", "final", "tool-calls", "last"),
    "hf": ("all", "last"),
    "axolotl": ("all", "final", "tool-calls", "last"),
    "sharegpt": ("all", "last"),
    "dpo": ("all",),
    "hf-dpo": ("all",),
}
"""`--train-on` values each format's trainer can express: OpenAI `weight` and Axolotl's
per-message `training` field take any choice; TRL's prompt/completion layout and LLaMA-Factory's
`mask_history` train the last turn only; a preference pair trains its one answer."""

__all__ = ["FLOAT_FREE_FORMATS", "FORMATS", "PREFERENCE_FORMATS", "RENDERERS", "TRAIN_ON_SUPPORT"]
