"""Bad input (issue 6): the proxy answers an OpenAI-shaped 4xx, never a 5xx of its own.

One real proxy process for the module (`--max-body-bytes 1000000`) in front of the fake upstream.
Hand-written cases first: body size limit (413, declared by Content-Length and sent chunked),
content type (415), invalid JSON and UTF-8, JSON in other Unicode encodings, wrong types, deep
nesting (100,000 levels), huge and long messages (forwarded and recorded when under the limit).
Then hypothesis fuzzes the HTTP surface over real HTTP: random JSON, random bytes, invalid UTF-8,
re-encoded and deeply nested bodies, requests with wrong types for every field, random headers
and content types; and random GET paths and query strings on the proxy's own pages.

"A 5xx of the proxy's own" is a 5xx that the upstream did not send: a response without the
`X-Understudy-Exchange-Id` header (an unhandled exception) or the proxy's `upstream_error` body.
The fake upstream itself fails with 500 on some odd bodies; that answer is passed through, which
is correct. After the fuzzing, every exchange the proxy answered must be in the database.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import string
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from proxy.core.packing import unpack_text
from proxy.core.redaction import MAX_PARTS
from proxy.http.body import MAX_NESTING, deeper_than, nesting_depth
from tests.support.bodies import whole_requests
from tests.support.processes import FakeUpstream, ProxyServer, launch_proxy
from tests.support.records import db_rows, recorded_ids

pytestmark = pytest.mark.e2e

LIMIT = 1_000_000
MODEL = "gpt-4.1-mini"
VALID = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded time, first failure shown
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


@pytest.fixture(scope="module")
def proxy(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    """The proxy under test (body limit 1,000,000 bytes), shared by this module."""
    directory = tmp_path_factory.mktemp("bad-input")
    server = launch_proxy(directory, upstream=fake_upstream.base_url, max_body_bytes=LIMIT)
    yield server
    server.stop()
    fake_upstream.clear()  # fuzzed bodies can hold what the fake cannot list again


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as http:
        yield http


def post(
    client: httpx.Client,
    proxy: ProxyServer,
    body: bytes,
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    sent = dict(headers or {})
    if content_type is not None:
        sent["content-type"] = content_type
    return client.post(proxy.base_url + "/chat/completions", content=body, headers=sent)


def is_proxy_5xx(response: httpx.Response) -> bool:
    """A 5xx the proxy produced itself (see the module docstring)."""
    if response.status_code < 500:
        return False
    if "x-understudy-exchange-id" not in response.headers:
        return True
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and error.get("type") == "upstream_error"


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """A 4xx with `{"error": {"message", "type", "param", "code"}}` (and `status` when given)."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict), body
    assert isinstance(error.get("message"), str) and error["message"], body
    assert isinstance(error.get("type"), str), body
    assert "param" in error and "code" in error, body
    return dict(error)


def assert_not_forwarded(fake_upstream: FakeUpstream, marker: str) -> None:
    for entry in fake_upstream.requests():
        assert marker not in json.dumps(entry.get("body")), "refused input reached the upstream"


# -- size, content type, encoding ----------------------------------------------------------------


def test_body_over_the_limit_is_413(
    client: httpx.Client, proxy: ProxyServer, fake_upstream: FakeUpstream
) -> None:
    content = "limit-by-length " + "x" * LIMIT
    body = json.dumps({**VALID, "messages": [{"role": "user", "content": content}]}).encode()
    error = assert_openai_error(post(client, proxy, body), 413)
    assert error["code"] == "request_too_large"
    assert_not_forwarded(fake_upstream, "limit-by-length")


def test_chunked_body_over_the_limit_is_413(proxy: ProxyServer) -> None:
    """Sent with Transfer-Encoding: chunked (no Content-Length): counted while it is read."""
    port = int(proxy.root_url.rsplit(":", 1)[1])
    piece = b"x" * 65536
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        )

        def send_body() -> None:
            try:
                start = b'{"model": "m", "messages": [{"role": "user", "content": "'
                sock.sendall(b"%x\r\n%s\r\n" % (len(start), start))
                for _ in range(2 * LIMIT // len(piece)):
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the proxy answered and closed before the end: expected

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        received = b""
        while b"\r\n\r\n" not in received:
            part = sock.recv(65536)
            assert part, f"connection closed without an answer: {received!r}"
            received += part
        head, _, body = received.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            part = sock.recv(65536)
            assert part, "connection closed mid-answer"
            body += part
        sender.join(timeout=30)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body[:length])["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/xml",
        "image/png",
    ],
)
def test_wrong_content_type_is_415(
    client: httpx.Client, proxy: ProxyServer, content_type: str
) -> None:
    response = post(client, proxy, json.dumps(VALID).encode(), content_type)
    assert assert_openai_error(response, 415)["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"model": "m", "messages": [}',
        b'{"model": "m"} trailing',
        b"\x00\x01\x02",
        b"nul\x00l",
        b'{"model": "m", "messages": [{"role": "user", "content": "\\x41"}]}',
    ],
    ids=["empty", "open-brace", "broken-array", "trailing", "binary", "nul", "bad-escape"],
)
def test_invalid_json_is_400(client: httpx.Client, proxy: ProxyServer, body: bytes) -> None:
    assert_openai_error(post(client, proxy, body), 400)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "m", "messages": [{"role": "user", "content": "caf\xe9"}]}',  # Latin-1
        b'{"model": "m", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # CESU
        b'{"model": "m", "messages": [{"role": "user", "content": "\xc3"}]}',  # truncated
    ],
    ids=["ff-fe", "latin-1", "encoded-surrogate", "truncated-sequence"],
)
def test_invalid_utf8_is_400(client: httpx.Client, proxy: ProxyServer, body: bytes) -> None:
    assert_openai_error(post(client, proxy, body), 400)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_json_in_another_unicode_encoding_is_400_not_500(
    client: httpx.Client, proxy: ProxyServer, encoding: str
) -> None:
    """Python's json.loads(bytes) accepts UTF-16/32; the proxy must not then fail decoding the
    same bytes as UTF-8 for the record."""
    response = post(client, proxy, json.dumps(VALID).encode(encoding))
    assert not is_proxy_5xx(response), f"proxy answered {response.status_code}: {response.text}"
    assert_openai_error(response, 400)


def test_utf8_bom_is_accepted(client: httpx.Client, proxy: ProxyServer) -> None:
    response = post(client, proxy, json.dumps(VALID).encode("utf-8-sig"))
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert_openai_error(response)


# -- types and shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ("a string", None),
        (None, None),
        (42, None),
        ({"messages": VALID["messages"]}, "model"),
        ({"model": 5, "messages": VALID["messages"]}, "model"),
        ({"model": ["gpt"], "messages": VALID["messages"]}, "model"),
        ({"model": "", "messages": VALID["messages"]}, "model"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": "hello"}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": {"role": "user"}}, "messages"),
        ({"model": MODEL, "messages": [1, 2]}, "messages[0]"),
        ({"model": MODEL, "messages": [{"content": "no role"}]}, "messages[0]"),
        ({"model": MODEL, "messages": [{"role": 7, "content": "x"}]}, "messages[0]"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}, None]}, "messages[1]"),
    ],
)
def test_wrong_types_are_400(
    client: httpx.Client, proxy: ProxyServer, body: Any, param: str | None
) -> None:
    error = assert_openai_error(post(client, proxy, json.dumps(body).encode()), 400)
    assert error["param"] == param


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream", "yes"),
        ("stream", 1),
        ("stream", {"on": True}),
        ("tools", "get_weather"),
        ("tools", [1, 2]),
        ("tools", {"type": "function"}),
    ],
)
def test_wrong_types_for_stream_and_tools_are_400_before_forwarding(
    client: httpx.Client,
    proxy: ProxyServer,
    fake_upstream: FakeUpstream,
    field: str,
    value: Any,
) -> None:
    """OpenAI answers 400 for these. The proxy itself acts on both fields (`stream` decides how
    the answer is relayed and recorded, `tools` drives routing rules and tool-call promotion), so
    it must refuse them itself rather than trust whatever a lenient upstream does."""
    marker = f"wrong type {field} {value!r}"
    body = {**VALID, "messages": [{"role": "user", "content": marker}], field: value}
    response = post(client, proxy, json.dumps(body).encode())
    error = assert_openai_error(response, 400)
    assert error["param"] == field
    assert_not_forwarded(fake_upstream, marker)


def test_lone_surrogate_in_a_message_is_handled_and_shown(
    client: httpx.Client, proxy: ProxyServer, fake_upstream: FakeUpstream
) -> None:
    """`\\ud83d` is valid JSON (JavaScript's JSON.stringify writes it for a string cut inside an
    emoji). Whatever the proxy decides, it is not a 5xx, a 400 does not name a header the client
    never sent, and once stored, the pages that list captured traffic still render."""
    body = b'{"model": "m", "messages": [{"role": "user", "content": "cut emoji \\ud83d"}]}'
    response = post(client, proxy, body)
    fake_upstream.clear()  # the fake cannot always list a request holding a lone surrogate
    assert not is_proxy_5xx(response), response.text
    if response.status_code == 400:
        error = assert_openai_error(response)
        assert error["param"] != "x-understudy-route", error
        return
    wait_recorded(proxy, {response.headers["x-understudy-exchange-id"]})
    trajectory = response.headers["x-understudy-trajectory-id"]
    for path in ("/api/trajectories", f"/api/trajectories/{trajectory}", "/dashboard"):
        page = client.get(proxy.root_url + path)
        assert page.status_code < 500, f"GET {path} -> {page.status_code}: {page.text[:200]}"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize("where", ["body", "content", "metadata", "tool-arguments"])
def test_deeply_nested_json_is_400(
    client: httpx.Client, proxy: ProxyServer, depth: int, where: str
) -> None:
    deep = nested(depth)
    if where == "body":
        text = deep
    elif where == "content":
        text = f'{{"model": "m", "messages": [{{"role": "user", "content": {deep}}}]}}'
    elif where == "metadata":
        text = f'{{"model": "m", "messages": [{{"role": "user", "content": "x"}}], "metadata": {deep}}}'
    else:
        text = (
            '{"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", '
            f'"tool_calls": [{{"id": "c", "type": "function", "function": {deep}}}]}}]}}'
        )
    response = post(client, proxy, text.encode())
    assert not is_proxy_5xx(response), response.text[:300]
    assert_openai_error(response, 400)


def test_nesting_up_to_the_limit_is_forwarded_and_recorded_deeper_is_refused(
    client: httpx.Client, proxy: ProxyServer
) -> None:
    """Nesting up to MAX_NESTING (128) goes through and is recorded; deeper nesting, which no
    chat request needs and which readers of stored JSON could not re-encode, is a 400."""

    def body(depth: int) -> bytes:
        inner = nested(depth)
        return f'{{"model": "m", "messages": [{{"role": "user", "content": "nest", "x": {inner}}}]}}'.encode()

    response = post(client, proxy, body(100))
    assert response.status_code == 200, response.text[:300]
    wait_recorded(proxy, {response.headers["x-understudy-exchange-id"]})
    refused = post(client, proxy, body(500))
    assert_openai_error(refused, 400)
    assert "nested" in refused.json()["error"]["message"]


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.text(alphabet='[]{}"\\ab', max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    st.dictionaries(st.sampled_from(["messages", "tools", "x", "model"]), JSON_VALUES),
    st.integers(0, 9),
)
def test_the_cheap_nesting_check_agrees_with_the_walk(document: dict[str, Any], limit: int) -> None:
    """Property: `deeper_than` (brackets counted per part, a part walked only when they could
    go past the limit) is `nesting_depth(...) > limit`, brackets and escapes in strings included."""
    assert deeper_than(document, limit) == (nesting_depth(document) > limit)


def test_a_long_conversation_is_not_walked_for_its_nesting_but_a_deep_message_in_it_is() -> None:
    """Hundreds of shallow messages (more brackets in all than the limit) pass; one message
    nested past the limit among them is found."""
    messages: list[Any] = [{"role": "user", "content": "[{" * 20, "parts": [[{"a": [1]}]]}] * 300
    body = {"model": "m", "messages": messages}
    assert not deeper_than(body, MAX_NESTING)
    deep: Any = "bottom"
    for _ in range(MAX_NESTING):
        deep = [deep]
    body["messages"] = [*messages, {"role": "user", "content": deep}]
    assert deeper_than(body, MAX_NESTING) and nesting_depth(body) == MAX_NESTING + 3
    many = [{}] * MAX_PARTS  # past MAX_PARTS elements an array is walked whole
    assert not deeper_than({"model": "m", "x": many}, MAX_NESTING)
    assert deeper_than({"model": "m", "x": [*many, deep]}, MAX_NESTING)


def test_accepted_nesting_does_not_break_the_pages_that_show_it(
    client: httpx.Client, proxy: ProxyServer
) -> None:
    """Whatever depth the request path accepts is stored; every reader of stored JSON (the
    dashboard list and the admin API here) must then cope with it: captured traffic is untrusted
    input everywhere it is shown. The deepest accepted nesting is found by trying, in a message
    (hashed for stitching) and in an extra top-level field (only stored)."""
    stored = []
    for where in ("content", "extra"):
        for depth in (975, 960, 900, 700, 480, 300, 120):
            deep = nested(depth)
            if where == "content":
                text = f'{{"model": "m", "messages": [{{"role": "user", "content": {deep}}}]}}'
            else:
                text = f'{{"model": "m", "messages": [{{"role": "user", "content": "d"}}], "x": {deep}}}'
            response = post(client, proxy, text.encode())
            if response.status_code == 200:
                stored.append(response.headers["x-understudy-exchange-id"])
                trajectory = response.headers["x-understudy-trajectory-id"]
                break
            assert_openai_error(response, 400)
    assert stored, "nothing nested was accepted"
    wait_recorded(proxy, set(stored))
    for path in ("/api/trajectories", f"/api/trajectories/{trajectory}", "/dashboard"):
        page = client.get(proxy.root_url + path)
        assert page.status_code < 500, f"GET {path} -> {page.status_code}: {page.text[:200]}"


def wait_recorded(proxy: ProxyServer, ids: set[str], timeout_s: float = 30.0) -> None:
    """Wait until every exchange id in `ids` is in the proxy's database."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            stored = set(recorded_ids(proxy.db))
        except sqlite3.OperationalError:  # busy for a moment (a checkpoint): read again
            stored = set()
        if ids <= stored:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(ids - stored)} answered exchanges were never recorded")
        time.sleep(0.1)


def test_huge_message_under_the_limit_is_forwarded_and_recorded(
    client: httpx.Client, proxy: ProxyServer
) -> None:
    content = "huge " + "lorem ipsum " * ((LIMIT - 2000) // 12)
    body = json.dumps({**VALID, "messages": [{"role": "user", "content": content}]}).encode()
    assert len(body) < LIMIT
    response = post(client, proxy, body)
    assert response.status_code == 200, response.text[:300]
    exchange_id = response.headers["x-understudy-exchange-id"]
    wait_recorded(proxy, {exchange_id})
    stored = db_rows(proxy.db, "SELECT * FROM exchanges WHERE id = ?", (exchange_id,))
    # Stored in content-addressed parts (migration 003): rebuilt JSON-equal, not byte-equal.
    assert json.loads(whole_requests(proxy.db, stored)[0]["request_json"]) == json.loads(body)


def test_thousands_of_messages_are_forwarded_and_recorded(
    client: httpx.Client, proxy: ProxyServer
) -> None:
    """A long conversation: every assistant message is a candidate state for stitching."""
    messages: list[dict[str, Any]] = []
    for i in range(4000):
        messages += [
            {"role": "user", "content": f"q{i}"},
            {"role": "assistant", "content": f"a{i}"},
        ]
    messages.append({"role": "user", "content": "last"})
    response = post(client, proxy, json.dumps({**VALID, "messages": messages}).encode())
    assert response.status_code == 200, response.text[:300]
    wait_recorded(proxy, {response.headers["x-understudy-exchange-id"]})


# -- the fuzzer ----------------------------------------------------------------------------------

HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60
).map(str.strip)
JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=16,
)
ROLE = st.sampled_from(["user", "system", "developer", "assistant", "tool", "function"]) | (
    st.text(max_size=12)
)
TOOL_CALL = st.fixed_dictionaries(
    {"id": st.text(max_size=12) | JSON_VALUE, "type": st.just("function") | JSON_VALUE},
    optional={
        "function": st.fixed_dictionaries(
            {
                "name": st.text(max_size=12) | JSON_VALUE,
                "arguments": st.text(max_size=40) | JSON_VALUE,
            }
        )
        | JSON_VALUE
    },
)
MESSAGE = st.fixed_dictionaries(
    {"role": ROLE},
    optional={
        "content": st.text(max_size=200) | JSON_VALUE,
        "tool_calls": st.lists(TOOL_CALL, max_size=3) | JSON_VALUE,
        "tool_call_id": st.text(max_size=12) | JSON_VALUE,
        "name": JSON_VALUE,
        "refusal": JSON_VALUE,
    },
)
TOOL = st.fixed_dictionaries(
    {
        "type": st.just("function") | JSON_VALUE,
        "function": st.fixed_dictionaries({"name": st.text(max_size=12), "parameters": JSON_VALUE})
        | JSON_VALUE,
    }
)
REQUEST = st.fixed_dictionaries(
    {
        "model": st.just(MODEL) | st.text(max_size=20) | JSON_VALUE,
        "messages": st.lists(MESSAGE, min_size=1, max_size=5) | JSON_VALUE,
    },
    optional={
        "stream": st.booleans() | JSON_VALUE,
        "tools": st.lists(TOOL, max_size=3) | JSON_VALUE,
        "tool_choice": st.sampled_from(["auto", "none", "required"]) | JSON_VALUE,
        "metadata": st.dictionaries(st.text(max_size=12), st.text(max_size=20)) | JSON_VALUE,
        "user": st.text(max_size=20) | JSON_VALUE,
        "temperature": JSON_VALUE,
        "logit_bias": st.dictionaries(st.text(max_size=6), st.integers(-100, 100)) | JSON_VALUE,
        "parallel_tool_calls": st.booleans() | JSON_VALUE,
        "n": JSON_VALUE,
    },
)
VALID_REQUEST = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=80)}
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional={"stream": st.booleans()},
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """A request body: random JSON, random bytes, a (mostly) valid request mutated, re-encoded,
    deeply nested or huge."""
    kind = draw(
        st.sampled_from(["request", "json", "bytes", "mutated", "encoded", "nested", "huge"])
    )
    if kind == "request":
        return json.dumps(draw(REQUEST), ensure_ascii=draw(st.booleans())).encode()
    if kind == "json":
        return json.dumps(draw(JSON_VALUE)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=600))
    valid: dict[str, Any] = draw(VALID_REQUEST)
    if kind == "mutated":
        raw = bytearray(json.dumps(valid, ensure_ascii=False).encode())
        for _ in range(draw(st.integers(1, 3))):
            position = draw(st.integers(0, len(raw)))
            junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\\", b'"']))
            raw[position:position] = junk
        return bytes(raw)
    if kind == "encoded":
        encoding = draw(
            st.sampled_from(["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
        )
        return json.dumps(valid).encode(encoding)
    if kind == "nested":
        depth = draw(st.sampled_from([10, 200, 900, 1_000, 5_000, 100_000]))
        valid["messages"][0]["content"] = "<deep>"
        return json.dumps(valid).replace('"<deep>"', nested(depth)).encode()
    size = draw(st.sampled_from([LIMIT // 2, LIMIT + 1, 3 * LIMIT]))
    valid["messages"][0]["content"] = "h" * size
    return json.dumps(valid).encode()


CONTENT_TYPES = (
    st.sampled_from(
        [
            None,
            "application/json",
            "application/json; charset=utf-8",
            "application/vnd.openai+json",
            "",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=xyz",
            "*/*",
        ]
    )
    | HEADER_TEXT
)
HEADER_NAMES = st.sampled_from(
    [
        "x-understudy-trajectory-id",
        "x-understudy-route",
        "x-understudy-note",
        "authorization",
        "api-key",
        "accept",
        "accept-encoding",
        "openai-organization",
        "openai-beta",
        "x-stainless-retry-count",
        "user-agent",
        "idempotency-key",
    ]
) | st.text(alphabet=string.ascii_lowercase + "-", min_size=1, max_size=20).filter(
    lambda name: (
        name
        not in (
            "content-length",
            "transfer-encoding",
            "host",
            "connection",
            "content-type",
            "expect",
        )
        and not name.startswith("x-fake")
    )
)
HEADERS = st.dictionaries(HEADER_NAMES, HEADER_TEXT, max_size=4)


@pytest.fixture(scope="module")
def answered() -> set[str]:
    """Exchange ids the proxy answered during the fuzzing (all must be recorded)."""
    return set()


@FUZZ
@given(body=bodies(), content_type=CONTENT_TYPES, headers=HEADERS)
def test_fuzz_chat_completions(
    client: httpx.Client,
    proxy: ProxyServer,
    answered: set[str],
    body: bytes,
    content_type: str | None,
    headers: dict[str, str],
) -> None:
    response = post(client, proxy, body, content_type, headers)
    assert not is_proxy_5xx(response), (
        f"the proxy answered {response.status_code} itself: {response.text[:300]}"
    )
    if 400 <= response.status_code < 500:
        assert_openai_error(response)
    if "x-understudy-exchange-id" in response.headers:
        answered.add(response.headers["x-understudy-exchange-id"])


def test_fuzzed_exchanges_were_all_recorded(
    client: httpx.Client, proxy: ProxyServer, answered: set[str]
) -> None:
    """After the fuzzing (runs after it, same module): the recorder still runs and every answered
    exchange reached the database."""
    ready = client.get(proxy.root_url + "/ready")
    assert ready.status_code == 200, ready.text
    wait_recorded(proxy, answered)
    stats = client.get(proxy.root_url + "/health").json()["recorder"]
    assert stats.get("lost", 0) == 0 and stats.get("failed_batches", 0) == 0, stats


QUERY = st.dictionaries(
    st.sampled_from(
        [
            "page",
            "limit",
            "offset",
            "q",
            "route",
            "outcome",
            "label",
            "sort",
            "order",
            "since",
            "until",
            "format",
            "model",
            "tools",
            "min_steps",
            "trajectory",
            "id",
            "errors",
        ]
    )
    | st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8),
    st.text(max_size=30) | st.integers(-(2**64), 2**64).map(str),
    max_size=4,
)
PATHS = st.sampled_from(
    [
        "/health",
        "/ready",
        "/metrics",
        "/dashboard",
        "/dashboard/",
        "/dashboard/charts",
        "/dashboard/export",
        "/dashboard/login",
        "/dashboard/trajectories/{}",
        "/api/trajectories",
        "/api/trajectories/{}",
        "/api/charts",
        "/api/stats",
        "/api/export",
        "/api/{}",
        "/v1/models",
        "/v1/{}",
        "/{}",
    ]
)


@FUZZ
@given(
    path=PATHS,
    segment=st.text(alphabet=string.ascii_letters + string.digits + "-_.~%", max_size=40),
    query=QUERY,
)
def test_fuzz_get_paths(
    client: httpx.Client, proxy: ProxyServer, path: str, segment: str, query: dict[str, str]
) -> None:
    """GET on the proxy's own pages and API with random ids and query strings: never a 5xx."""
    url = proxy.root_url + path.replace("{}", segment)
    response = client.get(url, params=query)
    assert response.status_code < 500, (
        f"GET {response.url} -> {response.status_code}: {response.text[:300]}"
    )


# -- issue 11: NaN, non-string trajectory ids, a client gone mid-body -----------------------------


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_with_400(
    client: httpx.Client, proxy: ProxyServer, fake_upstream: FakeUpstream, constant: str
) -> None:
    marker = f"nan-{constant}"
    body = (
        f'{{"model": "{MODEL}", "temperature": {constant}, '
        f'"messages": [{{"role": "user", "content": "{marker}"}}]}}'
    ).encode()
    error = assert_openai_error(post(client, proxy, body), 400)
    assert error["code"] == "invalid_json" and constant.lstrip("-") in error["message"]
    assert_not_forwarded(fake_upstream, marker)


def test_a_stored_nan_does_not_break_the_trajectory_api(
    client: httpx.Client, proxy: ProxyServer
) -> None:
    """Rows an older version stored with NaN are read back as null, not a 500."""
    body = {**VALID, "temperature": 0.25, "messages": [{"role": "user", "content": "nan row"}]}
    response = post(client, proxy, json.dumps(body).encode())
    assert response.status_code == 200
    exchange_id = response.headers["x-understudy-exchange-id"]
    trajectory_id = response.headers["x-understudy-trajectory-id"]
    wait_recorded(proxy, {exchange_id})
    with sqlite3.connect(proxy.db, timeout=30) as conn:
        (stored,) = conn.execute(
            "SELECT request_json FROM exchanges WHERE id = ?", (exchange_id,)
        ).fetchone()
        conn.execute(  # written back as plain text: a row from before packing (008) too
            "UPDATE exchanges SET request_json = ? WHERE id = ?",
            ((unpack_text(stored) or "").replace("0.25", "NaN"), exchange_id),
        )
    answer = client.get(f"{proxy.root_url}/api/trajectories/{trajectory_id}")
    assert answer.status_code == 200, answer.text[:300]
    (exchange,) = answer.json()["exchanges"]
    assert exchange["request"]["temperature"] is None


@pytest.mark.parametrize("value", [{"a": 1}, ["x"], 7, True])
def test_a_trajectory_id_that_is_not_a_string_is_refused(
    client: httpx.Client, proxy: ProxyServer, value: Any
) -> None:
    body = {**VALID, "metadata": {"trajectory_id": value}}
    error = assert_openai_error(post(client, proxy, json.dumps(body).encode()), 400)
    assert error["param"] == "metadata.trajectory_id"


def test_a_client_gone_while_sending_its_body_logs_one_line(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = launch_proxy(tmp_path_factory.mktemp("gone"), upstream=fake_upstream.base_url)
    try:
        port = int(server.root_url.rsplit(":", 1)[1])
        for path in ("/v1/chat/completions", "/v1/files"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(
                    f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    'content-length: 100000\r\n\r\n{"model": '.encode()
                )
                time.sleep(0.3)  # the proxy is reading the body when the client goes away
        # The proxy still serves, and nothing was recorded for the half-sent requests.
        assert httpx.get(server.root_url + "/health", timeout=10).status_code == 200
    finally:
        output = server.stop()
    assert "Traceback" not in output, output
    # The recorded path says so in one line (the pass-through's upstream call just ends).
    assert output.count("client went away while sending its request body") >= 1, output
