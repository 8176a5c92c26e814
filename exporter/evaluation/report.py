"""Terminal output of `eval` with rich: the progress bar and the summary tables.

Only presentation: every number comes from the report dict (`metrics.summarize`). Tool names come
from captured traffic: they are escaped so rich markup in them is shown as text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


@contextmanager
def eval_progress(
    console: Console, enabled: bool
) -> Iterator[tuple[Callable[[int, int], None], Callable[[], None]]]:
    """A context yielding `(on_start(total, done), on_step())` for `run_evaluation`; draws a bar
    on `console` when `enabled` (a terminal, not --json or --quiet)."""
    if not enabled:
        yield (lambda total, done: None), (lambda: None)
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("replaying steps"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task("steps", total=None)

    def on_start(total: int, done: int) -> None:
        progress.update(task, total=total, completed=done)

    with progress:
        yield on_start, lambda: progress.advance(task, 1)


def fmt_rate(value: float | None, ci: Any = None) -> str:
    """'83.3% (58-95)' (the 95% interval in whole percents) or '-' when there is nothing to rate."""
    if value is None:
        return "-"
    text = f"{value * 100:.1f}%"
    if ci:
        text += f" ({ci[0] * 100:.0f}-{ci[1] * 100:.0f})"
    return text


def _cost(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.4f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def summary_table(report: dict[str, Any]) -> Table:
    """Overall agreement (rates with 95% intervals), counts, latency, tokens and cost."""
    table = Table(
        title=f"Evaluation of {escape(str(report.get('model')))} (run {report.get('run_id')})",
        title_justify="left",
    )
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_column("of", justify="right")
    counts = report.get("counts", {})
    rows = (
        ("decision agreement", "decision_agreement", "steps answered"),
        ("tool-name agreement", "tool_name_agreement", "tool-call steps"),
        ("argument agreement", "argument_agreement", "tool-call steps"),
        ("argument agreement (schema types)", "argument_agreement_typed", "tool-call steps"),
        ("step agreement", "step_agreement", "steps answered"),
    )
    for label, key, base in rows:
        count = counts.get(key, {})
        table.add_row(
            label,
            fmt_rate(report.get(key), report.get(f"{key}_ci95")),
            f"{count.get('agree', 0)}/{count.get('of', 0)} {base}",
        )
    table.add_row("trajectories", f"{report['trajectories']:,}", "")
    table.add_row(
        "steps", f"{report['steps']:,}", f"{report.get('reused', 0):,} answered before this run"
    )
    table.add_row("invalid JSON arguments", f"{report['invalid_json']:,}", "candidate calls")
    table.add_row("unknown tools", f"{report['unknown_tools']:,}", "candidate calls")
    errors = ", ".join(f"{k}: {v}" for k, v in report.get("error_types", {}).items())
    table.add_row("errors (not answered)", f"{report['errors']:,}", escape(errors))
    latency, tokens, cost = report["latency_ms"], report["tokens"], report["cost_usd"]
    for side in ("candidate", "reference"):
        table.add_row(
            f"{side} latency p50 / p95",
            f"{_ms(latency[side]['p50'])} / {_ms(latency[side]['p95'])}",
            "",
        )
        table.add_row(
            f"{side} tokens (prompt / completion)",
            f"{tokens[side]['prompt']:,} / {tokens[side]['completion']:,}",
            "",
        )
        table.add_row(f"{side} cost", _cost(cost[side]), "")
    return table


def per_tool_table(report: dict[str, Any]) -> Table:
    """One row per tool the reference or the candidate called: calls and agreement rates."""
    table = Table(title="Per tool (over the reference's calls)", title_justify="left")
    table.add_column("tool", no_wrap=True)
    table.add_column("reference calls", justify="right")
    table.add_column("candidate calls", justify="right")
    table.add_column("name", justify="right")
    table.add_column("arguments", justify="right")
    table.add_column("arguments (types)", justify="right")
    for name, t in report.get("per_tool", {}).items():
        table.add_row(
            escape(name),
            f"{t['reference_calls']:,}",
            f"{t['candidate_calls']:,}",
            fmt_rate(t["name_agreement"], t["name_agreement_ci95"]),
            fmt_rate(t["argument_agreement"], t["argument_agreement_ci95"]),
            fmt_rate(t["argument_agreement_typed"], t["argument_agreement_typed_ci95"]),
        )
    return table
