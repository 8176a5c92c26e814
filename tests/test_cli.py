"""The command lines, run in-process: `python -m proxy` subcommands and `validate`'s sample minimum."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.__main__ import parse_args
from proxy.config import Settings
from tests.support.inprocess import run_exporter
from tests.support.inprocess import run_proxy_cli as run_proxy


def test_serve_is_the_default_command_and_takes_every_setting() -> None:
    assert parse_args([]) == ("serve", {})
    command, options = parse_args(["--port", "9000", "--teacher-model", "o3"])
    assert (command, options) == ("serve", {"port": "9000", "teacher_model": "o3"})
    assert parse_args(["serve", "--db", "x.db"]) == ("serve", {"db": "x.db"})
    serve_help = run_proxy("serve", "--help")
    assert serve_help.returncode == 0
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in serve_help.stdout, name


def test_each_command_has_its_own_help() -> None:
    general = run_proxy("--help")
    assert general.returncode == 0
    assert all(command in general.stdout for command in ("serve", "migrate", "demo"))
    demo = run_proxy("demo", "--help")
    assert demo.returncode == 0 and "--upstream-port" in demo.stdout
    assert "--teacher-model" not in demo.stdout and "--upstream " not in demo.stdout
    migrate = run_proxy("migrate", "--help")
    assert migrate.returncode == 0 and "--db" in migrate.stdout
    assert "--teacher-model" not in migrate.stdout


def test_a_command_refuses_flags_it_would_ignore() -> None:
    refused = run_proxy("migrate", "--teacher-model", "o3")
    assert refused.returncode == 2 and "unrecognized arguments: --teacher-model" in refused.stderr
    refused = run_proxy("demo", "--upstream", "http://127.0.0.1:1/v1")
    assert refused.returncode == 2 and "--upstream" in refused.stderr


def test_migrate_reports_the_schema_and_bad_settings_are_one_line(tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    migrated = run_proxy("migrate", "--db", str(db))
    assert migrated.returncode == 0, migrated.stderr
    assert "is at the latest schema" in migrated.stdout and db.is_file()
    again = run_proxy("migrate", "--db", str(db))
    assert "applied: none needed" in again.stdout
    bad = run_proxy("serve", "--port", "99999", "--db", str(db))
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "understudy-proxy: invalid settings: --port: Input should be less than or equal to 65535"
    ]
    bad_json = run_proxy("--routing-rules", "[not json", "--db", str(db))
    assert bad_json.returncode == 1 and "--routing-rules must be JSON" in bad_json.stderr


def _samples(path: Path, n: int) -> Path:
    line = {
        "messages": [
            {"role": "user", "content": "Where is order A1234?"},
            {"role": "assistant", "content": "It was delivered on Monday."},
        ]
    }
    path.write_text("".join(json.dumps(line) + "\n" for _ in range(n)), encoding="utf-8")
    return path


def test_validate_sample_minimum_is_a_warning_unless_strict(tmp_path: Path) -> None:
    few = _samples(tmp_path / "few.jsonl", 6)
    warned = run_exporter("validate", str(few))
    assert warned.returncode == 0, warned.stdout + warned.stderr
    assert "warning: 6 samples: OpenAI fine-tuning needs at least 10" in warned.stdout
    report = json.loads(run_exporter("validate", str(few), "--json").stdout)
    assert report["valid"] is True and report["errors"] == []
    assert report["warnings"] and "at least 10" in report["warnings"][0]
    strict = run_exporter("validate", str(few), "--strict-min-samples")
    assert strict.returncode == 1 and "6 samples: at least 10 are required" in strict.stdout
    enough = run_exporter("validate", str(_samples(tmp_path / "ok.jsonl", 10)), "--json")
    assert enough.returncode == 0 and json.loads(enough.stdout)["warnings"] == []


@pytest.mark.parametrize("argv", [["demo", "--port", "x"], ["demo", "--upstream-port", "x"]])
def test_demo_flags_are_checked_before_anything_starts(argv: list[str]) -> None:
    result = run_proxy(*argv)
    assert result.returncode != 0
    assert "understudy-proxy" in result.stderr
