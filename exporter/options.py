"""Export options and the export summary: plain dataclasses shared by the CLI, the API and the dashboard."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from exporter.formats import FORMATS, PREFERENCE_FORMATS, TRAIN_ON_SUPPORT
from exporter.samples import TRAIN_ON_CHOICES
from exporter.tokens import token_limit, training_price

if TYPE_CHECKING:  # an annotation only: sample-building processes need not load the storage
    from proxy.storage.filters import TrajectoryFilter

LEAVES_CHOICES = ("all", "longest")
ROUTE_CHOICES = ("any", "student", "teacher")
LABEL_CHOICES = ("approved", "rejected", "unlabeled", "any")
DEFAULT_LABELS = ("approved", "unlabeled")
"""Without `--label`, rejected trajectories are left out."""
DEFAULT_BASE_MODEL = "gpt-4.1-mini"


class OptionsError(ValueError):
    """Options that do not go together or are out of range (one-line message)."""


def train_on_refusal(fmt: str, train_on: str) -> str:
    """The one-line error for a `--train-on` choice the format's trainer cannot express."""
    if fmt in PREFERENCE_FORMATS:
        return (
            f"--train-on {train_on} does not apply to --format {fmt}: a preference pair trains "
            "its one answer after the input"
        )
    if fmt == "hf":
        return (
            f"--train-on {train_on} cannot be expressed for TRL (--format hf trains every "
            "assistant turn, or only the last one with --train-on last): use --format axolotl "
            "(per-message training field) or openai (weight)"
        )
    return (
        f"--train-on {train_on} cannot be expressed for LLaMA-Factory (--format {fmt}): its "
        "mask_history trains the last turn only (--train-on last); use --format axolotl "
        "(per-message training field) or openai (weight)"
    )


def trainer_notes(fmt: str, train_on: str) -> list[str]:
    """What the trainer's config must say for the export to be trained as meant (one line each)."""
    if fmt == "hf" and train_on == "last":
        return [
            "TRL: rows are prompt + completion; SFTTrainer trains the completion "
            "(the last assistant message) only"
        ]
    if fmt == "hf":
        return ["TRL: set assistant_only_loss=True in SFTConfig to train the assistant turns only"]
    if fmt == "axolotl":
        return ["Axolotl: set message_field_training: training in the dataset config"]
    if fmt == "sharegpt" and train_on == "last":
        return ["LLaMA-Factory: set mask_history: true to train the last turn only"]
    return []


def parse_utc(value: str, flag: str = "time") -> str:
    """A date or ISO-8601 time as the stored timestamp format (`2026-11-21T00:00:00.000+00:00`).

    Naive times are taken as UTC. Raises OptionsError for anything else.
    """
    try:
        parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise OptionsError(f"{flag}: not a date or ISO-8601 time: {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class ExportOptions:
    """Everything `export` can be asked; defaults are the CLI's defaults.

    format: 'openai' | 'hf' | 'axolotl' | 'sharegpt' | 'dpo' | 'hf-dpo' (`exporter.formats`).
    leaves: 'all' (every leaf of a forked
    trajectory) or 'longest'. train_on: 'all' | 'final' | 'tool-calls' | 'last' (assistant
    `weight`s; each format takes what its trainer can express, `formats.TRAIN_ON_SUPPORT`). system_prompt: text that replaces every system message (None: keep them).
    drop_system: remove system messages. strip_tool_descriptions: drop `description` from tools
    and their parameter schemas. route: 'any' | 'student' | 'teacher'. models: keep exchanges
    whose requested or answered model is one of these. since / until: ISO-8601 bounds on when the
    trajectory started (until is exclusive). labels: trajectory labels to keep ('approved',
    'rejected', 'unlabeled'; 'any' keeps all). tags: every one must be among the trajectory's tags.
    min_tool_calls: fewer tool calls in the sample drops it. include_incomplete: also export
    leaves that did not end with a final answer (they end at their last assistant message).
    include_truncated: also export Responses leaves whose `previous_response_id` history was
    never recorded (dropped as `truncated_history` otherwise).
    exclude_promoted: leave out trajectories with an injected logit_bias. base_model: the model
    to fine-tune: picks the tokenizer, the token limit and the price (default gpt-4.1-mini for the
    openai and dpo formats; none for hf and sharegpt). max_tokens: token limit per sample,
    overriding the base model's. val_fraction: share of trajectories (0 <= F < 1) written to the
    validation file, split by a hash of the trajectory id and `seed`. epochs: for the cost
    estimate. limit: stop after this many samples written. workers: processes that build samples
    (1: a worker thread in this process, what the dashboard uses; more: spawned processes, for
    large exports on several cores; the output is identical). trajectory_ids: only these
    trajectories (None: no selection), on top of every other filter. selection: only the
    trajectories this filter selects (the dashboard list's filter, so its Export downloads the
    list's trajectories), on top of every other filter.
    """

    format: str = "openai"
    leaves: str = "all"
    train_on: str = "all"
    system_prompt: str | None = None
    drop_system: bool = False
    strip_tool_descriptions: bool = False
    route: str = "any"
    models: tuple[str, ...] = ()
    since: str | None = None
    until: str | None = None
    labels: tuple[str, ...] = DEFAULT_LABELS
    tags: tuple[str, ...] = ()
    min_tool_calls: int = 0
    include_incomplete: bool = False
    include_truncated: bool = False
    exclude_promoted: bool = False
    base_model: str | None = None
    max_tokens: int | None = None
    val_fraction: float = 0.0
    seed: int = 0
    epochs: int = 3
    limit: int | None = None
    workers: int = 1
    trajectory_ids: tuple[str, ...] | None = None
    selection: TrajectoryFilter | None = None

    def check(self) -> None:
        """Raise OptionsError when the options are out of range or do not go together."""
        if self.format not in FORMATS:
            raise OptionsError(f"--format must be one of {', '.join(FORMATS)}")
        if self.leaves not in LEAVES_CHOICES:
            raise OptionsError(f"--leaves must be one of {', '.join(LEAVES_CHOICES)}")
        if self.train_on not in TRAIN_ON_CHOICES:
            raise OptionsError(f"--train-on must be one of {', '.join(TRAIN_ON_CHOICES)}")
        if self.route not in ROUTE_CHOICES:
            raise OptionsError(f"--route must be one of {', '.join(ROUTE_CHOICES)}")
        for label in self.labels:
            if label not in LABEL_CHOICES:
                raise OptionsError(f"--label must be one of {', '.join(LABEL_CHOICES)}")
        if self.system_prompt is not None and self.drop_system:
            raise OptionsError("--system-prompt and --drop-system cannot be used together")
        if self.train_on not in TRAIN_ON_SUPPORT[self.format]:
            raise OptionsError(train_on_refusal(self.format, self.train_on))
        if not 0.0 <= self.val_fraction < 1.0:
            raise OptionsError("--val-fraction must be at least 0 and below 1")
        if self.min_tool_calls < 0:
            raise OptionsError("--min-tool-calls must be 0 or more")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise OptionsError("--max-tokens must be positive")
        if self.epochs <= 0:
            raise OptionsError("--epochs must be positive")
        if self.limit is not None and self.limit <= 0:
            raise OptionsError("--limit must be positive")
        if self.workers < 1:
            raise OptionsError("--workers must be positive")
        if self.since is not None:
            parse_utc(self.since, "--since")
        if self.until is not None:
            parse_utc(self.until, "--until")

    @property
    def preference(self) -> bool:
        """The format is built from shadow pairs (`dpo`, `hf-dpo`), not from leaves."""
        return self.format in PREFERENCE_FORMATS

    @property
    def model_for_tokens(self) -> str:
        """The model whose tokenizer counts tokens (the base model, else gpt-4.1-mini)."""
        return self.base_model or DEFAULT_BASE_MODEL

    @property
    def pricing_model(self) -> str | None:
        """The base model for limits and prices: given, or the default for OpenAI formats."""
        if self.base_model:
            return self.base_model
        return DEFAULT_BASE_MODEL if self.format in ("openai", "dpo") else None

    @property
    def token_limit(self) -> int | None:
        """Most tokens per sample: `max_tokens`, else the base model's known limit, else None."""
        if self.max_tokens is not None:
            return self.max_tokens
        return token_limit(self.pricing_model) if self.pricing_model else None


@dataclass
class ExportSummary:
    """What an export did.

    read: the leaves the filters selected (shadow exchanges for dpo); every one is either written
    or dropped with a reason, so `written + sum(dropped.values()) == read`. written: samples
    written (train + valid). train / valid: samples per file. dropped: reason -> count (reasons
    from `samples.Rejected`: 'error', 'cancelled', 'length', 'content_filter',
    'pending_tool_call', 'refusal', 'audio', ...; plus 'duplicate', 'over_token_limit',
    'below_min_tool_calls', 'missing_tag', 'unreadable', 'invalid_text': a lone surrogate that
    UTF-8 cannot carry). dropped_examples: reason -> up to 5
    exchange ids. cut: reason -> written samples whose leaf answer was left out
    (`--include-incomplete`: an answer cut by 'length' or 'content_filter', a 'refusal', ... is
    never trained; the sample ends at the assistant message before it). notes: what the trainer's
    config must say (`trainer_notes`). tokens /
    trained_tokens: sums over written samples; max_sample_tokens: the largest. token_limit and
    base_model as applied; estimated_cost_usd: tokens x epochs x the base model's training price
    (None when the price is not known).
    """

    format: str = "openai"
    read: int = 0
    written: int = 0
    train: int = 0
    valid: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_examples: dict[str, list[str]] = field(default_factory=dict)
    cut: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    tokens: int = 0
    trained_tokens: int = 0
    max_sample_tokens: int = 0
    token_limit: int | None = None
    base_model: str | None = None
    encoding: str | None = None
    epochs: int = 3
    estimated_cost_usd: float | None = None
    seconds: float = 0.0

    def drop(self, reason: str, exchange_id: str) -> None:
        """Count a dropped sample and keep its exchange id as an example (first 5 per reason)."""
        self.dropped[reason] += 1
        examples = self.dropped_examples.setdefault(reason, [])
        if len(examples) < 5:
            examples.append(exchange_id)

    def finish(self) -> None:
        """Compute the cost estimate from the token total."""
        price = training_price(self.base_model) if self.base_model else None
        self.estimated_cost_usd = (
            round(self.tokens * self.epochs * price / 1_000_000, 2) if price is not None else None
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (`dropped` as a plain dict, largest first)."""
        return {
            "format": self.format,
            "read": self.read,
            "written": self.written,
            "train": self.train,
            "valid": self.valid,
            "dropped": dict(self.dropped.most_common()),
            "dropped_examples": self.dropped_examples,
            "cut": dict(self.cut.most_common()),
            "notes": self.notes,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "max_sample_tokens": self.max_sample_tokens,
            "token_limit": self.token_limit,
            "base_model": self.base_model,
            "encoding": self.encoding,
            "epochs": self.epochs,
            "estimated_cost_usd": self.estimated_cost_usd,
            "seconds": round(self.seconds, 3),
        }
