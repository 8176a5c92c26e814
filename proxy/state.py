"""What the running proxy holds open, reached from handlers as `request.app.state.proxy`."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from proxy.config import Settings
from proxy.recorder import Recorder
from proxy.stitching import Stitcher
from proxy.storage import Database


@dataclass
class ProxyState:
    """Resources opened in the app's lifespan: settings, database, recorder, stitcher, upstream client."""

    settings: Settings
    db: Database
    recorder: Recorder
    stitcher: Stitcher
    client: httpx.AsyncClient
