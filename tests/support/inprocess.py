"""The in-process test layer: the proxy app and the exporter CLI driven inside the test process.

    async with in_process_proxy(tmp_path, upstream=fake_upstream.base_url) as proxy:
        answer = await proxy.client.post("/v1/chat/completions", json={...})
        sdk = proxy.openai()                          # the official SDK over the same transport
    rows = recorded_exchanges(proxy.db)               # after the block: the recorder drained

The app is what `python -m proxy` serves (`FastPath(create_app(settings))`), its lifespan run
(database, recorder, upstream client) and requests sent through httpx's `ASGITransport`: no
process, no port, no uvicorn. The upstream is still a real HTTP server (the fake on loopback),
since the proxy's upstream client speaks real HTTP. `ASGITransport` hands over a response once
its body is complete, so a stream arrives whole (its SSE chunks unchanged); tests about chunk
timing or a client that goes away mid-stream need a real server (`tests.support.processes`).

`served_proxy(tmp_path, upstream=...)` serves the same app with uvicorn in a thread of this
process (lifespan run): a real loopback URL for synchronous clients (the `openai` SDK, httpx,
the demo's agent loop), without starting a process; `.stop()` drains the recorder.

`run_exporter(*argv)` runs `exporter.cli.main(argv)` in this process and returns its exit code
and output, as `python -m exporter ARGS` would print them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from fastapi import FastAPI

from proxy.app import FastPath, create_app
from proxy.config import Settings
from proxy.testing.servers import ServerThread, free_port

ROOT_URL = "http://127.0.0.1:8787"
"""The origin the in-process client sends to (never connected to: the transport is the app; a
loopback address, as the dashboard answers only to loopback hosts without an admin token)."""


@dataclass
class InProcessProxy:
    """A running in-process proxy.

    client: an `httpx.AsyncClient` whose base URL is the proxy's root (`/v1/...`, `/api/...`,
    `/dashboard`). db: the SQLite file (read it after the `in_process_proxy` block has ended; the
    lifespan's end drains the recorder). settings: what the app was built with.
    """

    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings
    db: Path

    base_url: str = ROOT_URL + "/v1"
    root_url: str = ROOT_URL

    async def flushed(self) -> None:
        """Wait until the recorder has written (or journaled) every exchange submitted so far,
        so the database can be read while the app still runs (bound it with `asyncio.timeout`)."""
        stats = self.app.state.proxy.recorder.stats
        while True:
            if stats["written"] + stats["journaled"] + stats["lost"] >= stats["submitted"]:
                return
            await asyncio.sleep(0.01)

    def openai(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """The official async SDK pointed at the proxy through the in-process transport."""
        kwargs.setdefault("api_key", "sk-test")
        kwargs.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.base_url, http_client=self.client, **kwargs)


@contextlib.asynccontextmanager
async def in_process_proxy(directory: Path, **settings: Any) -> AsyncIterator[InProcessProxy]:
    """Build the app from `Settings(**settings)` (`upstream` required; `db` defaults to a new
    SQLite file in `directory`), run its lifespan and yield it with a client; on exit the
    lifespan ends (the recorder drains, the database closes)."""
    settings.setdefault("db", str(directory / "understudy-inprocess.db"))
    config = Settings(**settings)
    app = create_app(config)
    transport = httpx.ASGITransport(app=FastPath(app))
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url=ROOT_URL, timeout=60) as client,
        ):
            yield InProcessProxy(app, client, config, Path(config.db))
    finally:
        gc.unfreeze()  # the lifespan freezes what start-up allocated; a test process goes on


@dataclass
class ThreadedProxy:
    """The proxy app served by uvicorn in a thread of the test process.

    base_url ends in /v1; root_url is `http://127.0.0.1:PORT`; db is the SQLite file (its
    database URL in `db_url`). Read the database after `stop()`, which drains the recorder.
    """

    base_url: str
    root_url: str
    db: Path
    db_url: str
    settings: Settings
    server: ServerThread

    def stop(self) -> str:
        """Stop serving (requests in flight finish, the recorder drains); returns "" (logs go to
        the test's `caplog`, not to an output stream)."""
        self.server.stop()
        return ""


def served_proxy(directory: Path, **settings: Any) -> ThreadedProxy:
    """Start `FastPath(create_app(Settings(**settings)))` with uvicorn in a thread on a free
    loopback port (`upstream` required; `db` defaults to a new SQLite file in `directory`); the
    caller stops it. Settings come from the arguments only (not from UNDERSTUDY_* variables)."""
    port = free_port()
    settings.setdefault("db", str(directory / f"understudy-{port}.db"))
    settings.setdefault("port", port)
    config = Settings(**settings)
    server = ServerThread(FastPath(create_app(config)), config.host, port, lifespan="on")
    server.start()
    return ThreadedProxy(
        server.root_url + "/v1", server.root_url, Path(config.db), config.db, config, server
    )


@dataclass
class CliResult:
    """What a CLI run printed and returned: exit code, stdout and stderr (text)."""

    returncode: int
    stdout: str
    stderr: str


def run_exporter(*argv: str) -> CliResult:
    """`python -m exporter ARGV`, in this process (`exporter.cli.main`): exit code and output.

    Call it from a synchronous test (the commands run their own event loop).
    """
    from exporter.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exc:
            if isinstance(exc.code, str):
                err.write(exc.code + "\n")
                code = 1
            else:
                code = int(exc.code or 0)
    return CliResult(code, out.getvalue(), err.getvalue())
