"""Tool-call promotion: raise the logit of the token " to" so the student calls tools more often.

In OpenAI's chat format the assistant addresses a tool by writing ` to=functions.NAME` in its
header, so a positive bias on " to" makes a tool call likelier. The token id comes from tiktoken
for the model's encoding, offline (tiktoken files bundled in litellm's package): 316 in
`o200k_base` (gpt-4o, gpt-4.1), 311 in `cl100k_base` (gpt-4, gpt-3.5). Pure apart from loading
the encoding once per model.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

# Reasoning models ignore logit_bias (or reject it); they are never biased.
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5", "gpt-oss")


def use_bundled_tiktoken() -> None:
    """Point tiktoken at the encodings bundled in litellm's package (no download at run time).

    Leaves an existing TIKTOKEN_CACHE_DIR alone. Finds litellm without importing it.
    """
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return
    spec = importlib.util.find_spec("litellm")
    if spec and spec.submodule_search_locations:
        bundled = (
            Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
        )
        if bundled.is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(bundled)


def _bare_model(model: str) -> str:
    """`openai/gpt-4.1` -> `gpt-4.1`; a fine-tuned `ft:gpt-4.1-mini-2025-04-14:org::id` -> its
    base model (tiktoken would match `ft:gpt-4` and give the wrong encoding)."""
    name = model.split("/", 1)[1] if model.startswith("openai/") else model
    if name.startswith("ft:"):
        name = name.split(":")[1]
    return name


def is_reasoning_model(model: str) -> bool:
    """o-series and gpt-5 reasoning models (`gpt-5-chat*` is not one)."""
    name = _bare_model(model).lower()
    return name.startswith(_REASONING_PREFIXES) and "-chat" not in name


@functools.lru_cache(maxsize=256)
def tool_call_token(model: str) -> int | None:
    """The token id of " to" in `model`'s encoding, or None for models tiktoken does not know
    (not an OpenAI model) or where " to" is not a single token."""
    use_bundled_tiktoken()
    import tiktoken

    try:
        encoding = tiktoken.encoding_for_model(_bare_model(model))
    except (KeyError, ValueError):
        return None
    tokens = encoding.encode(" to")
    return tokens[0] if len(tokens) == 1 else None


def promote_tool_calls(
    body: dict[str, Any], bias: float, *, drop_sampling: bool = False
) -> dict[str, int | float] | None:
    """Add `{token(" to"): bias}` to `body["logit_bias"]` in place when promotion applies.

    Applies to a request that offers tools, whose `tool_choice` is not "none", to a non-reasoning
    OpenAI model. The client's own entries are kept (a client entry for the same token wins).
    With `drop_sampling`, `temperature` and `top_p` are removed (reported to weaken the bias).
    Returns the entries added (`{"316": 5}`), or None when nothing was changed.
    """
    model = body.get("model")
    if not isinstance(model, str) or not body.get("tools") or body.get("tool_choice") == "none":
        return None
    if is_reasoning_model(model):
        return None
    token = tool_call_token(model)
    if token is None:
        return None
    existing = body.get("logit_bias")
    merged: dict[str, Any] = dict(existing) if isinstance(existing, dict) else {}
    key = str(token)
    if key in merged:
        return None
    merged[key] = int(bias) if float(bias).is_integer() else bias
    body["logit_bias"] = merged
    if drop_sampling:
        body.pop("temperature", None)
        body.pop("top_p", None)
    return {key: merged[key]}
