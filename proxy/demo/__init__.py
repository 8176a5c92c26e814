"""`python -m proxy demo`: a local fake upstream, the proxy, and sample traffic, then the dashboard.

Starts the fake OpenAI upstream (`proxy.testing.fake_openai`, a deterministic tool-using "model") and
the proxy in this process, each on its own uvicorn server thread; records into a demo database
file (`./understudy-demo.db` unless `--db` says otherwise); plays a handful of multi-step
tool-use conversations through the proxy with the official `openai` SDK (parallel tool calls, a
stream, a multi-turn follow-up, a fork, a teacher-routed one when a teacher can be configured, an
upstream error); prints the dashboard URL; and serves until Ctrl-C. No API key, no network.

Demo requests carry `metadata: {"understudy_demo": "1", ...}` and every run's system prompts name
the run, so a second run adds new trajectories instead of continuing old ones.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from proxy.config import Settings, SettingsError, load_settings
from proxy.testing.servers import ServerError, ServerThread, free_port

DEMO_DB = "./understudy-demo.db"
DEMO_PORT = 8787
DEMO_METADATA = {"understudy_demo": "1"}

log = logging.getLogger("understudy.demo")


# -- the demo's tools: JSON schemas and canned results -----------------------------------------


def _tool(name: str, description: str, **properties: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {
                    k: {"type": "string", "description": v} for k, v in properties.items()
                },
                "required": list(properties),
                "additionalProperties": False,
            },
        },
    }


TOOLS: dict[str, dict[str, Any]] = {
    "search_flights": _tool(
        "search_flights",
        "Find flights between two cities on a date.",
        route="From-to, e.g. BER-LIS",
        date="YYYY-MM-DD",
    ),
    "get_weather": _tool("get_weather", "Weather forecast for a city.", city="City name"),
    "find_hotels": _tool("find_hotels", "Hotels with free rooms in a city.", city="City name"),
    "lookup_order": _tool("lookup_order", "Look up a customer order by id.", order_id="Order id"),
    "refund_order": _tool("refund_order", "Refund an order (full amount).", order_id="Order id"),
    "search_docs": _tool("search_docs", "Search the product documentation.", query="Search words"),
    "fetch_page": _tool("fetch_page", "Fetch a documentation page as HTML.", url="Page URL"),
}

RESULTS: dict[str, Callable[[int], Any]] = {
    "search_flights": lambda n: {
        "flights": [{"flight": "TP 555", "departs": "07:40", "price_eur": 129}]
    },
    "get_weather": lambda n: {"forecast": "sunny", "high_c": 24, "low_c": 16},
    "find_hotels": lambda n: {"hotels": [{"name": "Casa do Rio", "price_eur": 98, "rating": 4.6}]},
    "lookup_order": lambda n: {
        "order_id": "A1234",
        "status": "delivered",
        "item": "kettle",
        "total_eur": 39.9,
    },
    "refund_order": lambda n: {"refund_id": "R-88", "amount_eur": 39.9, "status": "issued"},
    "search_docs": lambda n: {"hits": ["/docs/keys#rotate", "/docs/service-accounts"]},
    # Captured traffic is untrusted: this result shows that the dashboard escapes what it shows.
    "fetch_page": lambda n: (
        "<h1>Rotating keys</h1><p>Create a new key, deploy it, revoke the old one.</p>"
        "<script>alert('tool results are shown as text')</script>"
    ),
}


@dataclass
class Conversation:
    """One scripted conversation: what the app sends and how it calls the proxy."""

    name: str
    system: str
    users: list[str]
    tools: list[str]
    model: str = "gpt-4.1-mini"
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    fork: bool = False


CONVERSATIONS = [
    Conversation(
        "trip-planner",
        "You are a travel agent. Use the tools; answer in two sentences.",
        [
            "Plan a weekend in Lisbon from Berlin: check flights and the weather in parallel, then suggest a hotel."
        ],
        ["search_flights", "get_weather", "find_hotels"],
    ),
    Conversation(
        "support-refund (stream)",
        "You are a support agent for a kitchenware shop.",
        ["My order A1234 arrived broken. Please refund it."],
        ["lookup_order", "refund_order"],
        stream=True,
        headers={"x-fake-chunk-delay-ms": "15"},
    ),
    Conversation(
        "docs-helper (two user turns)",
        "You answer questions about the product from its documentation.",
        ["How do I rotate an API key?", "And for a service account?"],
        ["search_docs", "fetch_page"],
        model="gpt-4.1",
    ),
    Conversation(
        "weather (retried step: a fork)",
        "You are a concise assistant.",
        ["What's the weather in Oslo this weekend, and is there a hotel with a sauna?"],
        ["get_weather", "find_hotels"],
        model="gpt-4o-mini",
        fork=True,
    ),
    Conversation(
        "trip-planner (teacher)",
        "You are a travel agent. Use the tools; answer in two sentences.",
        ["Plan three days in Porto: compare flights and weather in parallel first."],
        ["search_flights", "get_weather", "find_hotels"],
        headers={"X-Understudy-Route": "teacher"},
    ),
    Conversation(
        "haiku (no tools)",
        "You are a poet.",
        ["Write a haiku about a proxy that remembers everything."],
        [],
    ),
    Conversation(
        "rate-limited",
        "You are a concise assistant.",
        ["Summarise yesterday's orders."],
        ["lookup_order"],
        model="fake-error-429",
    ),
]


# -- playing a conversation through the proxy --------------------------------------------------


def _message_from_stream(stream: Any) -> dict[str, Any]:
    """Assemble the assistant message from `chat.completion.chunk`s, as an app would."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content.append(delta.content)
            for call in delta.tool_calls or []:
                entry = calls.setdefault(
                    call.index,
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if call.id:
                    entry["id"] = call.id
                if call.function and call.function.name:
                    entry["function"]["name"] = call.function.name
                if call.function and call.function.arguments:
                    entry["function"]["arguments"] += call.function.arguments
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message


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
        return _message_from_stream(stream)
    completion = client.chat.completions.create(**kwargs)
    return completion.choices[0].message.model_dump(exclude_none=True)


def _tool_results(message: dict[str, Any], variant: int = 0) -> list[dict[str, Any]]:
    results = []
    for call in message.get("tool_calls") or []:
        name = call["function"]["name"]
        value = RESULTS.get(name, lambda n: {"ok": True})(variant)
        if variant:
            value = {"retry": variant, "note": "first attempt timed out", "result": value}
        results.append(
            {
                "role": "tool",
                "tool_call_id": call["id"],
                "content": value if isinstance(value, str) else json.dumps(value),
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
                _ask(client, convo, [*messages, *_tool_results(answer, variant=0)])
                requests += 1
                messages.extend(_tool_results(answer, variant=1))
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
    tool-call promotion, `demo` set so the dashboard says it shows demo data).

    Raises SettingsError.
    """
    values: dict[str, Any] = {
        "db": DEMO_DB,
        "log_level": "warning",
        "teacher_model": "openai/o4-mini",
        "teacher_base_url": upstream,
        "teacher_api_key": "demo-teacher-key",
        "promote_tool_calls": 5,
        **options,
        "upstream": upstream,
        "demo": True,
    }
    if "port" not in options:
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
    to 8787 (another free port when it is taken). Exits with one line when it cannot start.
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
    fake = ServerThread(create_fake_app(), "127.0.0.1", fake_port)
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
