"""What the running proxy holds open, reached from handlers as `request.app.state.proxy`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.config import Settings
from proxy.http.metrics import Metrics
from proxy.http.teacher import Teacher
from proxy.recording.recorder import Recorder
from proxy.recording.stitching import Stitcher
from proxy.storage import Database

log = logging.getLogger("understudy")


@dataclass
class ProxyState:
    """Resources opened in the app's lifespan: settings, database, recorder, stitcher, upstream
    client, metrics, the teacher (None when no teacher model is configured) and background tasks."""

    settings: Settings
    db: Database
    recorder: Recorder
    stitcher: Stitcher
    client: aiohttp.ClientSession
    metrics: Metrics
    teacher: Teacher | None = None
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def track(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run `coroutine` in the background (shadow calls); shutdown waits for it."""
        task = asyncio.create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def drain_background(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for background tasks, then cancel what is left."""
        if not self.background:
            return
        done, pending = await asyncio.wait(set(self.background), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("shutdown: cancelled %d unfinished shadow calls", len(pending))
