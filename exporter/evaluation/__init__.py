"""Replay evaluation (`understudy-export eval`): is the trained student ready to take over?

Every recorded assistant step of the held-out trajectories is replayed teacher-forced against a
candidate model at any OpenAI-compatible base URL, and its answer compared with the recorded
reference: decision, tool names, arguments (canonical and schema-typed), per tool and overall,
with confidence intervals, latency, tokens and cost. Modules: `compare` and `metrics` (pure),
`selection` (which steps), `replay` (the resumable run), `command` (the CLI), `report` (rich).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exporter.evaluation.replay import EvalConfig, EvalError, EvalResult, run_evaluation

__all__ = [
    "REFERENCE_CHOICES",
    "SPLIT_CHOICES",
    "EvalConfig",
    "EvalError",
    "EvalResult",
    "run_evaluation",
]

SPLIT_CHOICES = ("valid", "all")
"""`--split`: the export's validation trajectories, or every trajectory the filters select."""
REFERENCE_CHOICES = ("teacher", "student", "any")
"""`--reference`: which recorded answers the candidate's are compared with."""

_REPLAY_NAMES = frozenset({"EvalConfig", "EvalError", "EvalResult", "run_evaluation"})


def __getattr__(name: str) -> Any:
    """The replay API, imported on first use: it loads the openai SDK, which `understudy-export`
    needs only for `eval` (the CLI imports this package to build its parser)."""
    if name in _REPLAY_NAMES:
        from exporter.evaluation import replay

        return getattr(replay, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
