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

import contextlib
import json
import os
import secrets
import signal
import sqlite3
import stat
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.packing import unpack_text
from proxy.core.redaction import (
    MAX_PARTS,
    SECRET_MASK,
    Redactor,
    _active_rules,
    loggable_error,
    redact_identifier,
    secret_rules,
)
from proxy.core.sse import StreamAssembler
from proxy.storage.bodies import PACKED_COLUMNS
from proxy.testing.servers import child_env
from tests.support.bodies import whole_requests
from tests.support.processes import FakeUpstream, ProxyServer, launch_proxy
from tests.support.records import db_rows, recorded_ids

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
    """Every file under `directory` (database, -wal, -shm, journal, ...) by name, and for each
    SQLite database the texts it stores packed (migration 008), unpacked: a secret compressed
    into a packed value is on disk too."""
    files = {p.name: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
    for path in sorted(directory.rglob("*.db")):
        files[f"{path.name} (packed texts)"] = packed_texts(path)
    return files


def packed_texts(db: Path) -> bytes:
    """Every packed value of `db`'s exchanges and blobs, unpacked, as UTF-8 bytes."""
    columns = ", ".join(PACKED_COLUMNS)
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        values = [v for row in conn.execute(f"SELECT {columns} FROM exchanges") for v in row]
        values += [row[0] for row in conn.execute("SELECT body_json FROM blobs")]
    texts = []
    for value in values:
        if isinstance(value, bytes):
            with contextlib.suppress(ValueError):  # not a packed text (a marker, see bodies.py)
                texts.append(unpack_text(value) or "")
    return "\n".join(texts).encode("utf-8", "surrogatepass")


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
    return set(recorded_ids(db))


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


# -- issue 11: what slipped past the masks ------------------------------------------------------

AWS_SECRET = token(40, string.ascii_letters + string.digits + "/+")
FINE_GRAINED = "github_pat_" + token(22) + "_" + token(59)
SHORT_BEARER = token(10)
ID_KEY = "sk-proj-" + token(40)
MODEL_KEY = "sk-" + token(32)
ESCAPED_KEY = "sk-proj-" + token(40)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"aws_secret_access_key = {AWS_SECRET}", AWS_SECRET),
        (f'AWS_SECRET_ACCESS_KEY="{AWS_SECRET}"', AWS_SECRET),
        (f"token {FINE_GRAINED} works", FINE_GRAINED),
        (f"Authorization: Bearer {SHORT_BEARER}", SHORT_BEARER),
        (f"curl -H 'authorization: bearer {SHORT_BEARER}'", SHORT_BEARER),
        ("glpat-" + token(20), "glpat-"),  # detect-secrets' GitLab rule
        ("sk_live_" + token(24), "sk_live_"),  # ... and Stripe's
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEow"
            + token(64)
            + "\n-----END RSA PRIVATE KEY-----",
            "MIIEow",
        ),
    ],
    ids=[
        "aws-secret",
        "aws-secret-quoted",
        "github-fine-grained",
        "short-bearer",
        "short-bearer-lower",
        "gitlab",
        "stripe",
        "private-key-body",
    ],
)
def test_the_ruleset_masks_what_the_hand_list_missed(text: str, secret: str) -> None:
    redactor = Redactor()
    assert secret not in (redactor(text) or "")
    document = json.dumps({"messages": [{"content": "line one\n" + text}]})
    masked = redactor.json_text(document) or ""
    assert secret not in masked and json.loads(masked)  # still valid JSON


def test_ordinary_words_are_not_masked() -> None:
    text = "The bearer of bad news took a key decision: ACME and SKU 42. Pass it on."
    assert Redactor()(text) == text


def escaped(text: str) -> str:
    """`text` as JSON with every character of each `sk-` key written as a \\u escape."""
    return json.dumps(text).replace(ESCAPED_KEY, "".join(f"\\u{ord(c):04x}" for c in ESCAPED_KEY))


def test_a_key_written_with_unicode_escapes_is_masked_in_the_decoded_value() -> None:
    document = '{"content": ' + escaped(f"my key {ESCAPED_KEY}") + "}"
    assert ESCAPED_KEY not in document  # the raw text holds no key-shaped string
    masked = Redactor().json_text(document) or ""
    assert ESCAPED_KEY not in json.loads(masked)["content"]
    assert "[REDACTED:secret]" in json.loads(masked)["content"]


@pytest.mark.parametrize("index", range(len(secret_rules())))
def test_the_pre_check_is_sound_for_every_rule(index: int) -> None:
    """Property: for every rule, any text holding a match of its pattern (hypothesis draws
    matches from the pattern itself, and text around them) passes the pre-check, as plain
    text and inside JSON (newlines escaped around it)."""
    rule = secret_rules()[index]

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(
        st.from_regex(rule.pattern),
        st.text(alphabet=string.printable, max_size=30),
        st.text(alphabet=string.printable, max_size=30),
    )
    def check(match: str, before: str, after: str) -> None:
        text = before + match + after
        if not rule.pattern.search(text):
            return
        assert rule in _active_rules(text), (rule.pattern.pattern, text)
        document = json.dumps({"content": text})
        decoded = json.loads(document)["content"]
        assert rule.pattern.search(decoded)
        masked = Redactor().json_text(document) or ""
        assert not rule.pattern.search(json.loads(masked)["content"]) or SECRET_MASK in masked

    check()


def agent_request(steps: int, last: str) -> dict[str, Any]:
    """A chat request after `steps` tool calls (system prompt, tools, the history resent),
    ending in a user message `last`."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a support agent. Look facts up with the tools."},
        {"role": "user", "content": "Where is order A-1?"},
    ]
    for step in range(steps):
        call = {"id": f"call_{step}", "type": "function"}
        call["function"] = {"name": "lookup", "arguments": json.dumps({"order": f"A-{step}"})}
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"call_{step}", "content": "in transit"})
    messages.append({"role": "user", "content": last})
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    return {"model": "gpt-4.1-mini", "messages": messages, "tools": [tool], "temperature": 0.2}


def test_a_resent_history_is_looked_at_once_and_a_new_secret_in_it_is_still_masked() -> None:
    """`document_json` gives `json_text`'s result; of a request that resends what an earlier one
    held, it looks only at what is new."""
    redactor = Redactor()
    first = json.dumps(agent_request(3, "thanks"))
    assert redactor.document_json(first, json.loads(first)) == first
    scanned = redactor.scanned_bytes
    parts = [*json.loads(first)["messages"], *json.loads(first)["tools"]]
    assert scanned >= sum(len(json.dumps(part, separators=(",", ":"))) for part in parts)

    body = agent_request(4, "and order A-9?")
    second = json.dumps(body)
    assert redactor.document_json(second, body) == second
    new_parts = [*body["messages"][-3:], {k: v for k, v in body.items() if k != "messages"}]
    new_bytes = sum(len(json.dumps(part, separators=(",", ":"))) for part in new_parts)
    assert redactor.scanned_bytes - scanned <= new_bytes + 80  # the rest: key names of arrays
    assert redactor.scanned_bytes - scanned < len(second) / 3

    for where in ("message", "tool", "option", "key"):
        body = agent_request(4, "and order A-9?")
        if where == "message":
            body["messages"].append({"role": "user", "content": f"my key is {OPENAI_KEY}"})
        elif where == "tool":
            body["tools"][0]["function"]["description"] = f"uses {OPENAI_KEY}"
        elif where == "option":
            body["metadata"] = {"note": f"Bearer {OPENAI_KEY}"}
        else:
            body["messages"][1][OPENAI_KEY] = 1
        text = json.dumps(body)
        masked = redactor.document_json(text, body) or ""
        assert masked == Redactor().json_text(text), where
        assert OPENAI_KEY not in masked and SECRET_MASK in masked, where
        assert json.loads(masked), where


def test_a_body_of_more_array_elements_than_any_agent_sends_is_redacted_whole() -> None:
    """Past MAX_PARTS elements a lookup per element would cost more than the text's scan: the
    text is redacted whole, with the same result, and its parts are not remembered."""
    redactor = Redactor()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}] * MAX_PARTS}
    body["messages"] = [*body["messages"], {"role": "user", "content": f"key {OPENAI_KEY}"}]
    text = json.dumps(body)
    masked = redactor.document_json(text, body) or ""
    assert masked == Redactor().json_text(text) and OPENAI_KEY not in masked
    assert redactor.scanned_bytes == len(text)


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "tool"])},
            optional={
                "content": st.one_of(
                    st.text(max_size=40),
                    st.sampled_from([f"key {OPENAI_KEY}", "mail a@b.co", "call +1 415 555 0100"]),
                ),
                "n": st.integers(min_value=-(2**70), max_value=2**70),
            },
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([(), ("email", "phone")]),
)
def test_document_json_is_json_text_whatever_it_has_seen(
    messages: list[dict[str, Any]], pii: tuple[str, ...]
) -> None:
    """Property: for any request (lone surrogates, integers beyond 64 bits, secrets and PII),
    first seen or resent with one more message, `document_json` equals `json_text`."""
    redactor = Redactor(pii)
    for shown in (messages[:-1], messages, messages):
        body = {"model": "m", "messages": shown}
        text = json.dumps(body, ensure_ascii=False)
        expected = Redactor(pii).json_text(text)
        assert redactor.document_json(text, json.loads(text)) == expected


def test_a_trajectory_id_is_redacted_stably() -> None:
    first = redact_identifier(f"run-{ID_KEY}")
    assert ID_KEY[-16:] not in first and first.startswith("run-[REDACTED:")
    assert redact_identifier(f"run-{ID_KEY}") == first  # one trajectory keeps one id
    assert redact_identifier(f"run-{ID_KEY[:-1]}x") != first
    assert redact_identifier("checkout-42") == "checkout-42"


def test_loggable_error_carries_no_statement_parameters() -> None:
    import sqlalchemy
    from sqlalchemy.exc import OperationalError

    engine = sqlalchemy.create_engine("sqlite://")
    with engine.connect() as conn:
        try:
            conn.execute(sqlalchemy.text("INSERT INTO nowhere VALUES (:x)"), {"x": ID_KEY})
        except OperationalError as exc:
            assert ID_KEY in str(exc)  # what used to be logged
            line = loggable_error(exc)
    assert line == "OperationalError: no such table: nowhere"


def test_trajectory_ids_model_names_and_escaped_keys_never_reach_disk_or_log(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    db = tmp_path / "ids.db"
    proxy = launch_proxy(tmp_path, upstream=fake_upstream.base_url, db=db)
    ids = []
    try:
        for number, place in enumerate(("header", "metadata")):
            body: dict[str, Any] = {
                "model": f"ft:gpt-4.1-mini:{MODEL_KEY}",
                "messages": [{"role": "user", "content": f"call {number}"}],
            }
            headers = {"content-type": "application/json"}
            if place == "header":
                headers["x-understudy-trajectory-id"] = f"run-{ID_KEY}"
            else:
                body["metadata"] = {"trajectory_id": f"meta-{ID_KEY}"}
            response = httpx.post(
                proxy.base_url + "/chat/completions", json=body, headers=headers, timeout=30
            )
            assert response.status_code == 200, response.text
            assert ID_KEY[-16:] not in response.headers["x-understudy-trajectory-id"]
            ids.append(response.headers["x-understudy-exchange-id"])
        # A key written with \u escapes, as JSON allows.
        content = escaped(f"my key {ESCAPED_KEY}")
        raw = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": {content}}}]}}'
        response = httpx.post(
            proxy.base_url + "/chat/completions",
            content=raw.encode(),
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 200
        ids.append(response.headers["x-understudy-exchange-id"])
        stored(db, set(ids))
        # While the database is locked, failed writes are logged (without their parameters).
        with contextlib.closing(sqlite3.connect(db, timeout=30, isolation_level=None)) as lock:
            lock.execute("BEGIN EXCLUSIVE")
            for number in range(2):
                response = httpx.post(
                    proxy.base_url + "/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": f"l{number}"}]},
                    headers={"x-understudy-trajectory-id": f"locked-{ID_KEY}"},
                    timeout=30,
                )
                assert response.status_code == 200
            deadline = time.monotonic() + 60
            while (
                httpx.get(proxy.root_url + "/health", timeout=10)
                .json()["recorder"]
                .get("failed_batches", 0)
                == 0
                and time.monotonic() < deadline
            ):
                time.sleep(0.1)
            lock.execute("COMMIT")
    finally:
        output = proxy.stop()
    assert "database write of" in output  # the refusal was logged...
    wanted = {
        "id-key": ID_KEY[-16:].encode(),
        "model-key": MODEL_KEY[-16:].encode(),
        "escaped-key": ESCAPED_KEY[-16:].encode(),
    }
    assert_nothing_on_disk(tmp_path, wanted)
    for name, needle in wanted.items():
        assert needle.decode() not in output, f"{name} in the proxy's log"
    assert "locked-" not in output  # ...without the statement's parameters
    rows = db_rows(db, "SELECT trajectory_id, model_requested FROM exchanges")
    assert {r["model_requested"] for r in rows} >= {"ft:gpt-4.1-mini:[REDACTED:secret]"}
    # The exporter reads what was stored: nothing to decode back into a key.
    out = tmp_path / "train.jsonl"
    exported = subprocess.run(
        [sys.executable, "-m", "exporter", "export", "--db", str(db), "--out", str(out)],
        check=False,
        capture_output=True,
        env=child_env(),
    )
    assert exported.returncode == 0, exported.stderr.decode()[-500:]
    data = out.read_bytes()
    assert b"[REDACTED:secret]" in data  # the escaped key's sample is there, masked
    for needle in wanted.values():
        assert needle not in data


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_database_wal_and_journal_files_are_private(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    db = tmp_path / "private.db"
    proxy = launch_proxy(
        tmp_path,
        upstream=fake_upstream.base_url,
        db=db,
        record_queue_size=1,
        flush_interval_ms=10_000,
    )
    try:
        for number in range(3):
            call(proxy, f"private {number}")
        files = [
            db,
            db.with_name(db.name + "-wal"),
            db.with_name(db.name + "-shm"),
            tmp_path / (db.name + ".journal.jsonl"),
        ]
        for path in files:
            assert path.exists(), path
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path.name} is not 0600"
    finally:
        proxy.stop()
