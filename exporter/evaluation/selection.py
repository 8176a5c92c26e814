"""Which recorded steps an evaluation replays: the export's filters and split, then every
recorded assistant answer on the way to each selected leaf.

The leaves are chosen exactly as `export` chooses them (the same `ExportOptions`, the same rows
from `exporter.reader.read_batches`, the same `SampleBuilder` decisions, the same
`exporter.api.in_validation` split), so `--split valid` replays the trajectories that went to
the validation file of an export run with the same `--val-fraction` and `--seed`. Each selected
leaf's ancestors (its `parent_id` chain) are the steps; a step shared by two leaves of a fork is
replayed once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from exporter.api import SampleBuilder, in_validation
from exporter.evaluation import REFERENCE_CHOICES, SPLIT_CHOICES
from exporter.options import ExportOptions
from exporter.reader import read_batches
from proxy.core.canonical import response_message
from proxy.storage import Database
from proxy.storage.evaluations import steps_of

# Request fields never replayed: the candidate answers once, in one JSON body, and nothing of
# the recording (metadata with the trajectory id, stored completions) leaks into its call.
_NOT_REPLAYED = frozenset({"model", "stream", "stream_options", "n", "metadata", "store"})


@dataclass(frozen=True)
class Step:
    """One recorded assistant answer to replay.

    request: the recorded chat request (dict with `messages`, maybe `tools` and options).
    reference: the reference answer as a `chat.completion` dict (the recorded response, or the
    shadow teacher's). reference_model / reference_latency_ms / reference_*_tokens: what the
    reference cost, as recorded.
    """

    exchange_id: str
    trajectory_id: str
    step: int
    request: dict[str, Any]
    reference: dict[str, Any]
    reference_model: str | None
    reference_latency_ms: float | None
    reference_prompt_tokens: int | None
    reference_completion_tokens: int | None


@dataclass
class Selection:
    """The steps to replay, the trajectories they come from, and steps left out by reason
    ('not_chat', 'not_answered', 'unreadable', 'no_teacher_answer', 'not_student')."""

    steps: list[Step]
    trajectories: int
    skipped: Counter[str]


def candidate_request(request: dict[str, Any], model: str) -> dict[str, Any]:
    """The body sent to the candidate: the recorded request with `model` replaced, as one JSON
    answer (`stream`, `stream_options`, `n` dropped) and without `metadata`/`store`."""
    body = {k: v for k, v in request.items() if k not in _NOT_REPLAYED}
    return {"model": model, **body}


async def held_out_leaves(db: Database, options: ExportOptions, split: str) -> list[dict[str, Any]]:
    """Leaves that `export` with `options` would write (to the validation file for split
    'valid', to either file for 'all'), as `proxy.storage.reading.leaves_query` rows."""
    options = dataclasses.replace(options, format="openai", limit=None, workers=1)
    builder = SampleBuilder(options)
    selected: list[dict[str, Any]] = []
    async for rows in read_batches(db, options):
        built = await asyncio.to_thread(builder.build, rows)
        for row, result in zip(rows, built, strict=True):
            if result[0] != "ok":
                continue
            if split == "valid" and not in_validation(
                row["trajectory_id"], options.val_fraction, options.seed
            ):
                continue
            selected.append(row)
    return selected


def _decode(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _usage(response: dict[str, Any]) -> tuple[int | None, int | None]:
    usage = response.get("usage")
    if not isinstance(usage, dict):
        return None, None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
    )


def reference_step(row: dict[str, Any], reference: str) -> Step | str:
    """The step of one recorded exchange row (`steps_of`), or the reason it is left out.

    reference 'teacher': the answer of a teacher-routed exchange, else its shadow teacher answer;
    'student': the answer of a student-routed exchange; 'any': the recorded answer.
    """
    if not str(row.get("path") or "").endswith("/chat/completions"):
        return "not_chat"
    request = _decode(row.get("request_json"))
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        return "unreadable"
    answered = row.get("outcome") == "ok"
    response = _decode(row.get("response_json")) if answered else None
    model, latency = row.get("model_answered") or row.get("model_requested"), row.get("duration_ms")
    tokens: tuple[int | None, int | None] = (row.get("prompt_tokens"), row.get("completion_tokens"))
    if reference == "teacher" and row.get("route") != "teacher":
        response = _decode(row.get("shadow_response_json"))
        if response_message(response) is None:
            return "no_teacher_answer"
        assert isinstance(response, dict)
        model, latency = (
            row.get("shadow_model") or response.get("model"),
            row.get("shadow_duration_ms"),
        )
        tokens = _usage(response)
    elif reference == "student" and row.get("route") != "student":
        return "not_student"
    if response_message(response) is None:
        return "not_answered"
    assert isinstance(response, dict)
    return Step(
        exchange_id=row["id"],
        trajectory_id=row["trajectory_id"],
        step=int(row.get("step") or 0),
        request=request,
        reference=response,
        reference_model=model,
        reference_latency_ms=latency,
        reference_prompt_tokens=tokens[0],
        reference_completion_tokens=tokens[1],
    )


async def select_steps(
    db: Database, options: ExportOptions, split: str, reference: str
) -> Selection:
    """The steps of the held-out trajectories (see the module docstring), ordered by
    trajectory and step. Raises ValueError for an unknown split or reference."""
    if split not in SPLIT_CHOICES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_CHOICES)}")
    if reference not in REFERENCE_CHOICES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCE_CHOICES)}")
    leaves = await held_out_leaves(db, options, split)
    trajectory_ids = list(dict.fromkeys(leaf["trajectory_id"] for leaf in leaves))
    rows = await steps_of(db, trajectory_ids)
    by_id = {row["id"]: row for row in rows}
    wanted: set[str] = set()
    for leaf in leaves:
        current: str | None = leaf["id"]
        while current is not None and current in by_id and current not in wanted:
            wanted.add(current)
            current = by_id[current].get("parent_id")
    steps: list[Step] = []
    skipped: Counter[str] = Counter()
    for row in rows:  # already ordered by trajectory and step
        if row["id"] not in wanted:
            continue
        step = reference_step(row, reference)
        if isinstance(step, str):
            skipped[step] += 1
        else:
            steps.append(step)
    return Selection(steps=steps, trajectories=len(trajectory_ids), skipped=skipped)
