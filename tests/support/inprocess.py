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

A database URL (PostgreSQL) without a `journal` gets one in the test's directory
(`journal_beside`), never the proxy's default in the working directory.

Apps started here write their batches on the event loop (`record_writer="loop"`) unless a test
asks for the writer process: starting one per app would cost every test ~0.4 s. The writer
process is what `python -m proxy` uses: the tests that start real processes cover it, and
`tests/test_writer_process.py` drives it in-process.

`served_proxy(tmp_path, upstream=...)` serves the same app with uvicorn in a thread of this
process (lifespan run): a real loopback URL for synchronous clients (the `openai` SDK, httpx,
the demo's agent loop), without starting a process; `.stop()` drains the recorder.

`running_app(settings)` runs the same app's lifespan and hands out clients whose requests come
from a chosen client address (the dashboard's loopback and admin-token checks).

`run_exporter(*argv)` runs `exporter.cli.main(argv)` in this process and returns its exit code
and output, as `python -m exporter ARGS` would print them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import io
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from fastapi import FastAPI

from proxy.app import FastPath, create_app
from proxy.config import Settings, load_settings
from proxy.testing.servers import ServerThread, free_port

STARTUP_DEADLINE_S = 120.0
"""How long a server may take to start (a teacher imports litellm: seconds, many more on a
loaded machine) before the test fails: a bound on the wait, not a speed check."""

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


def journal_beside(directory: Path, settings: dict[str, Any]) -> None:
    """Set `settings["journal"]` to a file in `directory` when the database is not a SQLite file
    and no journal is given: the proxy's default for a database URL is
    `./understudy-journal.jsonl` in the working directory (the repository, in tests)."""
    db = str(settings.get("db", ""))
    if "journal" not in settings and "://" in db and not db.startswith("sqlite"):
        settings["journal"] = str(directory / "understudy-journal.jsonl")


@contextlib.asynccontextmanager
async def in_process_proxy(directory: Path, **settings: Any) -> AsyncIterator[InProcessProxy]:
    """Build the app from `Settings(**settings)` (`upstream` required; `db` defaults to a new
    SQLite file in `directory`), run its lifespan and yield it with a client; on exit the
    lifespan ends (the recorder drains, the database closes)."""
    settings.setdefault("db", str(directory / "understudy-inprocess.db"))
    settings.setdefault("record_writer", "loop")
    journal_beside(directory, settings)
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


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """Run the app's lifespan; yield `client(address="127.0.0.1")`, which makes an
    `httpx.AsyncClient` whose requests come from `address` (close it, or use `async with`).
    The recorder writes on the event loop unless `settings` names a `record_writer`."""
    if "record_writer" not in settings.model_fields_set:
        settings = settings.model_copy(update={"record_writer": "loop"})
    app: FastAPI = create_app(settings)
    entry = FastPath(app)
    try:
        async with app.router.lifespan_context(app):

            def client(address: str = "127.0.0.1") -> httpx.AsyncClient:
                transport = httpx.ASGITransport(app=entry, client=(address, 50_000))
                return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1")

            yield client
    finally:
        gc.unfreeze()  # the lifespan freezes what start-up allocated; a test process goes on


class _LogCollector(logging.Handler):
    """Keeps the formatted records (tracebacks included) of the loggers it is attached to."""

    LOGGERS = ("understudy", "uvicorn.error", "proxy")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def attach(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)

    def detach(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


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
    logs: _LogCollector
    restore_env: dict[str, str | None]
    app: FastAPI

    def background_tasks(self) -> int:
        """How many background tasks (shadow calls) the app has started and not yet finished."""
        return len(self.app.state.proxy.background)

    def stop(self) -> str:
        """Stop serving (requests in flight finish, the recorder drains), put back the
        environment it was started with; return what it logged at WARNING or above (with
        tracebacks), as a process's output would show it. Stopping twice is harmless."""
        if self.server.thread.is_alive():
            self.server.stop()
        self.logs.detach()
        _put_back(self.restore_env)
        self.restore_env = {}
        return "\n".join(self.logs.lines)


def _put_back(saved: dict[str, str | None]) -> None:
    """Restore environment variables saved as name -> value (None: it was not set)."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _settings_with_env(values: dict[str, Any], env: dict[str, str]) -> Settings:
    """`load_settings(values)` seeing exactly the `UNDERSTUDY_*` variables of `env` (none from
    the test process's own environment, so proxies started side by side do not share them)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("UNDERSTUDY_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(env)
    try:
        return load_settings({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})
    finally:
        for name in env:
            os.environ.pop(name, None)
        os.environ.update(saved)


def served_proxy(
    directory: Path, *, env: dict[str, str] | None = None, **settings: Any
) -> ThreadedProxy:
    """Start `FastPath(create_app(settings))` with uvicorn in a thread on a free loopback port;
    the caller stops it. settings: as `python -m proxy` flags, by field name (`upstream`
    required; `db` defaults to a new SQLite file in `directory`; JSON text for list options).
    env: `UNDERSTUDY_*` variables are seen by the settings (and no others of that prefix); other
    variables (`ANTHROPIC_API_KEY` for litellm) are set while it runs and put back by `stop()`.
    Raises SettingsError."""
    settings_env = {k: v for k, v in (env or {}).items() if k.startswith("UNDERSTUDY_")}
    process_env = {k: v for k, v in (env or {}).items() if k not in settings_env}
    restore = {name: os.environ.get(name) for name in process_env}
    os.environ.update(process_env)
    port = free_port()
    settings.setdefault("db", str(directory / f"understudy-{port}.db"))
    journal_beside(directory, settings)
    settings.setdefault("port", port)
    if "UNDERSTUDY_RECORD_WRITER" not in settings_env:
        settings.setdefault("record_writer", "loop")
    logs = _LogCollector()
    logs.attach()
    try:
        config = _settings_with_env(settings, settings_env)
        app = create_app(config)
        server = ServerThread(FastPath(app), config.host, port, lifespan="on")
        server.start(timeout=STARTUP_DEADLINE_S)
    except BaseException:
        logs.detach()
        _put_back(restore)
        raise
    return ThreadedProxy(
        server.root_url + "/v1",
        server.root_url,
        Path(config.db),
        config.db,
        config,
        server,
        logs,
        restore,
        app,
    )


@dataclass
class CliResult:
    """What a CLI run printed and returned: exit code, stdout and stderr (text)."""

    returncode: int
    stdout: str
    stderr: str


def run_exporter(*argv: str) -> CliResult:
    """`python -m exporter ARGV`, in this process (`exporter.cli.main`): exit code and output.

    The commands run their own event loop; called from a coroutine (an async test), the command
    runs in a worker thread while the caller waits.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_exporter(list(argv))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_run_exporter, list(argv)).result()


def _run_exporter(argv: list[str]) -> CliResult:
    from exporter.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            if isinstance(exc.code, str):
                err.write(exc.code + "\n")
                code = 1
            else:
                code = int(exc.code or 0)
    return CliResult(code, out.getvalue(), err.getvalue())


def run_proxy_cli(*argv: str) -> CliResult:
    """`python -m proxy ARGV` in this process (`proxy.__main__.main`), for the commands that
    return: `--help`, `migrate`, settings errors. Not for `serve` or `demo` (they serve)."""
    from proxy.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # main() configures logging: put it back
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exc:
            if isinstance(exc.code, str):
                err.write(exc.code + "\n")
                code = 1
            else:
                code = int(exc.code or 0)
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
    return CliResult(code, out.getvalue(), err.getvalue())
