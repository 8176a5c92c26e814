"""`python -m proxy demo`: fake upstream + proxy + sample traffic, as a new user runs it."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from proxy.config import Settings
from proxy.testing.servers import child_env, free_port

pytestmark = pytest.mark.e2e


def read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """The process output up to and including the line containing `marker`."""
    lines: list[str] = []
    done = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if marker in line:
                done.set()
                return
        done.set()

    threading.Thread(target=pump, daemon=True).start()
    done.wait(timeout)
    text = "".join(lines)
    assert marker in text, f"no {marker!r} within {timeout}s:\n{text}"
    return text


def printed_command(output: str, label: str) -> list[str]:
    """The command the demo printed after `label` (e.g. "Export:"), split as a shell would."""
    line = next(line for line in output.splitlines() if line.strip().startswith(label))
    return shlex.split(line.split(label, 1)[1])


def test_demo_records_conversations_and_serves_the_dashboard(tmp_path: Path) -> None:
    port, upstream_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "demo",
            "--port",
            str(port),
            "--upstream-port",
            str(upstream_port),
        ],
        cwd=tmp_path,  # the demo database goes to ./understudy-demo.db
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = read_until(process, "Serving until Ctrl-C.", timeout=180)
        root = f"http://127.0.0.1:{port}"
        assert f"Dashboard: {root}/dashboard" in output
        assert "understudy-demo.db" in output and "played support-refund (stream)" in output
        assert f"fake upstream  http://127.0.0.1:{upstream_port}/v1" in output
        assert httpx.get(f"http://127.0.0.1:{upstream_port}/v1/models").status_code == 200
        assert (tmp_path / "understudy-demo.db").is_file()

        data = httpx.get(f"{root}/api/trajectories").json()["data"]
        assert len(data) == 7
        assert sum(t["exchange_count"] for t in data) == 21
        trip = next(t for t in data if t["first_user_text"].startswith("Plan a weekend"))
        detail = httpx.get(f"{root}/api/trajectories/{trip['id']}").json()
        assert len(detail["conversation"][2]["tool_calls"]) == 2  # parallel calls
        assert detail["exchanges"][0]["request"]["metadata"]["understudy_demo"] == "1"
        support = next(t for t in data if t["first_user_text"].startswith("My order"))
        streamed = httpx.get(f"{root}/api/trajectories/{support['id']}").json()["exchanges"]
        assert all(e["stream"] and e["ttft_ms"] is not None for e in streamed)
        if "teacher_model" in Settings.model_fields:
            assert any(t["route"] == "teacher" for t in data)

        page = httpx.get(f"{root}/dashboard")
        assert page.status_code == 200 and "Demo data" in page.text

        # The commands the demo suggests run as printed, on this fresh demo database.
        for label in ("Export:", "Check it:", "Stats:"):
            ran = subprocess.run(
                printed_command(output, label),
                cwd=tmp_path,
                env=child_env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert ran.returncode == 0, (label, ran.stdout, ran.stderr)
            assert "warning" not in ran.stderr.lower() or label == "Check it:"
        assert (tmp_path / "demo.jsonl").read_text(encoding="utf-8").count("\n") >= 5
    finally:
        process.send_signal(signal.SIGINT)
        try:
            rest = process.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            rest = process.communicate()[0]
    assert process.returncode == 0, rest
    assert "demo stopped" in rest


def test_demo_with_admin_token_prints_login_hint(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "demo-token.db"  # any file name: the demo marks its data by a setting
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--port", str(port), "--db", str(db)],
        env=child_env(UNDERSTUDY_ADMIN_TOKEN="demo-token"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = read_until(process, "Serving until Ctrl-C.", timeout=180)
        assert "log in with UNDERSTUDY_ADMIN_TOKEN" in output
        assert "recorded: 21 exchanges in 7 trajectories" in output
        root = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{root}/api/stats").status_code == 401
        stats = httpx.get(f"{root}/api/stats", headers={"authorization": "Bearer demo-token"})
        assert json.loads(stats.text)["trajectories"] == 7
        page = httpx.get(f"{root}/dashboard", headers={"authorization": "Bearer demo-token"})
        assert "Demo data" in page.text  # marked by the demo's setting, not by the file name
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert process.returncode == 0
