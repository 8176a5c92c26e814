"""The dashboard's HTML pages and forms (server-rendered, no JavaScript).

    GET  /dashboard                              trajectory list with filters
    GET  /dashboard/trajectories/{id}[?leaf=ID]  one trajectory, one branch at a time
    POST /dashboard/trajectories/{id}/label      curation form (CSRF token)
    POST /dashboard/label                        label the ticked rows of the list (CSRF token)
    GET  /dashboard/charts[?window=24h]          charts
    GET  /dashboard/login, POST /dashboard/login, POST /dashboard/logout

Pages render the same payloads the JSON API returns (`proxy.dashboard.api`).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from proxy.dashboard import charts
from proxy.dashboard.api import (
    charts_payload,
    clean_note,
    clean_tags,
    get_payload,
    list_payload,
)
from proxy.dashboard.guard import database, field, guarded, read_form, safe_next
from proxy.dashboard.params import LABEL_CHOICES, ParamError, parse_list_query
from proxy.dashboard.render import error, render, set_cookie
from proxy.dashboard.security import SESSION_COOKIE, SESSION_TTL_S, Guard, client_address
from proxy.dashboard.turns import chat_turns
from proxy.storage.browse import (
    KEEP,
    label_many,
    label_trajectory,
    neighbour_unlabeled,
    recent_models,
)

ROUTE_CHOICES = ("student", "teacher", "shadow")
LABEL_ACTIONS = {"approved": "approved", "rejected": "rejected", "clear": None}


def _csrf_refused(request: Request) -> Response:
    return error(
        request,
        403,
        "the form expired or came from another site: reload the page and submit again",
        code="csrf_failed",
    )


@guarded
async def list_page(request: Request) -> Response:
    """GET /dashboard: the trajectory list."""
    db = database(request)
    try:
        query = parse_list_query(request.query_params)
        payload = await list_payload(db, query)
        problem = None
    except ParamError as exc:
        query = parse_list_query({})
        payload = await list_payload(db, query)
        problem = exc.message
    return render(
        request,
        "list.html",
        {
            "query": query,
            "page": payload,
            "problem": problem,
            "models": await recent_models(db),
            "routes": ROUTE_CHOICES,
            "label_choices": LABEL_CHOICES,
            "back": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            "flash": request.query_params.get("labeled"),
        },
    )


def estimated_steps(payload: dict[str, Any]) -> int:
    """How many exchanges of a trajectory payload have token counts the proxy estimated (a
    stream without `include_usage`: `usage.estimated`), not the upstream's own figures."""
    return sum(
        1
        for e in payload.get("exchanges") or []
        if isinstance(e.get("usage"), dict) and e["usage"].get("estimated") is True
    )


@guarded
async def trajectory_page(request: Request) -> Response:
    """GET /dashboard/trajectories/{id}: the conversation of one branch, steps and curation."""
    db = database(request)
    trajectory_id = request.path_params["trajectory_id"]
    payload = await get_payload(db, trajectory_id)
    if payload is None:
        return error(request, 404, f"no trajectory {trajectory_id}", code="trajectory_not_found")
    leaf = request.query_params.get("leaf") or None
    try:
        view = chat_turns(payload, leaf)
    except KeyError:
        return error(request, 404, f"no branch ending in exchange {leaf}", code="branch_not_found")
    return render(
        request,
        "trajectory.html",
        {
            "t": payload,
            "view": view,
            "estimated_steps": estimated_steps(payload),
            "next_unlabeled": await neighbour_unlabeled(db, payload),
            "saved": request.query_params.get("saved"),
            "back": safe_next(request.query_params.get("back"), "/dashboard"),
        },
    )


@guarded
async def label_form(request: Request) -> Response:
    """POST /dashboard/trajectories/{id}/label: approve / reject / clear, tags and note."""
    guard: Guard = request.app.state.dashboard.guard
    form = await read_form(request)
    if not guard.valid_csrf(request, field(form, "csrf_token")):
        return _csrf_refused(request)
    trajectory_id = request.path_params["trajectory_id"]
    action = field(form, "action", "keep")
    if action not in (*LABEL_ACTIONS, "keep"):
        raise ParamError("action must be approved, rejected, clear or keep", "action")
    row = await label_trajectory(
        database(request),
        trajectory_id,
        label=LABEL_ACTIONS.get(action, KEEP),
        tags=clean_tags(field(form, "tags")),
        note=clean_note(field(form, "note")),
    )
    if row is None:
        return error(request, 404, f"no trajectory {trajectory_id}", code="trajectory_not_found")
    if field(form, "then") == "next":
        following = await neighbour_unlabeled(database(request), row)
        if following:
            return RedirectResponse(
                f"/dashboard/trajectories/{following}?saved={action}", status_code=303
            )
    params = {"saved": action}
    leaf = field(form, "leaf")
    if leaf:
        params["leaf"] = leaf
    back = field(form, "back")
    if back:
        params["back"] = safe_next(back)
    return RedirectResponse(
        f"/dashboard/trajectories/{trajectory_id}?{urlencode(params)}", status_code=303
    )


@guarded
async def bulk_label_form(request: Request) -> Response:
    """POST /dashboard/label: set a label on the trajectories ticked in the list."""
    guard: Guard = request.app.state.dashboard.guard
    form = await read_form(request)
    if not guard.valid_csrf(request, field(form, "csrf_token")):
        return _csrf_refused(request)
    action = field(form, "action")
    if action not in LABEL_ACTIONS:
        raise ParamError("action must be approved, rejected or clear", "action")
    ids = form.get("id", [])[:500]
    updated = await label_many(database(request), ids, LABEL_ACTIONS[action])
    back = safe_next(field(form, "back"))
    separator = "&" if "?" in back else "?"
    return RedirectResponse(f"{back}{separator}labeled={updated}", status_code=303)


@guarded
async def charts_page(request: Request) -> Response:
    """GET /dashboard/charts: exchanges over time, teacher share, latency, tools, tokens."""
    window = request.query_params.get("window", "24h")
    data = await charts_payload(database(request), window)
    buckets = data["buckets"]
    svg = {
        "exchanges": charts.stacked_bars_svg(
            buckets, data["exchanges_by_route"], label="Exchanges over time by route"
        ),
        "teacher_share": charts.lines_svg(
            buckets,
            {"teacher share": data["teacher_share"]},
            label="Teacher share of exchanges",
            unit="%",
            top=100,
        ),
        "latency": charts.lines_svg(
            buckets, data["latency_ms"], label="Latency percentiles", unit=" ms"
        ),
        "tools": charts.hbars_svg(
            [(name, [count]) for name, count in data["tool_calls"]],
            label="Tool-call frequency",
            parts=("calls",),
        ),
        "tokens": charts.hbars_svg(
            [
                (model, [prompt, completion])
                for model, prompt, completion in data["tokens_by_model"]
            ],
            label="Tokens by model",
            parts=("prompt", "completion"),
        ),
    }
    return render(
        request,
        "charts.html",
        {
            "data": data,
            "svg": svg,
            "window": window,
            "windows": list(charts.WINDOWS),
            "route_colors": {
                route: charts.route_color(route, i)
                for i, route in enumerate(data["exchanges_by_route"])
            },
            "line_colors": charts.LINE_COLORS,
        },
    )


async def login_page(request: Request) -> Response:
    """GET /dashboard/login: the token form (straight to the list when no token is configured)."""
    guard: Guard = request.app.state.dashboard.guard
    target = safe_next(request.query_params.get("next"))
    if not guard.enabled:
        return error(request, 403, guard.disabled_reason or "", code="dashboard_disabled")
    if guard.token is None or guard.authenticated(request):
        return RedirectResponse(target, status_code=303)
    return render(request, "login.html", {"next": target, "failed": False})


async def login_submit(request: Request) -> Response:
    """POST /dashboard/login: check the token, set the session cookie, go on to `next`."""
    guard: Guard = request.app.state.dashboard.guard
    if not guard.enabled or guard.token is None:
        return RedirectResponse("/dashboard", status_code=303)
    try:
        form = await read_form(request)
    except ValueError as exc:
        return error(request, 400, str(exc), code="invalid_form")
    target = safe_next(field(form, "next"))
    if not guard.valid_csrf(request, field(form, "csrf_token")):
        return _csrf_refused(request)
    address = client_address(request)
    wait_s = guard.attempts.retry_after(address)
    if wait_s:
        message = f"too many wrong admin tokens from this address; retry in {wait_s} s"
        headers = {"retry-after": str(wait_s)}
        return error(request, 429, message, code="too_many_attempts", headers=headers)
    if not guard.check_token(field(form, "token")):
        guard.attempts.failed(address)
        await asyncio.sleep(0.5)  # slows guessing; the token is still the real protection
        return render(request, "login.html", {"next": target, "failed": True}, status=401)
    guard.attempts.succeeded(address)
    response = RedirectResponse(target, status_code=303)
    set_cookie(response, request, SESSION_COOKIE, guard.new_session(), SESSION_TTL_S)
    return response


async def logout(request: Request) -> Response:
    """POST /dashboard/logout: forget the session cookie."""
    guard: Guard = request.app.state.dashboard.guard
    form = await read_form(request) if request.headers.get("content-type") else {}
    if not guard.valid_csrf(request, field(form, "csrf_token")):
        return _csrf_refused(request)
    response = RedirectResponse("/dashboard/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
