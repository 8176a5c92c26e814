"""`upload` with the official SDK against a fake OpenAI files / fine-tuning server on loopback; the
CLI runs as `exporter.cli.main(argv)` in this process, its environment set with `monkeypatch`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.upload import UploadError, upload
from proxy.testing.fake_openai_files import VALID_KEY, serve_fake_openai
from proxy.testing.servers import free_port
from tests.support.inprocess import CliResult, run_exporter

SAMPLE = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[tuple[str, Any]]:
    port = free_port()
    with serve_fake_openai(port) as app:
        yield f"http://127.0.0.1:{port}/v1", app


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_text("\n".join(json.dumps(SAMPLE) for _ in range(10)) + "\n")
    valid.write_text(json.dumps(SAMPLE) + "\n")
    return train, valid


def run_cli(*argv: str, key: str | None, monkeypatch: pytest.MonkeyPatch) -> CliResult:
    """`understudy-export ARGV` with `OPENAI_API_KEY=key` (unset for None) and no other
    `OPENAI_*` variable in the environment."""
    with monkeypatch.context() as patched:
        for name in [n for n in os.environ if n.startswith("OPENAI_")]:
            patched.delenv(name)
        if key is not None:
            patched.setenv("OPENAI_API_KEY", key)
        return run_exporter(*argv)


def test_upload_files_and_create_a_job(
    fake_openai: tuple[str, Any], files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, app = fake_openai
    train, valid = files
    result = run_cli(
        "upload",
        str(train),
        "--validation-file",
        str(valid),
        "--model",
        "gpt-4.1-mini-2025-04-14",
        "--suffix",
        "understudy",
        "--epochs",
        "2",
        "--base-url",
        base_url,
        "--json",
        key=VALID_KEY,
        monkeypatch=monkeypatch,
    )
    assert result.returncode == 0, result.stderr
    ids = json.loads(result.stdout)
    assert (
        ids["training_file_id"] in app.state.files and ids["validation_file_id"] in app.state.files
    )
    assert app.state.files[ids["training_file_id"]]["content"] == train.read_text()
    (job,) = [j for j in app.state.jobs if j["id"] == ids["job_id"]]
    assert job["suffix"] == "understudy" and job["validation_file"] == ids["validation_file_id"]
    assert job["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": 2}},
    }
    assert ids["job_status"] == "validating_files" and ids["method"] == "supervised"
    plain = run_cli(
        "upload", str(train), "--base-url", base_url, key=VALID_KEY, monkeypatch=monkeypatch
    )
    assert plain.returncode == 0 and plain.stdout.startswith("training file: file-fake")


def test_dpo_files_create_dpo_jobs(fake_openai: tuple[str, Any], tmp_path: Path) -> None:
    base_url, app = fake_openai
    path = tmp_path / "dpo.jsonl"
    pair = {
        "input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_output": [{"role": "assistant", "content": "good"}],
        "non_preferred_output": [{"role": "assistant", "content": "bad"}],
    }
    path.write_text(json.dumps(pair) + "\n")
    result = upload(path, model="gpt-4.1-mini", base_url=base_url, api_key=VALID_KEY)
    assert result.method == "dpo"
    assert app.state.jobs[-1]["method"] == {"type": "dpo", "dpo": {"hyperparameters": {}}}


def test_auth_failure_is_one_clear_line(
    fake_openai: tuple[str, Any], files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, _ = fake_openai
    result = run_cli(
        "upload", str(files[0]), "--base-url", base_url, key="sk-wrong-key", monkeypatch=monkeypatch
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "authentication failed (401)" in line and "OPENAI_API_KEY" in line
    missing = run_cli(
        "upload", str(files[0]), "--base-url", base_url, key=None, monkeypatch=monkeypatch
    )
    assert (
        missing.returncode == 1
        and "no API key" in missing.stderr
        and "Traceback" not in missing.stderr
    )


def test_validation_failures_are_reported(
    fake_openai: tuple[str, Any],
    files: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base_url, _ = fake_openai
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "old format"}\n')
    with pytest.raises(UploadError, match=r"rejected by the API \(400\).*Line 1 has no messages"):
        upload(bad, base_url=base_url, api_key=VALID_KEY)
    result = run_cli(
        "upload",
        str(files[0]),
        "--model",
        "gpt-2",
        "--base-url",
        base_url,
        key=VALID_KEY,
        monkeypatch=monkeypatch,
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert (
        "creating the fine-tuning job: rejected by the API (400): Model gpt-2 is not available"
        in line
    )
    missing = run_cli(
        "upload", str(tmp_path / "nope.jsonl"), key=VALID_KEY, monkeypatch=monkeypatch
    )
    assert missing.returncode == 1 and "file not found" in missing.stderr


def test_unreachable_api(files: tuple[Path, Path]) -> None:
    with pytest.raises(UploadError, match="cannot reach"):
        upload(
            files[0],
            base_url=f"http://127.0.0.1:{free_port()}/v1",
            api_key=VALID_KEY,
            max_retries=0,
        )
