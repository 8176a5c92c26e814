"""The dashboard (`/dashboard`) and admin JSON API (`/api/*`), served by the proxy process.

Pages are server-rendered Jinja templates (`templates/`, a `base.html` and `_partial.html`
includes) with one stylesheet (`static/`); no JavaScript. Queries live in
`proxy.storage.browse`; access rules in `proxy.dashboard.security`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy.engine import make_url
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from proxy.config import Settings
from proxy.dashboard import api, evaluations, pages
from proxy.dashboard.export import export_download
from proxy.dashboard.guard import DashboardState
from proxy.dashboard.security import Guard

log = logging.getLogger("understudy.dashboard")

STATIC_DIR = Path(__file__).parent / "static"


def database_label(target: str) -> str:
    """The database as the header shows it: a path, or a URL without its password."""
    if "://" not in target:
        return target
    try:
        return make_url(target).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a label only; the database itself reports bad URLs
        return target.split("@")[-1]


async def _to_list(request: Request) -> Response:
    return RedirectResponse("/dashboard", status_code=307)


def routes() -> list[BaseRoute]:
    """Every dashboard and admin API route."""
    return [
        Route("/dashboard", pages.list_page, methods=["GET"]),
        Route("/dashboard/", _to_list, methods=["GET"]),
        Route(
            "/dashboard/trajectories/{trajectory_id:path}", pages.trajectory_page, methods=["GET"]
        ),
        Route(
            "/dashboard/trajectories/{trajectory_id:path}/label", pages.label_form, methods=["POST"]
        ),
        Route("/dashboard/label", pages.bulk_label_form, methods=["POST"]),
        Route("/dashboard/charts", pages.charts_page, methods=["GET"]),
        Route("/dashboard/export", export_download, methods=["GET"]),
        Route("/dashboard/evaluations", evaluations.evaluations_page, methods=["GET"]),
        Route("/dashboard/evaluations/{run_id}", evaluations.evaluation_page, methods=["GET"]),
        Route("/api/evaluations", evaluations.api_evaluations, methods=["GET"]),
        Route("/api/evaluations/{run_id}", evaluations.api_evaluation, methods=["GET"]),
        Route("/dashboard/login", pages.login_page, methods=["GET"]),
        Route("/dashboard/login", pages.login_submit, methods=["POST"]),
        Route("/dashboard/logout", pages.logout, methods=["POST"]),
        Route("/api/trajectories", api.api_list, methods=["GET"]),
        Route("/api/trajectories/{trajectory_id:path}", api.api_get, methods=["GET"]),
        Route("/api/trajectories/{trajectory_id:path}/label", api.api_label, methods=["POST"]),
        Route("/api/labels", api.api_label_many, methods=["POST"]),
        Route("/api/charts", api.api_charts, methods=["GET"]),
        Route("/api/stats", api.api_stats, methods=["GET"]),
        Route("/api/export", export_download, methods=["GET"]),
        Mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static"),
    ]


def mount_dashboard(app: FastAPI, settings: Settings) -> None:
    """Add the dashboard and admin API routes to `app`.

    When the proxy listens on a non-loopback address without `admin_token`, the routes answer
    403 with the reason, and the reason is logged once here.
    """
    guard = Guard.from_settings(settings)
    app.state.dashboard = DashboardState(
        guard=guard,
        demo=settings.demo,
        database_label=database_label(settings.db),
    )
    app.router.routes.extend(routes())
    if not guard.enabled:
        log.warning("%s", guard.disabled_reason)
    elif guard.token is not None:
        log.info("dashboard at /dashboard (admin token required)")
    else:
        log.info(
            "dashboard at http://%s:%s/dashboard (loopback only, no token)",
            settings.host,
            settings.port,
        )
