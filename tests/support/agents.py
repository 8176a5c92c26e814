"""Helpers for tests that run agents through a proxy and check routing, the teacher and promotion:
proxies (a process, or in-process), waiting for recorded exchanges, what the fake upstream got,
the exporter. The agent loop itself is the package's (`proxy.testing.agent`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import openai

from proxy.core.canonical import prefix_hashes
from proxy.storage.bodies import unpack_row
from proxy.testing.agent import SYSTEM, TOOLS, Step, run_agent, tool_result
from tests.support.bodies import whole_requests
from tests.support.inprocess import InProcessProxy, ThreadedProxy, run_exporter, served_proxy
from tests.support.processes import FakeUpstream, ProxyServer

__all__ = [
    "CLIENT_KEY",
    "SYSTEM",
    "TOOLS",
    "Step",
    "async_client",
    "db_rows",
    "first_request_hash",
    "first_user_text",
    "launch_proxy",
    "read_jsonl",
    "received",
    "run_agent",
    "run_exporter",
    "running",
    "tool_result",
    "trajectory_row",
    "wait_for_exchanges",
]

CLIENT_KEY = "sk-client-key-for-tests"

Served = TypeVar("Served", ProxyServer, ThreadedProxy)
"""A proxy reachable over HTTP: a process (`ProxyServer`) or served in a thread (`ThreadedProxy`)."""


def launch_proxy(
    fake_upstream: FakeUpstream, directory: Path, *, env: dict[str, str] | None = None, **flags: Any
) -> ThreadedProxy:
    """A proxy in front of `fake_upstream`, served in this process (uvicorn in a thread, lifespan
    run), for fixtures wider than one test; `env` is set while it runs. The caller stops it."""
    flags.setdefault("upstream", fake_upstream.base_url)
    flags.setdefault("db", str(directory / "understudy.db"))
    return served_proxy(directory, env=env, **flags)


@contextlib.contextmanager
def running(server: Served) -> Iterator[Served]:
    """Yield `server`, stop it afterwards (fixtures), failing loudly if it crashed meanwhile."""
    try:
        yield server
    finally:
        output = server.stop()
        assert "Traceback" not in output, output


def async_client(
    server: ProxyServer | ThreadedProxy | InProcessProxy, key: str = CLIENT_KEY
) -> openai.AsyncOpenAI:
    """The async SDK pointed at `server` (a process, or an in-process proxy's transport)."""
    if isinstance(server, InProcessProxy):
        return server.openai(api_key=key)
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=key, max_retries=0)


def db_rows(db: Path, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Rows of a query on the proxy's SQLite file (readable while the proxy runs: WAL)."""
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        conn.row_factory = sqlite3.Row
        # packed JSON texts (migration 008) read as the text they hold
        return [unpack_row(dict(row)) for row in conn.execute(sql, list(params))]


async def wait_for_exchanges(
    db: Path, ids: Sequence[str], *, shadow: bool = False, within_s: float = 20.0
) -> list[dict[str, Any]]:
    """The `exchanges` rows of `ids` (in that order) once the recorder has written them all.

    shadow: also wait until each has its shadow answer (or shadow error) written.
    """
    marks = ",".join("?" for _ in ids)
    deadline = time.monotonic() + within_s
    while True:
        rows = {
            r["id"]: r for r in db_rows(db, f"SELECT * FROM exchanges WHERE id IN ({marks})", ids)
        }
        ready = len(rows) == len(set(ids)) and (
            not shadow
            or all(r["shadow_response_json"] or r["shadow_error_json"] for r in rows.values())
        )
        if ready:
            return whole_requests(db, [rows[i] for i in ids])
        if time.monotonic() > deadline:
            raise AssertionError(
                f"exchanges not recorded in {within_s}s: {sorted(set(ids) - set(rows))}"
            )
        await asyncio.sleep(0.05)


def trajectory_row(db: Path, trajectory_id: str) -> dict[str, Any]:
    rows = db_rows(db, "SELECT * FROM trajectories WHERE id = ?", [trajectory_id])
    assert len(rows) == 1, rows
    return rows[0]


def received(fake_upstream: FakeUpstream, marker: str) -> list[dict[str, Any]]:
    """Requests the fake OpenAI upstream got whose user message contains `marker`."""
    return [
        r
        for r in fake_upstream.requests()
        if any(
            m.get("role") == "user" and marker in str(m.get("content"))
            for m in (r["body"] or {}).get("messages", [])
        )
    ]


def first_request_hash(user_text: str) -> str:
    """The stitching hash of an agent run's first request (what the rate is decided from)."""
    return prefix_hashes([SYSTEM, {"role": "user", "content": user_text}])[-1]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_user_text(sample: dict[str, Any]) -> str:
    """The first user message's text of an exported sample (OpenAI `messages` or DPO `input`)."""
    messages = sample.get("messages") or (sample.get("input") or {}).get("messages") or []
    for message in messages:
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "".join(str(p.get("text", "")) for p in content)
            return str(content)
    raise AssertionError(f"sample without a user message: {sample}")
