"""The dashboard (`/dashboard`) and admin JSON API (`/api/*`), served by the proxy process."""

from __future__ import annotations

from fastapi import FastAPI

from proxy.config import Settings


def mount_dashboard(app: FastAPI, settings: Settings) -> None:
    """Add the dashboard and admin API routes to `app` (being built in the dashboard issue)."""
