"""Proxy replicas on one PostgreSQL database, as real processes: the `start_replicas` fixture
(a factory) and `Replicas`. Used by the replica tests of chat and of the Responses API."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.testing.servers import REPOSITORY_ROOT as ROOT
from proxy.testing.servers import child_env, free_port, wait_for_http
from tests.support.processes import FakeUpstream, ProxyServer


@dataclass
class Replicas:
    """Proxy processes on one database; `clients[i]` is an AsyncOpenAI for `servers[i]`."""

    servers: list[ProxyServer]
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def start_replicas(
    pg_url: str, fake_upstream: FakeUpstream, tmp_path: Path
) -> Iterator[Callable[..., Replicas]]:
    """Factory: `start_replicas(n, flags_per_replica=[...])` starts n proxies on the test database
    at once (so their migrations race), waits for all, and stops them at the end."""
    started: list[Replicas] = []

    def start(count: int, flags: list[dict[str, Any]] | None = None) -> Replicas:
        processes = []
        for number in range(count):
            port = free_port()
            options = {
                "port": port,
                "upstream": fake_upstream.base_url,
                "db": pg_url,
                "journal": str(tmp_path / f"journal-{port}.jsonl"),
                "log_level": "warning",
                **(flags[number] if flags else {}),
            }
            args = [sys.executable, "-m", "proxy"]
            for name, value in options.items():
                args += [f"--{name.replace('_', '-')}", str(value)]
            process = subprocess.Popen(
                args, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            processes.append((port, process))
        servers = []
        for port, process in processes:
            wait_for_http(f"http://127.0.0.1:{port}/health", process, timeout=90)
            root = f"http://127.0.0.1:{port}"
            servers.append(ProxyServer(f"{root}/v1", root, Path(os.devnull), process))
        replicas = Replicas(
            servers,
            [
                openai.AsyncOpenAI(base_url=s.base_url, api_key="sk-test-key", max_retries=0)
                for s in servers
            ],
        )
        started.append(replicas)
        return replicas

    yield start
    for replicas in started:
        replicas.stop()
