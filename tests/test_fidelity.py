"""Fidelity: what the app gets through the proxy is what the upstream sent, and when it sent it.

Compared with the same request sent to the fake upstream directly: status, headers
(`x-request-id`, `openai-processing-ms`, `x-ratelimit-*`, ...) and body bytes (JSON and SSE), with
only the per-call values (completion id, `created`, tool-call ids, request id, date) normalized.
Unknown body fields (`x_fake_extra`) reach the SDK. Stream chunks are passed on as they arrive
(a 300 ms-per-chunk upstream: the first chunk arrives long before the last). Other `/v1/*` paths
pass through unrecorded. With an in-process scripted upstream: request bytes and query string
forwarded exactly, duplicate response headers kept, gzip answers (JSON and SSE) passed on raw and
recorded decoded, and only codings the proxy can decode offered upstream.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from proxy.testing.servers import serve_in_thread
from tests.support.inprocess import ThreadedProxy
from tests.support.inprocess import served_proxy as launch_proxy
from tests.support.processes import FakeUpstream
from tests.support.records import db_rows, recorded_exchanges, response_message, wait_for_ids
from tests.support.scripted import (
    LONG_TOOL_ARGUMENTS,
    SCRIPTED_COMPLETION,
    ScriptedUpstream,
    create_scripted_app,
    long_tool_sse_events,
)

API_KEY = "sk-test-fidelity"
AUTH = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
TOOLS = [
    {
        "type": "function",
        "function": {"name": n, "parameters": {"type": "object", "properties": {}}},
    }
    for n in ("lookup", "fetch")
]
# Values that differ from one call to the next, whoever makes it.
PER_CALL_HEADERS = {"x-request-id", "date", "content-length"}


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream
) -> Iterator[ThreadedProxy]:
    """One proxy in front of the fake upstream for this module; tests find rows by exchange id."""
    server = launch_proxy(tmp_path_factory.mktemp("fidelity"), upstream=fake_upstream.base_url)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    received: list[dict[str, Any]] = []
    with serve_in_thread(create_scripted_app(received)) as root:
        yield ScriptedUpstream(root + "/v1", received)


@pytest.fixture(scope="module")
def scripted_proxy(
    tmp_path_factory: pytest.TempPathFactory, scripted: ScriptedUpstream
) -> Iterator[ThreadedProxy]:
    server = launch_proxy(tmp_path_factory.mktemp("scripted"), upstream=scripted.base_url)
    yield server
    server.stop()


def row_of(proxy: ThreadedProxy, response: httpx.Response) -> dict[str, Any]:
    """The recorded exchange behind `response` (waits for the recorder's batch)."""
    exchange_id = response.headers["x-understudy-exchange-id"]
    return wait_for_ids(proxy.db, exchange_id)[exchange_id]


def normalize(data: bytes) -> bytes:
    """Blank the per-call values of the fake's bodies: completion id, created, tool-call ids."""
    data = re.sub(rb"chatcmpl-fake\d+", b"chatcmpl-fakeN", data)
    data = re.sub(rb'"created": ?\d+', b'"created":0', data)
    return re.sub(rb"call_\d+_(\d+)", rb"call_N_\1", data)


def header_multiset(response: httpx.Response) -> Counter[tuple[str, str]]:
    return Counter(
        (name, value)
        for name, value in response.headers.multi_items()
        if name not in PER_CALL_HEADERS and not name.startswith("x-understudy-")
    )


def post_both(
    fake: FakeUpstream,
    proxy: ThreadedProxy,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[httpx.Response, httpx.Response]:
    """POST the same bytes to the fake directly and through the proxy; read the raw bodies."""
    content = json.dumps(body).encode()
    out = []
    for base in (fake.base_url, proxy.base_url):
        with httpx.Client(timeout=30) as client:
            request = client.build_request(
                "POST",
                base + "/chat/completions",
                content=content,
                headers={**AUTH, **(headers or {})},
            )
            response = client.send(request, stream=True)
            response.read()
            out.append(response)
    return out[0], out[1]


@pytest.mark.parametrize("parallel", [False, True], ids=["text", "parallel-calls"])
def test_json_answer_bytes_and_headers_unchanged(
    fake_upstream: FakeUpstream, proxy: ThreadedProxy, parallel: bool
) -> None:
    body = {
        "model": "gpt-4.1-mini",
        "messages": [{"role": "user", "content": "go parallel" if parallel else "hello"}],
        **({"tools": TOOLS} if parallel else {}),
    }
    direct, proxied = post_both(fake_upstream, proxy, body)
    assert proxied.status_code == direct.status_code == 200
    assert normalize(proxied.content) == normalize(direct.content)
    assert header_multiset(proxied) == header_multiset(direct)
    for name in (
        "x-request-id",
        "openai-processing-ms",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-tokens",
        "openai-version",
        "content-type",
    ):
        assert name in proxied.headers, name
    assert proxied.headers["x-request-id"].startswith("req_fake_")
    assert int(proxied.headers["content-length"]) == len(proxied.content)
    assert json.loads(proxied.content)["x_fake_extra"] == {"kept": True}
    row = row_of(proxy, proxied)
    assert row["response_json"].encode() == proxied.content  # stored verbatim too
    assert row["upstream_request_id"] == proxied.headers["x-request-id"]
    assert row["trajectory_id"] == proxied.headers["x-understudy-trajectory-id"]


@pytest.mark.parametrize("usage", [False, True], ids=["no-usage", "usage"])
def test_sse_bytes_and_headers_unchanged(
    fake_upstream: FakeUpstream, proxy: ThreadedProxy, usage: bool
) -> None:
    body = {
        "model": "gpt-4.1-mini",
        "messages": [{"role": "user", "content": "both in parallel"}],
        "tools": TOOLS,
        "stream": True,
        **({"stream_options": {"include_usage": True}} if usage else {}),
    }
    direct, proxied = post_both(fake_upstream, proxy, body)
    assert proxied.status_code == direct.status_code == 200
    assert proxied.headers["content-type"].startswith("text/event-stream")
    assert normalize(proxied.content) == normalize(direct.content)
    assert proxied.content.endswith(b"data: [DONE]\n\n")
    assert header_multiset(proxied) == header_multiset(direct)
    row = row_of(proxy, proxied)
    assert row["stream"] == 1
    message = response_message(row)
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["lookup", "fetch"]
    if usage:
        assert "estimated" not in row["usage"]  # the upstream's own figures
    else:  # not asked for: counted offline, marked estimated; the client's bytes are unchanged
        assert row["usage"]["estimated"] is True and row["usage"]["encoding"] == "o200k_base"
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
        assert b'"usage"' not in proxied.content


def test_unknown_fields_reach_the_sdk(proxy: ThreadedProxy) -> None:
    with openai.OpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0) as client:
        completion = client.chat.completions.create(
            model="gpt-4.1-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert completion.model_extra is not None
    assert completion.model_extra["x_fake_extra"] == {"kept": True}
    assert completion.service_tier == "default"
    assert completion.system_fingerprint == "fp_fake"


async def test_stream_chunks_arrive_as_the_upstream_sends_them(proxy: ThreadedProxy) -> None:
    """300 ms between upstream chunks: a buffering proxy would deliver them all at the end."""
    arrivals: list[float] = []
    async with openai.AsyncOpenAI(
        base_url=proxy.base_url, api_key=API_KEY, max_retries=0
    ) as client:
        start = time.monotonic()
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4.1-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-fake-chunk-delay-ms": "300"},
        )
        async for _chunk in raw.parse():
            arrivals.append(time.monotonic() - start)
    assert len(arrivals) >= 4
    # the upstream needs >= 300 ms per chunk; the first must not wait for the others
    assert arrivals[-1] - arrivals[0] >= 0.3 * (len(arrivals) - 1) * 0.8
    assert arrivals[0] < arrivals[-1] - 0.6
    row = row_of(proxy, raw.http_response)
    assert row["ttft_ms"] < row["duration_ms"] - 600


def test_other_v1_paths_pass_through_unrecorded(
    fake_upstream: FakeUpstream, proxy: ThreadedProxy
) -> None:
    marker = "passthrough-marker-51d2"
    with openai.OpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0) as client:
        models = client.models.with_raw_response.list()
        embeddings = client.embeddings.create(model=marker, input=["a", "b"])
    assert [m.id for m in models.parse().data] == ["fake-model"]
    assert models.headers["x-request-id"] == "req_fake_models"
    assert models.headers["x-ratelimit-remaining-requests"] == "9999"
    assert [e.embedding for e in embeddings.data] == [[0.1, 0.2, 0.3]] * 2
    assert "x-understudy-trajectory-id" not in models.headers

    with httpx.Client(timeout=30) as client:
        for path in ("/models", "/files"):  # /files: the upstream's own 404 passes through too
            direct = client.get(fake_upstream.base_url + path, headers=AUTH)
            proxied = client.get(proxy.base_url + path, headers=AUTH)
            assert proxied.status_code == direct.status_code
            assert proxied.content == direct.content
            assert header_multiset(proxied) == header_multiset(direct)
            assert "x-understudy-trajectory-id" not in proxied.headers
        body = json.dumps({"model": marker, "input": "x"}).encode()
        direct = client.post(fake_upstream.base_url + "/embeddings", content=body, headers=AUTH)
        proxied = client.post(proxy.base_url + "/embeddings", content=body, headers=AUTH)
        assert (proxied.status_code, proxied.content) == (direct.status_code, direct.content)
        # a chat call after them: once it is written, anything recorded before it is too
        chat = client.post(
            proxy.base_url + "/chat/completions",
            json={"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": marker}]},
            headers=AUTH,
        )
    row_of(proxy, chat)
    rows = [row for row in recorded_exchanges(proxy.db) if marker in row["request_json"]]
    assert [row["path"] for row in rows] == ["/v1/chat/completions"]
    assert db_rows(proxy.db, "SELECT id FROM exchanges WHERE path != '/v1/chat/completions'") == []


# -- with the scripted in-process upstream -------------------------------------------------------


def test_request_bytes_and_query_are_forwarded_exactly(
    scripted_proxy: ThreadedProxy, scripted: ScriptedUpstream
) -> None:
    raw = (
        b'{"zzz_unknown": {"b": 1, "a": 2},\n  "model": "m",'
        b' "messages": [{"role": "user", "content": "h\\u00e9 \xe2\x9c\x93"}]  }'
    )
    response = httpx.post(
        scripted_proxy.base_url + "/chat/completions?api-version=2024-10-21&x=1",
        content=raw,
        headers={**AUTH, "x-custom-client": "yes", "X-Understudy-Tag": "t"},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.json() == SCRIPTED_COMPLETION
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    received = scripted.received[-1]
    assert received["body"] == raw
    assert received["query"] == "api-version=2024-10-21&x=1"
    names = dict(received["headers"])
    assert names["x-custom-client"] == "yes"
    assert names["authorization"] == f"Bearer {API_KEY}"
    assert "x-understudy-tag" not in names
    row = row_of(scripted_proxy, response)
    # Stored in content-addressed parts (migration 003): rebuilt JSON-equal, not byte-equal.
    assert json.loads(row["request_json"]) == json.loads(raw)
    assert row["headers"] == {"x-understudy-tag": "t"}


def test_gzip_json_is_passed_raw_and_recorded_decoded(scripted_proxy: ThreadedProxy) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "zip"}]}).encode()
    with httpx.Client(timeout=30) as client:
        request = client.build_request(
            "POST",
            scripted_proxy.base_url + "/chat/completions",
            content=body,
            headers={**AUTH, "x-script": "gzip-json", "accept-encoding": "gzip"},
        )
        response = client.send(request, stream=True)
        raw = b"".join(response.iter_raw())
        response.close()
    assert response.headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw)) == SCRIPTED_COMPLETION
    assert int(response.headers["content-length"]) == len(raw)
    row = row_of(scripted_proxy, response)
    assert row["outcome"] == "ok"
    assert row["response"] == SCRIPTED_COMPLETION
    assert row["total_tokens"] == 7


def test_gzip_stream_reaches_the_sdk_and_is_assembled(scripted_proxy: ThreadedProxy) -> None:
    with openai.OpenAI(base_url=scripted_proxy.base_url, api_key=API_KEY, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="m",
            messages=[{"role": "user", "content": "zip"}],
            stream=True,
            extra_headers={"x-script": "gzip-sse"},
        )
        assert raw.headers["content-encoding"] == "gzip"
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == "scripted answer"
    row = row_of(scripted_proxy, raw.http_response)
    assert row["outcome"] == "ok"
    assert response_message(row)["content"] == "scripted answer"
    assert row["usage"] == SCRIPTED_COMPLETION["usage"]


def test_a_long_streamed_tool_call_is_relayed_as_sent_and_recorded_whole(
    scripted_proxy: ThreadedProxy,
) -> None:
    """~3,900 events (~940 KB) carrying a 31 KB file write (the proxy parses such a stream 64 KiB at a
    time as it passes): the client gets the upstream's bytes unchanged and the SDK's own
    accumulator the whole call; the record holds the same arguments, character for character."""
    body = {"model": "m", "messages": [{"role": "user", "content": "write it"}], "stream": True}
    with httpx.Client(timeout=60) as client:
        response = client.post(
            scripted_proxy.base_url + "/chat/completions",
            json=body,
            headers={**AUTH, "x-script": "long-tool-sse"},
        )
    assert response.status_code == 200
    assert response.content == b"".join(long_tool_sse_events())
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for line in response.text.split("\n\n"):
        if line.startswith("data: {"):
            state.handle_chunk(ChatCompletionChunk.model_validate_json(line[6:]))
    sdk_call = state.get_final_completion().choices[0].message.tool_calls[0]  # type: ignore[index]
    assert sdk_call.function.arguments == LONG_TOOL_ARGUMENTS
    row = row_of(scripted_proxy, response)
    assert row["outcome"] == "ok"
    recorded = response_message(row)["tool_calls"][0]
    assert recorded == {
        "id": "call_long",
        "type": "function",
        "function": {"name": "write_file", "arguments": LONG_TOOL_ARGUMENTS},
    }


def test_upstream_is_only_offered_codings_the_proxy_can_decode(
    scripted_proxy: ThreadedProxy, scripted: ScriptedUpstream
) -> None:
    """br/zstd would leave the recorder unable to read the answer; a client that asked for no
    coding must not get one either (curl without --compressed cannot read gzip)."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode()
    offers: dict[str, str | None] = {}
    with httpx.Client(timeout=30) as client:
        for label, accept in (
            ("mixed", "br, zstd, gzip;q=0.5"),
            ("br-only", "br"),
            ("identity", "identity"),
            ("none", None),
        ):
            request = client.build_request(
                "POST", scripted_proxy.base_url + "/chat/completions", content=body, headers=AUTH
            )
            if accept is None:
                del request.headers["accept-encoding"]
            else:
                request.headers["accept-encoding"] = accept
            assert client.send(request).status_code == 200
            offers[label] = dict(scripted.received[-1]["headers"]).get("accept-encoding")
    assert offers["mixed"] == "gzip;q=0.5"
    assert offers["identity"] == "identity"
    for label in ("br-only", "none"):
        assert offers[label] in (None, "identity"), (label, offers[label])
