"""Server helpers for tests, benchmarks and the demo: free ports, child processes, waiting for HTTP.

    port = free_port()
    process = start_server(["-m", "proxy.testing.fake_openai", "--port", str(port)],
                           f"http://127.0.0.1:{port}/v1/models", child_env())
    ...
    seconds, output = stop_process(process)

    with serve_in_thread(app) as root_url:   # an ASGI app on a real loopback port, in a thread
        ...

Servers are real processes (or a real uvicorn in a thread) on loopback, as users start them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this package was imported from (the working directory of started servers)."""


class ServerError(RuntimeError):
    """A server exited before it answered, or did not answer in time (carries its output)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, on `host` (the OS picks it; another process may take it
    before it is bound, which on loopback in tests does not happen in practice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """Environment for servers started here: no `UNDERSTUDY_*` from outside, litellm offline
    (`LITELLM_LOCAL_MODEL_COST_MAP`), unbuffered output; then `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNDERSTUDY_")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_for_http(
    url: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 30.0
) -> None:
    """Poll `url` until it answers with any status. Raises ServerError when `process` exits first
    (with its output) or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            out = process.stdout.read().decode(errors="replace") if process.stdout else ""
            raise ServerError(f"server exited with {process.returncode}:\n{out}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise ServerError(f"server at {url} did not answer in {timeout}s")


def start_server(
    args: Sequence[str],
    health_url: str,
    env: Mapping[str, str] | None = None,
    *,
    cwd: Path = REPOSITORY_ROOT,
    timeout: float = 30.0,
) -> subprocess.Popen[bytes]:
    """Start `python ARGS` (stdout and stderr captured together) and wait until `health_url`
    answers; the caller stops it (`stop_process`). Raises ServerError."""
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=dict(env) if env is not None else child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_http(health_url, process, timeout)
    except ServerError:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise
    return process


def stop_process(process: subprocess.Popen[bytes], timeout: float = 60.0) -> tuple[float, str]:
    """SIGTERM, wait for a clean exit (the proxy's recorder drains; SIGKILL after `timeout` s);
    return (seconds it took to exit, its output when it was captured)."""
    started = time.perf_counter()
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    took = time.perf_counter() - started
    output = process.stdout.read().decode(errors="replace") if process.stdout else ""
    return took, output


@contextlib.contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve the ASGI `app` with uvicorn on `host` (port 0: a free one) in a daemon thread; yield
    its root URL (`http://host:port`). The lifespan is not run. Raises ServerError when it does
    not start within 10 s."""
    import uvicorn

    port = port or free_port(host)
    config = uvicorn.Config(
        app,
        host=host,
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
            raise ServerError(f"in-process server on port {port} did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
