"""Operations on the Responses path: a client that goes away mid-stream (recorded 'cancelled'
with the partial answer), an upstream stream that breaks (recorded 'error'), body limits,
redaction of key-shaped strings, and metrics labelling exchanges by kind."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import ProxyServer
from tests.support.records import database_bytes, wait_recorded
from tests.support.responses import exchanges, fake_url, in_process_proxy

__all__ = ["fake_url"]


def test_client_gone_mid_stream_is_recorded_cancelled(
    start_proxy: Callable[..., ProxyServer],
) -> None:
    proxy = start_proxy()
    body = json.dumps(
        {"model": "m", "stream": True, "input": "please cancel this long answer, it has many words"}
    ).encode()
    request = (
        b"POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\nx-fake-chunk-delay-ms: 300\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    port = int(proxy.root_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while received.count(b"response.output_text.delta") < 2:
            part = sock.recv(65536)
            assert part, "the proxy closed the connection early"
            received += part
    rows = wait_recorded(proxy.db, lambda rows: len(rows) == 1)
    [row] = rows
    assert row["kind"] == "responses"
    assert row["outcome"] == "cancelled"
    partial = row["response"]["output"][0]
    assert partial["status"] == "incomplete"
    assert partial["content"][0]["text"]  # the deltas seen before the client went away
    assert row["state_hash"] is None  # a cancelled answer is no state to continue


async def test_broken_upstream_stream_is_recorded_as_error(tmp_path: Path, fake_url: str) -> None:
    db = tmp_path / "u.db"
    async with in_process_proxy(db, fake_url) as client:
        reply = await client.post(
            "/responses",
            headers={"x-fake-break-after": "5"},
            json={"model": "m", "stream": True, "input": "a long answer please"},
        )
    assert reply.status_code == 200
    assert b"upstream stream broke" in reply.content
    [row] = exchanges(db)
    assert row["outcome"] == "error"
    assert "upstream stream broke" in row["error_json"]


async def test_body_over_the_limit_is_a_413(tmp_path: Path, fake_url: str) -> None:
    async with in_process_proxy(tmp_path / "u.db", fake_url, max_body_bytes=2000) as client:
        reply = await client.post("/responses", json={"model": "m", "input": "x" * 5000})
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"


async def test_key_shaped_strings_are_not_stored(tmp_path: Path, fake_url: str) -> None:
    db = tmp_path / "u.db"
    secret = "sk-proj-" + "A1b2C3d4E5f6G7h8" * 3
    async with in_process_proxy(db, fake_url) as client:
        reply = await client.post(
            "/responses",
            headers={"authorization": f"Bearer {secret}"},
            json={"model": "m", "input": [{"role": "user", "content": f"my key is {secret}"}]},
        )
    assert reply.status_code == 200
    stored = database_bytes(db)
    assert secret.encode() not in stored
    [row] = exchanges(db)
    assert "my key is" in row["request_json"]


async def test_metrics_label_exchanges_by_kind(tmp_path: Path, fake_url: str) -> None:
    """`kind` tells chat from Responses exchanges on every exchange metric."""
    async with in_process_proxy(tmp_path / "u.db", fake_url) as client:
        for _ in range(3):
            await client.post("/responses", json={"model": "m", "input": "hi"})
        await client.post("/responses", json={"model": "m", "input": "hi", "stream": True})
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        await client.post("/chat/completions", json=chat)
        text = (await client.get("http://127.0.0.1/metrics")).text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    requests = "understudy_requests_total"
    assert value(requests, kind="responses", route="student", stream="false", outcome="ok") == 3
    assert value(requests, kind="responses", route="student", stream="true", outcome="ok") == 1
    assert value(requests, kind="chat", route="student", stream="false", outcome="ok") == 1
    duration = "understudy_request_duration_seconds_count"
    assert value(duration, kind="responses", route="student", stream="false") == 3
    assert value(duration, kind="chat", route="student", stream="false") == 1
    ttft = "understudy_time_to_first_token_seconds_count"
    assert value(ttft, kind="responses", route="student") == 1
    assert value(ttft, kind="chat", route="student") == 0
