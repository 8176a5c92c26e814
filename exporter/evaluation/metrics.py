"""Evaluation metrics: per-step comparisons summed into the run's report. Pure, no I/O.

Rates are fractions 0..1 with a 95% Wilson score interval (sound for small counts and for rates
near 0 or 1, unlike the normal approximation). Decision agreement is over the steps the candidate
answered; tool-name and argument agreement over the answered steps where the reference called
tools; per-tool rates over the reference's calls to that tool. Steps the candidate never answered
(errors after retries) are counted in `errors` and left out of every rate.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from exporter.evaluation.compare import StepComparison, ToolTally
from proxy.dashboard.pricing import price_of

Z_95 = 1.959963984540054


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of `successes` out of `total` (95% by default); None if total is 0.

    Returns (low, high), both within 0..1, rounded to 4 places.
    """
    if total <= 0:
        return None
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def rate(successes: int, total: int) -> dict[str, Any]:
    """`{"rate", "ci95", "agree", "of"}`: the fraction (None when total is 0), its interval, counts."""
    return {
        "rate": round(successes / total, 4) if total else None,
        "ci95": wilson_interval(successes, total),
        "agree": successes,
        "of": total,
    }


@dataclass(frozen=True)
class StepOutcome:
    """One evaluated step as stored: what the run's report is computed from.

    comparison: None when the candidate did not answer (then error_type says why, e.g.
    'http_429', 'timeout', 'no_message'). latency_ms: the candidate call, retries included.
    Tokens: the candidate's usage and the recorded reference's. reference_model: the model that
    answered the reference (prices its tokens); reference_latency_ms: its recorded duration.
    """

    trajectory_id: str
    comparison: StepComparison | None
    error_type: str | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reference_model: str | None = None
    reference_latency_ms: float | None = None
    reference_prompt_tokens: int | None = None
    reference_completion_tokens: int | None = None


def _latency(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "mean": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {
        "p50": round(statistics.median(ordered), 1),
        "p95": round(p95, 1),
        "mean": round(statistics.fmean(ordered), 1),
    }


def _cost(tokens: Iterable[tuple[str | None, int, int]]) -> float | None:
    """USD for (model, prompt, completion) triples; None when no model has a known price."""
    total, known = 0.0, False
    for model, prompt, completion in tokens:
        price = price_of(model)
        if price is None:
            continue
        known = True
        total += price[0] * prompt + price[1] * completion
    return round(total, 6) if known else None


def summarize(outcomes: Iterable[StepOutcome], candidate_model: str) -> dict[str, Any]:
    """The report of a run from its steps (see the module docstring for each rate's base).

    Keys: trajectories, steps, answered, tool_call_steps, decision_agreement,
    tool_name_agreement, argument_agreement (canonical), argument_agreement_typed (fractions or
    None), `*_ci95` intervals, step_agreement (decision and arguments both), counts (agree/of per
    rate), type_only_disagreements, decisions (reference->candidate counts), invalid_json,
    unknown_tools, per_tool (name -> reference_calls, candidate_calls, name_agreement,
    argument_agreement, argument_agreement_typed with intervals), errors (steps not answered),
    error_types, latency_ms, tokens and cost_usd (candidate and reference).
    """
    steps = answered = called = 0
    decision = names = args = typed = full = type_only = 0
    invalid = unknown = 0
    trajectories: set[str] = set()
    decisions: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    tools: dict[str, ToolTally] = {}
    cand_latency: list[float] = []
    ref_latency: list[float] = []
    cand_tokens: list[tuple[str | None, int, int]] = []
    ref_tokens: list[tuple[str | None, int, int]] = []
    for o in outcomes:
        steps += 1
        trajectories.add(o.trajectory_id)
        c = o.comparison
        if c is None:
            errors[o.error_type or "error"] += 1
            continue
        answered += 1
        decision += c.decision_agree
        full += c.agrees
        decisions[f"{c.reference_decision}->{c.candidate_decision}"] += 1
        invalid += c.invalid_json
        unknown += c.unknown_tools
        if c.names_agree is not None:
            called += 1
            names += bool(c.names_agree)
            args += bool(c.arguments_agree)
            typed += bool(c.typed_agree)
            type_only += bool(c.typed_agree) and not c.arguments_agree
        for name, tally in c.per_tool.items():
            tools.setdefault(name, ToolTally()).add(tally)
        if o.latency_ms is not None:
            cand_latency.append(o.latency_ms)
        if o.reference_latency_ms is not None:
            ref_latency.append(o.reference_latency_ms)
        cand_tokens.append((candidate_model, o.prompt_tokens or 0, o.completion_tokens or 0))
        ref_tokens.append(
            (o.reference_model, o.reference_prompt_tokens or 0, o.reference_completion_tokens or 0)
        )
    rates = {
        "decision_agreement": rate(decision, answered),
        "tool_name_agreement": rate(names, called),
        "argument_agreement": rate(args, called),
        "argument_agreement_typed": rate(typed, called),
        "step_agreement": rate(full, answered),
    }
    report: dict[str, Any] = {
        "trajectories": len(trajectories),
        "steps": steps,
        "answered": answered,
        "tool_call_steps": called,
    }
    for key, value in rates.items():
        report[key] = value["rate"]
        report[f"{key}_ci95"] = value["ci95"]
    report["counts"] = {key: {"agree": v["agree"], "of": v["of"]} for key, v in rates.items()}
    report["type_only_disagreements"] = type_only
    report["decisions"] = dict(sorted(decisions.items()))
    report["invalid_json"] = invalid
    report["unknown_tools"] = unknown
    report["per_tool"] = {
        name: {
            "reference_calls": t.reference,
            "candidate_calls": t.candidate,
            **{
                f"{key}{suffix}": value
                for key, matches in (
                    ("name_agreement", t.name_matches),
                    ("argument_agreement", t.argument_matches),
                    ("argument_agreement_typed", t.typed_matches),
                )
                for suffix, value in (
                    ("", rate(matches, t.reference)["rate"]),
                    ("_ci95", wilson_interval(matches, t.reference)),
                )
            },
            "name_matches": t.name_matches,
            "argument_matches": t.argument_matches,
            "typed_matches": t.typed_matches,
        }
        for name, t in sorted(tools.items(), key=lambda kv: (-kv[1].reference, kv[0]))
    }
    report["errors"] = steps - answered
    report["error_types"] = dict(errors.most_common())
    report["latency_ms"] = {"candidate": _latency(cand_latency), "reference": _latency(ref_latency)}
    report["tokens"] = {
        "candidate": {
            "prompt": sum(t[1] for t in cand_tokens),
            "completion": sum(t[2] for t in cand_tokens),
        },
        "reference": {
            "prompt": sum(t[1] for t in ref_tokens),
            "completion": sum(t[2] for t in ref_tokens),
        },
    }
    report["cost_usd"] = {"candidate": _cost(cand_tokens), "reference": _cost(ref_tokens)}
    return report
