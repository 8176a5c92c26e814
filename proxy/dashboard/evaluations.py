"""The Evaluations pages and API: replay evaluation runs (`understudy-export eval`).

    GET /dashboard/evaluations                 one row per run: candidate, status, agreement
    GET /dashboard/evaluations/{run}[?page=N]  a run: summary, per-tool table, and the steps
                                               where the candidate disagreed, beside the reference
    GET /api/evaluations                       `{"object": "list", "data": [run...]}`
    GET /api/evaluations/{run}[?page=N]        a run with its report and one page of disagreements

Runs and steps are read with `proxy.storage.evaluations`; the report is the one the CLI stored.
Messages shown are captured (reference) or candidate text: untrusted, rendered escaped.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.core.canonical import response_message
from proxy.dashboard.guard import database, guarded
from proxy.dashboard.params import ParamError
from proxy.dashboard.render import error, render
from proxy.storage import Database
from proxy.storage.evaluations import disagreed_steps, get_run, list_runs

PAGE_STEPS = 25
MAX_ARGUMENT_CHARS = 4000


def _load(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def run_summary(row: dict[str, Any]) -> dict[str, Any]:
    """A run row as the pages and API show it: its columns (no fingerprint), the report decoded
    (`report`, or None before the first finish) and `options` decoded."""
    out = {k: v for k, v in row.items() if k not in ("report_json", "options_json", "fingerprint")}
    out["report"] = _load(row.get("report_json"))
    out["options"] = _load(row.get("options_json")) or {}
    return out


def message_view(message: Any) -> dict[str, Any]:
    """An assistant message for display: `{"content": str | None, "calls": [{"name",
    "arguments"}]}`, arguments pretty-printed when they are JSON (else as written), cut to
    MAX_ARGUMENT_CHARS."""
    if not isinstance(message, dict):
        return {"content": None, "calls": []}
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    calls = []
    tool_calls = message.get("tool_calls")
    raw: list[Any] = tool_calls if isinstance(tool_calls, list) else []
    if not raw and isinstance(message.get("function_call"), dict):
        raw = [{"function": message["function_call"]}]
    for call in raw:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        with contextlib.suppress(ValueError, TypeError):
            text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        calls.append({"name": str(function.get("name")), "arguments": text[:MAX_ARGUMENT_CHARS]})
    return {"content": content if isinstance(content, str) else None, "calls": calls}


def _why(comparison: dict[str, Any] | None, row: dict[str, Any]) -> list[str]:
    """Short reasons a step disagreed, in the report's words."""
    if row.get("outcome") != "answered" or comparison is None:
        return [f"not answered ({row.get('error_type') or 'error'})"]
    reasons = []
    if not comparison.get("decision_agree"):
        reasons.append(
            f"decision: {comparison.get('candidate_decision')} instead of "
            f"{comparison.get('reference_decision')}"
        )
    elif comparison.get("names_agree") is False:
        reasons.append("tool names")
    elif comparison.get("arguments_agree") is False:
        reasons.append("argument types only" if comparison.get("typed_agree") else "arguments")
    if comparison.get("invalid_json"):
        reasons.append(f"{comparison['invalid_json']} invalid JSON")
    if comparison.get("unknown_tools"):
        reasons.append(f"{comparison['unknown_tools']} unknown tool")
    return reasons


def step_view(row: dict[str, Any]) -> dict[str, Any]:
    """One disagreeing step: ids, the reasons, the reference and candidate messages, the error."""
    comparison = _load(row.get("comparison_json"))
    error_data = _load(row.get("error_json")) or {}
    return {
        "exchange_id": row["exchange_id"],
        "trajectory_id": row["trajectory_id"],
        "step": row["step"],
        "outcome": row["outcome"],
        "why": _why(comparison, row),
        "reference": message_view(_load(row.get("reference_message_json"))),
        "candidate": message_view(response_message(_load(row.get("candidate_response_json")))),
        "error": error_data.get("message") if isinstance(error_data, dict) else None,
        "latency_ms": row.get("latency_ms"),
    }


def _page(request: Request) -> int:
    raw = request.query_params.get("page", "1")
    if not raw.isdigit() or not 1 <= int(raw) <= 100_000:
        raise ParamError("page must be a whole number from 1", "page")
    return int(raw)


async def run_payload(db: Database, run_id: str, page: int) -> dict[str, Any] | None:
    """A run with its report and one page of disagreeing steps (`disagreements`,
    `disagreement_count`, `page`, `pages`); None when there is no such run."""
    row = await get_run(db, run_id)
    if row is None:
        return None
    steps, total = await disagreed_steps(
        db, run_id, limit=PAGE_STEPS, offset=(page - 1) * PAGE_STEPS
    )
    return {
        **run_summary(row),
        "disagreements": [step_view(s) for s in steps],
        "disagreement_count": total,
        "page": page,
        "pages": max(1, -(-total // PAGE_STEPS)),
    }


@guarded
async def evaluations_page(request: Request) -> Response:
    """GET /dashboard/evaluations: one row per run, latest first."""
    runs = [run_summary(r) for r in await list_runs(database(request))]
    return render(request, "evaluations.html", {"runs": runs})


@guarded
async def evaluation_page(request: Request) -> Response:
    """GET /dashboard/evaluations/{run}: the run's summary, per-tool table and disagreements."""
    run_id = request.path_params["run_id"]
    payload = await run_payload(database(request), run_id, _page(request))
    if payload is None:
        return error(request, 404, f"no evaluation run {run_id}", code="run_not_found")
    return render(request, "evaluation.html", {"run": payload})


@guarded
async def api_evaluations(request: Request) -> Response:
    """GET /api/evaluations: the latest runs with their reports."""
    runs = [run_summary(r) for r in await list_runs(database(request))]
    return JSONResponse({"object": "list", "data": runs})


@guarded
async def api_evaluation(request: Request) -> Response:
    """GET /api/evaluations/{run}: one run, its report and a page of disagreements."""
    run_id = request.path_params["run_id"]
    payload = await run_payload(database(request), run_id, _page(request))
    if payload is None:
        return error(request, 404, f"no evaluation run {run_id}", code="run_not_found")
    return JSONResponse(payload)
