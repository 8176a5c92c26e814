"""`python -m exporter` (console script `understudy-export`): export, validate, stats, upload.

    understudy-export export --db PATH_OR_URL --out FILE [options]
    understudy-export validate FILE [--format openai]
    understudy-export stats --db PATH_OR_URL [--json]
    understudy-export upload FILE [--validation-file F] [--model BASE] [--suffix S] [--epochs N]
    understudy-export eval --db PATH_OR_URL --base-url URL --model NAME [--split valid|all] ...

`--db` defaults to `UNDERSTUDY_DB`, then `./understudy.db`, like the proxy. Errors are one line on
stderr with a non-zero exit (1: failure or invalid file, 2: bad usage), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from exporter.commands import (
    AUTO_WORKERS_FROM,
    PROG,
    CliError,
    cmd_export,
    cmd_stats,
    cmd_upload,
    cmd_validate,
    one_line,
)
from exporter.evaluation.command import add_eval_parser
from exporter.formats import FORMATS
from exporter.options import (
    DEFAULT_BASE_MODEL,
    LABEL_CHOICES,
    LEAVES_CHOICES,
    ROUTE_CHOICES,
    OptionsError,
)
from exporter.samples import TRAIN_ON_CHOICES
from exporter.tokens import TokenizerError
from exporter.upload import UploadError
from exporter.validate import VALIDATE_FORMATS


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `understudy-export: error: ... (see --help)`, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _default_db() -> str:
    return os.environ.get("UNDERSTUDY_DB", "./understudy.db")


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return number


def _nonnegative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return number


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1: {value}")
    return number


# -- parser ------------------------------------------------------------------------------------


def _doc(func: Callable[..., Any]) -> str:
    return (func.__doc__ or "").strip().splitlines()[0]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each command's help is its function's docstring."""
    parser = _Parser(
        prog=PROG,
        description="Turn recorded trajectories into fine-tuning data: export, validate, stats, upload.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    export = commands.add_parser("export", help=_doc(cmd_export), description=_doc(cmd_export))
    export.set_defaults(run=cmd_export)
    export.add_argument(
        "--db",
        default=_default_db(),
        help="SQLite path or postgresql:// URL [UNDERSTUDY_DB, ./understudy.db]",
    )
    export.add_argument("--out", required=True, help="training file to write (JSONL); - for stdout")
    export.add_argument(
        "--valid-out",
        help="validation file (default: train->valid in --out's name, or NAME.valid.jsonl)",
    )
    export.add_argument(
        "--format",
        choices=FORMATS,
        default="openai",
        help="openai (default: OpenAI fine-tuning chat), hf (TRL SFTTrainer: messages, or "
        "prompt/completion with --train-on last), axolotl (Axolotl chat_template, per-message "
        "training field), sharegpt (LLaMA-Factory); preference pairs from shadow answers: dpo "
        "(OpenAI's layout: input/preferred_output/non_preferred_output), hf-dpo (TRL "
        "DPOTrainer's layout: prompt/chosen/rejected message lists)",
    )
    export.add_argument(
        "--leaves",
        choices=LEAVES_CHOICES,
        default="all",
        help="forked trajectories: every leaf (default) or only the longest",
    )
    export.add_argument(
        "--train-on",
        choices=TRAIN_ON_CHOICES,
        default="all",
        help="assistant messages to train: all (default), final answers, tool-calls, or the last "
        "one; openai: weight, axolotl: training field, hf: prompt/completion (last only), "
        "sharegpt: mask_history (last only); refused where the trainer cannot express it",
    )
    export.add_argument(
        "--system-prompt", metavar="FILE", help="replace every system message with this file's text"
    )
    export.add_argument("--drop-system", action="store_true", help="remove system messages")
    export.add_argument(
        "--strip-tool-descriptions",
        action="store_true",
        help="remove descriptions from tools and their parameters",
    )
    export.add_argument(
        "--route",
        choices=ROUTE_CHOICES,
        default="any",
        help="only trajectories on this route (default any)",
    )
    export.add_argument(
        "--model",
        action="append",
        metavar="MODEL",
        help="only exchanges whose requested or answered model is MODEL (repeatable)",
    )
    export.add_argument(
        "--since",
        metavar="TIME",
        help="only trajectories started at or after TIME (date or ISO-8601, UTC if no zone)",
    )
    export.add_argument("--until", metavar="TIME", help="only trajectories started before TIME")
    export.add_argument(
        "--label",
        action="append",
        choices=LABEL_CHOICES,
        help="only trajectories with this dashboard label (repeatable; default: approved and unlabeled)",
    )
    export.add_argument(
        "--tag",
        action="append",
        metavar="TAG",
        help="only trajectories tagged TAG (repeatable: all must match)",
    )
    export.add_argument(
        "--min-tool-calls",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="drop samples with fewer than N tool calls",
    )
    export.add_argument(
        "--include-incomplete",
        action="store_true",
        help="also export leaves that did not end with a final answer (an answer cut by length "
        "or content_filter is left out, never trained; error leaves are never exported)",
    )
    export.add_argument(
        "--include-truncated",
        action="store_true",
        help="also export Responses trajectories whose previous_response_id history the proxy "
        "never recorded (they start at the first recorded step)",
    )
    export.add_argument(
        "--exclude-promoted",
        action="store_true",
        help="leave out trajectories whose requests got an injected logit_bias",
    )
    export.add_argument(
        "--base-model",
        metavar="MODEL",
        help=f"model to fine-tune: tokenizer, token limit and price (default {DEFAULT_BASE_MODEL} for openai/dpo)",
    )
    export.add_argument(
        "--max-tokens",
        type=_positive_int,
        metavar="N",
        help="drop samples over N tokens (default: the base model's limit)",
    )
    export.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="share of trajectories for the validation file (0 <= F < 1)",
    )
    export.add_argument(
        "--seed", type=int, default=0, help="seed of the train/validation split (default 0)"
    )
    export.add_argument(
        "--epochs", type=_positive_int, default=3, help="epochs for the cost estimate (default 3)"
    )
    export.add_argument("--limit", type=_positive_int, metavar="N", help="stop after N samples")
    export.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help=f"processes that build samples (default: 1, or one per core up to 4 from {AUTO_WORKERS_FROM:,} trajectories)",
    )
    export.add_argument("--json", action="store_true", help="print the summary as JSON")
    export.add_argument("--quiet", action="store_true", help="no progress bar, no summary")

    validate = commands.add_parser(
        "validate", help=_doc(cmd_validate), description=_doc(cmd_validate)
    )
    validate.set_defaults(run=cmd_validate)
    validate.add_argument("file", help="JSONL file")
    validate.add_argument(
        "--format",
        choices=VALIDATE_FORMATS,
        default="openai",
        help="format of the file (default openai)",
    )
    validate.add_argument(
        "--base-model",
        metavar="MODEL",
        help=f"model to fine-tune: tokenizer and token limit (default {DEFAULT_BASE_MODEL} for openai/dpo)",
    )
    validate.add_argument(
        "--max-tokens",
        type=_positive_int,
        metavar="N",
        help="token limit per sample (default: the base model's)",
    )
    validate.add_argument(
        "--min-samples",
        type=_nonnegative_int,
        default=10,
        metavar="N",
        help="fewer samples is a warning (default 10, OpenAI's minimum for fine-tuning)",
    )
    validate.add_argument(
        "--strict-min-samples",
        action="store_true",
        help="make fewer than --min-samples samples an error (exit 1), as OpenAI refuses the file",
    )
    validate.add_argument(
        "--max-errors",
        type=_positive_int,
        default=50,
        metavar="N",
        help="print at most N errors (default 50)",
    )
    validate.add_argument("--json", action="store_true", help="print the report as JSON")

    stats = commands.add_parser("stats", help=_doc(cmd_stats), description=_doc(cmd_stats))
    stats.set_defaults(run=cmd_stats)
    stats.add_argument(
        "--db",
        default=_default_db(),
        help="SQLite path or postgresql:// URL [UNDERSTUDY_DB, ./understudy.db]",
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object")

    up = commands.add_parser("upload", help=_doc(cmd_upload), description=_doc(cmd_upload))
    up.set_defaults(run=cmd_upload)
    up.add_argument("file", help="training file (JSONL)")
    up.add_argument("--validation-file", metavar="FILE", help="validation file to upload with it")
    up.add_argument(
        "--model", metavar="BASE", help="base model; when given, a fine-tuning job is created"
    )
    up.add_argument("--suffix", help="suffix of the fine-tuned model's name")
    up.add_argument("--epochs", type=_positive_int, help="n_epochs (default: the API's auto)")
    up.add_argument(
        "--method",
        choices=("supervised", "dpo"),
        help="fine-tuning method (default: from the file)",
    )
    up.add_argument(
        "--base-url",
        metavar="URL",
        help="API base URL [OPENAI_BASE_URL, https://api.openai.com/v1]",
    )
    up.add_argument("--json", action="store_true", help="print the ids as JSON")

    add_eval_parser(commands, _default_db(), _positive_int, _nonnegative_int, _fraction)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m exporter` and `understudy-export`."""
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
    except (CliError, UploadError, TokenizerError, OptionsError) as exc:
        sys.exit(f"{PROG}: {exc}")
    except KeyboardInterrupt:
        sys.exit(f"{PROG}: interrupted")
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout.close()
        code = 1
    except Exception as exc:  # the boundary: anything else is still one line, never a traceback
        sys.exit(f"{PROG}: error: {type(exc).__name__}: {one_line(exc)}")
    sys.exit(code)
