"""Validation of a whole training file: every record, file-level rules, token statistics.

Pure functions, no I/O (the caller reads the file and passes its lines). Record rules are
`exporter.validate`'s; tokens are counted by `exporter.tokens`' recipe.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from exporter.tokens import TokenCounter
from exporter.validate import MIN_SAMPLES, axolotl_as_weighted, guess_format, validate_record


def record_tokens(record: dict[str, Any], fmt: str, counter: TokenCounter) -> tuple[int, int]:
    """(total, trained) tokens of a valid record, by the recipe in `exporter.tokens`."""
    if fmt == "hf" and "prompt" in record:
        untrained = [{**m, "weight": 0} for m in record["prompt"]]
        counted = counter.count([*untrained, *record["completion"]], record.get("tools"))
        return counted.total, counted.trained
    if fmt in ("openai", "hf", "axolotl"):
        messages = record["messages"]
        if fmt == "axolotl":
            messages = axolotl_as_weighted(messages, [])
        counted = counter.count(messages, record.get("tools"))
        return counted.total, counted.trained
    if fmt == "hf-dpo":
        context = counter.count(record["prompt"], record.get("tools"))
        chosen = counter.count(record["chosen"])
        return context.total + chosen.total, chosen.trained
    if fmt == "dpo":
        data = record["input"]
        prompt = counter.count(data["messages"], data.get("tools"))
        preferred = counter.count(record["preferred_output"])
        return prompt.total + preferred.total, preferred.trained
    texts = [t["value"] for t in record["conversations"]]
    total = counter.count_texts([record.get("system", ""), record.get("tools", ""), *texts])
    trained = counter.count_texts(
        t["value"] for t in record["conversations"] if t["from"] in ("gpt", "function_call")
    )
    return total, trained


@dataclass
class FileReport:
    """The result of validating a file.

    errors: `"line N: message"` strings (N counts from 1; file-level errors have no line).
    samples: records read. tokens: per-sample totals. trained_tokens: sum over samples.
    over_limit: samples above `limit` tokens.
    """

    fmt: str
    limit: int | None
    errors: list[str] = field(default_factory=list)
    samples: int = 0
    tokens: list[int] = field(default_factory=list)
    trained_tokens: int = 0
    over_limit: int = 0

    @property
    def ok(self) -> bool:
        """No error at all (the file would be accepted)."""
        return not self.errors

    def token_stats(self) -> dict[str, int | float]:
        """`{"total", "trained", "min", "mean", "median", "max", "over_limit"}` over the samples."""
        t = self.tokens
        return {
            "total": sum(t),
            "trained": self.trained_tokens,
            "min": min(t, default=0),
            "mean": round(statistics.fmean(t), 1) if t else 0,
            "median": statistics.median(t) if t else 0,
            "max": max(t, default=0),
            "over_limit": self.over_limit,
        }


def validate_lines(
    lines: Iterable[str],
    fmt: str,
    counter: TokenCounter | None,
    *,
    limit: int | None = None,
    min_samples: int = MIN_SAMPLES,
    max_errors: int = 1000,
) -> FileReport:
    """Validate a JSONL file given as lines: every record, plus file-level rules.

    counter: counts tokens (None: no token statistics, no limit check). limit: most tokens per
    sample. min_samples: fewer records is an error (OpenAI: 10). Keeps at most `max_errors`
    error strings (the count of records stays exact).
    """
    report = FileReport(fmt=fmt, limit=limit)
    hinted = False

    def add(error: str) -> None:
        if len(report.errors) < max_errors:
            report.errors.append(error)

    for number, line in enumerate(lines, start=1):
        if not line.strip():
            add(f"line {number}: empty line")
            continue
        report.samples += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            add(f"line {number}: not valid JSON ({exc.msg})")
            continue
        errors = validate_record(record, fmt)
        if errors and not hinted:
            hinted = True
            guessed = guess_format(record)
            if guessed and guessed != fmt:
                add(f"line {number}: looks like the {guessed} format; pass --format {guessed}")
        for error in errors:
            add(f"line {number}: {error}")
        if errors or counter is None:
            continue
        total, trained = record_tokens(record, fmt, counter)
        report.tokens.append(total)
        report.trained_tokens += trained
        if limit is not None and total > limit:
            report.over_limit += 1
            add(f"line {number}: {total} tokens, over the {limit}-token limit")
    if report.samples < min_samples:
        add(f"{report.samples} samples: at least {min_samples} are required")
    return report
