"""Route plumbing shared by pages and API: the dashboard's state, the access check around every
handler, and reading urlencoded forms (without a multipart dependency)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from proxy.dashboard.params import ParamError
from proxy.dashboard.render import error, is_api
from proxy.dashboard.security import Guard, client_address
from proxy.storage import Database
from proxy.storage.browse import CursorError

log = logging.getLogger("understudy.dashboard")

Handler = Callable[[Request], Awaitable[Response]]
MAX_FORM_BYTES = 256 * 1024


@dataclass(frozen=True)
class DashboardState:
    """What the dashboard keeps on `app.state.dashboard`: its guard and how to label the database."""

    guard: Guard
    demo: bool
    database_label: str


class FormError(ValueError):
    """A form body that is not urlencoded or too large."""


def database(request: Request) -> Database:
    """The proxy's open database (opened in the app's lifespan)."""
    db: Database = request.app.state.proxy.db
    return db


def guarded(handler: Handler) -> Handler:
    """Run `handler` only for requests the guard lets in; map parameter errors to 400.

    Dashboard off: 403 with the reason. Host not allowed: 403. An address that sent too many
    wrong tokens (`Guard.attempts`): 429 with `Retry-After`, whatever it sends now. Not logged
    in: a redirect to the login form for pages, 401 with `WWW-Authenticate: Bearer` for the API
    (a wrong Bearer token counts as a failed attempt). A POST from another origin: 403.
    """

    @functools.wraps(handler)
    async def check(request: Request) -> Response:
        guard: Guard = request.app.state.dashboard.guard
        if not guard.enabled:
            return error(request, 403, guard.disabled_reason or "", code="dashboard_disabled")
        if not guard.host_allowed(request):
            return error(
                request,
                403,
                "the dashboard answers only to localhost / 127.0.0.1 / [::1] unless "
                "UNDERSTUDY_ADMIN_TOKEN is set",
                code="host_not_allowed",
            )
        address = client_address(request)
        wait_s = guard.attempts.retry_after(address) if guard.token is not None else 0
        if wait_s:
            return error(
                request,
                429,
                f"too many wrong admin tokens from this address; retry in {wait_s} s",
                code="too_many_attempts",
                headers={"retry-after": str(wait_s)},
            )
        if not guard.authenticated(request):
            if "authorization" in request.headers:  # a wrong token, not an expired session
                guard.attempts.failed(address)
            if is_api(request):
                return error(
                    request,
                    401,
                    "missing or wrong admin token: send Authorization: Bearer <UNDERSTUDY_ADMIN_TOKEN>",
                    code="invalid_admin_token",
                    headers={"www-authenticate": "Bearer"},
                )
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/dashboard/login?next={quote(target, safe='')}", 303)
        if "authorization" in request.headers:
            guard.attempts.succeeded(address)
        if request.method == "POST" and not guard.same_origin(request):
            return error(request, 403, "cross-origin request refused", code="cross_origin")
        try:
            return await handler(request)
        except ParamError as exc:
            return error(request, 400, exc.message, param=exc.param, code="invalid_parameter")
        except CursorError as exc:
            return error(request, 400, str(exc), param="after", code="invalid_cursor")
        except FormError as exc:
            return error(request, 400, str(exc), code="invalid_form")

    return check


async def read_form(request: Request) -> dict[str, list[str]]:
    """The fields of an `application/x-www-form-urlencoded` body (each a list of values)."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise FormError("expected a form (application/x-www-form-urlencoded)")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise FormError("form too large")
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=1000)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormError(f"unreadable form: {exc}") from exc


def field(form: dict[str, list[str]], name: str, default: str = "") -> str:
    """The first value of a form field."""
    values = form.get(name)
    return values[0] if values else default


def safe_next(target: str | None, default: str = "/dashboard") -> str:
    """A redirect target only within the dashboard (no open redirect to another site)."""
    if target and target.startswith("/dashboard") and "\\" not in target and "//" not in target:
        return target
    return default
