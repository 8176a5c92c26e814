"""Shared fixtures: real server processes on loopback (the fake upstream and the proxy itself).

- `fake_upstream`: one fake OpenAI-compatible server for the session (`proxy.testing.fake_openai`).
- `proxy_server`: a fresh proxy process per test, its own SQLite file, pointed at the fake.
- `start_proxy(**flags)`: start a proxy with extra flags (several per test are fine).

A `ProxyServer` is stopped with SIGTERM (`.stop()`), which drains the recorder, so tests read the
database after stopping it. Servers are started as subprocesses, as users start them.

PostgreSQL: `postgres_server` (the server's maintenance URL) and `pg_url` (a fresh database on it,
dropped afterwards). They skip only when nothing answers at the default URL and
`UNDERSTUDY_TEST_POSTGRES_URL` is unset; when that variable names a server (as `.ci/run` does), an
unreachable server fails the tests instead, so CI never skips them silently.

Helpers: `launch_proxy()` (for module-scoped proxies), reading what a proxy recorded
(`recorded_exchanges`, `wait_recorded` / `wait_for_ids` while it runs, `leaves`, `path_to`,
`conversation`, `database_bytes`), `serve_in_thread(app)` for an in-process upstream (a real
uvicorn on loopback, in a thread) and `ScriptedUpstream`, one such upstream with scripted faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.storage_helpers import whole_requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Poll `url` until it answers (any status) or fail with the process output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out = process.stdout.read().decode(errors="replace") if process.stdout else ""
            raise RuntimeError(f"server exited with {process.returncode}:\n{out}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"server at {url} did not answer in {timeout}s")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: no UNDERSTUDY_* leaking in from the outside, offline litellm."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNDERSTUDY_")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class FakeUpstream:
    """The fake upstream server: `base_url` ends in /v1."""

    base_url: str
    process: subprocess.Popen[bytes]

    def requests(self) -> list[dict[str, Any]]:
        """Requests it received: `[{"headers": {...}, "body": {...}}, ...]`."""
        return list(httpx.get(self.base_url.removesuffix("/v1") + "/_fake/requests").json())

    def clear(self) -> None:
        httpx.delete(self.base_url.removesuffix("/v1") + "/_fake/requests")


@dataclass
class ProxyServer:
    """A running proxy process. `base_url` ends in /v1; `db_url` is its `--db`, and `db` that
    path for a SQLite database (for a database URL, `db` is not a file)."""

    base_url: str
    root_url: str
    db: Path
    process: subprocess.Popen[bytes]
    output: list[str] = field(default_factory=list)
    db_url: str = ""

    def stop(self, timeout: float = 30.0) -> str:
        """SIGTERM, wait for a clean exit (the recorder drains); return the process output."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout and not self.output:
            self.output.append(self.process.stdout.read().decode(errors="replace"))
        return "".join(self.output)


def start_server(args: list[str], health_url: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_for_http(health_url, process)
    return process


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    port = free_port()
    process = start_server(
        ["-m", "proxy.testing.fake_openai", "--port", str(port)],
        f"http://127.0.0.1:{port}/v1/models",
        child_env(),
    )
    yield FakeUpstream(f"http://127.0.0.1:{port}/v1", process)
    process.terminate()
    process.wait(timeout=10)


def launch_proxy(
    directory: Path, *, env: dict[str, str] | None = None, **flags: Any
) -> ProxyServer:
    """Start `python -m proxy` with `flags` (`upstream` required; `db` defaults to a new file in
    `directory`) and wait until it answers. The caller stops it."""
    port = free_port()
    db_url = str(flags.pop("db", directory / f"understudy-{port}.db"))
    options = {"port": port, "db": db_url, **flags}
    args = ["-m", "proxy"]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    process = start_server(args, f"http://127.0.0.1:{port}/health", child_env(**(env or {})))
    return ProxyServer(
        f"http://127.0.0.1:{port}/v1",
        f"http://127.0.0.1:{port}",
        Path(db_url),
        process,
        db_url=db_url,
    )


@pytest.fixture
def start_proxy(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> Iterator[Callable[..., ProxyServer]]:
    """Factory: `start_proxy(db=..., upstream=..., env={...}, **flags)` starts a proxy process."""
    started: list[ProxyServer] = []

    def start(*, env: dict[str, str] | None = None, **flags: Any) -> ProxyServer:
        flags.setdefault("upstream", fake_upstream.base_url)
        server = launch_proxy(tmp_path, env=env, **flags)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def proxy_server(start_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    """A proxy in front of the fake upstream, with a fresh SQLite database."""
    return start_proxy()


# -- what a proxy recorded (read after ProxyServer.stop()) ----------------------------------------

_JSON_COLUMNS = {
    "request_json": "request",
    "response_json": "response",
    "error_json": "error",
    "request_headers_json": "headers",
    "metadata_json": "metadata",
    "usage_json": "usage",
}


def db_rows(db: Path, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Rows of `query` on the SQLite file `db`, as dicts."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(query, params)]


def recorded_exchanges(db: Path, trajectory_id: str | None = None) -> list[dict[str, Any]]:
    """`exchanges` rows by step then time, each *_json column also decoded under a short name
    (`request`, `response`, `error`, `headers`, `metadata`, `usage`; None when NULL, the raw
    text when it is not JSON)."""
    where, params = ("WHERE trajectory_id = ?", (trajectory_id,)) if trajectory_id else ("", ())
    rows = db_rows(db, f"SELECT * FROM exchanges {where} ORDER BY step, started_utc, id", params)
    rows = whole_requests(db, rows)  # request bodies are stored in parts (migration 003)
    for row in rows:
        for column, name in _JSON_COLUMNS.items():
            row[name] = _json_or_text(row[column])
    return rows


def _json_or_text(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value  # not JSON: tests that care check the raw column


def wait_recorded(
    db: Path, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Poll a *running* proxy's database until `until(recorded_exchanges(db))` holds; return the
    rows. The recorder writes in batches off the request path, so rows appear a little after the
    answer; after `ProxyServer.stop()` they are all there and no waiting is needed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            rows = recorded_exchanges(db)
        except sqlite3.OperationalError:  # a writer holds a lock for a moment: read again
            rows = []
        if until(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def wait_for_ids(db: Path, *exchange_ids: str) -> dict[str, dict[str, Any]]:
    """The exchanges `exchange_ids` of a running proxy, by id, once all are written."""
    wanted = set(exchange_ids)
    rows = wait_recorded(db, lambda rows: wanted <= {row["id"] for row in rows})
    found = {row["id"]: row for row in rows if row["id"] in wanted}
    assert set(found) == wanted, f"not recorded: {wanted - set(found)}"
    return found


def leaves(exchanges: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The exchanges no other exchange continues (one per branch of each trajectory)."""
    parents = {row["parent_id"] for row in exchanges}
    return [row for row in exchanges if row["id"] not in parents]


def path_to(exchanges: list[dict[str, Any]], leaf: dict[str, Any]) -> list[dict[str, Any]]:
    """The exchanges from the trajectory's first step to `leaf`, following `parent_id`."""
    by_id = {row["id"]: row for row in exchanges}
    path = [leaf]
    while path[-1]["parent_id"] is not None:
        path.append(by_id[path[-1]["parent_id"]])
    return path[::-1]


def response_message(exchange: dict[str, Any]) -> dict[str, Any]:
    """The assistant message of a recorded exchange's (assembled) `chat.completion`."""
    message: dict[str, Any] = exchange["response"]["choices"][0]["message"]
    return message


def conversation(exchange: dict[str, Any]) -> list[dict[str, Any]]:
    """A recorded exchange's request messages followed by its response message."""
    return [*exchange["request"]["messages"], response_message(exchange)]


def database_bytes(db: Path) -> bytes:
    """The raw bytes of a SQLite database and its side files (-wal, -shm, -journal)."""
    files = [db, *(db.with_name(db.name + suffix) for suffix in ("-wal", "-shm", "-journal"))]
    return b"".join(path.read_bytes() for path in files if path.exists())


# -- an in-process upstream ----------------------------------------------------------------------


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve the ASGI `app` with uvicorn on a free loopback port in a thread; yield its root URL."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"in-process server on port {port} did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# -- a scripted upstream (in process) ------------------------------------------------------------

SCRIPTED_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-scripted",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "scripted-model",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "scripted answer", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    "x_scripted_extra": [1, 2, 3],
}


def scripted_sse_events() -> list[bytes]:
    """The SSE events of the scripted stream: role, two content pieces, finish, usage, [DONE]."""
    base = {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "scripted-model",
    }

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n".encode()

    usage = {**base, "choices": [], "usage": SCRIPTED_COMPLETION["usage"]}
    return [
        event({"role": "assistant", "content": ""}),
        event({"content": "scripted "}),
        event({"content": "answer"}),
        event({}, "stop"),
        f"data: {json.dumps(usage)}\n\n".encode(),
        b"data: [DONE]\n\n",
    ]


@dataclass
class ScriptedUpstream:
    """An in-process upstream whose behaviour each request picks with the `x-script` header.

    `x-script`: `json` (default; also sends two `set-cookie` headers), `gzip-json`, `gzip-sse`
    (gzip, flushed per event), `sse-break` (two events, then the connection is dropped),
    `not-json` (a 200 text body), `html-502` (a load balancer's HTML error page). `x-script-delay-ms: N` waits before answering at all.
    `received` holds each request: method, path, query, headers (raw pairs), body (bytes).
    """

    base_url: str
    received: list[dict[str, Any]]


def create_scripted_app(received: list[dict[str, Any]]) -> Starlette:
    """The ASGI app of `ScriptedUpstream` (routes under /v1)."""
    headers = {"x-request-id": "req_scripted", "x-ratelimit-remaining-requests": "41"}

    async def handler(request: Request) -> Response:
        body = await request.body()
        received.append(
            {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "headers": list(request.headers.items()),
                "body": body,
            }
        )
        delay = float(request.headers.get("x-script-delay-ms", "0")) / 1000
        if delay:
            await asyncio.sleep(delay)
        script = request.headers.get("x-script", "json")
        completion = json.dumps(SCRIPTED_COMPLETION).encode()
        if script == "gzip-json":
            return Response(
                gzip.compress(completion),
                media_type="application/json",
                headers={**headers, "content-encoding": "gzip"},
            )
        if script == "gzip-sse":

            async def gzipped() -> AsyncIterator[bytes]:
                compressor = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
                for event in scripted_sse_events():
                    yield compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH)
                yield compressor.flush()

            return StreamingResponse(
                gzipped(),
                media_type="text/event-stream",
                headers={**headers, "content-encoding": "gzip"},
            )
        if script == "sse-break":

            async def breaking() -> AsyncIterator[bytes]:
                for event in scripted_sse_events()[:2]:
                    yield event
                raise RuntimeError("upstream dropped the connection (scripted)")

            return StreamingResponse(breaking(), media_type="text/event-stream", headers=headers)
        if script == "not-json":
            return Response(b"upstream says: not json", media_type="text/plain", headers=headers)
        if script == "html-502":
            page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            return Response(page, status_code=502, media_type="text/html", headers=headers)
        response = Response(completion, media_type="application/json", headers=headers)
        response.raw_headers.extend([(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")])
        return response

    return Starlette(routes=[Route("/v1/{path:path}", handler, methods=["GET", "POST"])])


@pytest.fixture
def scripted_upstream() -> Iterator[ScriptedUpstream]:
    received: list[dict[str, Any]] = []
    with serve_in_thread(create_scripted_app(received)) as root:
        yield ScriptedUpstream(root + "/v1", received)


# -- PostgreSQL ------------------------------------------------------------------------------------

POSTGRES_URL_ENV = "UNDERSTUDY_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` instead."""
    return f"{url.rpartition('/')[0]}/{name}"


async def pg_admin(url: str, *statements: str) -> None:
    """Run `statements` on `url` with plain asyncpg (not the code under test)."""
    import asyncpg

    conn = await asyncpg.connect(url, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The PostgreSQL test server's URL (its maintenance database); see the module docstring."""
    url = os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL)
    try:
        asyncio.run(pg_admin(url, "SELECT 1"))
    except (TimeoutError, OSError) as exc:  # nothing listening; a refusal (auth) still fails
        message = f"no PostgreSQL server reachable at {url} ({exc})"
        if POSTGRES_URL_ENV in os.environ:
            pytest.fail(f"{message}, but {POSTGRES_URL_ENV} says there is one")
        pytest.skip(f"{message}; start one or set {POSTGRES_URL_ENV}")
    return url


@pytest.fixture
def pg_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the test server (dropped afterwards)."""
    import secrets

    name = f"understudy_test_{secrets.token_hex(6)}"  # hex only: safe as an identifier
    asyncio.run(pg_admin(postgres_server, f'CREATE DATABASE "{name}"'))
    yield with_database(postgres_server, name)
    asyncio.run(pg_admin(postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
