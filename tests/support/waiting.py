"""Waiting on a condition with a deadline, instead of sleeping a fixed time: `poll` for
synchronous tests, `poll_async` in coroutines. A deadline only bounds a wait; it asserts nothing
about speed (a test never fails for being slow on a loaded machine, only for never getting
there)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


def poll(
    condition: Callable[[], Any],
    timeout_s: float = 60.0,
    what: str = "condition",
    interval_s: float = 0.05,
) -> Any:
    """Call `condition` until it returns something truthy and return that; raise
    AssertionError naming `what` when `timeout_s` seconds pass first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


async def poll_async(
    condition: Callable[[], Any],
    timeout_s: float = 60.0,
    what: str = "condition",
    interval_s: float = 0.02,
) -> Any:
    """`poll` for coroutines: the event loop keeps running between calls of `condition`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)
