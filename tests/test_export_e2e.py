"""End to end: trajectories recorded by the proxy app (served by uvicorn in a thread, official SDK,
fake upstream), then exported with the CLI (`exporter.cli.main`, in-process) and checked message
for message, validated, split, in every format. The CLI as a process is what tests/test_readme.py
runs."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.exporter import TOOLS, expected_openai_sample, read_jsonl, run_agent
from tests.support.inprocess import ThreadedProxy, served_proxy
from tests.support.inprocess import run_exporter as run_cli
from tests.support.records import recorded_exchanges, recorded_trajectories


def _canonical(sample: dict[str, Any]) -> str:
    return json.dumps(sample, sort_keys=True)


@pytest.fixture(scope="module")
def recorded(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: Any
) -> tuple[Path, list[dict[str, Any]]]:
    """A realistic workload through one proxy: streamed and not, parallel calls, SDK objects
    echoed back, tool results as part arrays, re-serialized arguments, a second user turn, a
    conversation without tools. Returns the database and the expected samples."""
    directory = tmp_path_factory.mktemp("recorded")
    db = directory / "understudy.db"
    server = served_proxy(directory, upstream=fake_upstream.base_url, db=str(db))
    client = openai.OpenAI(base_url=server.base_url, api_key="sk-test-key-123")
    conversations: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = []
    try:
        variants: list[dict[str, Any]] = [
            {},
            {"stream": True},
            {"echo_sdk_objects": True},
            {"stream": True, "echo_sdk_objects": True, "tool_results_as_parts": True},
            {"reserialize_arguments": True},
            {"follow_up": "and refund the parallel ones"},
            {"stream": True, "follow_up": "thanks, one more check"},
        ]
        for i in range(14):
            variant = variants[i % len(variants)]
            user = f"where is order {1000 + i}?" + (" check parallel" if i % 3 == 0 else "")
            conversations.append((run_agent(client, user, **variant), TOOLS))
        conversations.append((run_agent(client, "hello there", tools=None), None))
        conversations.append((run_agent(client, "no system prompt here", system=None), TOOLS))
    finally:
        server.stop()
    expected = [expected_openai_sample(messages, tools) for messages, tools in conversations]
    return db, expected


def test_export_reproduces_every_trajectory_exactly_once(
    recorded: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    db, expected = recorded
    out = tmp_path / "train.jsonl"
    result = run_cli("export", "--db", str(db), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    samples = read_jsonl(out)
    assert sorted(map(_canonical, samples)) == sorted(map(_canonical, expected))
    assert summary["written"] == len(expected) == 16
    assert summary["dropped"] == {}
    assert summary["tokens"] > 0 and summary["estimated_cost_usd"] is not None
    # parallel calls stay in one assistant message, each answered by one tool message
    parallel = [m for s in samples for m in s["messages"] if len(m.get("tool_calls") or ()) == 2]
    assert len(parallel) >= 5
    for sample in samples:
        for message in sample["messages"]:
            assert not {"refusal", "annotations", "audio", "function_call"} & set(message)
            for call in message.get("tool_calls") or ():
                assert isinstance(call["function"]["arguments"], str)
    # round trip: what export wrote, validate accepts
    check = run_cli("validate", str(out), "--json")
    assert check.returncode == 0, check.stdout
    report = json.loads(check.stdout)
    assert report["valid"] and report["samples"] == 16 and report["tokens"]["max"] > 0


def test_every_format_round_trips_and_keeps_every_tool_call(
    recorded: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    db, expected = recorded
    calls_expected = sum(len(m.get("tool_calls") or ()) for s in expected for m in s["messages"])
    for fmt in ("hf", "sharegpt"):
        out = tmp_path / f"{fmt}.jsonl"
        result = run_cli("export", "--db", str(db), "--out", str(out), "--format", fmt, "--quiet")
        assert result.returncode == 0, result.stderr
        check = run_cli("validate", str(out), "--format", fmt)
        assert check.returncode == 0, check.stdout
        records = read_jsonl(out)
        if fmt == "hf":
            calls = sum(len(m.get("tool_calls") or ()) for r in records for m in r["messages"])
            assert all(
                isinstance(c["function"]["arguments"], dict)
                for r in records
                for m in r["messages"]
                for c in m.get("tool_calls") or ()
            )
        else:
            calls = 0
            for r in records:
                for turn in r["conversations"]:
                    if turn["from"] == "function_call":
                        value = json.loads(turn["value"])
                        calls += len(value) if isinstance(value, list) else 1
        assert calls == calls_expected
        assert len(records) == len(expected)


def test_train_on_and_system_prompt_options(
    recorded: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    db, _ = recorded
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You are the distilled agent.\n")
    out = tmp_path / "final.jsonl"
    result = run_cli(
        "export",
        "--db",
        str(db),
        "--out",
        str(out),
        "--train-on",
        "final",
        "--system-prompt",
        str(prompt),
        "--strip-tool-descriptions",
        "--min-tool-calls",
        "1",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    samples = read_jsonl(out)
    assert json.loads(result.stdout)["dropped"] == {"below_min_tool_calls": 1}
    for sample in samples:
        assert sample["messages"][0] == {
            "role": "system",
            "content": "You are the distilled agent.",
        }
        assert sum(m["role"] == "system" for m in sample["messages"]) == 1
        for message in sample["messages"]:
            if message["role"] == "assistant":
                assert message["weight"] == (0 if message.get("tool_calls") else 1)
            else:
                assert "weight" not in message
        assert "description" not in json.dumps(sample["tools"])
    assert run_cli("validate", str(out)).returncode == 0
    dropped = run_cli(
        "export", "--db", str(db), "--out", str(tmp_path / "d.jsonl"), "--drop-system", "--json"
    )
    assert all(
        m["role"] != "system" for s in read_jsonl(tmp_path / "d.jsonl") for m in s["messages"]
    )
    assert json.loads(dropped.stdout)["written"] == 16


def test_split_by_trajectory_is_deterministic(
    recorded: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    db, expected = recorded
    out = tmp_path / "train.jsonl"
    result = run_cli(
        "export",
        "--db",
        str(db),
        "--out",
        str(out),
        "--val-fraction",
        "0.4",
        "--seed",
        "7",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    train, valid = read_jsonl(out), read_jsonl(tmp_path / "valid.jsonl")
    assert summary["train"] == len(train) and summary["valid"] == len(valid)
    assert len(train) + len(valid) == len(expected) and valid and train
    again = run_cli(
        "export",
        "--db",
        str(db),
        "--out",
        str(tmp_path / "again-train.jsonl"),
        "--val-fraction",
        "0.4",
        "--seed",
        "7",
        "--quiet",
    )
    assert again.returncode == 0
    assert read_jsonl(tmp_path / "again-valid.jsonl") == valid


def test_stats_counts_what_the_proxy_recorded(recorded: tuple[Path, list[dict[str, Any]]]) -> None:
    db, _ = recorded
    result = run_cli("stats", "--db", str(db), "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    exchanges = len(recorded_exchanges(db))
    trajectories = len(recorded_trajectories(db))
    assert stats["exchanges"] == exchanges and stats["trajectories"] == trajectories == 16
    assert stats["leaves"] == 16 and stats["forked_trajectories"] == 0
    assert stats["by_route"]["student"]["trajectories"] == 16
    assert stats["by_model"]["gpt-4.1-mini"]["exchanges"] == exchanges
    assert stats["error_rate"] == 0.0
    assert sum(stats["tool_call_histogram"].values()) == 16
    table = run_cli("stats", "--db", str(db))
    assert table.returncode == 0 and "Tool calls per trajectory" in table.stdout


def test_forks_export_every_leaf_or_the_longest(
    serve_proxy: Callable[..., ThreadedProxy], tmp_path: Path
) -> None:
    proxy_server = serve_proxy()
    client = openai.OpenAI(base_url=proxy_server.base_url, api_key="sk-test")
    full = run_agent(client, "where is order 7?")
    # The app retries from the first tool result: same prefix, a new answer -> a fork.
    prefix = full[:4]
    client.chat.completions.create(model="gpt-4.1-mini", messages=prefix, tools=TOOLS)  # type: ignore[arg-type]
    proxy_server.stop()
    every = run_cli(
        "export",
        "--db",
        str(proxy_server.db),
        "--out",
        str(tmp_path / "all.jsonl"),
        "--include-incomplete",
        "--quiet",
    )
    assert every.returncode == 0, every.stderr
    assert len(read_jsonl(tmp_path / "all.jsonl")) == 2
    longest = run_cli(
        "export",
        "--db",
        str(proxy_server.db),
        "--out",
        str(tmp_path / "longest.jsonl"),
        "--leaves",
        "longest",
        "--include-incomplete",
        "--quiet",
    )
    assert longest.returncode == 0, longest.stderr
    (only,) = read_jsonl(tmp_path / "longest.jsonl")
    assert _canonical(only) == _canonical(expected_openai_sample(full, TOOLS))
    # by default only complete leaves are written; the fork, which ends in a tool call, is
    # counted as a drop with its reason (written + drops == leaves selected)
    complete = run_cli(
        "export", "--db", str(proxy_server.db), "--out", str(tmp_path / "c.jsonl"), "--json"
    )
    summary = json.loads(complete.stdout)
    assert summary["dropped"] == {"pending_tool_call": 1}
    assert summary["read"] == 2 and summary["written"] == 1
    assert len(read_jsonl(tmp_path / "c.jsonl")) == 1


def test_duplicate_conversations_are_written_once(
    serve_proxy: Callable[..., ThreadedProxy], tmp_path: Path
) -> None:
    proxy_server = serve_proxy()
    client = openai.OpenAI(base_url=proxy_server.base_url, api_key="sk-test")
    for _ in range(3):  # the same question, answered the same way, in separate trajectories
        client.chat.completions.create(
            model="gpt-4.1-mini",
            messages=[{"role": "user", "content": "same question"}],
            extra_headers={"X-Understudy-Trajectory-Id": f"t-{_}"},
        )
    proxy_server.stop()
    result = run_cli(
        "export", "--db", str(proxy_server.db), "--out", str(tmp_path / "t.jsonl"), "--json"
    )
    summary = json.loads(result.stdout)
    assert summary["written"] == 1 and summary["dropped"] == {"duplicate": 2}


def test_cli_errors_are_one_line(serve_proxy: Callable[..., ThreadedProxy], tmp_path: Path) -> None:
    def one_line_error(result: Any, code: int, needle: str) -> None:
        assert result.returncode == code, (result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], result.stderr
        assert "Traceback" not in result.stderr

    out = str(tmp_path / "o.jsonl")
    one_line_error(
        run_cli("export", "--db", str(tmp_path / "missing.db"), "--out", out),
        1,
        "database not found",
    )
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as conn:
        conn.execute(
            "CREATE TABLE understudy_migrations (name TEXT PRIMARY KEY, applied_utc TEXT NOT NULL)"
        )
    one_line_error(run_cli("export", "--db", str(old), "--out", out), 1, "older schema")
    one_line_error(run_cli("stats", "--db", str(old)), 1, "migrate")
    one_line_error(
        run_cli("export", "--db", str(old), "--out", out, "--bogus"), 2, "unrecognized arguments"
    )
    one_line_error(
        run_cli("export", "--db", str(old), "--out", out, "--val-fraction", "1.5"),
        2,
        "--val-fraction",
    )
    one_line_error(
        run_cli(
            "export", "--db", str(old), "--out", out, "--format", "sharegpt", "--train-on", "final"
        ),
        1,
        "mask_history",
    )
    not_db = tmp_path / "text.db"
    not_db.write_text("hello, not a database\n" * 100)
    one_line_error(run_cli("stats", "--db", str(not_db)), 1, "understudy-export")
    proxy = serve_proxy()
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-test")
    client.chat.completions.create(
        model="gpt-4.1-mini", messages=[{"role": "user", "content": "hi"}]
    )
    proxy.stop()
    one_line_error(
        run_cli("export", "--db", str(proxy.db), "--out", out, "--route", "teacher"),
        1,
        "no samples to write",
    )
    assert not Path(out).exists()
    one_line_error(run_cli("validate", str(tmp_path / "nope.jsonl")), 1, "file not found")
