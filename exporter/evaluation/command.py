"""`understudy-export eval`: its flags (`add_eval_parser`) and the command (`cmd_eval`).

    understudy-export eval --db PATH_OR_URL --base-url URL --model NAME [--split valid|all]
        [--reference teacher|student|any] [--concurrency N] [--json] [--api-key KEY] ...

The export's filters are taken under the same names (`--route`, `--since`, `--label`, ...,
`--val-fraction`, `--seed`), except the export's `--model` filter, which is `--recorded-model`
here (`--model` names the candidate). Exit codes: 0 every step answered, 1 some steps not
answered (rerun the command to ask only those) or a failure, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from exporter.commands import CliError, one_line
from exporter.evaluation import REFERENCE_CHOICES, SPLIT_CHOICES
from exporter.options import (
    DEFAULT_LABELS,
    LABEL_CHOICES,
    LEAVES_CHOICES,
    ROUTE_CHOICES,
    ExportOptions,
    OptionsError,
)

if TYPE_CHECKING:  # the replay (openai SDK) and rich load when `eval` runs, not with the CLI
    from rich.console import Console

    from exporter.evaluation.replay import EvalConfig

IntType = Callable[[str], int]


def add_eval_parser(
    commands: Any,
    default_db: str,
    positive_int: IntType,
    nonnegative_int: IntType,
    fraction: Callable[[str], float],
) -> None:
    """Add the `eval` subcommand to the CLI's subparsers (the CLI passes its argument types)."""
    doc = (cmd_eval.__doc__ or "").strip().splitlines()[0]
    ev = commands.add_parser("eval", help=doc, description=doc)
    ev.set_defaults(run=cmd_eval)
    ev.add_argument(
        "--db", default=default_db, help="SQLite path or postgresql:// URL [UNDERSTUDY_DB]"
    )
    ev.add_argument(
        "--base-url",
        required=True,
        metavar="URL",
        help="the candidate's OpenAI-compatible API root, e.g. http://localhost:8000/v1 (vLLM)",
    )
    ev.add_argument("--model", required=True, metavar="NAME", help="the candidate model")
    ev.add_argument(
        "--api-key", metavar="KEY", help="the candidate's API key [OPENAI_API_KEY]; never stored"
    )
    ev.add_argument(
        "--split",
        choices=SPLIT_CHOICES,
        default="valid",
        help="valid (default): the trajectories export put in the validation file (same "
        "--val-fraction and --seed); all: every trajectory that passes the filters",
    )
    ev.add_argument(
        "--reference",
        choices=REFERENCE_CHOICES,
        default="teacher",
        help="the answers to agree with: teacher (default; teacher routes and shadow answers), "
        "student, or any recorded answer",
    )
    ev.add_argument(
        "--concurrency", type=positive_int, default=4, metavar="N", help="requests in flight (4)"
    )
    ev.add_argument(
        "--retries",
        type=nonnegative_int,
        default=4,
        metavar="N",
        help="retries per step on 429, 5xx and connection errors, with backoff (4)",
    )
    ev.add_argument(
        "--timeout", type=positive_int, default=120, metavar="S", help="seconds per attempt (120)"
    )
    ev.add_argument(
        "--new-run",
        action="store_true",
        help="start a new run instead of resuming the last unfinished one of this command",
    )
    ev.add_argument("--limit", type=positive_int, metavar="N", help="ask at most N steps now")
    ev.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.0,
        metavar="F",
        help="the export's validation share (needed by --split valid)",
    )
    ev.add_argument("--seed", type=int, default=0, help="the export's split seed (0)")
    ev.add_argument("--route", choices=ROUTE_CHOICES, default="any", help="trajectory route")
    ev.add_argument(
        "--recorded-model",
        action="append",
        metavar="MODEL",
        help="only exchanges whose requested or answered model is MODEL (export's --model)",
    )
    ev.add_argument("--since", metavar="TIME", help="trajectories started at or after TIME")
    ev.add_argument("--until", metavar="TIME", help="trajectories started before TIME")
    ev.add_argument(
        "--label", action="append", choices=LABEL_CHOICES, help="labels (default: not rejected)"
    )
    ev.add_argument("--tag", action="append", metavar="TAG", help="only trajectories tagged TAG")
    ev.add_argument("--leaves", choices=LEAVES_CHOICES, default="all", help="forks: all leaves")
    ev.add_argument(
        "--min-tool-calls", type=nonnegative_int, default=0, metavar="N", help="as export"
    )
    ev.add_argument("--include-incomplete", action="store_true", help="as export")
    ev.add_argument("--exclude-promoted", action="store_true", help="as export")
    ev.add_argument("--json", action="store_true", help="print the report as one JSON object")
    ev.add_argument("--quiet", action="store_true", help="no progress bar, no tables")


def _config(args: argparse.Namespace) -> EvalConfig:
    from exporter.evaluation.replay import EvalConfig

    options = ExportOptions(
        leaves=args.leaves,
        route=args.route,
        models=tuple(args.recorded_model or ()),
        since=args.since,
        until=args.until,
        labels=tuple(args.label) if args.label else DEFAULT_LABELS,
        tags=tuple(args.tag or ()),
        min_tool_calls=args.min_tool_calls,
        include_incomplete=args.include_incomplete,
        exclude_promoted=args.exclude_promoted,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    options.check()
    if args.split == "valid" and options.val_fraction <= 0:
        raise OptionsError(
            "--split valid needs the export's --val-fraction (and --seed) to know which "
            "trajectories were held out; or use --split all"
        )
    if not args.base_url.startswith(("http://", "https://")):
        raise OptionsError(f"--base-url must be an http:// or https:// URL: {args.base_url!r}")
    return EvalConfig(
        base_url=args.base_url,
        model=args.model,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY", ""),
        split=args.split,
        reference=args.reference,
        concurrency=args.concurrency,
        retries=args.retries,
        timeout_s=float(args.timeout),
        options=options,
        new_run=args.new_run,
        limit=args.limit,
    )


async def _run(args: argparse.Namespace, config: EvalConfig, console: Console) -> dict[str, Any]:
    from exporter.evaluation.replay import EvalError, run_evaluation
    from exporter.evaluation.report import eval_progress
    from proxy.storage import Database, DatabaseError

    try:
        try:
            db = await Database.open(args.db, migrate=False, must_exist=True)
        except DatabaseError as exc:
            if "older schema" not in str(exc):
                raise
            # An Understudy database the proxy has not migrated yet: eval writes its own tables.
            db = await Database.open(args.db, migrate=True, must_exist=True)
    except DatabaseError as exc:
        raise CliError(one_line(exc)) from exc
    show_bar = not (args.json or args.quiet) and console.is_terminal
    try:
        with eval_progress(console, show_bar) as (on_start, on_step):
            result = await run_evaluation(db, config, on_start=on_start, on_step=on_step)
    except EvalError as exc:
        raise CliError(str(exc)) from exc
    finally:
        await db.close()
    return result.report


def cmd_eval(args: argparse.Namespace) -> int:
    """Replay held-out trajectories against a candidate model; tool-call agreement with the reference."""
    from rich.console import Console

    from exporter.evaluation.report import per_tool_table, summary_table

    try:
        config = _config(args)
    except OptionsError as exc:
        raise CliError(str(exc)) from exc
    console = Console(stderr=True)
    report = asyncio.run(_run(args, config, console))
    if args.json:
        print(json.dumps(report))
    elif not args.quiet:
        out = Console()
        out.print(summary_table(report))
        if report["per_tool"]:
            out.print(per_tool_table(report))
        if report["errors"]:
            print(
                f"{report['errors']} steps not answered: run the same command again to ask "
                "only those (answered steps are kept)",
                file=sys.stderr,
            )
    return 0 if report["errors"] == 0 else 1
