"""The evaluation run: ask the candidate every selected step, store each answer as it comes,
and summarize the stored steps into the run's report.

A run is identified by a fingerprint of what it selects and asks (base URL, model, split,
reference, the export filters); running the same command again resumes the latest run with that
fingerprint that did not finish cleanly, asking only the steps not answered yet (a crash, Ctrl-C
or a step that failed after its retries). The candidate is called with the official `openai` SDK
(`AsyncOpenAI`, any OpenAI-compatible base URL), which retries 429, 408, 409 and 5xx answers and
connection errors with exponential backoff (honouring `retry-after`). The API key is passed to the
client only: it is never stored, and it is masked from stored error texts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai

from exporter.evaluation.compare import StepComparison, compare_responses
from exporter.evaluation.metrics import StepOutcome, summarize
from exporter.evaluation.selection import Selection, Step, candidate_request, select_steps
from exporter.options import ExportOptions
from proxy.core.canonical import response_message
from proxy.core.redaction import mask_secrets
from proxy.storage import Database, new_id, utc_now
from proxy.storage import evaluations as store

MAX_ERROR_TEXT = 500


class EvalError(Exception):
    """An evaluation that cannot run (one-line message for the CLI)."""


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how.

    base_url: the candidate's OpenAI-compatible API root (`https://api.openai.com/v1`,
    `http://localhost:8000/v1` for vLLM). model: the candidate model name sent in every request.
    api_key: the candidate's key (never stored). split: 'valid' (the export's validation split)
    or 'all'. reference: 'teacher' | 'student' | 'any' (see `selection.reference_step`).
    concurrency: requests in flight at once. retries: SDK retries per step on 429/5xx/connection
    errors (exponential backoff). timeout_s: per attempt. options: the export filters and split
    (`val_fraction`, `seed`). new_run: start a new run even when one can be resumed. limit: ask at
    most this many steps in this invocation (None: all).
    """

    base_url: str
    model: str
    api_key: str = field(repr=False)
    split: str = "valid"
    reference: str = "teacher"
    concurrency: int = 4
    retries: int = 4
    timeout_s: float = 120.0
    options: ExportOptions = field(default_factory=ExportOptions)
    new_run: bool = False
    limit: int | None = None


@dataclass
class EvalResult:
    """What `run_evaluation` did: the run id, its report, steps asked now and answered before."""

    run_id: str
    report: dict[str, Any]
    asked: int = 0
    reused: int = 0
    resumed: bool = False
    status: str = "finished"


def public_url(url: str) -> str:
    """`url` as stored and shown: without user info, query or fragment (no credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def _filters(options: ExportOptions) -> dict[str, Any]:
    """The export options that select trajectories (what the fingerprint and the run record)."""
    keys = (
        "leaves",
        "route",
        "models",
        "since",
        "until",
        "labels",
        "tags",
        "min_tool_calls",
        "include_incomplete",
        "exclude_promoted",
        "val_fraction",
        "seed",
    )
    data = dataclasses.asdict(options)
    return {k: list(data[k]) if isinstance(data[k], tuple) else data[k] for k in keys}


def fingerprint(config: EvalConfig) -> str:
    """A hash of what a run selects and asks; equal for reruns of the same command."""
    identity = {
        "base_url": public_url(config.base_url),
        "model": config.model,
        "split": config.split,
        "reference": config.reference,
        "filters": _filters(config.options),
    }
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _scrub(text: str, api_key: str) -> str:
    """`text` without the API key or anything key-shaped, cut to MAX_ERROR_TEXT characters."""
    if api_key:
        text = text.replace(api_key, "***")
    return mask_secrets(text)[:MAX_ERROR_TEXT]


def _scrub_json(text: str, api_key: str) -> str | None:
    """A candidate's answer as stored: key-shaped strings masked; None when over 1 MB."""
    if len(text) > 1_000_000:
        return None
    if api_key:
        text = text.replace(api_key, "***")
    return mask_secrets(text)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _Asker:
    """Asks the candidate one step and stores the result (one per run)."""

    def __init__(self, db: Database, config: EvalConfig, run_id: str) -> None:
        self.db = db
        self.config = config
        self.run_id = run_id
        self.client = openai.AsyncOpenAI(
            base_url=config.base_url,
            api_key=config.api_key or "none",
            max_retries=config.retries,
            timeout=config.timeout_s,
        )
        self.write_lock = asyncio.Lock()  # one writer at a time (SQLite), in completion order

    async def ask(self, step: Step) -> None:
        body = candidate_request(step.request, self.config.model)
        started = time.perf_counter()
        response: Any = None
        error_type: str | None = None
        error: dict[str, Any] | None = None
        try:
            response = await self.client.post("/chat/completions", body=body, cast_to=object)
        except openai.APIStatusError as exc:
            error_type = f"http_{exc.status_code}"
            error = {"status": exc.status_code, "message": str(exc)}
        except openai.APITimeoutError as exc:
            error_type, error = "timeout", {"message": str(exc)}
        except openai.APIConnectionError as exc:
            error_type, error = "connection", {"message": str(exc)}
        except (openai.APIError, ValueError) as exc:  # e.g. a JSON content type with a bad body
            error_type, error = "bad_response", {"message": f"{type(exc).__name__}: {exc}"}
        latency_ms = (time.perf_counter() - started) * 1000
        comparison = None
        if error_type is None:
            comparison = compare_responses(step.reference, response, step.request)
            if comparison is None:
                error_type = "no_message"
                error = {"message": "the answer has no choices[0].message"}
        usage = response.get("usage") if isinstance(response, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        answer_text = json.dumps(response) if response is not None else None
        row: dict[str, Any] = {
            "run_id": self.run_id,
            "exchange_id": step.exchange_id,
            "trajectory_id": step.trajectory_id,
            "step": step.step,
            "answered_utc": utc_now(),
            "outcome": "answered" if comparison is not None else "error",
            "error_type": error_type,
            "agrees": comparison.agrees if comparison is not None else None,
            "comparison_json": json.dumps(comparison.as_dict()) if comparison else None,
            "reference_message_json": json.dumps(response_message(step.reference)),
            "candidate_response_json": (
                _scrub_json(answer_text, self.config.api_key) if answer_text else None
            ),
            "error_json": (
                json.dumps({k: _scrub(str(v), self.config.api_key) for k, v in error.items()})
                if error
                else None
            ),
            "latency_ms": round(latency_ms, 2) if comparison is not None else None,
            "prompt_tokens": _int(usage.get("prompt_tokens")),
            "completion_tokens": _int(usage.get("completion_tokens")),
            "reference_model": step.reference_model,
            "reference_latency_ms": step.reference_latency_ms,
            "reference_prompt_tokens": step.reference_prompt_tokens,
            "reference_completion_tokens": step.reference_completion_tokens,
        }
        async with self.write_lock:
            await store.save_step(self.db, row)

    async def close(self) -> None:
        await self.client.close()


def outcome_of(row: dict[str, Any]) -> StepOutcome:
    """A stored `eval_steps` row as the metrics' `StepOutcome`."""
    comparison = (
        StepComparison.from_dict(json.loads(row["comparison_json"]))
        if row.get("outcome") == "answered" and row.get("comparison_json")
        else None
    )
    return StepOutcome(
        trajectory_id=row["trajectory_id"],
        comparison=comparison,
        error_type=row.get("error_type"),
        latency_ms=row.get("latency_ms"),
        prompt_tokens=row.get("prompt_tokens"),
        completion_tokens=row.get("completion_tokens"),
        reference_model=row.get("reference_model"),
        reference_latency_ms=row.get("reference_latency_ms"),
        reference_prompt_tokens=row.get("reference_prompt_tokens"),
        reference_completion_tokens=row.get("reference_completion_tokens"),
    )


async def _start_run(
    db: Database, config: EvalConfig, selection: Selection
) -> tuple[str, set[str], bool]:
    """(run id, exchange ids answered before, resumed?): the run to resume, or a new one."""
    print_ = fingerprint(config)
    now = utc_now()
    run = None if config.new_run else await store.open_run_with(db, print_)
    counts = {
        "trajectory_count": len({s.trajectory_id for s in selection.steps}),
        "step_count": len(selection.steps),
    }
    if run is not None:
        await store.update_run(db, run["id"], status="running", updated_utc=now, **counts)
        return run["id"], await store.answered_exchange_ids(db, run["id"]), True
    run_id = new_id()
    await store.create_run(
        db,
        {
            "id": run_id,
            "created_utc": now,
            "updated_utc": now,
            "status": "running",
            "fingerprint": print_,
            "base_url": public_url(config.base_url),
            "model": config.model,
            "split": config.split,
            "reference": config.reference,
            "options_json": json.dumps(_filters(config.options)),
            **counts,
        },
    )
    return run_id, set(), False


async def run_evaluation(
    db: Database,
    config: EvalConfig,
    on_start: Callable[[int, int], None] | None = None,
    on_step: Callable[[], None] | None = None,
) -> EvalResult:
    """Replay the held-out steps against the candidate; store and return the report.

    on_start(total_steps, already_answered) is called once the steps are known; on_step() after
    each step is stored. Raises EvalError when no step is selected; database errors as
    sqlalchemy raises them. Cancelling (Ctrl-C) leaves the run resumable.
    """
    selection = await select_steps(db, config.options, config.split, config.reference)
    if not selection.steps:
        skipped = ", ".join(f"{k}: {v}" for k, v in selection.skipped.most_common())
        raise EvalError(
            f"no steps to replay: {selection.trajectories} trajectories matched"
            + (f", their steps were left out ({skipped})" if skipped else "")
            + (
                "; the teacher answered none of them: try --reference any"
                if selection.skipped.get("no_teacher_answer")
                else ""
            )
        )
    run_id, answered, resumed = await _start_run(db, config, selection)
    todo = [s for s in selection.steps if s.exchange_id not in answered]
    if config.limit is not None:
        todo = todo[: config.limit]
    if on_start is not None:
        on_start(len(selection.steps), len(selection.steps) - len(todo))
    asker = _Asker(db, config, run_id)
    queue: asyncio.Queue[Step] = asyncio.Queue()
    for step in todo:
        queue.put_nowait(step)

    async def worker() -> None:
        while True:
            try:
                step = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await asker.ask(step)
            if on_step is not None:
                on_step()

    try:
        workers = [asyncio.create_task(worker()) for _ in range(min(config.concurrency, len(todo)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
    finally:
        await asker.close()
    wanted = {s.exchange_id for s in selection.steps}
    rows = [r for r in await store.run_steps(db, run_id) if r["exchange_id"] in wanted]
    report = summarize((outcome_of(r) for r in rows), config.model)
    report["steps"] = len(selection.steps)
    report["not_asked"] = len(selection.steps) - len(rows)
    if report["not_asked"]:  # --limit, or steps of a run interrupted before (kept for a rerun)
        report["errors"] += report["not_asked"]
        report["error_types"]["not_asked"] = report["not_asked"]
    complete = report["errors"] == 0
    status = "finished" if complete else "incomplete"
    report = {
        "run_id": run_id,
        "status": status,
        "model": config.model,
        "base_url": public_url(config.base_url),
        "split": config.split,
        "reference": config.reference,
        "trajectories": len({s.trajectory_id for s in selection.steps}),
        **{k: v for k, v in report.items() if k != "trajectories"},
        "skipped": dict(selection.skipped.most_common()),
        "asked": len(todo),
        "reused": len(selection.steps) - len(todo) if resumed else 0,
    }
    now = utc_now()
    await store.update_run(
        db,
        run_id,
        status=status,
        updated_utc=now,
        finished_utc=now,
        report_json=json.dumps(report),
    )
    return EvalResult(
        run_id=run_id,
        report=report,
        asked=len(todo),
        reused=report["reused"],
        resumed=resumed,
        status=status,
    )
