"""Cost where known: USD per token from the price table litellm ships (read as data, offline).

litellm is a dependency of the proxy (teacher calls); its package carries
`model_prices_and_context_window_backup.json`. It is read once, lazily, without importing litellm
(which is slow to import). Unknown models have no price, and their cost is shown as unknown.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("understudy.dashboard")

_PRICE_FILE = "model_prices_and_context_window_backup.json"


@functools.cache
def price_table() -> dict[str, tuple[float, float]]:
    """`{model: (usd_per_input_token, usd_per_output_token)}`; empty when litellm is absent."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.origin:
        return {}
    path = Path(spec.origin).parent / _PRICE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.info("no model price table at %s: costs are shown as unknown", path)
        return {}
    table: dict[str, tuple[float, float]] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            continue
        cost_in, cost_out = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
        if isinstance(cost_in, int | float) and isinstance(cost_out, int | float):
            table[name] = (float(cost_in), float(cost_out))
    return table


def price_of(model: str | None) -> tuple[float, float] | None:
    """(input, output) USD per token for `model`, also tried without a `provider/` prefix."""
    if not model:
        return None
    table = price_table()
    return table.get(model) or table.get(model.split("/", 1)[-1])


def cost_usd(models: Iterable[Mapping[str, Any]]) -> float | None:
    """Cost of per-model token sums (`model_answered`/`model_requested`, `prompt_tokens`,
    `completion_tokens`); None when no model has a known price."""
    total = 0.0
    known = False
    for usage in models:
        price = price_of(usage.get("model_answered")) or price_of(usage.get("model_requested"))
        if price is None:
            continue
        known = True
        total += price[0] * int(usage.get("prompt_tokens") or 0)
        total += price[1] * int(usage.get("completion_tokens") or 0)
    return total if known else None
