"""Replay evaluation (`understudy-export eval`): is the trained student ready to take over?

Every recorded assistant step of the held-out trajectories is replayed teacher-forced against a
candidate model at any OpenAI-compatible base URL, and its answer compared with the recorded
reference: decision, tool names, arguments (canonical and schema-typed), per tool and overall,
with confidence intervals, latency, tokens and cost. Modules: `compare` and `metrics` (pure),
`selection` (which steps), `replay` (the resumable run), `command` (the CLI), `report` (rich).
"""

from exporter.evaluation.replay import EvalConfig, EvalError, EvalResult, run_evaluation

__all__ = ["EvalConfig", "EvalError", "EvalResult", "run_evaluation"]
