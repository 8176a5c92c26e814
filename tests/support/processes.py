"""Real server processes for end-to-end tests: the fake upstream and the proxy (`python -m proxy`).

A `ProxyServer` is stopped with SIGTERM (`.stop()`), which drains the recorder, so tests read the
database after stopping it. Use these only where the process matters (signals, journal replay,
replicas, SDK/agents runs over real HTTP); `tests.support.inprocess` drives the app in-process.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from proxy.testing.servers import child_env, free_port, start_server
from tests.support.inprocess import STARTUP_DEADLINE_S, journal_beside


@dataclass
class FakeUpstream:
    """The fake upstream server: `base_url` ends in /v1."""

    base_url: str
    process: subprocess.Popen[bytes]

    def requests(self) -> list[dict[str, Any]]:
        """Requests it received: `[{"headers": {...}, "body": {...}}, ...]`."""
        return list(httpx.get(self.base_url.removesuffix("/v1") + "/_fake/requests").json())

    def clear(self) -> None:
        """Forget the requests received so far."""
        httpx.delete(self.base_url.removesuffix("/v1") + "/_fake/requests")

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        self.process.terminate()
        self.process.wait(timeout=10)


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
    _reader: threading.Thread | None = field(default=None, repr=False)
    _arrived: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def wait_for_output(self, text: str, timeout: float = 30.0) -> str:
        """Read the process's output as it comes until it contains `text`; return it so far.

        Raises AssertionError when `timeout` s pass or the output ends first. `stop()` still
        returns the whole output."""
        with self._arrived:
            if self._reader is None:
                self._reader = threading.Thread(target=self._read_lines, daemon=True)
                self._reader.start()
            finished = self._arrived.wait_for(
                lambda: text in "".join(self.output) or not self._reading(), timeout
            )
            so_far = "".join(self.output)
        assert finished and text in so_far, (
            f"no {text!r} in the output within {timeout} s:\n{so_far}"
        )
        return so_far

    def _reading(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def _read_lines(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._arrived:
                self.output.append(line.decode(errors="replace"))
                self._arrived.notify_all()
        with self._arrived:
            self._arrived.notify_all()

    def stop(self, timeout: float = 30.0) -> str:
        """SIGTERM, wait for a clean exit (the recorder drains); return the process output."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)  # the output ends with the process
        elif self.process.stdout and not self.output:
            self.output.append(self.process.stdout.read().decode(errors="replace"))
        return "".join(self.output)


def start_fake_upstream() -> FakeUpstream:
    """Start `python -m proxy.testing.fake_openai` on a free port; stop it with `.stop()`."""
    port = free_port()
    process = start_server(
        ["-m", "proxy.testing.fake_openai", "--port", str(port)],
        f"http://127.0.0.1:{port}/v1/models",
        child_env(),
        timeout=STARTUP_DEADLINE_S,
    )
    return FakeUpstream(f"http://127.0.0.1:{port}/v1", process)


def launch_proxy(
    directory: Path, *, env: dict[str, str] | None = None, **flags: Any
) -> ProxyServer:
    """Start `python -m proxy` with `flags` (`upstream` required; `db` defaults to a new file in
    `directory`; a database URL's journal goes to `directory`) and wait until it answers. The
    caller stops it."""
    port = free_port()
    db_url = str(flags.pop("db", directory / f"understudy-{port}.db"))
    options = {"port": port, "db": db_url, **flags}
    journal_beside(directory, options)
    args = ["-m", "proxy"]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    process = start_server(
        args,
        f"http://127.0.0.1:{port}/health",
        child_env(**(env or {})),
        timeout=STARTUP_DEADLINE_S,
    )
    return ProxyServer(
        f"http://127.0.0.1:{port}/v1",
        f"http://127.0.0.1:{port}",
        Path(db_url),
        process,
        db_url=db_url,
    )
