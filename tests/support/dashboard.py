"""Dashboard test helpers: demo traffic played through a proxy, finding trajectories, CSRF tokens."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any, Protocol

import httpx
import openai

from proxy.demo import CONVERSATIONS, Conversation, play


class Served(Protocol):
    """A proxy reachable over HTTP (a process, or served in a thread)."""

    base_url: str
    root_url: str


TOKEN = "test-admin-token-123"


def record_traffic(
    proxy: Served,
    conversations: Sequence[Conversation] = CONVERSATIONS,
    headers: dict[str, str] | None = None,
    rounds: int = 1,
    run: str = "test",
) -> int:
    """Play conversations through the proxy with the openai SDK (`rounds` times, each round new
    trajectories); wait until all are recorded (the database's count grows by the requests
    made: it may hold earlier traffic). Returns the requests made."""
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-test-key", max_retries=0)
    stats_url = f"{proxy.root_url}/api/stats"
    before = httpx.get(stats_url, headers=headers).json()["exchanges"]
    requests = 0
    for round_ in range(rounds):
        for convo in conversations:
            try:
                requests += play(client, convo, f"{run} round {round_}")
            except openai.APIStatusError:
                requests += 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = httpx.get(stats_url, headers=headers).json()
        if stats["exchanges"] >= before + requests:
            return requests
        time.sleep(0.05)
    raise AssertionError(f"{stats}: expected {before} + {requests} exchanges recorded")


def by_name(*names: str) -> list[Conversation]:
    """The demo conversations with these names (the part before any parenthesis)."""
    return [
        c
        for c in CONVERSATIONS
        if c.name in names or c.name.split(" (")[0] in names and "(teacher)" not in c.name
    ]


def find(data: list[dict[str, Any]], text: str) -> dict[str, Any]:
    return next(t for t in data if (t["first_user_text"] or "").startswith(text))


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
    assert match, "no CSRF token in the form"
    return match.group(1)
