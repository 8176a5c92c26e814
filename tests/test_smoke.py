"""The proxy process starts, forwards one call and records it (`python -m proxy` as users run it)."""

from __future__ import annotations

import openai
import pytest

from tests.support.processes import ProxyServer
from tests.support.records import recorded_exchanges

pytestmark = pytest.mark.e2e


def test_one_call_is_forwarded_and_recorded(proxy_server: ProxyServer) -> None:
    client = openai.OpenAI(base_url=proxy_server.base_url, api_key="sk-test-key")
    completion = client.chat.completions.create(
        model="gpt-4.1-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == "Answer to 'hi'"
    proxy_server.stop()
    rows = recorded_exchanges(proxy_server.db)
    assert [(r["model_requested"], r["outcome"], r["status_code"]) for r in rows] == [
        ("gpt-4.1-mini", "ok", 200)
    ]
