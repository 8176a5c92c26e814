"""Errors: what the proxy refuses, what it answers when the upstream fails, and what it records.

- Bodies that are not JSON, not UTF-8, not an object, or lack `model` / `messages` get a 400
  OpenAI-shaped error (`{"error": {"message", "type", "param", "code"}}`), are not forwarded
  and not recorded; odd but well-formed messages are forwarded (stitching never fails on them).
- Upstream unreachable (a closed port) is 502, upstream timeout (`read_timeout_s=0.3` and a fake
  that waits before answering) is 504, both OpenAI-shaped, carrying the trajectory header, and
  recorded as errors.
- Upstream 4xx/5xx (`fake-error-500`, `fake-error-429` with `retry-after`) and a 200 that is not
  JSON are passed through exactly (status, body, headers) and recorded with outcome 'error'.
- Streams: an upstream that stalls or drops mid-stream is recorded as 'error' and the client can
  tell (dropped connection or a final error event the SDK raises on); a client that goes away
  mid-stream is recorded as 'cancelled'.

Most cases share one module-scoped proxy and find their rows by the `X-Understudy-Exchange-Id`
answer header (waiting for the recorder's batch); tests that need a whole database stop their own.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.testing.servers import free_port
from tests.support.inprocess import ThreadedProxy, in_process_proxy
from tests.support.inprocess import served_proxy as launch_proxy
from tests.support.processes import FakeUpstream
from tests.support.records import db_rows, recorded_exchanges, wait_for_ids, wait_recorded
from tests.support.scripted import ScriptedUpstream

API_KEY = "sk-test-errors"
AUTH = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
GOOD: dict[str, Any] = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response is `status` with an OpenAI-shaped JSON error; returns the inner object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


@pytest.fixture(scope="module")
def shared_proxy(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream
) -> Iterator[ThreadedProxy]:
    """A proxy in front of the fake upstream, shared by this module's tests."""
    server = launch_proxy(tmp_path_factory.mktemp("errors"), upstream=fake_upstream.base_url)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def impatient_proxy(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream
) -> Iterator[ThreadedProxy]:
    """A proxy that waits at most 0.3 s for the upstream's next byte."""
    server = launch_proxy(
        tmp_path_factory.mktemp("impatient"), upstream=fake_upstream.base_url, read_timeout_s=0.3
    )
    yield server
    server.stop()


def post(proxy: ThreadedProxy, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    """POST `body` (bytes as they are, anything else as ASCII-escaped JSON) to chat completions."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        proxy.base_url + "/chat/completions",
        content=content,
        headers={**AUTH, **(headers or {})},
        timeout=30,
    )


# -- requests the proxy refuses -------------------------------------------------------------------

INVALID_BODIES: list[tuple[str, bytes, str | None, str | None]] = [
    # (id, body, expected param, expected code)
    ("not-json", b"this is not json", None, "invalid_json"),
    ("truncated-json", b'{"model": "m", "messages": [', None, "invalid_json"),
    ("empty", b"", None, "invalid_json"),
    ("not-utf8", b'{"model": "m\xff", "messages": []}', None, "invalid_json"),
    ("utf16", json.dumps(GOOD).encode("utf-16"), None, "invalid_json"),
    ("array", b"[1, 2]", None, "invalid_type"),
    ("string", b'"hello"', None, "invalid_type"),
    ("null", b"null", None, "invalid_type"),
    ("no-model", json.dumps({"messages": GOOD["messages"]}).encode(), "model", None),
    ("model-not-string", json.dumps({**GOOD, "model": 5}).encode(), "model", None),
    ("empty-model", json.dumps({**GOOD, "model": ""}).encode(), "model", None),
    ("no-messages", json.dumps({"model": "m"}).encode(), "messages", None),
    ("messages-empty", json.dumps({"model": "m", "messages": []}).encode(), "messages", None),
    ("messages-string", json.dumps({"model": "m", "messages": "hi"}).encode(), "messages", None),
    (
        "message-not-object",
        json.dumps({"model": "m", "messages": [1]}).encode(),
        "messages[0]",
        None,
    ),
    (
        "message-without-role",
        json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "a"}, {"content": "b"}]}
        ).encode(),
        "messages[1]",
        None,
    ),
]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [case[1:] for case in INVALID_BODIES],
    ids=[case[0] for case in INVALID_BODIES],
)
def test_invalid_body_is_a_400_openai_error_and_not_forwarded(
    shared_proxy: ThreadedProxy,
    fake_upstream: FakeUpstream,
    body: bytes,
    param: str | None,
    code: str | None,
) -> None:
    fake_upstream.clear()
    error = assert_openai_error(post(shared_proxy, body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert fake_upstream.requests() == []


@pytest.mark.parametrize(
    ("headers", "metadata", "param"),
    [
        ({"X-Understudy-Trajectory-Id": "x" * 201}, None, "x-understudy-trajectory-id"),
        ({"X-Understudy-Trajectory-Id": ""}, None, "x-understudy-trajectory-id"),
        ({}, {"trajectory_id": ""}, "metadata.trajectory_id"),
    ],
    ids=["header-too-long", "header-empty", "metadata-empty"],
)
def test_bad_explicit_trajectory_id_is_a_400(
    shared_proxy: ThreadedProxy,
    fake_upstream: FakeUpstream,
    headers: dict[str, str],
    metadata: dict[str, str] | None,
    param: str,
) -> None:
    fake_upstream.clear()
    body = {**GOOD, **({"metadata": metadata} if metadata is not None else {})}
    assert assert_openai_error(post(shared_proxy, body, headers), 400)["param"] == param
    assert fake_upstream.requests() == []


@pytest.mark.parametrize("trajectory_id", ["line\nbreak", "nul\x00", "bell\x07", "del\x7f"])
def test_trajectory_id_that_cannot_be_a_header_is_a_400(
    shared_proxy: ThreadedProxy, fake_upstream: FakeUpstream, trajectory_id: str
) -> None:
    """The id is echoed in the X-Understudy-Trajectory-Id answer header: one that cannot be a
    header value must be refused up front, not forwarded, billed and then dropped."""
    fake_upstream.clear()
    body = {**GOOD, "metadata": {"trajectory_id": trajectory_id}}
    try:
        response = post(shared_proxy, body)
    except httpx.HTTPError as exc:
        pytest.fail(f"the proxy dropped the connection ({type(exc).__name__}) instead of a 400")
    assert assert_openai_error(response, 400)["param"] == "metadata.trajectory_id"
    assert fake_upstream.requests() == []


def test_non_ascii_trajectory_id_is_echoed_exactly_or_refused(shared_proxy: ThreadedProxy) -> None:
    """The answer header must name the stored trajectory, not a mangled copy ("trip-??")."""
    trajectory_id = "trip-東京"
    response = post(shared_proxy, {**GOOD, "metadata": {"trajectory_id": trajectory_id}})
    if response.status_code == 400:
        assert assert_openai_error(response, 400)["param"] == "metadata.trajectory_id"
        return
    assert response.status_code == 200
    header = response.headers["x-understudy-trajectory-id"]
    exchange_id = response.headers["x-understudy-exchange-id"]
    stored = wait_for_ids(shared_proxy.db, exchange_id)[exchange_id]["trajectory_id"]
    assert stored == trajectory_id
    assert urllib.parse.unquote(header) == stored, f"header {header!r} != stored {stored!r}"


def test_sdk_reads_the_400_as_a_bad_request(shared_proxy: ThreadedProxy) -> None:
    with (
        openai.OpenAI(base_url=shared_proxy.base_url, api_key=API_KEY, max_retries=0) as client,
        pytest.raises(openai.BadRequestError) as caught,
    ):
        client.chat.completions.create(model="gpt-4.1-mini", messages=[])
    assert caught.value.status_code == 400
    assert caught.value.param == "messages"
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "invalid_request_error"


def test_refused_requests_are_not_recorded(shared_proxy: ThreadedProxy) -> None:
    marker = "refused-marker-7c1f"
    refused = [
        f"not json {marker}".encode(),
        json.dumps([marker]).encode(),
        json.dumps({"model": marker}).encode(),
        json.dumps({"model": "m", "messages": [{"content": marker}]}).encode(),
    ]
    for body in refused:
        assert post(shared_proxy, body).status_code == 400
    ok = post(shared_proxy, {**GOOD, "user": marker})
    assert ok.status_code == 200
    # the recorder keeps order: once the later good call is written, a refused one would be too
    wait_for_ids(shared_proxy.db, ok.headers["x-understudy-exchange-id"])
    rows = db_rows(shared_proxy.db, "SELECT id, request_json FROM exchanges")
    assert [row["id"] for row in rows if marker in row["request_json"]] == [
        ok.headers["x-understudy-exchange-id"]
    ]


def test_odd_but_wellformed_messages_are_forwarded(
    shared_proxy: ThreadedProxy, fake_upstream: FakeUpstream
) -> None:
    """Only `role` is checked: any other shape goes upstream, and stitching must not choke on it
    (a lone surrogate escape, half an emoji a client cut, included)."""
    messages = [
        {"role": "system", "content": "cut emoji \ud83d here"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, "stray"]},
        {"role": "assistant", "function_call": "not an object", "tool_calls": {"weird": True}},
        {"role": "assistant", "tool_calls": [{"id": "c1", "function": "f"}]},
        {"role": "tool", "tool_call_id": "c1", "content": 42},
        {"role": "user", "content": None, "name": ["x"]},
    ]
    try:
        response = post(shared_proxy, {"model": "gpt-4.1-mini", "messages": messages})
    finally:
        fake_upstream.clear()  # its request log cannot list a lone surrogate as JSON
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
    row = wait_for_ids(shared_proxy.db, response.headers["x-understudy-exchange-id"])
    # Stored as sent, except the lone surrogate, which no database or page can encode: U+FFFD.
    stored = [{**messages[0], "content": "cut emoji \ufffd here"}, *messages[1:]]
    assert next(iter(row.values()))["request"]["messages"] == stored


# -- the upstream fails below HTTP ----------------------------------------------------------------


def test_unreachable_upstream_is_a_502(serve_proxy: Callable[..., ThreadedProxy]) -> None:
    proxy = serve_proxy(upstream=f"http://127.0.0.1:{free_port()}/v1")
    answers = []
    for stream in (False, True):
        response = post(proxy, {**GOOD, "stream": stream})
        error = assert_openai_error(response, 502)
        assert error["code"] == "upstream_unreachable"
        assert response.headers["x-understudy-trajectory-id"]
        answers.append(response)
    passthrough = httpx.get(proxy.base_url + "/models", headers=AUTH, timeout=30)
    assert assert_openai_error(passthrough, 502)["code"] == "upstream_unreachable"
    with (
        openai.OpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0) as client,
        pytest.raises(openai.InternalServerError) as caught,
    ):
        client.chat.completions.create(model=GOOD["model"], messages=GOOD["messages"])
    assert caught.value.status_code == 502
    proxy.stop()
    rows = recorded_exchanges(proxy.db)
    assert len(rows) == 3
    for row, response in zip(rows, answers, strict=False):
        assert row["id"] == response.headers["x-understudy-exchange-id"]
        assert row["trajectory_id"] == response.headers["x-understudy-trajectory-id"]
        assert (row["status_code"], row["outcome"]) == (502, "error")
        assert row["error"] == response.json()
        assert row["response_json"] is None and row["state_hash"] is None
    assert [row["stream"] for row in rows] == [0, 1, 0]


def test_upstream_timeout_is_a_504(impatient_proxy: ThreadedProxy) -> None:
    slow = {"x-fake-delay-ms": "3000"}
    answers = []
    for stream in (False, True):
        response = post(impatient_proxy, {**GOOD, "stream": stream}, slow)
        assert assert_openai_error(response, 504)["code"] == "upstream_timeout"
        assert response.elapsed.total_seconds() < 2.5  # it did not wait for the upstream
        assert response.headers["x-understudy-trajectory-id"]
        answers.append(response)
    fast = post(impatient_proxy, GOOD)
    assert fast.status_code == 200  # the timeout is between bytes, not a cap on good calls
    ids = [r.headers["x-understudy-exchange-id"] for r in (*answers, fast)]
    rows = wait_for_ids(impatient_proxy.db, *ids)
    assert [(rows[i]["status_code"], rows[i]["outcome"]) for i in ids] == [
        (504, "error"),
        (504, "error"),
        (200, "ok"),
    ]
    assert [rows[i]["error"] for i in ids[:2]] == [a.json() for a in answers]
    assert [rows[i]["stream"] for i in ids] == [0, 1, 0]


# -- the upstream answers with an error -----------------------------------------------------------


@pytest.mark.parametrize("model", ["fake-error-500", "fake-error-429"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream-request"])
def test_upstream_errors_pass_through_exactly_and_are_recorded(
    fake_upstream: FakeUpstream, shared_proxy: ThreadedProxy, model: str, stream: bool
) -> None:
    body = json.dumps({**GOOD, "model": model, "stream": stream}).encode()
    direct = httpx.post(fake_upstream.base_url + "/chat/completions", content=body, headers=AUTH)
    proxied = post(shared_proxy, body)
    assert proxied.status_code == direct.status_code == int(model[-3:])
    assert proxied.content == direct.content
    for name, value in direct.headers.items():
        if name not in ("x-request-id", "date"):
            assert proxied.headers.get(name) == value, name
    if model == "fake-error-429":
        assert proxied.headers["retry-after"] == "1"
    assert proxied.headers["x-understudy-trajectory-id"]
    exchange_id = proxied.headers["x-understudy-exchange-id"]
    row = wait_for_ids(shared_proxy.db, exchange_id)[exchange_id]
    assert (row["status_code"], row["outcome"]) == (proxied.status_code, "error")
    assert row["error_json"].encode() == proxied.content
    assert row["response_json"] is None and row["state_hash"] is None
    assert row["model_requested"] == model
    assert row["stream"] == int(stream)
    assert row["upstream_request_id"] == proxied.headers["x-request-id"]
    assert row["trajectory_id"] == proxied.headers["x-understudy-trajectory-id"]


def test_sdk_sees_rate_limit_with_retry_after(shared_proxy: ThreadedProxy) -> None:
    with (
        openai.OpenAI(base_url=shared_proxy.base_url, api_key=API_KEY, max_retries=0) as client,
        pytest.raises(openai.RateLimitError) as caught,
    ):
        client.chat.completions.create(model="fake-error-429", messages=GOOD["messages"])
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.code == "rate_limit_exceeded"
    assert "Rate limit reached" in caught.value.message


def test_error_answers_carry_no_stitching_state(shared_proxy: ThreadedProxy) -> None:
    """A failed call must not become a state that a later request could continue."""
    failed = post(shared_proxy, {**GOOD, "model": "fake-error-500"})
    assert failed.status_code == 500
    retry = post(shared_proxy, GOOD)
    assert retry.status_code == 200
    new_id, old_id = (
        retry.headers["x-understudy-trajectory-id"],
        failed.headers["x-understudy-trajectory-id"],
    )
    assert new_id != old_id
    exchange_id = retry.headers["x-understudy-exchange-id"]
    row = wait_for_ids(shared_proxy.db, exchange_id)[exchange_id]
    assert (row["parent_id"], row["step"]) == (None, 0)


@pytest.mark.parametrize(
    ("script", "status", "body"),
    [
        ("not-json", 200, b"upstream says: not json"),
        ("html-502", 502, b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    ],
    ids=["200-text", "502-html"],
)
def test_a_body_that_is_not_json_passes_through_and_is_recorded_as_json(
    serve_proxy: Callable[..., ThreadedProxy],
    scripted_upstream: ScriptedUpstream,
    script: str,
    status: int,
    body: bytes,
) -> None:
    proxy = serve_proxy(upstream=scripted_upstream.base_url)
    response = post(proxy, GOOD, {"x-script": script})
    assert (response.status_code, response.content) == (status, body)
    assert not response.headers["content-type"].startswith("application/json")
    proxy.stop()
    (row,) = db_rows(
        proxy.db, "SELECT status_code, outcome, response_json, error_json FROM exchanges"
    )
    assert (row["status_code"], row["outcome"]) == (status, "error")
    assert row["response_json"] is None
    # a *_json column holds JSON: readers json.loads() it; the upstream's text must survive inside
    error_json = row["error_json"]
    try:
        decoded = json.loads(error_json)
    except ValueError:
        pytest.fail(f"error_json is not JSON: {error_json!r}")
    assert body.decode() in json.dumps(decoded)


# -- streams that end badly -----------------------------------------------------------------------


def read_stream(
    url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[httpx.Headers, bytes, bool]:
    """POST and read the streamed answer raw: (headers, bytes received, whether reading broke)."""
    received = b""
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", url, json=body, headers={**AUTH, **headers}) as response,
    ):
        assert response.status_code == 200
        try:
            for piece in response.iter_raw():
                received += piece
        except httpx.HTTPError:
            return response.headers, received, True
    return response.headers, received, False


def sdk_stream_fails(base_url: str, headers: dict[str, str]) -> str | None:
    """Iterate a stream with the openai SDK; the name of the exception it raised, if any."""
    with openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
        try:
            for _chunk in client.chat.completions.create(
                model=GOOD["model"], messages=GOOD["messages"], stream=True, extra_headers=headers
            ):
                pass
        except (openai.APIError, httpx.HTTPError) as exc:
            return type(exc).__name__
    return None


def client_can_tell(received: bytes, broke: bool) -> bool:
    """A broken stream is visible to the client: the connection drops, or an error event ends it."""
    if broke:
        return True
    events = [e for e in received.split(b"\n\n") if e.startswith(b"data: ")]
    try:
        last = json.loads(events[-1][len(b"data: ") :])
    except (IndexError, ValueError):
        return False
    return isinstance(last, dict) and "error" in last and "choices" not in last


def test_upstream_stalling_mid_stream_is_recorded_as_error(impatient_proxy: ThreadedProxy) -> None:
    stall = {"x-fake-chunk-delay-ms": "1500"}
    headers, received, broke = read_stream(
        impatient_proxy.base_url + "/chat/completions", {**GOOD, "stream": True}, stall
    )
    assert received.startswith(b"data: ")  # the first chunk came in time and was passed on
    assert b"[DONE]" not in received
    assert client_can_tell(received, broke)
    assert sdk_stream_fails(impatient_proxy.base_url, stall) is not None
    exchange_id = headers["x-understudy-exchange-id"]
    row = wait_for_ids(impatient_proxy.db, exchange_id)[exchange_id]
    assert (row["status_code"], row["outcome"]) == (200, "error")
    assert "ReadTimeout" in row["error"]["error"]["message"]
    assert row["state_hash"] is None
    assert row["response"]["choices"][0]["message"]["role"] == "assistant"  # what did arrive


def test_upstream_dropping_mid_stream_is_visible_to_the_client(
    fake_upstream: FakeUpstream, shared_proxy: ThreadedProxy
) -> None:
    """Directly, the client sees the connection drop; through the proxy it must see the break too
    (dropped connection or error event), or it takes a truncated answer for a whole one."""
    body = {
        **GOOD,
        "stream": True,
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
    }
    drop = {"x-fake-break-after": "3"}
    _, direct, direct_broke = read_stream(fake_upstream.base_url + "/chat/completions", body, drop)
    assert direct_broke
    headers, received, broke = read_stream(shared_proxy.base_url + "/chat/completions", body, drop)
    assert received.count(b"data: {") >= 3  # what arrived was passed on
    assert client_can_tell(received, broke)
    assert sdk_stream_fails(shared_proxy.base_url, drop) is not None
    exchange_id = headers["x-understudy-exchange-id"]
    row = wait_for_ids(shared_proxy.db, exchange_id)[exchange_id]
    assert row["outcome"] == "error"
    assert row["state_hash"] is None
    (call,) = row["response"]["choices"][0]["message"]["tool_calls"]  # half a tool call
    assert call["function"]["name"] == "lookup"
    assert row["response"]["choices"][0]["finish_reason"] is None


def test_client_going_away_mid_stream_is_recorded_as_cancelled(shared_proxy: ThreadedProxy) -> None:
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            shared_proxy.base_url + "/chat/completions",
            json={**GOOD, "stream": True},
            headers={**AUTH, "x-fake-chunk-delay-ms": "300"},
        ) as response,
    ):
        first = next(response.iter_raw())
        assert first.startswith(b"data: ")
        exchange_id = response.headers["x-understudy-exchange-id"]
    # the proxy notices when it next writes; the record follows
    rows = wait_recorded(shared_proxy.db, lambda rows: any(r["id"] == exchange_id for r in rows))
    (row,) = [r for r in rows if r["id"] == exchange_id]
    assert row["outcome"] == "cancelled"
    assert row["stream"] == 1
    assert row["state_hash"] is None


# -- refused requests leave a trace: /metrics and one log line each ------------------------------


async def test_rejected_requests_are_counted_by_status_and_code_and_logged(
    tmp_path: Path, fake_upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="understudy.requests")
    secret = "sk-proj-" + "z" * 40
    async with in_process_proxy(
        tmp_path, upstream=fake_upstream.base_url, max_body_bytes=1024
    ) as proxy:
        sent = [
            (b"not json " + secret.encode(), "application/json", 400),
            (json.dumps({"model": "m"}).encode(), "application/json", 400),
            (json.dumps({**GOOD, "pad": "x" * 2000}).encode(), "application/json", 413),
            (json.dumps(GOOD).encode(), "text/plain", 415),
        ]
        for body, content_type, status in sent:
            answer = await proxy.client.post(
                "/v1/chat/completions", content=body, headers={"content-type": content_type}
            )
            assert answer.status_code == status, answer.text
        ok = await proxy.client.post("/v1/chat/completions", json=GOOD, headers=AUTH)
        assert ok.status_code == 200
        metrics = (await proxy.client.get("/metrics")).text
    counted = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith("understudy_rejected_requests_total{")
    }
    assert counted == {
        'understudy_rejected_requests_total{code="invalid_json",status="400"}': 1.0,
        'understudy_rejected_requests_total{code="invalid_request",status="400"}': 1.0,
        'understudy_rejected_requests_total{code="request_too_large",status="413"}': 1.0,
        'understudy_rejected_requests_total{code="unsupported_media_type",status="415"}': 1.0,
    }
    lines = [r.getMessage() for r in caplog.records if r.name == "understudy.requests"]
    assert lines == [
        "rejected /v1/chat/completions: 400 invalid_json (param -)",
        "rejected /v1/chat/completions: 400 invalid_request (param messages)",
        "rejected /v1/chat/completions: 413 request_too_large (param -)",
        "rejected /v1/chat/completions: 415 unsupported_media_type (param -)",
    ]
    assert all(r.levelname == "INFO" for r in caplog.records if r.name == "understudy.requests")
    assert secret not in caplog.text
    assert (
        recorded_exchanges(proxy.db) and len(recorded_exchanges(proxy.db)) == 1
    )  # only the ok one
