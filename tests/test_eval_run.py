"""`python -m exporter eval` against the scripted fake candidate (a real HTTP server on loopback):
every rate checked against its known value, retries, split, reference, errors and resume after
the run is killed mid-way."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.cli import main
from proxy.dashboard.pricing import price_of
from proxy.testing.fake_candidate import CandidateScript, create_candidate_app
from proxy.testing.servers import REPOSITORY_ROOT as ROOT
from proxy.testing.servers import child_env, serve_in_thread
from tests.support.evaluation import (
    CANDIDATE_MODEL,
    EXPECTED,
    SECRET_KEY,
    STEP_KEYS_TEACHER,
    TEACHER_MODEL,
    candidate_script,
    record_scenario,
)
from tests.support.exporter import read_jsonl
from tests.support.inprocess import run_exporter as run_cli


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "eval.db"
    record_scenario(path)
    return path


@pytest.fixture
def script() -> CandidateScript:
    return candidate_script()


@pytest.fixture
def candidate(script: CandidateScript) -> Iterator[str]:
    """The fake candidate's base URL (`.../v1`)."""
    with serve_in_thread(create_candidate_app(script)) as root:
        try:
            yield f"{root}/v1"
        finally:
            script.release()  # no request stays held past the test


def run_eval(
    capsys: pytest.CaptureFixture[str], *args: str, code: int = 0
) -> tuple[dict[str, Any], str]:
    """`understudy-export eval ARGS --json` in-process; (the JSON report, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *args, "--json"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == code, (out, err)
    return json.loads(out), err


def db_rows(db: Path, query: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(query)]
    finally:
        conn.close()


def test_every_rate_matches_the_scripted_candidate(
    db_path: Path, candidate: str, script: CandidateScript, capsys: pytest.CaptureFixture[str]
) -> None:
    report, _ = run_eval(
        capsys,
        "--db", str(db_path),
        "--base-url", candidate,
        "--model", CANDIDATE_MODEL,
        "--api-key", SECRET_KEY,
        "--split", "all",
        "--concurrency", "3",
    )  # fmt: skip
    for key, value in EXPECTED.items():
        if key == "per_tool":
            continue
        assert report[key] == value, key
    for name, counts in EXPECTED["per_tool"].items():
        tool = report["per_tool"][name]
        for key, value in counts.items():
            assert tool[key] == value, (name, key)
    assert report["per_tool"]["get_weather"]["name_agreement"] == 0.8
    assert report["per_tool"]["search"]["argument_agreement"] == round(1 / 3, 4)
    assert report["per_tool"]["launch_rockets"]["name_agreement"] is None
    assert report["decision_agreement_ci95"][0] < 9 / 11 < report["decision_agreement_ci95"][1]
    assert report["skipped"] == {"no_teacher_answer": 1}  # the student-only trajectory
    assert report["status"] == "finished" and report["reference"] == "teacher"

    # Every step asked once, the 429s retried; the key sent, the model replaced, no stream.
    assert sorted(script.keys_received()) == sorted(STEP_KEYS_TEACHER)
    assert script.keys_received(429) == ["r4 cold", "r4 cold"]
    assert {r["authorization"] for r in script.received} == {f"Bearer {SECRET_KEY}"}
    bodies = [r["body"] for r in script.received]
    assert {b["model"] for b in bodies} == {CANDIDATE_MODEL}
    assert not any("stream" in b or "metadata" in b for b in bodies)
    lima = next(b for b in bodies if b["messages"][-1]["content"] == "s5 weather Lima")
    assert [t["function"]["name"] for t in lima["tools"]] == ["get_weather", "search"]

    # Tokens and cost of both sides (litellm's price table, read offline).
    assert report["tokens"]["candidate"] == {"prompt": 110, "completion": 55}
    assert report["tokens"]["reference"] == {"prompt": 110, "completion": 55}
    cand_in, cand_out = price_of(CANDIDATE_MODEL) or (0, 0)
    ref_in, ref_out = price_of(TEACHER_MODEL) or (0, 0)
    assert report["cost_usd"]["candidate"] == pytest.approx(11 * (10 * cand_in + 5 * cand_out))
    assert report["cost_usd"]["reference"] == pytest.approx(11 * (10 * ref_in + 5 * ref_out))
    assert report["latency_ms"]["candidate"]["p50"] > 0
    assert report["latency_ms"]["reference"]["p50"] == 800.0

    # Stored: the run with its report and one row per step; never the key.
    runs = db_rows(db_path, "SELECT * FROM eval_runs")
    assert len(runs) == 1 and runs[0]["status"] == "finished"
    assert (
        json.loads(runs[0]["report_json"])["argument_agreement"] == EXPECTED["argument_agreement"]
    )
    assert runs[0]["base_url"] == candidate
    steps = db_rows(db_path, "SELECT * FROM eval_steps")
    assert len(steps) == 11 and sum(bool(s["agrees"]) for s in steps) == 6
    raw = b"".join(p.read_bytes() for p in db_path.parent.glob("eval.db*"))
    assert SECRET_KEY.encode() not in raw


def test_reference_any_compares_with_what_was_returned(
    db_path: Path, candidate: str, capsys: pytest.CaptureFixture[str]
) -> None:
    report, _ = run_eval(
        capsys,
        "--db", str(db_path), "--base-url", candidate, "--model", CANDIDATE_MODEL,
        "--split", "all", "--reference", "any",
    )  # fmt: skip
    # 12 steps now: the student-only step agrees (final/final); the shadowed step's reference
    # is the student's final answer, so the candidate's call is a decision disagreement.
    assert report["steps"] == 12 and report["trajectories"] == 5
    assert report["decision_agreement"] == round(9 / 12, 4)
    assert report["tool_call_steps"] == 6 and report["skipped"] == {}


def test_split_valid_replays_the_exports_validation_trajectories(
    db_path: Path, candidate: str, script: CandidateScript, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:  # fmt: skip
    exported = run_cli(
        "export", "--db", str(db_path), "--out", str(tmp_path / "train.jsonl"),
        "--val-fraction", "0.5", "--seed", "7", "--quiet",
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    valid = read_jsonl(tmp_path / "valid.jsonl")
    first_users = {next(m["content"] for m in s["messages"] if m["role"] == "user") for s in valid}
    assert 0 < len(first_users) < 5
    report, _ = run_eval(
        capsys,
        "--db", str(db_path), "--base-url", candidate, "--model", CANDIDATE_MODEL,
        "--val-fraction", "0.5", "--seed", "7", "--reference", "any",
    )  # fmt: skip
    assert report["split"] == "valid" and report["trajectories"] == len(first_users)
    asked_first_users = {
        next(m["content"] for m in r["body"]["messages"] if m["role"] == "user")
        for r in script.received
    }
    assert asked_first_users == first_users


def test_bad_usage_is_one_line(
    db_path: Path, candidate: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for args, message in (
        ([], "--split valid needs the export's --val-fraction"),
        (["--split", "all", "--reference", "student", "--route", "teacher"], "no steps to replay"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--db", str(db_path), "--base-url", candidate, "--model", "m", *args])
        assert message in str(exit_info.value.code)
        assert "\n" not in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--db", str(db_path.parent / "missing.db"), "--base-url", candidate,
              "--model", "m", "--split", "all"])  # fmt: skip
    assert "database not found" in str(exit_info.value.code)


def test_unanswered_steps_are_asked_again_and_only_they(
    db_path: Path, candidate: str, script: CandidateScript, capsys: pytest.CaptureFixture[str]
) -> None:
    script.failures["s2 weather Rome"] = [500, 500, 500]
    args = ["--db", str(db_path), "--base-url", candidate, "--model", CANDIDATE_MODEL,
            "--split", "all", "--retries", "2"]  # fmt: skip
    report, err = run_eval(capsys, *args, code=1)
    assert report["errors"] == 1 and report["error_types"] == {"http_500": 1}
    assert report["status"] == "incomplete" and report["answered"] == 10
    assert report["tool_call_steps"] == 6  # the unanswered step is in no rate
    assert script.keys_received(500) == ["s2 weather Rome"] * 3  # asked, then 2 retries
    first = len(script.keys_received())
    report, _ = run_eval(capsys, *args)
    assert script.keys_received()[first:] == ["s2 weather Rome"]
    assert report["reused"] == 10 and report["asked"] == 1 and report["status"] == "finished"
    for key in ("decision_agreement", "argument_agreement", "argument_agreement_typed"):
        assert report[key] == EXPECTED[key]
    assert len(db_rows(db_path, "SELECT id FROM eval_runs")) == 1
    # --new-run starts over.
    report, _ = run_eval(capsys, *args, "--new-run")
    assert report["asked"] == 11 and len(db_rows(db_path, "SELECT id FROM eval_runs")) == 2


def test_a_killed_run_resumes_without_asking_again(
    db_path: Path, candidate: str, script: CandidateScript, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL the CLI while the candidate holds its 5th request; the rerun asks only the rest."""
    script.hang_after = 4
    args = ["eval", "--db", str(db_path), "--base-url", candidate, "--model", CANDIDATE_MODEL,
            "--split", "all", "--concurrency", "1", "--json"]  # fmt: skip
    env = child_env(OPENAI_API_KEY=SECRET_KEY)
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            held = [r for r in script.received if r["status"] == "held"]
            if held and process.poll() is None:
                break
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        else:
            raise AssertionError("the run never reached the held request")
        stored = db_rows(db_path, "SELECT exchange_id FROM eval_steps")
        assert len(stored) == 4  # each answer stored as it came
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    first_keys = script.keys_received()
    assert len(first_keys) == 4
    runs = db_rows(db_path, "SELECT status FROM eval_runs")
    assert [r["status"] for r in runs] == ["running"]

    script.hang_after = None
    script.release()
    report, _ = run_eval(capsys, *args[1:-1])
    second_keys = script.keys_received()[4:]
    assert not set(first_keys) & set(second_keys)  # nothing answered was asked again
    assert sorted(first_keys + second_keys) == sorted(STEP_KEYS_TEACHER)
    assert report["reused"] == 4 and report["asked"] == 7 and report["status"] == "finished"
    for key, value in EXPECTED.items():
        if key != "per_tool":
            assert report[key] == value, key
    assert len(db_rows(db_path, "SELECT id FROM eval_runs")) == 1


def test_limit_asks_some_steps_now_and_the_rest_on_the_next_run(
    db_path: Path, candidate: str, script: CandidateScript, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--db", str(db_path), "--base-url", candidate, "--model", CANDIDATE_MODEL,
            "--split", "all", "--concurrency", "1"]  # fmt: skip
    report, err = run_eval(capsys, *args, "--limit", "3", code=1)
    assert report["asked"] == 3 and report["answered"] == 3 and report["status"] == "incomplete"
    assert report["errors"] == 8 and report["error_types"] == {"not_asked": 8}
    report, _ = run_eval(capsys, *args)
    assert report["asked"] == 8 and report["reused"] == 3 and report["errors"] == 0
    assert sorted(script.keys_received()) == sorted(STEP_KEYS_TEACHER)


def test_a_database_the_proxy_has_not_migrated_yet_gets_the_eval_tables(
    db_path: Path, candidate: str, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = sqlite3.connect(db_path)
    conn.executescript(
        "DROP TABLE eval_steps; DROP TABLE eval_runs;"
        "DELETE FROM understudy_migrations WHERE name = '005_evaluations';"
    )
    conn.close()
    report, _ = run_eval(
        capsys, "--db", str(db_path), "--base-url", candidate, "--model", CANDIDATE_MODEL,
        "--split", "all",
    )  # fmt: skip
    assert report["steps"] == 11 and report["errors"] == 0
    assert len(db_rows(db_path, "SELECT * FROM eval_steps")) == 11
