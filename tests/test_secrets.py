"""Secrets and privacy (issue 6): no API key and no key-shaped string ever reaches the disk.

Real proxy processes, real files: after the traffic, every file the proxy wrote (the SQLite file,
its `-wal` and `-shm`, the journal) is read as raw bytes and searched for each secret and for
its distinctive tail (a partial mask would leave one). Keys are sent the ways apps send them:
`Authorization: Bearer`, Azure's `api-key`, Anthropic's `x-api-key`, and inside bodies (messages,
`metadata`, `user`, an `X-Understudy-*` header that is stored) as OpenAI/Anthropic `sk-` keys,
`Bearer` tokens, AWS `AKIA` ids and GitHub `ghp_` tokens. The fake upstream echoes the user's
text in its answer and its tool-call arguments, so secrets travel in responses too.

The journal is exercised with `--record-queue-size 1 --flush-interval-ms 10000`: the queue is
full at once and records spill straight to the journal; the proxy is then killed (SIGKILL) so the
journal stays on disk to be searched, and a second proxy replays it into the database.

PII (`--redact-pii email,phone,card`): e-mail addresses, phone numbers and card numbers are
masked in the stored request and response JSON, which stays valid JSON, while the client still
gets the real answer.
"""

from __future__ import annotations

import json
import secrets
import signal
import sqlite3
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.core.sse import StreamAssembler
from tests.conftest import FakeUpstream, ProxyServer, db_rows, launch_proxy
from tests.storage_helpers import whole_requests

pytestmark = pytest.mark.e2e

MODEL = "gpt-4.1-mini"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look something up.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


def token(length: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


# Fresh per run, so a hit on disk can only come from this run.
OPENAI_KEY = "sk-proj-" + token(48)
ANTHROPIC_KEY = "sk-ant-api03-" + token(40)
AZURE_KEY = token(32, "0123456789abcdef")
BEARER = token(40)
AWS_ID = "AKIA" + token(16, string.ascii_uppercase + string.digits)
GITHUB = "ghp_" + token(36)
BODY_SECRETS = {
    "openai": OPENAI_KEY,
    "anthropic": ANTHROPIC_KEY,
    "bearer": "Bearer " + BEARER,
    "aws": AWS_ID,
    "github": GITHUB,
}
HEADERS = {
    "authorization": f"Bearer {OPENAI_KEY}",
    "api-key": AZURE_KEY,
    "x-api-key": ANTHROPIC_KEY,
}


def needles() -> dict[str, bytes]:
    """Byte strings that must not be on disk: each secret and the last 16 characters of each."""
    out = {}
    for name, value in [*BODY_SECRETS.items(), ("azure", AZURE_KEY), ("bearer-token", BEARER)]:
        out[name] = value.encode()
        out[name + "-tail"] = value[-16:].encode()
    return out


def files_on_disk(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (database, -wal, -shm, journal, ...) by name."""
    return {p.name: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_nothing_on_disk(directory: Path, wanted: dict[str, bytes]) -> None:
    hits = [
        f"{name} in {file}"
        for file, data in files_on_disk(directory).items()
        for name, needle in wanted.items()
        if needle in data
    ]
    assert not hits, f"secrets found on disk: {hits}"


def call(
    proxy: ProxyServer,
    content: str,
    *,
    stream: bool = False,
    tools: bool = False,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> tuple[str, str]:
    """One chat call; returns (exchange id, the text the client received: content or arguments)."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        **extra,
    }
    if tools:
        body["tools"] = TOOLS
    response = httpx.post(
        proxy.base_url + "/chat/completions", json=body, headers=headers or {}, timeout=30
    )
    assert response.status_code == 200, response.text[:300]
    if stream:
        assembler = StreamAssembler()
        assembler.feed(response.content)
        assert assembler.done
        message = assembler.result()["choices"][0]["message"]
    else:
        message = response.json()["choices"][0]["message"]
    text = message.get("content") or json.dumps(message.get("tool_calls"))
    return response.headers["x-understudy-exchange-id"], text


def stored(db: Path, exchange_ids: set[str], timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """The raw `exchanges` rows of `exchange_ids`, once all are written."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            rows = {r["id"]: r for r in db_rows(db, "SELECT * FROM exchanges")}
        except sqlite3.OperationalError:
            rows = {}
        if exchange_ids <= set(rows) or time.monotonic() > deadline:
            missing = exchange_ids - set(rows)
            assert not missing, f"{len(missing)} exchanges were never recorded"
            chosen = whole_requests(db, [rows[i] for i in exchange_ids])  # bodies in parts (003)
            return {row["id"]: row for row in chosen}
        time.sleep(0.1)


def secret_traffic(proxy: ProxyServer) -> dict[str, str]:
    """Calls carrying every secret in every place; returns exchange id -> what the client got."""
    answers = {}
    for number, (name, secret) in enumerate(BODY_SECRETS.items()):
        # At the start of the text: the fake echoes the first 60 (answer) / 40 (arguments) chars.
        exchange_id, text = call(
            proxy,
            f"{secret} is my {name} credential, keep it safe",
            stream=number % 2 == 1,
            tools=number % 3 == 2,
            headers={**HEADERS, "x-understudy-note": f"deploy token {secret}"},
            metadata={"credential": secret},
            user=secret if name != "bearer" else "someone",
        )
        answers[exchange_id] = text
    return answers


def test_api_keys_and_key_shaped_strings_never_reach_the_disk(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    db = tmp_path / "secrets.db"
    # 1. Everything spills to the journal; SIGKILL keeps the journal on disk.
    spilling = launch_proxy(
        tmp_path,
        upstream=fake_upstream.base_url,
        db=db,
        record_queue_size=1,
        flush_interval_ms=10_000,
    )
    try:
        journaled = secret_traffic(spilling)
        stats = httpx.get(spilling.root_url + "/health", timeout=10).json()["recorder"]
        assert stats.get("spilled", 0) >= len(journaled) - 2, stats
    finally:
        spilling.process.send_signal(signal.SIGKILL)
        spilling.process.wait(timeout=30)
    journal = tmp_path / (db.name + ".journal.jsonl")
    assert journal.exists() and journal.stat().st_size > 0
    assert_nothing_on_disk(tmp_path, needles())

    # 2. The next proxy replays the journal into the database; more secrets go the usual way.
    replaying = launch_proxy(tmp_path, upstream=fake_upstream.base_url, db=db)
    try:
        written = secret_traffic(replaying)
    finally:
        output = replaying.stop()
    assert_nothing_on_disk(tmp_path, needles())
    for name, needle in needles().items():
        assert needle.decode() not in output, f"{name} in the proxy's log output"

    # The client got the real answers (the fake echoes the secret), the store got masks.
    assert any(OPENAI_KEY in text for text in [*journaled.values(), *written.values()])
    replayed = set(journaled) & _ids(db)  # all but the two held in memory when it was killed
    assert len(replayed) >= len(journaled) - 2
    rows = stored(db, set(written) | replayed)
    for row in rows.values():
        request = json.loads(row["request_json"])  # still valid JSON after masking
        assert "[REDACTED:secret]" in json.dumps(request)
        assert json.loads(row["request_headers_json"])["x-understudy-note"] == (
            "deploy token [REDACTED:secret]"
        )
        assert json.loads(row["metadata_json"]) == {"credential": "[REDACTED:secret]"}
        assert json.loads(row["response_json"])  # parses


def _ids(db: Path) -> set[str]:
    return {r["id"] for r in db_rows(db, "SELECT id FROM exchanges")}


@pytest.fixture(scope="module")
def default_proxy(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    directory = tmp_path_factory.mktemp("secrets-default")
    server = launch_proxy(directory, upstream=fake_upstream.base_url)
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("my key is\n" + OPENAI_KEY, OPENAI_KEY),
        ("curl -H 'Authorization:\n\tBearer " + BEARER + "'", BEARER),
        ("aws:\r\n" + AWS_ID, AWS_ID),
        ("héllo " + GITHUB, GITHUB),
    ],
    ids=["newline-sk", "tab-bearer", "crlf-akia", "non-ascii-ghp"],
)
def test_key_after_an_escaped_character_is_masked(
    default_proxy: ProxyServer, text: str, secret: str
) -> None:
    """In the request JSON as clients send it, a key on a new line reads `...\\nsk-proj-...`:
    the `n` of the escape is a word character, so `\\bsk-` does not match there. The key is
    still in the message, and the dashboard shows it decoded."""
    for ensure_ascii in (True, False):
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
        response = httpx.post(
            default_proxy.base_url + "/chat/completions",
            content=json.dumps(body, ensure_ascii=ensure_ascii).encode(),
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 200
        row = stored(default_proxy.db, {response.headers["x-understudy-exchange-id"]})
        request_json = next(iter(row.values()))["request_json"]
        assert secret[-16:] not in request_json, f"stored unmasked: {request_json[:200]}"
        assert secret[-16:] not in json.dumps(json.loads(request_json), ensure_ascii=False)


# -- PII ------------------------------------------------------------------------------------------

PII = {
    "email": ("jane.roe@example.com", "[REDACTED:email]"),
    "phone": ("+1 415 555 0132", "[REDACTED:phone]"),
    "card": ("4111 1111 1111 1111", "[REDACTED:card]"),
}


@pytest.fixture(scope="module")
def pii_proxy(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    directory = tmp_path_factory.mktemp("secrets-pii")
    server = launch_proxy(directory, upstream=fake_upstream.base_url, redact_pii="email,phone,card")
    yield server
    server.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", list(PII))
def test_pii_is_masked_in_storage_but_not_for_the_client(
    pii_proxy: ProxyServer, kind: str, stream: bool
) -> None:
    value, mask = PII[kind]
    exchange_id, answer = call(pii_proxy, f"{value} is how to reach me", stream=stream)
    assert value in answer, "the client must get the real answer"
    row = stored(pii_proxy.db, {exchange_id})[exchange_id]
    for column in ("request_json", "response_json"):
        text = row[column]
        parsed = json.loads(text)  # masking keeps the JSON valid
        assert mask in json.dumps(parsed), f"{column} not masked: {text[:300]}"
        assert value not in text
    assert_nothing_on_disk(pii_proxy.db.parent, {kind: value.encode()})


@pytest.mark.parametrize("kind", list(PII))
def test_pii_after_an_escaped_character_keeps_the_json_valid(
    pii_proxy: ProxyServer, kind: str
) -> None:
    """`Contact:\\njane.roe@example.com` is sent as `...\\\\njane.roe@...` inside the JSON text; a
    mask that swallows the `n` of the escape leaves `\\\\[REDACTED:email]`, an invalid escape."""
    value, mask = PII[kind]
    for prefix in ("Contact:\n", "\u00e9"):
        body = {"model": MODEL, "messages": [{"role": "user", "content": prefix + value}]}
        response = httpx.post(
            pii_proxy.base_url + "/chat/completions",
            content=json.dumps(body).encode(),  # ensure_ascii: "é" is sent as \\u00e9
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 200
        exchange_id = response.headers["x-understudy-exchange-id"]
        text = stored(pii_proxy.db, {exchange_id})[exchange_id]["request_json"]
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise AssertionError(f"stored request is not JSON any more ({exc}): {text}") from exc
        assert parsed["messages"][0]["content"] == prefix + mask


def test_unknown_pii_kind_is_refused_at_start(tmp_path: Path, fake_upstream: FakeUpstream) -> None:
    """A typo in `--redact-pii` must stop the proxy (it does) with a one-line message, as every
    other invalid setting does, not a traceback."""
    with pytest.raises(RuntimeError) as raised:
        server = launch_proxy(tmp_path, upstream=fake_upstream.base_url, redact_pii="emial")
        server.stop()
    assert "emial" in str(raised.value)
    assert "Traceback" not in str(raised.value), str(raised.value)[-600:]
