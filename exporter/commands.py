"""The commands of `understudy-export`: export, validate, stats, upload (`exporter.cli` parses).

Each `cmd_*` takes the parsed arguments and returns the exit code; failures raise `CliError` (or
the library's own one-line errors), which `exporter.cli.main` prints as one line. A command's
docstring's first line is its `--help` text.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.options import DEFAULT_BASE_MODEL, ExportOptions, OptionsError

if TYPE_CHECKING:  # each command imports what it needs when it runs (the CLI starts faster)
    from rich.console import Console

PROG = "understudy-export"
AUTO_WORKERS_FROM = 20_000
"""Without --workers, exports of this many trajectories or more use one process per core (<= 4)."""


WRITE_BUFFER_BYTES = 1 << 20
"""Buffer of an output file: lines are written in large blocks, not one system call each."""


class CliError(Exception):
    """A failure to report as one line and exit 1."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- export ------------------------------------------------------------------------------------


def nothing_written(summary: Any, options: ExportOptions) -> str:
    """Why an export wrote no sample, in one line that says what to try."""
    if summary.read == 0:
        hint = (
            "record some traffic first, or widen the filters"
            if options.labels == ExportOptions.labels
            else "no trajectory has these labels yet (label them in the dashboard, or drop --label)"
        )
        return f"no samples to write: no finished trajectory leaf matches the filters; {hint}"
    reasons = ", ".join(f"{n} {r}" for r, n in summary.dropped.most_common())
    return (
        f"no samples to write: all {summary.read} trajectory leaves that match were dropped "
        f"({reasons})"
    )


def _valid_path(out: Path) -> Path:
    """Where the validation split goes by default: train.jsonl -> valid.jsonl, x.jsonl -> x.valid.jsonl."""
    if "train" in out.stem:
        return out.with_name(out.stem.replace("train", "valid") + out.suffix)
    return out.with_name(f"{out.stem}.valid{out.suffix or '.jsonl'}")


def _options(args: argparse.Namespace) -> ExportOptions:
    system_prompt = None
    if args.system_prompt is not None:
        try:
            system_prompt = Path(args.system_prompt).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CliError(
                f"cannot read --system-prompt {args.system_prompt}: {exc.strerror or exc}"
            ) from exc
    options = ExportOptions(
        format=args.format,
        leaves=args.leaves,
        train_on=args.train_on,
        system_prompt=system_prompt,
        drop_system=args.drop_system,
        strip_tool_descriptions=args.strip_tool_descriptions,
        route=args.route,
        models=tuple(args.model or ()),
        since=args.since,
        until=args.until,
        labels=tuple(args.label) if args.label else ExportOptions.labels,
        tags=tuple(args.tag or ()),
        min_tool_calls=args.min_tool_calls,
        include_incomplete=args.include_incomplete,
        include_truncated=args.include_truncated,
        exclude_promoted=args.exclude_promoted,
        base_model=args.base_model,
        max_tokens=args.max_tokens,
        val_fraction=args.val_fraction,
        seed=args.seed,
        epochs=args.epochs,
        limit=args.limit,
        workers=args.workers or 1,
    )
    try:
        options.check()
    except OptionsError as exc:
        raise CliError(str(exc)) from exc
    return options


async def _open_db(target: str) -> Any:
    from proxy.storage import Database, DatabaseError

    try:
        return await Database.open(target, migrate=False, must_exist=True)
    except DatabaseError as exc:
        raise CliError(one_line(exc)) from exc


async def _run_export(args: argparse.Namespace, options: ExportOptions, console: Console) -> int:
    from exporter import api, report

    to_stdout = args.out == "-"
    if to_stdout and options.val_fraction > 0:
        raise CliError("--val-fraction needs files: give --out FILE, not -")
    out = Path(args.out)
    valid_out = Path(args.valid_out) if args.valid_out else _valid_path(out)
    if not to_stdout and options.val_fraction > 0 and valid_out.resolve() == out.resolve():
        raise CliError("--valid-out must differ from --out")
    db = await _open_db(args.db)
    # What is loaded by now (SQLAlchemy, the engine, the modules) outlives the export: the
    # garbage collector need not scan it again at each pass the export's rows trigger.
    gc.freeze()
    temps: list[Path] = []
    try:
        files: list[Any] = []
        if to_stdout:
            train: Any = sys.stdout
        else:
            for path in (out, valid_out) if options.val_fraction > 0 else (out,):
                if not path.parent.is_dir():
                    raise CliError(f"cannot write {path}: directory {path.parent} does not exist")
                temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                temps.append(temp)
                # binary: the workers' UTF-8 lines are written as they come (`api.line_writer`)
                files.append(temp.open("wb", buffering=WRITE_BUFFER_BYTES))
            train = files[0]
        valid = files[1] if len(files) > 1 else None
        show_bar = not args.quiet and console.is_terminal and not to_stdout
        total = (await db.counts())["trajectories"]
        if args.workers is None and total >= AUTO_WORKERS_FROM:
            options = dataclasses.replace(options, workers=min(os.cpu_count() or 1, 4))
        try:
            with report.progress_bar(console, total, show_bar) as advance:
                summary = await api.write_export(db, options, train, valid, on_progress=advance)
        finally:
            for fh in files:
                fh.close()
        if summary.written == 0:
            raise CliError(nothing_written(summary, options))
        for temp, path in zip(temps, (out, valid_out), strict=False):
            temp.replace(path)
        temps.clear()
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
        await db.close()
        gc.unfreeze()  # an in-process caller (tests) collects as before
    outputs = [] if to_stdout else [(str(out), summary.train)]
    if options.val_fraction > 0:
        outputs.append((str(valid_out), summary.valid))
    if args.json:
        payload = {**summary.as_dict(), "files": dict(outputs)}
        print(json.dumps(payload), file=sys.stderr if to_stdout else sys.stdout)
    elif not args.quiet:
        console.print(report.export_table(summary, outputs))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write one training sample per trajectory leaf (JSONL), filtered, deduplicated, split."""
    from rich.console import Console

    options = _options(args)
    console = Console(stderr=args.out == "-")
    return asyncio.run(_run_export(args, options, console))


# -- validate ----------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a training file against the format's rules; errors by line, token statistics."""
    from rich.console import Console

    from exporter import report
    from exporter.tokens import TokenCounter, encoding_name, token_limit
    from exporter.validate_file import validate_lines

    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"file not found: {path}")
    fmt = args.format
    limit = args.max_tokens
    model = args.base_model or (DEFAULT_BASE_MODEL if fmt in ("openai", "dpo") else None)
    if limit is None and model is not None:
        limit = token_limit(model)
    counter = TokenCounter(encoding_name(model or DEFAULT_BASE_MODEL))
    try:
        with path.open(encoding="utf-8") as fh:
            result = validate_lines(
                (line.rstrip("\n") for line in fh),
                fmt,
                counter,
                limit=limit,
                min_samples=args.min_samples if args.strict_min_samples else 0,
            )
    except UnicodeDecodeError as exc:
        raise CliError(f"{path} is not UTF-8 text: {exc.reason}") from exc
    warnings: list[str] = []
    if not args.strict_min_samples and result.samples < args.min_samples:
        warnings.append(
            f"{result.samples} samples: OpenAI fine-tuning needs at least {args.min_samples} "
            "(the open-model trainers do not); --strict-min-samples makes this an error"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "file": str(path),
                    "format": fmt,
                    "valid": result.ok,
                    "samples": result.samples,
                    "errors": result.errors,
                    "warnings": warnings,
                    "tokens": result.token_stats(),
                    "token_limit": limit,
                }
            )
        )
    else:
        console = Console()
        for error in result.errors[: args.max_errors]:
            print(f"{path}: {error}")
        if len(result.errors) > args.max_errors:
            print(f"{path}: ... {len(result.errors) - args.max_errors} more errors")
        for warning in warnings:
            print(f"{path}: warning: {warning}")
        console.print(report.validation_table(result, str(path)))
    return 0 if result.ok else 1


# -- stats -------------------------------------------------------------------------------------


async def _stats(target: str) -> dict[str, Any]:
    from proxy.storage.reading import statistics

    db = await _open_db(target)
    try:
        return await statistics(db)
    finally:
        await db.close()


def cmd_stats(args: argparse.Namespace) -> int:
    """Show what was recorded: exchanges, trajectories, routes, models, tool calls, tokens, errors."""
    from rich.console import Console

    from exporter import report

    stats = asyncio.run(_stats(args.db))
    if args.json:
        print(json.dumps(stats))
    else:
        console = Console()
        for table in report.stats_tables(stats):
            console.print(table)
    return 0


# -- upload ------------------------------------------------------------------------------------


def cmd_upload(args: argparse.Namespace) -> int:
    """Upload a training file (purpose fine-tune) and optionally start a fine-tuning job."""
    from exporter.upload import upload

    path = Path(args.file)
    validation = Path(args.validation_file) if args.validation_file else None
    for file_path in (path, validation):
        if file_path is not None and not file_path.is_file():
            raise CliError(f"file not found: {file_path}")
    result = upload(
        path,
        validation_path=validation,
        model=args.model,
        suffix=args.suffix,
        epochs=args.epochs,
        base_url=args.base_url,
        method=args.method,
    )
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    print(f"training file: {result.training_file_id}")
    if result.validation_file_id:
        print(f"validation file: {result.validation_file_id}")
    if result.job_id:
        print(f"fine-tuning job: {result.job_id} ({result.job_status}, {result.method})")
    return 0
