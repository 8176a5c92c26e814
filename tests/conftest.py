"""Shared fixtures: real server processes on loopback (the fake upstream and the proxy itself).

- `fake_upstream`: one fake OpenAI-compatible server for the session (`proxy.fake_upstream`).
- `proxy_server`: a fresh proxy process per test, its own SQLite file, pointed at the fake.
- `start_proxy(**flags)`: start a proxy with extra flags (several per test are fine).

A `ProxyServer` is stopped with SIGTERM (`.stop()`), which drains the recorder, so tests read the
database after stopping it. Servers are started as subprocesses, as users start them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

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
    """A running proxy process. `base_url` ends in /v1; `db` is its SQLite file."""

    base_url: str
    root_url: str
    db: Path
    process: subprocess.Popen[bytes]
    output: list[str] = field(default_factory=list)

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
        ["-m", "proxy.fake_upstream", "--port", str(port)],
        f"http://127.0.0.1:{port}/v1/models",
        child_env(),
    )
    yield FakeUpstream(f"http://127.0.0.1:{port}/v1", process)
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def start_proxy(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> Iterator[Callable[..., ProxyServer]]:
    """Factory: `start_proxy(db=..., upstream=..., env={...}, **flags)` starts a proxy process."""
    started: list[ProxyServer] = []

    def start(*, env: dict[str, str] | None = None, **flags: Any) -> ProxyServer:
        port = free_port()
        db = Path(flags.pop("db", tmp_path / f"understudy-{port}.db"))
        options = {"port": port, "upstream": fake_upstream.base_url, "db": str(db), **flags}
        args = ["-m", "proxy"]
        for name, value in options.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        process = start_server(args, f"http://127.0.0.1:{port}/health", child_env(**(env or {})))
        server = ProxyServer(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}", db, process)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def proxy_server(start_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    """A proxy in front of the fake upstream, with a fresh SQLite database."""
    return start_proxy()
