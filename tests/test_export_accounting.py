"""Every drop accounted for (issue 16): written plus each drop reason adds up to the leaves
selected, in the summary and in `--json`; error leaves are never samples; answers cut by `length`
or `content_filter` are never trained, even with `--include-incomplete`.

Rows are written the way the recorder writes them (`ExchangeRecord.to_row`,
`Database.write_exchanges`), on a SQLite file and on a fresh PostgreSQL database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.api import ExportOptions, export_samples
from proxy.storage import Database, new_id
from tests.support.exporter import completion, record, write_records
from tests.support.inprocess import run_exporter as run_cli

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]
SYSTEM = {"role": "system", "content": "Be brief."}


def _finished(message: dict[str, Any], finish: str) -> dict[str, Any]:
    response = completion(message)
    response["choices"][0]["finish_reason"] = finish
    return response


def _call(call_id: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "lookup", "arguments": '{"q":"x"}'},
    }


def _one(question: str, response: dict[str, Any] | None, **kwargs: Any) -> Any:
    request = {"model": "gpt-4.1-mini", "tools": TOOLS, "messages": [SYSTEM, question_of(question)]}
    return record(new_id(), request, response, **kwargs)


def question_of(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def build_db(path: str) -> None:
    """Eight one-exchange trajectories, one per way a leaf ends, plus a retried call:
    complete, length, content_filter, pending tool call, refusal, audio-only, error, cancelled;
    and a trajectory whose step 1 failed upstream (500) and was retried with the same request."""
    items = [
        _one("complete", completion({"role": "assistant", "content": "All done."})),
        _one(
            "cut", _finished({"role": "assistant", "content": "The order is on its wa"}, "length")
        ),
        _one(
            "filtered", _finished({"role": "assistant", "content": "[filtered"}, "content_filter")
        ),
        _one(
            "pending",
            completion({"role": "assistant", "content": None, "tool_calls": [_call("c1")]}),
        ),
        _one("refused", completion({"role": "assistant", "content": None, "refusal": "I can't."})),
        _one(
            "spoken",
            completion(
                {
                    "role": "assistant",
                    "content": None,
                    "audio": {"id": "audio_1", "data": "", "transcript": "hello", "expires_at": 1},
                }
            ),
        ),
        _one("failed", None, outcome="error"),
        _one("gone", completion({"role": "assistant", "content": "partial"}), outcome="cancelled"),
    ]
    # A retry: step 0 calls a tool; step 1 fails upstream; the app sends step 1 again and it answers.
    trajectory = new_id()
    first = [SYSTEM, question_of("retried")]
    step0 = record(
        trajectory,
        {"model": "gpt-4.1-mini", "tools": TOOLS, "messages": first},
        completion({"role": "assistant", "content": None, "tool_calls": [_call("r1")]}),
        started_utc="2026-11-20T10:00:00.000+00:00",
    )
    again = {
        "model": "gpt-4.1-mini",
        "tools": TOOLS,
        "messages": [
            *first,
            {"role": "assistant", "content": None, "tool_calls": [_call("r1")]},
            {"role": "tool", "tool_call_id": "r1", "content": "found it"},
        ],
    }
    failed = record(
        trajectory,
        again,
        None,
        parent_id=step0[0].id,
        step=1,
        outcome="error",
        started_utc="2026-11-20T10:00:01.000+00:00",
    )
    retried = record(
        trajectory,
        again,
        completion({"role": "assistant", "content": "It is found."}),
        parent_id=step0[0].id,
        step=1,
        started_utc="2026-11-20T10:00:02.000+00:00",
    )
    items += [step0, failed, retried]
    await write_records(path, items)  # type: ignore[arg-type]


EXPECTED_DROPS = {
    "length": 1,
    "content_filter": 1,
    "pending_tool_call": 1,
    "refusal": 1,
    "audio": 1,
    "error": 2,  # the failed one-step trajectory and the failed try before the retry
    "cancelled": 1,
}


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "accounting.db")
        return
    yield request.getfixturevalue("pg_url")


@pytest.fixture
async def db(target: str) -> Any:
    await build_db(target)
    database = await Database.open(target, migrate=False, must_exist=True)
    yield database, target
    await database.close()


def _users(lines: list[str]) -> list[str]:
    return [
        next(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user")
        for line in lines
    ]


async def test_written_plus_drops_add_up_to_the_leaves_selected(db: Any) -> None:
    database, _ = db
    lines, summary = await export_samples(database, ExportOptions())
    assert sorted(_users(lines)) == ["complete", "retried"]
    assert dict(summary.dropped) == EXPECTED_DROPS
    assert summary.read == 10  # every leaf: 8 one-step trajectories, the failed try, the retry
    assert summary.written + sum(summary.dropped.values()) == summary.read
    assert summary.cut == {}


async def test_include_incomplete_never_trains_a_cut_or_failed_answer(db: Any) -> None:
    database, _ = db
    lines, summary = await export_samples(database, ExportOptions(include_incomplete=True))
    samples = [json.loads(line) for line in lines]
    text = json.dumps(samples)
    assert "on its wa" not in text and "[filtered" not in text and "partial" not in text
    # the one-step trajectories whose only answer is unusable have nothing to train
    assert dict(summary.dropped) == {
        "length": 1,
        "content_filter": 1,
        "refusal": 1,
        "audio": 1,
        "error": 2,
        "cancelled": 1,
    }
    assert summary.written + sum(summary.dropped.values()) == summary.read == 10
    # the failed try is not exported as a duplicate prefix of the retried trajectory
    retried = [s for s in samples if s["messages"][1]["content"] == "retried"]
    assert len(retried) == 1 and retried[0]["messages"][-1]["content"] == "It is found."
    pending = [s for s in samples if s["messages"][1]["content"] == "pending"]
    assert pending[0]["messages"][-1]["tool_calls"][0]["id"] == "call00001"


async def test_a_cut_answer_after_earlier_turns_is_left_out_and_reported(tmp_path: Path) -> None:
    path = str(tmp_path / "cut.db")
    trajectory = new_id()
    messages = [
        SYSTEM,
        question_of("two steps"),
        {"role": "assistant", "content": None, "tool_calls": [_call("a1")]},
        {"role": "tool", "tool_call_id": "a1", "content": "result"},
    ]
    cut = _finished({"role": "assistant", "content": "Here is a long answ"}, "length")
    await write_records(
        path,
        [record(trajectory, {"model": "gpt-4.1-mini", "tools": TOOLS, "messages": messages}, cut)],  # type: ignore[list-item]
    )
    database = await Database.open(path, migrate=False, must_exist=True)
    try:
        lines, summary = await export_samples(database, ExportOptions(include_incomplete=True))
        (sample,) = [json.loads(line) for line in lines]
        assert sample["messages"][-1]["tool_calls"][0]["function"]["name"] == "lookup"
        assert "long answ" not in lines[0]
        assert summary.cut == {"length": 1} and summary.as_dict()["cut"] == {"length": 1}
        lines, summary = await export_samples(database, ExportOptions())
        assert lines == [] and summary.dropped == {"length": 1}
    finally:
        await database.close()


def test_cli_json_and_table_account_for_every_leaf(db: Any, tmp_path: Path) -> None:
    _, path = db
    out = tmp_path / "train.jsonl"
    result = run_cli("export", "--db", path, "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dropped"] == EXPECTED_DROPS
    assert summary["written"] + sum(summary["dropped"].values()) == summary["read"] == 10
    table = run_cli(
        "export", "--db", path, "--out", str(out), "--include-incomplete", "--format", "hf"
    )
    assert table.returncode == 0, table.stderr
    assert "leaves selected" in table.stdout and "dropped: refusal" in table.stdout
    assert "dropped: audio" in table.stdout and "dropped: error" in table.stdout


def test_cli_json_says_what_the_trainer_must_set(db: Any, tmp_path: Path) -> None:
    _, path = db
    out = str(tmp_path / "sharegpt.jsonl")
    result = run_cli(
        "export", "--db", path, "--out", out, "--format", "sharegpt", "--train-on", "last", "--json"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["notes"] == ["LLaMA-Factory: set mask_history: true to train the last turn only"]
    refused = run_cli("export", "--db", path, "--out", out, "--format", "hf", "--train-on", "final")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "--format axolotl" in refused.stderr and "Traceback" not in refused.stderr
