"""The rich output: progress bar on a terminal, summary and stats tables, untrusted text escaped."""

from __future__ import annotations

import io
from collections import Counter

from rich.console import Console

from exporter.options import ExportSummary
from exporter.report import export_table, progress_bar, stats_tables, validation_table
from exporter.validate_file import validate_lines


def render(*renderables: object) -> str:
    console = Console(file=io.StringIO(), width=160, force_terminal=False)
    for item in renderables:
        console.print(item)
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def test_summary_table_shows_drops_tokens_and_cost() -> None:
    summary = ExportSummary(
        read=12,
        written=9,
        train=9,
        tokens=1_234_567,
        trained_tokens=1000,
        max_sample_tokens=700,
        token_limit=65_536,
        base_model="gpt-4.1-mini",
        encoding="o200k_base",
    )
    summary.dropped = Counter({"duplicate": 2, "over_token_limit": 1})
    summary.dropped_examples = {"duplicate": ["ex1", "ex2"], "over_token_limit": ["[bold]x"]}
    summary.finish()
    text = render(export_table(summary, [("train.jsonl", 9)]))
    assert "dropped: duplicate" in text and "2  (e.g. ex1, ex2)" in text
    assert "[bold]x" in text  # markup in captured data is shown, not interpreted
    assert "1,234,567" in text and "$18.52" in text and "65,536" in text


def test_progress_bar_draws_only_on_a_terminal() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    with progress_bar(terminal, 10, enabled=True) as advance:
        advance(5)
        advance(5)
    with progress_bar(terminal, None, enabled=False) as advance:
        advance(3)


def test_stats_and_validation_tables() -> None:
    stats = {
        "exchanges": 3,
        "trajectories": 1,
        "leaves": 1,
        "forked_trajectories": 0,
        "errors": 0,
        "error_rate": 0.0,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "promoted_exchanges": 0,
        "shadow_exchanges": 0,
        "first_utc": "a",
        "last_utc": "b",
        "labels": {"unlabeled": 1},
        "by_route": {
            "student": {
                "trajectories": 1,
                "exchanges": 3,
                "errors": 0,
                "prompt_tokens": 10,
                "completion_tokens": 5,
            }
        },
        "by_model": {
            "[red]m": {"exchanges": 3, "errors": 0, "prompt_tokens": 10, "completion_tokens": 5}
        },
        "tool_call_histogram": {0: 1, 2: 3},
    }
    text = render(*stats_tables(stats))
    assert "[red]m" in text and "###" in text
    report = validate_lines(["{}"], "openai", None, min_samples=1)
    assert "invalid" in render(validation_table(report, "f.jsonl"))
