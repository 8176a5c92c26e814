"""Templates and responses: the Jinja environment, page rendering, and the one place errors are
rendered (HTML for `/dashboard`, OpenAI-shaped JSON for `/api/`).

Autoescaping is on for every template; captured values are never marked safe. Responses carry a
Content-Security-Policy that allows no script at all, so even a value that escaped escaping would
not run.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any
from urllib.parse import quote

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from proxy.dashboard.security import CSRF_COOKIE, Guard
from proxy.http.errors import error_response

SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def fmt_ms(value: float | None) -> str:
    """Milliseconds for people: '–', '812 ms', '2.3 s', '4 min 5 s'."""
    if value is None:
        return "\u2013"
    if value < 1000:
        return f"{value:.0f} ms"
    if value < 60_000:
        return f"{value / 1000:.1f} s"
    minutes, seconds = divmod(int(value / 1000), 60)
    return f"{minutes} min {seconds} s"


def fmt_int(value: int | float | None) -> str:
    """Thousands separated, '–' for None."""
    return "\u2013" if value is None else f"{int(value):,}"


def fmt_time(value: str | None) -> str:
    """A stored ISO-8601 UTC timestamp as 'YYYY-MM-DD HH:MM:SS'."""
    if not value:
        return "\u2013"
    try:
        moment = dt.datetime.fromisoformat(value).astimezone(dt.UTC)
    except ValueError:
        return value
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def fmt_cost(value: float | None) -> str:
    """USD with enough digits for small amounts; '–' when unknown."""
    if value is None:
        return "\u2013"
    if value == 0:
        return "$0"
    if value < 0.01:
        return f"${value:.5f}"
    return f"${value:,.2f}"


def short_id(value: str | None, length: int = 10) -> str:
    """The start of a long id (the full id goes in a title attribute)."""
    if not value:
        return ""
    return value if len(value) <= length + 1 else value[:length] + "\u2026"


def path_segment(value: str) -> str:
    """`value` quoted for use as one URL path segment (a `/` in an id is escaped too)."""
    return quote(str(value), safe="")


@functools.cache
def environment() -> jinja2.Environment:
    """The dashboard's Jinja environment (templates in proxy/dashboard/templates/)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("proxy.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ms=fmt_ms, int=fmt_int, time=fmt_time, cost=fmt_cost, short=short_id, seg=path_segment
    )
    return env


def csrf_nonce(request: Request) -> tuple[str, bool]:
    """The browser's CSRF nonce and whether it is new (then the response must set the cookie)."""
    nonce = request.cookies.get(CSRF_COOKIE)
    if nonce and 16 <= len(nonce) <= 64 and nonce.replace("-", "").replace("_", "").isalnum():
        return nonce, False
    return Guard.new_nonce(), True


def set_cookie(
    response: Response, request: Request, name: str, value: str, max_age: int | None
) -> None:
    """An HttpOnly, SameSite=Strict cookie for the whole proxy (Secure when served over https)."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def render(
    request: Request, template: str, context: dict[str, Any], *, status: int = 200
) -> Response:
    """Render `template` with `context` plus the common names (guard, csrf_token, nav, demo)."""
    dashboard = request.app.state.dashboard
    guard: Guard = dashboard.guard
    nonce, new = csrf_nonce(request)
    html = (
        environment()
        .get_template(template)
        .render(
            request=request,
            csrf_token=guard.csrf_token(nonce),
            login_required=guard.token is not None,
            demo=dashboard.demo,
            database=dashboard.database_label,
            **context,
        )
    )
    response = HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
    if new:
        set_cookie(response, request, CSRF_COOKIE, nonce, None)
    return response


def is_api(request: Request) -> bool:
    """Does the request address the JSON API (errors as JSON) rather than a page."""
    return request.url.path.startswith("/api/") or request.url.path == "/api"


def error(
    request: Request,
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    type_: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> Response:
    """The error answer: OpenAI-shaped JSON for `/api/`, an HTML page for the dashboard."""
    if is_api(request):
        return error_response(status, message, type_, param=param, code=code, headers=headers)
    dashboard = getattr(request.app.state, "dashboard", None)
    if dashboard is None or not dashboard.guard.enabled:
        html = (
            environment()
            .get_template("error.html")
            .render(
                request=request,
                status=status,
                message=message,
                csrf_token="",
                login_required=False,
                demo=False,
                database="",
                bare=True,
            )
        )
        return HTMLResponse(
            html, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})}
        )
    response = render(
        request, "error.html", {"status": status, "message": message, "bare": False}, status=status
    )
    response.headers.update(headers or {})
    return response
