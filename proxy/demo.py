"""`python -m proxy demo`: a local fake upstream, the proxy, and sample traffic (dashboard issue)."""

from __future__ import annotations

from typing import Any


def run_demo(options: dict[str, Any]) -> None:
    """Start the demo (being built in the dashboard issue)."""
    raise SystemExit("understudy-proxy: demo is not available yet")
