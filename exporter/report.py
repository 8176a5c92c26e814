"""Terminal output with rich: the export progress bar, the summary table, stats and validation reports.

Only presentation: every number comes from `ExportSummary`, `FileReport` or the stats dict.
Captured traffic is untrusted: nothing from it is printed except ids, model names and counts,
and those are escaped so rich markup in them is shown as text.
"""

from __future__ import annotations

from collections.abc import Iterator
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
)
from rich.table import Table

from exporter.options import ExportSummary
from exporter.validate_file import FileReport


@contextmanager
def progress_bar(console: Console, total: int | None, enabled: bool) -> Iterator[Any]:
    """A context that yields `advance(n)`; draws a bar on `console` when `enabled` (a terminal)."""
    if not enabled:
        yield lambda n: None
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("reading"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task("rows", total=total)
    with progress:
        yield lambda n: progress.advance(task, n)


def _n(value: int | float) -> str:
    return f"{value:,}"


def export_table(summary: ExportSummary, outputs: list[tuple[str, int]]) -> Table:
    """The summary table: samples written per file, dropped by reason, tokens and cost."""
    table = Table(title="Export summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("format", summary.format)
    selected = "shadow answers selected" if summary.format.endswith("dpo") else "leaves selected"
    table.add_row(selected, _n(summary.read))
    for path, count in outputs:
        table.add_row(f"written to {escape(path)}", _n(count))
    table.add_row("samples written", _n(summary.written))
    for reason, count in summary.dropped.most_common():
        examples = ", ".join(summary.dropped_examples.get(reason, [])[:2])
        table.add_row(f"dropped: {escape(reason)}", f"{_n(count)}  (e.g. {escape(examples)})")
    for reason, count in summary.cut.most_common():
        table.add_row(f"written without its {escape(reason)} answer", _n(count))
    table.add_row(f"tokens ({summary.encoding})", _n(summary.tokens))
    table.add_row("trained tokens", _n(summary.trained_tokens))
    limit = _n(summary.token_limit) if summary.token_limit else "none (set --max-tokens)"
    table.add_row("largest sample / limit", f"{_n(summary.max_sample_tokens)} / {limit}")
    if summary.estimated_cost_usd is not None:
        table.add_row(
            f"est. training cost ({escape(summary.base_model or '')}, {summary.epochs} epochs)",
            f"${summary.estimated_cost_usd:,.2f}",
        )
    else:
        table.add_row("est. training cost", "unknown for this base model")
    table.add_row("time", f"{summary.seconds:.2f} s")
    for note in summary.notes:
        table.add_row("[cyan]trainer[/]", escape(note))
    if summary.format in ("openai", "dpo") and 0 < summary.train < 10:
        table.add_row("[yellow]note[/]", "OpenAI needs at least 10 training samples")
    return table


def stats_tables(stats: dict[str, Any]) -> list[Table]:
    """Tables for `stats`: totals, by route, by model, tool-call histogram."""
    totals = Table(title="Recorded traffic", show_header=False, title_justify="left")
    totals.add_column("what", style="bold")
    totals.add_column("value", justify="right")
    for key in (
        "exchanges",
        "trajectories",
        "leaves",
        "forked_trajectories",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "promoted_exchanges",
        "shadow_exchanges",
    ):
        totals.add_row(key.replace("_", " "), _n(stats[key]))
    totals.add_row("error rate", f"{stats['error_rate']:.2%}")
    totals.add_row("first exchange", str(stats["first_utc"] or "-"))
    totals.add_row("last exchange", str(stats["last_utc"] or "-"))
    totals.add_row(
        "labels", ", ".join(f"{escape(str(k))}: {_n(v)}" for k, v in stats["labels"].items()) or "-"
    )
    tables = [totals]
    for title, key, columns in (
        (
            "By route",
            "by_route",
            ("trajectories", "exchanges", "errors", "prompt_tokens", "completion_tokens"),
        ),
        ("By model", "by_model", ("exchanges", "errors", "prompt_tokens", "completion_tokens")),
    ):
        table = Table(title=title, title_justify="left")
        table.add_column(key.removeprefix("by_"))
        for column in columns:
            table.add_column(column.replace("_", " "), justify="right")
        for name, row in stats[key].items():
            table.add_row(escape(str(name)), *(_n(row.get(c, 0)) for c in columns))
        tables.append(table)
    histogram = Table(title="Tool calls per trajectory", title_justify="left")
    histogram.add_column("tool calls", justify="right")
    histogram.add_column("trajectories", justify="right")
    histogram.add_column("", justify="left")
    most = max(stats["tool_call_histogram"].values(), default=0)
    for calls, count in stats["tool_call_histogram"].items():
        bar = "#" * max(1, round(30 * count / most)) if most else ""
        histogram.add_row(str(calls), _n(count), bar)
    tables.append(histogram)
    return tables


def validation_table(report: FileReport, path: str) -> Table:
    """Token statistics and the verdict of a validated file."""
    table = Table(
        title=f"Validation of {escape(path)} ({report.fmt})",
        show_header=False,
        title_justify="left",
    )
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("samples", _n(report.samples))
    table.add_row("errors", _n(len(report.errors)))
    for key, value in report.token_stats().items():
        table.add_row(f"tokens {key.replace('_', ' ')}", _n(value))
    table.add_row("token limit", _n(report.limit) if report.limit else "none")
    table.add_row("verdict", "[green]valid[/]" if report.ok else "[red]invalid[/]")
    return table
