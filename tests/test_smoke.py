"""The proxy process starts, forwards one call and records it (`python -m proxy` as users run it)."""

from __future__ import annotations

import sqlite3

import openai
import pytest

from tests.support.processes import ProxyServer

pytestmark = pytest.mark.e2e


def test_one_call_is_forwarded_and_recorded(proxy_server: ProxyServer) -> None:
    client = openai.OpenAI(base_url=proxy_server.base_url, api_key="sk-test-key")
    completion = client.chat.completions.create(
        model="gpt-4.1-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == "Answer to 'hi'"
    proxy_server.stop()
    with sqlite3.connect(proxy_server.db) as conn:
        rows = conn.execute(
            "SELECT model_requested, outcome, status_code FROM exchanges"
        ).fetchall()
    assert rows == [("gpt-4.1-mini", "ok", 200)]
