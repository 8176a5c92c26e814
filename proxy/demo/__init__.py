"""`python -m proxy demo`: a local fake upstream, the proxy, and sample traffic, then the dashboard.

Starts the fake OpenAI upstream (`proxy.testing.fake_openai`, a deterministic tool-using "model") and
the proxy in this process, each on its own uvicorn server thread; records into a demo database
file (`./understudy-demo.db` unless `--db` says otherwise); plays a handful of multi-step
tool-use conversations through the proxy with the official `openai` SDK (parallel tool calls, a
stream, a multi-turn follow-up, a fork, a teacher-routed one when a teacher can be configured, an
upstream error); prints the dashboard URL; and serves until Ctrl-C. No API key, no network.

The conversations and the scripted model that answers them are in `proxy.demo.scenarios`.
Demo requests carry `metadata: {"understudy_demo": "1", ...}` and every run's system prompts name
the run, so a second run adds new trajectories instead of continuing old ones.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from proxy.config import Settings, SettingsError, load_settings
from proxy.demo.scenarios import CONVERSATIONS, TOOLS, Conversation, scripted_model, tool_output
from proxy.testing.agent import assemble_chunks
from proxy.testing.servers import ServerError, ServerThread, free_port

__all__ = ["CONVERSATIONS", "TOOLS", "Conversation", "play", "run_demo", "scripted_model"]

DEMO_DB = "./understudy-demo.db"
DEMO_PORT = 8787
DEMO_METADATA = {"understudy_demo": "1"}

log = logging.getLogger("understudy.demo")


# -- playing a conversation through the proxy --------------------------------------------------


def _ask(client: Any, convo: Conversation, messages: list[dict[str, Any]]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": convo.model,
        "messages": messages,
        "metadata": {**DEMO_METADATA, "scenario": convo.name},
        "extra_headers": convo.headers,
    }
    if convo.tools:
        kwargs["tools"] = [TOOLS[name] for name in convo.tools]
    if convo.stream:
        stream = client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
        return assemble_chunks(stream)[0]
    completion = client.chat.completions.create(**kwargs)
    return completion.choices[0].message.model_dump(exclude_none=True)


def _tool_results(message: dict[str, Any], retry: int = 0) -> list[dict[str, Any]]:
    results = []
    for call in message.get("tool_calls") or []:
        try:
            args = json.loads(call["function"]["arguments"] or "{}")
        except ValueError:
            args = {}
        results.append(
            {
                "role": "tool",
                "tool_call_id": call["id"],
                "content": tool_output(call["function"]["name"], args, retry),
            }
        )
    return results


def play(client: Any, convo: Conversation, run_label: str, max_steps: int = 6) -> int:
    """Run one conversation's agent loop through the proxy; return the requests it made."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": f"{convo.system} (Understudy demo run {run_label})"}
    ]
    requests = 0
    for user_text in convo.users:
        messages.append({"role": "user", "content": user_text})
        for _ in range(max_steps):
            answer = _ask(client, convo, messages)
            requests += 1
            messages.append(answer)
            if not answer.get("tool_calls"):
                break
            if convo.fork and requests == 1:
                # The app's tool timed out: it sends this step once, then again with the retried
                # tool's result. Both continue the same exchange, so the trajectory forks.
                _ask(client, convo, [*messages, *_tool_results(answer)])
                requests += 1
                messages.extend(_tool_results(answer, retry=1))
                continue
            messages.extend(_tool_results(answer))
    return requests


# -- servers and settings ----------------------------------------------------------------------


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host if host not in ("", "0.0.0.0", "::") else "0.0.0.0", port))
        except OSError:
            return False
    return True


def demo_settings(options: dict[str, Any], upstream: str) -> Settings:
    """The proxy's settings for the demo: `options` (the demo's flags, by field name) over the
    demo's defaults (its own database file, the fake upstream, which also plays the teacher,
    `demo` set so the dashboard says it shows demo data). Tool-call promotion is off unless
    `--promote-tool-calls` asks for it, as in production.

    Raises SettingsError.
    """
    values: dict[str, Any] = {
        "db": DEMO_DB,
        "log_level": "warning",
        "teacher_model": "openai/o4-mini",
        "teacher_base_url": upstream,
        "teacher_api_key": "demo-teacher-key",
        **options,
        "upstream": upstream,
        "demo": True,
    }
    if "port" not in options and "UNDERSTUDY_PORT" not in os.environ:
        host = str(values.get("host", "127.0.0.1"))
        values["port"] = DEMO_PORT if _port_free(host, DEMO_PORT) else free_port(host)
    return load_settings(values)


def exporter_command() -> str:
    """How to run the exporter from here, as the user can type it: `understudy-export` when it
    is on PATH, else the console script beside this Python (relative to the working directory
    when it is below it), else `<this python> -m exporter`."""
    on_path = shutil.which("understudy-export")
    beside = Path(sys.executable).parent / "understudy-export"
    if on_path and Path(on_path).resolve() == beside.resolve():
        return "understudy-export"
    if beside.is_file():
        try:
            return "./" + str(beside.relative_to(Path.cwd()))
        except ValueError:
            return shlex.quote(str(beside))
    return f"{shlex.quote(sys.executable)} -m exporter"


def _wait_recorded(
    root: str, headers: dict[str, str], expected: int, timeout: float = 10.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            stats = httpx.get(f"{root}/api/stats", headers=headers, timeout=5).json()
        except (httpx.HTTPError, ValueError):
            stats = {}
        if int(stats.get("exchanges", 0)) >= expected:
            break
        time.sleep(0.1)
    return stats


def run_demo(options: dict[str, Any]) -> None:
    """Start the fake upstream and the proxy, play the demo conversations, serve until Ctrl-C.

    options: the `demo` command's flags given (Settings field names, plus `upstream_port`: the
    fake upstream's port, default a free one); `--db` defaults to ./understudy-demo.db, `--port`
    (or UNDERSTUDY_PORT) to 8787, another free port when that one is taken. Exits with one line when it cannot start.
    """
    import openai

    from proxy.app import create_app
    from proxy.dashboard.security import is_loopback
    from proxy.testing.fake_openai import create_fake_app

    options = dict(options)
    fake_port = int(options.pop("upstream_port", 0) or 0) or free_port()
    upstream = f"http://127.0.0.1:{fake_port}/v1"
    try:
        settings = demo_settings(options, upstream)
    except SettingsError as exc:
        sys.exit(f"understudy-proxy demo: {exc}")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    fake = ServerThread(create_fake_app(scripted_model), "127.0.0.1", fake_port)
    try:
        fake.start()
    except ServerError as exc:
        sys.exit(
            f"understudy-proxy demo: the fake upstream did not start on port {fake_port}: {exc}"
        )
    try:
        proxy = ServerThread(
            create_app(settings),
            settings.host,
            settings.port,
            log_level=settings.log_level.lower(),
            lifespan="on",
        )
        proxy.start()
    except (ServerError, SystemExit, OSError) as exc:
        fake.stop()
        sys.exit(
            f"understudy-proxy demo: the proxy did not start on {settings.host}:{settings.port}: {exc}"
        )

    connect_host = "127.0.0.1" if settings.host in ("0.0.0.0", "", "::") else settings.host
    if ":" in connect_host and not connect_host.startswith("["):
        connect_host = f"[{connect_host}]"
    root = f"http://{connect_host}:{settings.port}"
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    api_headers = {"authorization": f"Bearer {token}"} if token else {}
    client = openai.OpenAI(base_url=f"{root}/v1", api_key="demo-no-real-key", max_retries=0)
    run_label = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    print("Understudy demo")
    print(f"  fake upstream  {upstream}  (plays a tool-using model: no API key, no network)")
    print(f"  proxy          {root}/v1")
    print(f"  database       {settings.db}  (demo data only)")
    print()
    requests = 0
    for convo in CONVERSATIONS:
        try:
            made = play(client, convo, run_label)
            requests += made
            print(f"  played {convo.name}: {made} request{'s' if made != 1 else ''}")
        except openai.APIStatusError as exc:
            requests += 1
            print(
                f"  played {convo.name}: upstream answered {exc.status_code} (recorded as an error)"
            )
        except openai.OpenAIError as exc:
            print(f"  skipped {convo.name}: {type(exc).__name__}: {exc}")
    stats = (
        _wait_recorded(root, api_headers, requests) if is_loopback(connect_host) or token else {}
    )
    print()
    if stats:
        print(
            f"  recorded: {stats.get('exchanges')} exchanges in {stats.get('trajectories')} trajectories (all runs)"
        )
    if settings.admin_token is None and not is_loopback(settings.host):
        print(
            "  the dashboard is off: the proxy listens on a non-loopback address without "
            "UNDERSTUDY_ADMIN_TOKEN (see the log)"
        )
    else:
        print(
            f"  Dashboard: {root}/dashboard"
            + ("   (log in with UNDERSTUDY_ADMIN_TOKEN)" if token else "")
        )
    exporter = exporter_command()
    db_arg = shlex.quote(settings.db)
    print(f"  Export:    {exporter} export --db {db_arg} --out demo.jsonl")
    print(f"  Check it:  {exporter} validate demo.jsonl")
    print(f"  Stats:     {exporter} stats --db {db_arg}")
    print()
    print("Serving until Ctrl-C.", flush=True)

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    try:
        while not stop.is_set():
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    print("\nstopping: writing what is queued...", flush=True)
    proxy.stop()
    fake.stop()
    print("demo stopped", flush=True)
