"""Security holes of issue 11, each driven the way an attacker would: the path escape through the
pass-through (raw request lines over a socket, so no client library normalises them first),
every spelling of a recorded path, and the pure path rules behind both.

The upstream here is an in-process server mounted under a base path (`/openai/v1`) that answers
every path and keeps what it received, so a request that escaped the base would show up in it
with the proxy's key attached.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.config import Settings
from proxy.dashboard.security import FailedAttempts
from proxy.http.paths import PathRefused, normalize, recorded_api, upstream_path
from proxy.testing.servers import serve_in_thread
from tests.support.inprocess import running_app
from tests.support.processes import FakeUpstream, ProxyServer, launch_proxy
from tests.support.records import wait_for_ids
from tests.support.scripted import SCRIPTED_COMPLETION

PROXY_KEY = "sk-proxy-" + "k" * 40


def catch_all(received: list[dict[str, Any]]) -> Starlette:
    async def handler(request: Request) -> Response:
        received.append(
            {
                "method": request.method,
                "raw_path": request.scope.get("raw_path", b"").decode("latin-1"),
                "authorization": request.headers.get("authorization"),
            }
        )
        return Response(json.dumps(SCRIPTED_COMPLETION), media_type="application/json")

    methods = ["GET", "POST", "PUT", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", handler, methods=methods)])


@pytest.fixture(scope="module")
def based_upstream() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    with serve_in_thread(catch_all(received)) as root:
        yield root + "/openai/v1", received


@pytest.fixture(scope="module")
def keyed_proxy(
    tmp_path_factory: pytest.TempPathFactory, based_upstream: tuple[str, list[dict[str, Any]]]
) -> Iterator[ProxyServer]:
    server = launch_proxy(
        tmp_path_factory.mktemp("security"),
        upstream=based_upstream[0],
        upstream_api_key=PROXY_KEY,
    )
    yield server
    server.stop()


def raw_request(
    proxy: ProxyServer, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send `path` exactly as written (http.client does not normalise it)."""
    port = int(proxy.root_url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"content-type": "application/json"} if body is not None else {}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


ESCAPES = [
    "/v1/../../internal/admin",
    "/v1/%2e%2e/%2e%2e/internal/admin",
    "/v1/%2E%2E/%2E%2E/internal/admin",
    "/v1/..%2f..%2finternal%2fadmin",
    "/v1/..%5c..%5cinternal%5cadmin",
    "/v1/models/../../../internal/admin",
    "/v1/%252e%252e/%252e%252e/internal/admin",
    "/v1/./../internal/admin",
]


@pytest.mark.e2e
@pytest.mark.parametrize("path", ESCAPES)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_passthrough_never_leaves_the_upstream_base_path(
    keyed_proxy: ProxyServer,
    based_upstream: tuple[str, list[dict[str, Any]]],
    path: str,
    method: str,
) -> None:
    _, received = based_upstream
    before = len(received)
    status, _, data = raw_request(keyed_proxy, method, path, b"{}" if method == "POST" else None)
    assert status == 400, data
    assert json.loads(data)["error"]["code"] == "invalid_path"
    assert received[before:] == []  # nothing reached the upstream, with or without the key


@pytest.mark.e2e
def test_passthrough_under_the_base_path_keeps_working_and_carries_the_key(
    keyed_proxy: ProxyServer, based_upstream: tuple[str, list[dict[str, Any]]]
) -> None:
    _, received = based_upstream
    before = len(received)
    for path in ("/v1/models", "/v1/files/file-1/../file-2/content", "/v1/files/a%20b?x=1"):
        status, _, _ = raw_request(keyed_proxy, "GET", path)
        assert status == 200
    got = received[before:]
    assert [r["raw_path"] for r in got] == [
        "/openai/v1/models",
        "/openai/v1/files/file-2/content",
        "/openai/v1/files/a%20b",
    ]
    assert {r["authorization"] for r in got} == {f"Bearer {PROXY_KEY}"}


SPELLINGS = [
    "/v1/chat/completions/",
    "/v1//chat/completions",
    "/v1/chat//completions",
    "/v1/./chat/completions",
    "/chat/completions",
    "/chat/completions/",
]


@pytest.mark.e2e
@pytest.mark.parametrize("path", SPELLINGS)
def test_every_spelling_of_the_chat_path_is_recorded(
    keyed_proxy: ProxyServer, based_upstream: tuple[str, list[dict[str, Any]]], path: str
) -> None:
    _, received = based_upstream
    before = len(received)
    body = {"model": "m", "messages": [{"role": "user", "content": f"spelled {path}"}]}
    status, headers, data = raw_request(keyed_proxy, "POST", path, json.dumps(body).encode())
    assert status == 200, data
    exchange_id = headers["x-understudy-exchange-id"]  # set only by the recording handler
    assert [r["raw_path"] for r in received[before:]] == ["/openai/v1/chat/completions"]
    row = wait_for_ids(Path(keyed_proxy.db), exchange_id)[exchange_id]
    assert json.loads(row["request_json"])["messages"][0]["content"] == f"spelled {path}"


# -- the pure rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ESCAPES + ["/v1/%00/x", "/v1/a%0d%0ab", "/v1/%ff"])
def test_upstream_path_refuses_escapes_and_ambiguous_segments(path: str) -> None:
    with pytest.raises(PathRefused):
        upstream_path(path)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/models", "/models"),
        ("/v1//models/", "/models/"),
        ("/v1/a/./b/../c", "/a/c"),
        ("/v1/files/a%20b", "/files/a%20b"),
        ("/v1/caf%C3%A9", "/caf%C3%A9"),
        ("/v1", "/"),
    ],
)
def test_upstream_path_normalises(path: str, expected: str) -> None:
    assert upstream_path(path) == expected


def test_paths_outside_v1_are_not_passed_through() -> None:
    for path in ("/v1/../models", "/internal/admin", "/"):
        with pytest.raises(PathRefused):
            upstream_path(path)


def test_recorded_api_names_only_the_recorded_paths() -> None:
    for path in SPELLINGS + ["/v1/chat/completions"]:
        assert recorded_api(path) == "chat", path
    for path in (
        "/v1/chat/completions/abc",
        "/v1/chat",
        "/v1/completions",
        "/v1/../chat/completions/x",
        "/v1/chat%2fcompletions",
    ):
        assert recorded_api(path) is None, path
    assert normalize("/a/b/") == ["a", "b", ""]


# -- the admin API's failed-token limit ---------------------------------------------------------


def test_failed_attempts_slide_out_of_the_window() -> None:
    attempts = FailedAttempts(limit=3, window_s=60)
    for second in (0, 1, 2):
        assert attempts.retry_after("10.0.0.1", now=second) == 0
        attempts.failed("10.0.0.1", now=second)
    assert attempts.retry_after("10.0.0.1", now=2) == 58
    assert attempts.retry_after("10.0.0.2", now=2) == 0  # per address
    assert attempts.retry_after("10.0.0.1", now=60.5) == 0  # the first failure slid out
    attempts.failed("10.0.0.1", now=61)  # failures at 1 and 2 slid out too: 2, 61
    assert attempts.retry_after("10.0.0.1", now=61) == 0
    attempts.failed("10.0.0.1", now=61.5)  # 2, 61, 61.5: locked until 2 + 60
    assert attempts.retry_after("10.0.0.1", now=61.5) == 1
    attempts.succeeded("10.0.0.1")
    assert attempts.retry_after("10.0.0.1", now=61) == 0


def test_failed_attempts_track_a_bounded_number_of_addresses() -> None:
    attempts = FailedAttempts(limit=1, window_s=60, max_addresses=100)
    for n in range(1_000):
        attempts.failed(f"10.0.{n // 256}.{n % 256}", now=0)
    assert len(attempts._failures) == 100
    assert attempts.retry_after("10.0.3.231", now=1) > 0  # the latest are kept


async def test_admin_api_refuses_an_address_after_too_many_wrong_tokens(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    settings = Settings(
        upstream=fake_upstream.base_url,
        db=str(tmp_path / "admin.db"),
        admin_token="right-token-" + "x" * 20,
        admin_max_failures=5,
        admin_failure_window_s=600,
    )
    async with (
        running_app(settings) as client,
        client("192.0.2.7") as attacker,
        client("192.0.2.8") as admin,
    ):
        wrong = {"authorization": "Bearer wrong"}
        for _ in range(5):
            answer = await attacker.get("/api/trajectories", headers=wrong)
            assert answer.status_code == 401
        answer = await attacker.get("/api/trajectories", headers=wrong)
        assert answer.status_code == 429
        assert answer.json()["error"]["code"] == "too_many_attempts"
        assert 0 < int(answer.headers["retry-after"]) <= 600
        # Even the right token is refused from that address while it is locked out...
        right = {"authorization": f"Bearer {settings.admin_token.get_secret_value()}"}
        answer = await attacker.get("/api/trajectories", headers=right)
        assert answer.status_code == 429
        # ...and another address is served as usual.
        assert (await admin.get("/api/trajectories", headers=right)).status_code == 200
        assert (await admin.get("/api/trajectories", headers=wrong)).status_code == 401


# -- header and body limits, slow clients, bodies in flight -------------------------------------


@pytest.fixture(scope="module")
def limited_proxy(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream
) -> Iterator[ProxyServer]:
    server = launch_proxy(
        tmp_path_factory.mktemp("limits"),
        upstream=fake_upstream.base_url,
        max_header_count=30,
        max_header_bytes=16384,
        header_timeout_s=1,
        body_timeout_s=2,
        max_inflight_body_bytes=1_000_000,
    )
    yield server
    server.stop()


def connect(proxy: ProxyServer) -> socket.socket:
    port = int(proxy.root_url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=20)


def read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (or 20 s pass)."""
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def request_head(extra: str = "", length: int = 0) -> bytes:
    return (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {length}\r\n{extra}\r\n"
    ).encode()


def assert_serving(proxy: ProxyServer) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "still here"}]}
    response = httpx.post(proxy.base_url + "/chat/completions", json=body, timeout=30)
    assert response.status_code == 200


@pytest.mark.e2e
def test_too_many_headers_is_431(limited_proxy: ProxyServer) -> None:
    extra = "".join(f"x-h{n}: v\r\n" for n in range(2000))
    with connect(limited_proxy) as sock:
        sock.sendall(request_head(extra))
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert answer.count(b"HTTP/1.1") == 1  # one answer, then the connection is closed
    assert_serving(limited_proxy)


@pytest.mark.e2e
def test_a_huge_header_is_431_before_it_is_all_read(limited_proxy: ProxyServer) -> None:
    with connect(limited_proxy) as sock:
        sock.sendall(request_head(f"x-big: {'a' * 1_000_000}\r\n"[:20_000]))
        answer = read_all(sock)  # refused at 16 KiB, without waiting for a megabyte
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert_serving(limited_proxy)


@pytest.mark.e2e
def test_slow_headers_are_cut_off(limited_proxy: ProxyServer) -> None:
    """Slowloris: a header line now and then, never the end of the headers."""
    with connect(limited_proxy) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        started = time.monotonic()
        answer = b""
        with contextlib.suppress(OSError):
            for n in range(40):  # would take 20 s
                sock.sendall(f"x-slow-{n}: 1\r\n".encode())
                time.sleep(0.5)
        answer = read_all(sock)
        took = time.monotonic() - started
    assert took < 15, f"the connection was held {took:.1f} s"
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


@pytest.mark.e2e
def test_a_stalled_body_is_cut_off(limited_proxy: ProxyServer) -> None:
    with connect(limited_proxy) as sock:
        sock.sendall(request_head(length=1000) + b'{"model": ')
        started = time.monotonic()
        read_all(sock)  # the server closes the connection
        took = time.monotonic() - started
    assert took < 15, f"a stalled body held the connection {took:.1f} s"
    assert_serving(limited_proxy)


@pytest.mark.e2e
def test_request_bodies_in_flight_are_capped_with_503(limited_proxy: ProxyServer) -> None:
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "z" * 300_000}]}
    ).encode()
    with connect(limited_proxy) as holder:
        # One request holds 900,000 of the 1,000,000 bytes: it sends its body slowly.
        holder.sendall(request_head(length=900_000) + b'{"model": "m", ')
        deadline = time.monotonic() + 20
        refused = None
        while refused is None and time.monotonic() < deadline:
            holder.sendall(b" ")  # keeps it alive within the body timeout
            response = httpx.post(
                limited_proxy.base_url + "/chat/completions",
                content=body,
                headers={"content-type": "application/json"},
                timeout=30,
            )
            if response.status_code == 503:
                refused = response
            time.sleep(0.2)
    assert refused is not None, "a request over the in-flight budget was admitted"
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "too_many_request_bytes"
    # With the holder gone, the same request is served.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        response = httpx.post(
            limited_proxy.base_url + "/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        if response.status_code == 200:
            break
        time.sleep(0.2)
    assert response.status_code == 200
