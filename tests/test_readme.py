"""The README's shell commands run as written, in order, against the demo (issue 10).

Every ```bash block of README.md runs, except those right after a
`<!-- not run by tests/test_readme.py: REASON -->` comment (the whole suite, an upload to OpenAI,
real providers). Commands run with bash in a fresh directory, one after the other, each must
exit 0. Two stand-ins, both explicit: the install line (`python3 -m venv .venv && .venv/bin/pip
install -e .`) is replaced by a `.venv` link to the environment running this test (installing
from PyPI is what `.ci/run` does); commands that serve (`understudy-proxy`, `understudy-proxy
demo`) start in the background on a free port (`UNDERSTUDY_PORT`), the plain proxy in front of the
fake OpenAI upstream (`UNDERSTUDY_UPSTREAM`), with one app conversation played through it as the
README's "Point an app at it" says. They are stopped with Ctrl-C (SIGINT) at the end.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from proxy.testing.servers import REPOSITORY_ROOT, child_env, free_port, wait_for_http
from tests.support.processes import FakeUpstream

pytestmark = pytest.mark.e2e

INSTALL = "python3 -m venv .venv && .venv/bin/pip install -e ."
SKIP = re.compile(r"<!-- not run by tests/test_readme\.py: (.+?) -->")


def readme_commands(text: str) -> list[str]:
    """The commands of the README's runnable bash blocks, in order (continuations joined)."""
    commands: list[str] = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if line.strip() != "```bash":
            continue
        if number > 0 and SKIP.search(lines[number - 1]):
            continue
        block: list[str] = []
        for body in lines[number + 1 :]:
            if body.strip() == "```":
                break
            block.append(body)
        joined = "\n".join(block).replace("\\\n", " ")
        commands += [c.strip() for c in joined.splitlines() if c.strip()]
    return commands


def test_every_bash_block_is_either_run_or_says_why_not() -> None:
    text = (REPOSITORY_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = text.count("```bash")
    skipped = len(SKIP.findall(text))
    commands = readme_commands(text)
    assert blocks - skipped >= 4  # the setup, demo and export blocks run; each skip says why
    assert commands[0] == INSTALL, commands[:1]
    assert any(c.endswith("understudy-proxy demo") for c in commands)


def _serves(command: str) -> str | None:
    """'serve' or 'demo' when `command` starts a server that runs until stopped, else None."""
    words = shlex.split(command, comments=True)
    if not words or not words[0].endswith("understudy-proxy"):
        return None
    rest = words[1:]
    if rest[:1] == ["demo"]:
        return "demo"
    if not rest or rest[0] == "serve" or rest[0].startswith("--"):
        return None if "--help" in rest else "serve"
    return None


def _read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> str:
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


def test_readme_commands_run_as_written_in_order(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    commands = readme_commands((REPOSITORY_ROOT / "README.md").read_text(encoding="utf-8"))
    assert commands[0] == INSTALL
    (tmp_path / ".venv").symlink_to(sys.prefix)  # the virtual environment running this test
    servers: list[subprocess.Popen[str]] = []
    try:
        for command in commands[1:]:
            kind = _serves(command)
            port = free_port()
            env = child_env(UNDERSTUDY_PORT=str(port))
            if kind == "serve":
                env["UNDERSTUDY_UPSTREAM"] = fake_upstream.base_url
            if kind is not None:
                process = subprocess.Popen(
                    ["bash", "-c", f"exec {command}"],
                    cwd=tmp_path,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                servers.append(process)
                assert process.poll() is None, (command, process.communicate()[0])
                if kind == "demo":
                    _read_until(process, "Serving until Ctrl-C.", timeout=180)
                else:
                    wait_for_http(f"http://127.0.0.1:{port}/health", timeout=60)
                    app = openai.OpenAI(
                        base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-readme", max_retries=0
                    )
                    app.chat.completions.create(
                        model="gpt-4.1-mini", messages=[{"role": "user", "content": "hello"}]
                    )
                    app.close()
                    assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
                continue
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert done.returncode == 0, (command, done.stdout, done.stderr)
    finally:
        for process in servers:
            process.send_signal(signal.SIGINT)
        for process in servers:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert [p.returncode for p in servers] == [0] * len(servers)
    assert (tmp_path / "demo.jsonl").is_file() and (tmp_path / "train.jsonl").is_file()
