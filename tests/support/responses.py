"""Helpers for the Responses API tests: the proxy app driven in-process (lifespan run by
asgi-lifespan, requests through httpx's ASGI transport) in front of the fake upstream served on
loopback, and readers of what it recorded."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from proxy.app import create_app
from proxy.config import Settings
from proxy.testing.fake_openai import create_fake_app
from proxy.testing.servers import serve_in_thread
from tests.support.bodies import whole_requests
from tests.support.records import db_rows


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    """The fake OpenAI upstream (chat and Responses) in a thread; its base URL ends in /v1."""
    with serve_in_thread(create_fake_app()) as root:
        yield root + "/v1"


@contextlib.asynccontextmanager
async def in_process_proxy(
    db: Path, upstream: str, **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The proxy app with its lifespan running; yields a client whose base URL ends in /v1.
    The recorder drains when the block exits, so read the database after it."""
    app = create_app(
        Settings(
            upstream=upstream,
            db=str(db),
            journal=str(db.with_suffix(".journal")),
            flush_interval_ms=5,
            **{"record_writer": "loop", **settings},
        )
    )
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app),
            base_url="http://127.0.0.1/v1",
            timeout=30,
        ) as client,
    ):
        yield client


def exchanges(db: Path) -> list[dict[str, Any]]:
    """Recorded exchanges, oldest first, with `request`, `response`, `error` decoded."""
    rows = db_rows(db, "SELECT * FROM exchanges ORDER BY started_utc, step")
    rows = whole_requests(db, rows)  # request bodies are stored in parts (migration 003)
    for row in rows:
        row["request"] = json.loads(row["request_json"])
        row["response"] = json.loads(row["response_json"]) if row["response_json"] else None
        row["error"] = json.loads(row["error_json"]) if row["error_json"] else None
    return rows


def sse_events(body: bytes) -> list[dict[str, Any]]:
    """The JSON data of each event of a Responses SSE body."""
    out = []
    for block in body.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out
