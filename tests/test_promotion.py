"""Tool-call promotion: the `logit_bias` on the token " to" that the upstream really receives.

Pure tests of `proxy.core.promotion` (token ids from tiktoken, offline; merging; when it is skipped;
dropping sampling parameters). Then two proxy processes (`--promote-tool-calls 5`, and the same
with `--promote-drop-sampling true`) in front of the fake upstream: for each case, the exact body
the upstream got, the `injected_logit_bias_json` recorded, and the client's own request in
`request_json`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiktoken

from proxy.core.promotion import is_reasoning_model, promote_tool_calls, tool_call_token
from proxy.testing.servers import REPOSITORY_ROOT as ROOT
from tests.support.agents import (
    SYSTEM,
    TOOLS,
    async_client,
    first_user_text,
    launch_proxy,
    read_jsonl,
    received,
    run_agent,
    run_exporter,
    running,
    wait_for_exchanges,
)
from tests.support.inprocess import ThreadedProxy
from tests.support.processes import FakeUpstream

# ---------------------------------------------------------------------------------------------
# Pure: the token, and when and how it is added
# ---------------------------------------------------------------------------------------------

O200K = ["gpt-4.1", "gpt-4o", "gpt-4.1-mini", "gpt-4o-mini", "gpt-4.1-2025-04-14", "openai/gpt-4o"]
CL100K = ["gpt-4", "gpt-3.5-turbo", "gpt-4-turbo", "gpt-3.5-turbo-0125"]


@pytest.mark.parametrize("model", O200K)
def test_the_token_is_316_for_o200k_models(model: str) -> None:
    assert tool_call_token(model) == 316
    assert tiktoken.get_encoding("o200k_base").encode(" to") == [316]


@pytest.mark.parametrize("model", CL100K)
def test_the_token_is_311_for_cl100k_models(model: str) -> None:
    assert tool_call_token(model) == 311
    assert tiktoken.get_encoding("cl100k_base").encode(" to") == [311]


@pytest.mark.parametrize(
    ("model", "token"),
    [
        ("ft:gpt-4.1-mini-2025-04-14:acme::AbC123", 316),
        ("ft:gpt-4.1-2025-04-14:acme:travel:Xy9", 316),
        ("ft:gpt-4o-mini-2024-07-18:acme::Qq1", 316),
        ("ft:gpt-3.5-turbo-0125:acme::Zz2", 311),
    ],
)
def test_a_fine_tuned_student_gets_its_base_models_token(model: str, token: int) -> None:
    """The students Understudy trains are `ft:` models; they keep their base model's encoding."""
    assert tool_call_token(model) == token


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "llama-3.1-8b-instruct", "fake-model"])
def test_models_tiktoken_does_not_know_have_no_token(model: str) -> None:
    assert tool_call_token(model) is None


def test_the_token_is_computed_offline(tmp_path: Path) -> None:
    """In a fresh process with every socket refused and an empty temp dir, the ids still come."""
    script = (
        "import socket\n"
        "def refuse(*args, **kwargs):\n"
        "    raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from proxy.core.promotion import tool_call_token\n"
        "print([tool_call_token(m) for m in ('gpt-4.1', 'gpt-4o', 'gpt-4', 'gpt-3.5-turbo')])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    env.update(
        TMPDIR=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[316, 316, 311, 311]"


@pytest.mark.parametrize(
    ("model", "reasoning"),
    [
        ("o3", True),
        ("o3-mini", True),
        ("o4-mini", True),
        ("o1", True),
        ("gpt-5", True),
        ("gpt-5-mini", True),
        ("openai/o3", True),
        ("gpt-5-chat-latest", False),
        ("gpt-4.1", False),
        ("gpt-4o", False),
        ("chatgpt-4o-latest", False),
    ],
)
def test_reasoning_models(model: str, reasoning: bool) -> None:
    assert is_reasoning_model(model) is reasoning


def request(model: str = "gpt-4.1", **fields: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": TOOLS,
        **fields,
    }


@pytest.mark.parametrize(
    ("model", "token"), [("gpt-4.1", "316"), ("gpt-4o", "316"), ("gpt-4", "311")]
)
def test_the_bias_is_added_for_a_request_with_tools(model: str, token: str) -> None:
    body = request(model)
    assert promote_tool_calls(body, 5) == {token: 5}
    assert body["logit_bias"] == {token: 5}
    assert isinstance(body["logit_bias"][token], int)


@pytest.mark.parametrize(
    "choice", ["auto", "required", {"type": "function", "function": {"name": "book_flight"}}]
)
def test_any_tool_choice_but_none_is_promoted(choice: Any) -> None:
    body = request(tool_choice=choice)
    assert promote_tool_calls(body, 5) == {"316": 5}


def test_the_clients_own_entries_are_kept() -> None:
    own = {"1734": -20, "50256": 3}
    body = request(logit_bias=own)
    assert promote_tool_calls(body, 5) == {"316": 5}
    assert body["logit_bias"] == {"1734": -20, "50256": 3, "316": 5}
    assert own == {"1734": -20, "50256": 3}  # the client's dict itself is not changed


def test_the_clients_entry_for_the_token_wins() -> None:
    body = request(logit_bias={"316": -2})
    assert promote_tool_calls(body, 5) is None
    assert body["logit_bias"] == {"316": -2}


def test_a_fractional_or_negative_bias_is_passed_as_given() -> None:
    assert promote_tool_calls(request(), 2.5) == {"316": 2.5}
    assert promote_tool_calls(request(), -3.0) == {"316": -3}


@pytest.mark.parametrize(
    "body",
    [
        request(tool_choice="none"),
        request(tools=[]),
        {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]},
        request("o3"),
        request("o4-mini"),
        request("gpt-5"),
        request("openai/o3"),
        request("claude-sonnet-4-5"),
        request("llama-3.1-70b"),
        request("ft:o4-mini-2025-04-16:acme::Rf1"),
        {"messages": [], "tools": TOOLS},
    ],
    ids=[
        "tool_choice-none",
        "empty-tools",
        "no-tools",
        "o3",
        "o4-mini",
        "gpt-5",
        "openai-o3",
        "claude",
        "llama",
        "fine-tuned-o4-mini",
        "no-model",
    ],
)
def test_promotion_is_skipped(body: dict[str, Any]) -> None:
    before = copy.deepcopy(body)
    assert promote_tool_calls(body, 5, drop_sampling=True) is None
    assert body == before


def test_drop_sampling_removes_temperature_and_top_p_only_when_biasing() -> None:
    body = request(temperature=0.2, top_p=0.9, max_tokens=50, seed=1)
    promote_tool_calls(body, 5, drop_sampling=True)
    assert body == request(max_tokens=50, seed=1, logit_bias={"316": 5})
    kept = request(temperature=0.2, top_p=0.9)
    promote_tool_calls(kept, 5)
    assert (kept["temperature"], kept["top_p"]) == (0.2, 0.9)
    owned = request(temperature=0.2, logit_bias={"316": 1})
    promote_tool_calls(owned, 5, drop_sampling=True)
    assert owned["temperature"] == 0.2


# ---------------------------------------------------------------------------------------------
# End to end: what the upstream receives
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promoting(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedProxy]:
    server = launch_proxy(fake_upstream, tmp_path_factory.mktemp("promote"), promote_tool_calls=5)
    with running(server):
        yield server


@pytest.fixture(scope="module")
def dropping(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedProxy]:
    server = launch_proxy(
        fake_upstream,
        tmp_path_factory.mktemp("drop"),
        promote_tool_calls=5,
        promote_drop_sampling="true",
    )
    with running(server):
        yield server


async def one_call(
    server: ThreadedProxy, fake_upstream: FakeUpstream, marker: str, **fields: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Send one chat request carrying `marker`; return (what was sent, what the upstream got,
    the recorded exchange row)."""
    sent = {"messages": [SYSTEM, {"role": "user", "content": marker}], **fields}
    async with async_client(server) as client:
        raw = await client.chat.completions.with_raw_response.create(**sent)
        if fields.get("stream"):
            async for _ in raw.parse():
                pass
        else:
            raw.parse()
    (row,) = await wait_for_exchanges(server.db, [raw.headers["x-understudy-exchange-id"]])
    (got,) = received(fake_upstream, marker)
    return sent, got["body"], row


ABSENT: Any = object()

CASES: list[tuple[str, dict[str, Any], Any]] = [
    ("gpt-4.1", {"model": "gpt-4.1", "tools": TOOLS}, {"316": 5}),
    ("gpt-4o", {"model": "gpt-4o", "tools": TOOLS}, {"316": 5}),
    ("gpt-4.1-mini-stream", {"model": "gpt-4.1-mini", "tools": TOOLS, "stream": True}, {"316": 5}),
    ("gpt-4", {"model": "gpt-4", "tools": TOOLS}, {"311": 5}),
    ("gpt-3.5-turbo", {"model": "gpt-3.5-turbo", "tools": TOOLS}, {"311": 5}),
    (
        "merged",
        {"model": "gpt-4o", "tools": TOOLS, "logit_bias": {"1734": -20, "50256": 3}},
        {"1734": -20, "50256": 3, "316": 5},
    ),
    (
        "client-owns-token",
        {"model": "gpt-4.1", "tools": TOOLS, "logit_bias": {"316": -2}},
        {"316": -2},
    ),
    (
        "tool_choice-required",
        {"model": "gpt-4.1", "tools": TOOLS, "tool_choice": "required"},
        {"316": 5},
    ),
    ("tool_choice-none", {"model": "gpt-4.1", "tools": TOOLS, "tool_choice": "none"}, ABSENT),
    ("no-tools", {"model": "gpt-4.1"}, ABSENT),
    ("o3", {"model": "o3", "tools": TOOLS}, ABSENT),
    ("o4-mini-stream", {"model": "o4-mini", "tools": TOOLS, "stream": True}, ABSENT),
    ("gpt-5", {"model": "gpt-5", "tools": TOOLS}, ABSENT),
    ("o3-client-bias", {"model": "o3", "tools": TOOLS, "logit_bias": {"1734": -20}}, {"1734": -20}),
    ("claude", {"model": "claude-sonnet-4-5", "tools": TOOLS}, ABSENT),
    ("llama", {"model": "llama-3.1-8b-instruct", "tools": TOOLS}, ABSENT),
    (
        "fine-tuned-gpt-4.1-mini",
        {"model": "ft:gpt-4.1-mini-2025-04-14:acme::AbC1", "tools": TOOLS},
        {"316": 5},
    ),
]


@pytest.mark.parametrize(("name", "fields", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_the_upstream_receives_exactly_this_logit_bias(
    promoting: ThreadedProxy,
    fake_upstream: FakeUpstream,
    name: str,
    fields: dict[str, Any],
    expected: Any,
) -> None:
    sent, got, row = await one_call(promoting, fake_upstream, f"Promotion case [{name}]", **fields)
    if expected is ABSENT:
        assert "logit_bias" not in got
    else:
        assert got["logit_bias"] == expected
    # Everything else reaches the upstream as the client sent it.
    assert {k: v for k, v in got.items() if k != "logit_bias"} == {
        k: v for k, v in sent.items() if k != "logit_bias"
    }
    own = sent.get("logit_bias") or {}
    injected = {k: v for k, v in (got.get("logit_bias") or {}).items() if k not in own}
    assert (
        json.loads(row["injected_logit_bias_json"]) if row["injected_logit_bias_json"] else {}
    ) == injected
    # The recorded request is the client's own, not the biased one.
    assert json.loads(row["request_json"]) == sent
    assert row["outcome"] == "ok"


async def test_every_step_of_an_agent_run_is_promoted(
    promoting: ThreadedProxy, fake_upstream: FakeUpstream
) -> None:
    text = "Promoted agent run: Hanoi to Hue"
    async with async_client(promoting) as client:
        steps = await run_agent(client, text, model="gpt-4.1", stream=True)
    assert len(steps) == 3 and len({s.trajectory_id for s in steps}) == 1
    assert [r["body"]["logit_bias"] for r in received(fake_upstream, text)] == [{"316": 5}] * 3
    rows = await wait_for_exchanges(promoting.db, [s.exchange_id for s in steps])
    assert [json.loads(r["injected_logit_bias_json"]) for r in rows] == [{"316": 5}] * 3
    assert all("logit_bias" not in json.loads(r["request_json"]) for r in rows)
    assert [r["step"] for r in rows] == [0, 1, 2]


async def test_export_can_leave_promoted_trajectories_out(
    promoting: ThreadedProxy, tmp_path: Path
) -> None:
    biased, plain = "Biased export run: Pisa to Bari", "Plain export run: Pisa to Bari"
    async with async_client(promoting) as client:
        first = await run_agent(client, biased, model="gpt-4.1")
        second = await run_agent(client, plain, model="o3")
    rows = await wait_for_exchanges(promoting.db, [s.exchange_id for s in first + second])
    assert [bool(r["injected_logit_bias_json"]) for r in rows] == [True] * 3 + [False] * 3
    unbiased = tmp_path / "unbiased.jsonl"
    done = run_exporter(
        "export", "--db", str(promoting.db), "--out", str(unbiased), "--quiet", "--exclude-promoted"
    )
    assert done.returncode == 0, done.stderr + done.stdout
    kept = {first_user_text(s) for s in read_jsonl(unbiased)}
    assert plain in kept and biased not in kept


@pytest.mark.parametrize(
    ("name", "fields", "dropped"),
    [
        ("biased", {"model": "gpt-4.1", "tools": TOOLS}, True),
        ("biased-stream", {"model": "gpt-4o", "tools": TOOLS, "stream": True}, True),
        ("no-tools", {"model": "gpt-4.1"}, False),
        ("tool_choice-none", {"model": "gpt-4.1", "tools": TOOLS, "tool_choice": "none"}, False),
        ("reasoning", {"model": "o3", "tools": TOOLS}, False),
        (
            "client-owns-token",
            {"model": "gpt-4.1", "tools": TOOLS, "logit_bias": {"316": 1}},
            False,
        ),
    ],
)
async def test_drop_sampling_removes_temperature_and_top_p_from_biased_requests(
    dropping: ThreadedProxy,
    fake_upstream: FakeUpstream,
    name: str,
    fields: dict[str, Any],
    dropped: bool,
) -> None:
    sampling = {"temperature": 0.3, "top_p": 0.8, "max_tokens": 64, "seed": 11}
    sent, got, row = await one_call(
        dropping, fake_upstream, f"Drop case [{name}]", **fields, **sampling
    )
    assert (got["max_tokens"], got["seed"]) == (64, 11)
    if dropped:
        assert "temperature" not in got and "top_p" not in got
        assert "316" in got["logit_bias"]
    else:
        assert (got["temperature"], got["top_p"]) == (0.3, 0.8)
    assert json.loads(row["request_json"]) == sent
