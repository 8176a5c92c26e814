"""Shared fixtures: real server processes on loopback, in-process apps, PostgreSQL databases.

- `fake_upstream`: one fake OpenAI-compatible server for the session (`proxy.testing.fake_openai`).
- `proxy_server`: a fresh proxy process per test, its own SQLite file, pointed at the fake.
- `start_proxy(**flags)`: start a proxy process with extra flags (several per test are fine).
- `inprocess_proxy(**settings)`: the app built by `create_app` and driven in-process (httpx
  `ASGITransport`, lifespan run) in front of the fake upstream: the default for HTTP tests that
  do not need a real process (see `tests.support.inprocess`).
- `scripted_upstream`: an in-process upstream with scripted faults (`tests.support.scripted`).

PostgreSQL: `postgres_server` (the server's maintenance URL) and `pg_url` (a fresh database on it,
dropped afterwards). They skip only when nothing answers at the default URL and
`UNDERSTUDY_TEST_POSTGRES_URL` is unset; when that variable names a server (as `.ci/run` does), an
unreachable server fails the tests instead, so CI never skips them silently.

This file holds fixtures only: helpers are imported from `tests.support` (no test module imports
another, nor this file).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.storage import Database
from proxy.testing.servers import REPOSITORY_ROOT, serve_in_thread
from tests.support.inprocess import InProcessProxy, ThreadedProxy, in_process_proxy, served_proxy
from tests.support.postgres import DEFAULT_POSTGRES_URL, POSTGRES_URL_ENV, pg_admin, with_database
from tests.support.processes import FakeUpstream, ProxyServer, launch_proxy, start_fake_upstream
from tests.support.scheduling import MODULE_SECONDS_KEY, ModuleTimes, order_heaviest_first
from tests.support.scripted import ScriptedUpstream, create_scripted_app
from tests.support.worktree import files_in_working_tree

# Shared fixtures: Chromium (`browser`, `page`) and PostgreSQL replicas (`start_replicas`).
pytest_plugins = ["tests.support.browser", "tests.support.replicas"]


# -- sharing the suite among xdist workers -----------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker: heaviest modules first, by the previous run's times when pytest's
    cache has them (`tests.support.scheduling`). Every worker reads the same cache and reorders
    the same items the same way, as xdist requires."""
    if hasattr(config, "workerinput"):
        cache = getattr(config, "cache", None)
        measured = cache.get(MODULE_SECONDS_KEY, {}) if cache is not None else {}
        order_heaviest_first(items, measured if isinstance(measured, dict) else {})


def pytest_configure(config: pytest.Config) -> None:
    """In the controller: note each module's time for the next run's order."""
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(ModuleTimes(config), "understudy-module-times")


# -- the suite leaves nothing behind ---------------------------------------------------------------

_TREE_BEFORE = pytest.StashKey[set[str]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Note the files of the working tree (in the controller, not in xdist workers)."""
    if not hasattr(session.config, "workerinput"):
        session.config.stash[_TREE_BEFORE] = files_in_working_tree(REPOSITORY_ROOT)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when it left new files in the working tree (tests write under `tmp_path`)."""
    before = session.config.stash.get(_TREE_BEFORE, None)
    if before is None:
        return
    left = sorted(files_in_working_tree(REPOSITORY_ROOT) - before)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"the tests left {len(left)} new file(s) in {REPOSITORY_ROOT}: {left}"
        if reporter is not None:
            reporter.write("\n")
            reporter.write_line(f"ERROR: {message}", red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    upstream = start_fake_upstream()
    yield upstream
    upstream.stop()


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


@pytest.fixture
def scripted_upstream() -> Iterator[ScriptedUpstream]:
    received: list[dict[str, Any]] = []
    with serve_in_thread(create_scripted_app(received)) as root:
        yield ScriptedUpstream(root + "/v1", received)


# -- PostgreSQL ------------------------------------------------------------------------------------


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


# -- in-process proxies ----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database of each dialect: a SQLite path, or a new database on the test server."""
    if request.param == "sqlite":
        return str(tmp_path / "test.db")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def db(db_target: str) -> AsyncIterator[Database]:
    """The migrated database of `db_target`, closed after the test."""
    database = await Database.open(db_target)
    yield database
    await database.close()


@pytest.fixture
async def inprocess_proxy(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> AsyncIterator[InProcessProxy]:
    """The app in front of the fake upstream, driven in-process (`proxy.client`, `proxy.openai()`);
    for other settings use `tests.support.inprocess.in_process_proxy` directly."""
    async with in_process_proxy(tmp_path, upstream=fake_upstream.base_url) as proxy:
        yield proxy


@pytest.fixture
def serve_proxy(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> Iterator[Callable[..., ThreadedProxy]]:
    """Factory: `serve_proxy(**settings)` serves the app in a thread of this process (a real
    loopback URL for sync clients, no process started); `upstream` defaults to the fake. Stopped
    after the test."""
    started: list[ThreadedProxy] = []

    def start(**settings: Any) -> ThreadedProxy:
        settings.setdefault("upstream", fake_upstream.base_url)
        server = served_proxy(tmp_path, **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def demo_upstream() -> Iterator[str]:
    """The fake upstream answering the demo's conversations with the demo's scripted model
    (`proxy.demo.scenarios`), served in a thread for the session; its base URL (ends in /v1)."""
    from proxy.demo.scenarios import scripted_model
    from proxy.testing.fake_openai import create_fake_app

    with serve_in_thread(create_fake_app(scripted_model)) as root:
        yield root + "/v1"
