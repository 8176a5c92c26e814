"""Token counts, per-model sample limits and training prices, all offline.

Tokenizers come from tiktoken, read from the BPE files litellm ships (its
`litellm_core_utils/tokenizers` directory, found with `importlib.util.find_spec` so litellm itself
is never imported): `TIKTOKEN_CACHE_DIR` points there unless the user set it. Nothing is loaded
at import; the first count loads the encoding (~0.3 s).

Counts follow OpenAI's published recipe for chat messages (cookbook "How to count tokens with
tiktoken"): 3 tokens per message, the tokens of its role, content and name (+1), 3 to prime the
reply; tool calls add their name and `arguments` plus 3; `tools` add the tokens of their compact
JSON. It is an estimate of what OpenAI bills, within a few percent; open models' tokenizers differ.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from proxy.core.promotion import use_bundled_tiktoken

ENCODING_O200K = "o200k_base"
ENCODING_CL100K = "cl100k_base"

# Most tokens in one training sample (OpenAI's fine-tuning guide, per base model).
TOKEN_LIMITS: dict[str, int] = {
    "gpt-4.1": 65_536,
    "gpt-4.1-mini": 65_536,
    "gpt-4.1-nano": 32_768,
}

# Training price in USD per 1M training tokens (OpenAI pricing page, fine-tuning section, 2025;
# billed tokens = tokens in the training file x epochs). Models not listed: no estimate.
TRAINING_USD_PER_M_TOKENS: dict[str, float] = {
    "gpt-4.1": 25.00,
    "gpt-4.1-mini": 5.00,
    "gpt-4.1-nano": 1.50,
    "gpt-4o": 25.00,
    "gpt-4o-mini": 3.00,
    "gpt-3.5-turbo": 8.00,
}

_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_PER_TOOL_CALL = 3
TOKENS_REPLY_PRIMING = 3


class TokenizerError(RuntimeError):
    """The tokenizer cannot be loaded offline (one-line message for users)."""


def base_model_name(model: str) -> str:
    """`ft:gpt-4.1-mini-2025-04-14:org::id` or `openai/gpt-4.1-mini` -> `gpt-4.1-mini`."""
    name = model.strip()
    if name.startswith("ft:"):
        name = name[3:].split(":", 1)[0]
    name = name.rsplit("/", 1)[-1]
    return _SNAPSHOT.sub("", name)


def encoding_name(model: str) -> str:
    """tiktoken encoding of a model: o200k_base for gpt-4o / gpt-4.1 / o-series, cl100k_base before."""
    return ENCODING_O200K if base_model_name(model).startswith(_O200K_PREFIXES) else ENCODING_CL100K


def token_limit(model: str) -> int | None:
    """Most tokens per training sample for `model`, or None when not known (use --max-tokens)."""
    return TOKEN_LIMITS.get(base_model_name(model))


def training_price(model: str) -> float | None:
    """USD per 1M training tokens for `model`, or None when not in the table."""
    return TRAINING_USD_PER_M_TOKENS.get(base_model_name(model))


@cache
def get_encoding(name: str) -> Any:
    """The tiktoken `Encoding` called `name`, loaded offline. Raises TokenizerError."""
    use_bundled_tiktoken()
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # tiktoken raises plain errors (network, file) on a missing cache
        raise TokenizerError(
            f"cannot load tokenizer {name} offline (TIKTOKEN_CACHE_DIR="
            f"{os.environ.get('TIKTOKEN_CACHE_DIR', '')}): {type(exc).__name__}: {exc}"
        ) from exc


@dataclass(frozen=True)
class SampleTokens:
    """Tokens of one sample: `total` (what is billed and limited) and `trained` (assistant
    messages whose weight is not 0)."""

    total: int
    trained: int


class TokenCounter:
    """Counts tokens of OpenAI-form conversations with one encoding.

    Texts that repeat across samples (system prompts, tool lists) are counted once and cached
    (at most `cache_size` entries); everything else of a sample is counted in two encoder calls.
    """

    def __init__(self, encoding: str = ENCODING_O200K, cache_size: int = 4096) -> None:
        self.encoding_name = encoding
        self._encoding = get_encoding(encoding)
        self._cache: dict[str, int] = {}
        self._cache_size = cache_size

    def count_text(self, text: str) -> int:
        """Tokens of `text`; special-token strings such as `<|endoftext|>` count as plain text."""
        return len(self._encoding.encode_ordinary(text)) if text else 0

    def _cached(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            n = self._cache[text] = self.count_text(text)
        return n

    def count(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        tools_json: str | None = None,
    ) -> SampleTokens:
        """Tokens of a conversation in OpenAI form (see the module docstring for the recipe).

        tools_json: the compact JSON of `tools` when the caller has it already (saves a dump).
        """
        fixed = TOKENS_REPLY_PRIMING + (TOKENS_PER_MESSAGE + 1) * len(messages)  # role: 1 token
        prompt_parts: list[str] = []
        trained_parts: list[str] = []
        trained_fixed = 0
        for message in messages:
            role = message.get("role")
            trained = role == "assistant" and message.get("weight", 1) != 0
            parts = trained_parts if trained else prompt_parts
            overhead = 0
            content = message.get("content")
            if isinstance(content, str):
                if role == "system":
                    overhead += self._cached(content)
                else:
                    parts.append(content)
            elif isinstance(content, list):
                parts.extend(_part_texts(content))
            name = message.get("name")
            if isinstance(name, str):
                parts.append(name)
                overhead += TOKENS_PER_NAME
            calls = message.get("tool_calls")
            if calls:
                for call in calls:
                    function = call.get("function") or {}
                    parts.append(str(function.get("name", "")))
                    arguments = function.get("arguments", "")
                    parts.append(arguments if isinstance(arguments, str) else json.dumps(arguments))
                overhead += TOKENS_PER_TOOL_CALL * len(calls)
            fixed += overhead
            if trained:
                trained_fixed += TOKENS_PER_MESSAGE + 1 + overhead
        if tools_json is None and tools:
            tools_json = json.dumps(tools, separators=(",", ":"), ensure_ascii=False)
        if tools_json:
            fixed += self._cached(tools_json)
        prompt = self.count_text("\n".join(prompt_parts))
        trained_tokens = self.count_text("\n".join(trained_parts))
        return SampleTokens(
            total=fixed + prompt + trained_tokens, trained=trained_tokens + trained_fixed
        )

    def count_texts(self, texts: Iterable[str]) -> int:
        """Tokens of several texts counted as one newline-joined text (for non-chat formats)."""
        return self.count_text("\n".join(texts))


def _part_texts(parts: Sequence[Any]) -> list[str]:
    texts = []
    for part in parts:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
    return texts
