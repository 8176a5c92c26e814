"""Server helpers for tests, benchmarks and the demo: free ports, child processes, waiting for HTTP.

    port = free_port()
    process = start_server(["-m", "proxy.testing.fake_openai", "--port", str(port)],
                           f"http://127.0.0.1:{port}/v1/models", child_env())
    ...
    seconds, output = stop_process(process)

    with serve_in_thread(app) as root_url:   # an ASGI app on a real loopback port, in a thread
        ...
    server = ServerThread(create_app(settings), port=8787, lifespan="on"); server.start()

Servers are real processes (or a real uvicorn in a thread) on loopback, as users start them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import httpx

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this package was imported from (the working directory of started servers)."""


class ServerError(RuntimeError):
    """A server exited before it answered, or did not answer in time (carries its output)."""


_PORTS_FROM: Final = 15_000
"""The lowest port `free_port` hands out (above the usual fixed service ports)."""
_next_port: list[int] = []  # this process's next candidate, once drawn
_port_lock = threading.Lock()


def _ephemeral_ports_from() -> int:
    """The lowest port of the kernel's ephemeral range (Linux's setting; its default elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, on `host`, for a server to bind soon after.

    Drawn below the kernel's ephemeral range, from a random start per process, then in turn:
    a port the kernel picked (bind to 0) comes from the ephemeral range, which the kernel also
    hands to outgoing connections, and one of those took such a port before its server bound
    it ("address already in use", seen once in a full test run). Falls back to the kernel's
    pick when the range below is too small."""
    low, high = _PORTS_FROM, _ephemeral_ports_from()
    with _port_lock:
        if high - low >= 1_000:
            if not _next_port:
                _next_port.append(random.randrange(low, high))
            for _ in range(high - low):
                port = _next_port[0]
                _next_port[0] = low + (port + 1 - low) % (high - low)
                with socket.socket() as sock:
                    try:
                        sock.bind((host, port))
                    except OSError as exc:
                        if exc.errno == errno.EADDRINUSE:
                            continue
                        break  # not a port in use (e.g. an address this family cannot bind)
                return port
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


class ServerThread:
    """A uvicorn server for an ASGI app in a daemon thread (uvicorn installs no signal handlers
    off the main thread, so the caller's own handlers stay in charge).

    lifespan: "on" runs the app's lifespan (the proxy needs it), "off" skips it. `start()` waits
    until it listens (raises ServerError after `timeout` s or when it fails to bind); `stop()`
    lets requests in flight finish (up to `grace_s`) and runs the lifespan's end.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_level: str = "warning",
        lifespan: Literal["on", "off"] = "off",
        grace_s: float = 10.0,
    ) -> None:
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(
            app,
            host=host,
            port=self.port,
            log_level=log_level,
            lifespan=lifespan,
            ws="none",
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=int(grace_s),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, name=f"uvicorn-{self.port}", daemon=True
        )

    @property
    def root_url(self) -> str:
        """`http://host:port` (a wildcard host as 127.0.0.1, an IPv6 host in brackets)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start serving and wait until the server listens."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServerError(f"server on {self.host}:{self.port} did not start")
            time.sleep(0.01)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the server to exit and wait for its thread (at most `timeout` s)."""
        self.server.should_exit = True
        self.thread.join(timeout=timeout)


@contextlib.contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve the ASGI `app` (lifespan not run) on `host` (port 0: a free one) in a thread; yield
    its root URL (`http://host:port`). Raises ServerError when it does not start within 10 s."""
    server = ServerThread(app, host, port, grace_s=1)
    server.start(timeout=10)
    try:
        yield server.root_url
    finally:
        server.stop(timeout=10)
