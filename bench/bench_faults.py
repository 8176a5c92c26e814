"""Fault benchmark (issue 6): exchanges answered vs recorded under sustained load, with kill -9.

Everything runs on 127.0.0.1: the project's fake upstream (`python -m proxy.testing.fake_openai`), the
real proxy (`python -m proxy`, one process, recording into a fresh SQLite file) and an asyncio
load generator (httpx) with several concurrent clients. Each client runs three-step tool-use
conversations (tool call, tool call, answer), a mix of streamed and JSON calls, and counts an
exchange as **answered** when the whole answer arrived (the JSON body, or a stream up to
`data: [DONE]`), keyed by the `X-Understudy-Exchange-Id` response header.

Two modes:

- **kill** (default, about a minute): the proxy is killed with SIGKILL `--kills` times during the
  run and restarted on the same database and port while the clients keep going; the run ends with
  SIGTERM under load. Reported: answered, recorded, answered-but-not-recorded per kill, how old
  (ms before the kill) the oldest lost exchange was, and how many exchanges were answered in the
  last flush interval before each kill (the bound the design promises), plus the exchanges lost
  at the final SIGTERM (must be 0).
- **soak** (`--soak-minutes N`): no kills; the proxy's RSS (`/proc/PID/status` VmRSS), open
  file descriptors and threads are sampled every `--sample-seconds`; reported: the first sample
  after warm-up, the last, the largest, one line per minute, and answered vs recorded after the
  final SIGTERM.

Run from the repository root in the project's venv:

    python -m bench.bench_faults                         # kill mode, 60 s, 3 kills
    python -m bench.bench_faults --duration 30 --kills 2
    python -m bench.bench_faults --soak-minutes 10       # memory soak
    python -m bench.bench_faults --proxy-flag=--stitch-cache-size=1000   # extra proxy flags

`--json FILE` also writes the results as JSON. Exit status 1 when an exchange answered before the
final SIGTERM is missing from the database, or the database fails `PRAGMA integrity_check`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from proxy.core.sse import StreamAssembler
from proxy.testing.servers import child_env, free_port, wait_for_http

ROOT = Path(__file__).resolve().parent.parent


SYSTEM = "You are a support agent. Look facts up with the tools before you answer."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    }
    for name, description in (
        ("lookup_order", "Fetch an order by id."),
        ("track_shipment", "Carrier events for a tracking number."),
    )
]


@dataclass
class Servers:
    """The fake upstream and the proxy processes (the proxy can be killed and restarted)."""

    workdir: Path
    flush_interval_ms: int
    proxy_flags: list[str]
    upstream_port: int = field(default_factory=free_port)
    proxy_port: int = field(default_factory=free_port)
    upstream: subprocess.Popen[bytes] | None = None
    proxy: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def db(self) -> Path:
        return self.workdir / "bench.db"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"

    def start_upstream(self) -> None:
        log = (self.workdir / "upstream.log").open("ab")
        self.upstream = subprocess.Popen(
            [sys.executable, "-m", "proxy.testing.fake_openai", "--port", str(self.upstream_port)],
            cwd=ROOT,
            env=child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for_http(self.upstream_url + "/v1/models", self.upstream, 60.0)

    def start_proxy(self) -> None:
        log = (self.workdir / f"proxy-{self.restarts}.log").open("ab")
        command = [
            sys.executable,
            "-m",
            "proxy",
            "--port",
            str(self.proxy_port),
            "--upstream",
            self.upstream_url + "/v1",
            "--db",
            str(self.db),
            "--flush-interval-ms",
            str(self.flush_interval_ms),
            *self.proxy_flags,
        ]
        self.proxy = subprocess.Popen(
            command, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT
        )
        wait_for_http(self.proxy_url + "/health", self.proxy, 60.0)

    def kill_proxy(self) -> float:
        """SIGKILL the proxy; return the monotonic time just before the signal."""
        assert self.proxy is not None
        at = time.monotonic()
        self.proxy.send_signal(signal.SIGKILL)
        self.proxy.wait(timeout=30)
        self.restarts += 1
        return at

    def terminate_proxy(self) -> float:
        """SIGTERM the proxy and wait for it to exit (it drains); return the seconds it took."""
        assert self.proxy is not None
        at = time.monotonic()
        self.proxy.send_signal(signal.SIGTERM)
        self.proxy.wait(timeout=120)
        return time.monotonic() - at

    def proxy_pid(self) -> int:
        assert self.proxy is not None
        return self.proxy.pid

    def clear_upstream_log(self) -> None:
        """The fake upstream keeps every request in memory; forget them (long runs)."""
        with contextlib.suppress(httpx.HTTPError):
            httpx.delete(self.upstream_url + "/_fake/requests", timeout=10)

    def close(self) -> None:
        for process in (self.proxy, self.upstream):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@dataclass
class Load:
    """What the clients saw: answered exchanges with the time the answer was complete."""

    answered: dict[str, float] = field(default_factory=dict)
    generation_of: dict[str, int] = field(default_factory=dict)
    generation: int = 0  # which proxy process requests go to (kill mode: +1 per restart)
    failed: int = 0
    streamed: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def call(
    client: httpx.AsyncClient, url: str, messages: list[dict[str, Any]], stream: bool
) -> tuple[str, dict[str, Any]] | None:
    """One chat call; (exchange id, assistant message) when the whole answer arrived, else None."""
    body = {"model": "gpt-4.1-mini", "messages": messages, "tools": TOOLS, "stream": stream}
    if not stream:
        response = await client.post(url, json=body)
        if response.status_code != 200:
            return None
        message = response.json()["choices"][0]["message"]
        return response.headers["x-understudy-exchange-id"], message
    assembler = StreamAssembler()
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return None
        async for chunk in response.aiter_raw():
            assembler.feed(chunk)
        if not assembler.done or assembler.error is not None:
            return None
        exchange_id = response.headers["x-understudy-exchange-id"]
    message = assembler.result()["choices"][0]["message"]
    return exchange_id, {k: v for k, v in message.items() if v is not None}


async def client_loop(number: int, url: str, load: Load, rate_delay_s: float) -> None:
    """Run three-step conversations until `load.stop` is set (bounded by it)."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        conversation = 0
        while not load.stop.is_set():
            conversation += 1
            messages: list[dict[str, Any]] = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"client {number} case {conversation}: order status?"},
            ]
            for step in range(3):
                if load.stop.is_set():
                    return
                stream = (conversation + step) % 3 == 0
                generation = load.generation
                try:
                    result = await call(client, url, messages, stream)
                except (httpx.HTTPError, KeyError, ValueError):
                    result = None
                if result is None:
                    load.failed += 1
                    await asyncio.sleep(0.1)  # the proxy may be down: back off a little
                    break
                exchange_id, message = result
                load.answered[exchange_id] = time.monotonic()
                load.generation_of[exchange_id] = generation
                load.streamed += stream
                if rate_delay_s:
                    await asyncio.sleep(rate_delay_s)
                calls = message.get("tool_calls") or []
                if not calls:
                    break
                messages.append(message)
                messages += [
                    {"role": "tool", "tool_call_id": c["id"], "content": f"result {step}"}
                    for c in calls
                ]


def recorded_ids(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM exchanges")]


def integrity(db: Path) -> tuple[str, int, int]:
    """(`PRAGMA integrity_check`, sum of trajectories.exchange_count, exchange rows)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        counted = conn.execute("SELECT COALESCE(SUM(exchange_count), 0) FROM trajectories")
        rows = conn.execute("SELECT COUNT(*) FROM exchanges").fetchone()[0]
        return str(check), int(counted.fetchone()[0]), int(rows)


def proc_sample(pid: int) -> dict[str, int]:
    """RSS (KiB), open file descriptors and threads of `pid`, from /proc."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


async def run_kill_mode(servers: Servers, args: argparse.Namespace) -> dict[str, Any]:
    load = Load()
    url = servers.proxy_url + "/v1/chat/completions"
    tasks = [asyncio.create_task(client_loop(i, url, load, 0.0)) for i in range(args.concurrency)]
    kills: list[dict[str, Any]] = []
    started = time.monotonic()
    for k in range(args.kills):
        await asyncio.sleep(started + args.duration * (k + 1) / (args.kills + 1) - time.monotonic())
        at = servers.kill_proxy()
        load.generation += 1  # the killed process is gone: later requests reach the next one
        await asyncio.to_thread(servers.start_proxy)
        kills.append({"at": at, "downtime_s": time.monotonic() - at})
    await asyncio.sleep(max(0.0, started + args.duration - time.monotonic()))
    drain_s = await asyncio.to_thread(servers.terminate_proxy)  # under load
    load.stop.set()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started

    recorded = set(recorded_ids(servers.db))
    answered = load.answered
    lost = {i for i in answered if i not in recorded}
    window_s = args.flush_interval_ms / 1000
    per_kill = []
    for generation, kill in enumerate(kills):
        at = kill["at"]
        mine = {i: t for i, t in answered.items() if load.generation_of[i] == generation}
        ages_ms = sorted(round((at - mine[i]) * 1000, 1) for i in mine if i in lost)
        per_kill.append(
            {
                "answered_by_killed_process": len(mine),
                "lost": len(ages_ms),
                # age of a lost exchange at the kill: the client had its whole answer that long
                # before SIGKILL (negative: the answer was still arriving when the signal went)
                "lost_age_ms_max": ages_ms[-1] if ages_ms else None,
                "lost_age_ms_median": ages_ms[len(ages_ms) // 2] if ages_ms else None,
                "answered_in_last_flush_interval": sum(
                    1 for t in mine.values() if t >= at - window_s
                ),
                "answered_in_last_2_flush_intervals": sum(
                    1 for t in mine.values() if t >= at - 2 * window_s
                ),
                "downtime_s": round(kill["downtime_s"], 2),
            }
        )
    last = {i for i in answered if load.generation_of[i] == len(kills)}
    lost_at_sigterm = len(last & lost)
    check, counted, rows = integrity(servers.db)
    return {
        "mode": "kill",
        "duration_s": round(elapsed, 1),
        "concurrency": args.concurrency,
        "flush_interval_ms": args.flush_interval_ms,
        "answered": len(answered),
        "streamed": load.streamed,
        "failed_calls": load.failed,
        "recorded": len(recorded),
        "answered_and_recorded": len(answered) - len(lost),
        "recorded_not_answered": len(recorded - set(answered)),
        "lost_total": len(lost),
        "kills": per_kill,
        "lost_at_sigterm": lost_at_sigterm,
        "answered_by_last_process": len(last),
        "sigterm_exit_s": round(drain_s, 2),
        "integrity_check": check,
        "trajectory_exchange_count_sum": counted,
        "exchange_rows": rows,
        "throughput_per_s": round(len(answered) / elapsed, 1),
    }


async def run_soak_mode(servers: Servers, args: argparse.Namespace) -> dict[str, Any]:
    load = Load()
    url = servers.proxy_url + "/v1/chat/completions"
    delay = args.concurrency / args.rate if args.rate else 0.0
    tasks = [asyncio.create_task(client_loop(i, url, load, delay)) for i in range(args.concurrency)]
    pid = servers.proxy_pid()
    started = time.monotonic()
    end = started + args.soak_minutes * 60
    samples: list[dict[str, Any]] = []
    while time.monotonic() < end:
        await asyncio.sleep(min(args.sample_seconds, max(0.0, end - time.monotonic())))
        sample: dict[str, Any] = dict(proc_sample(pid))
        sample["t_s"] = round(time.monotonic() - started, 1)
        sample["answered"] = len(load.answered)
        samples.append(sample)
        await asyncio.to_thread(servers.clear_upstream_log)
        print(
            f"  t={sample['t_s']:>6}s  rss={sample['rss_kib'] / 1024:7.1f} MiB  "
            f"fds={sample['fds']:>4}  threads={sample['threads']:>3}  answered={sample['answered']}",
            flush=True,
        )
    await asyncio.to_thread(servers.terminate_proxy)  # under load
    load.stop.set()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    recorded = set(recorded_ids(servers.db))
    warm = [s for s in samples if s["t_s"] >= args.warmup_seconds] or samples
    per_minute = [
        s
        for i, s in enumerate(samples)
        if i == len(samples) - 1 or int(samples[i + 1]["t_s"] // 60) > int(s["t_s"] // 60)
    ]
    check, counted, rows = integrity(servers.db)
    return {
        "mode": "soak",
        "minutes": args.soak_minutes,
        "concurrency": args.concurrency,
        "flush_interval_ms": args.flush_interval_ms,
        "answered": len(load.answered),
        "streamed": load.streamed,
        "failed_calls": load.failed,
        "recorded": len(recorded),
        "lost_at_sigterm": sum(1 for i in load.answered if i not in recorded),
        "throughput_per_s": round(len(load.answered) / elapsed, 1),
        "rss_first_mib": round(warm[0]["rss_kib"] / 1024, 1),
        "rss_last_mib": round(warm[-1]["rss_kib"] / 1024, 1),
        "rss_max_mib": round(max(s["rss_kib"] for s in warm) / 1024, 1),
        "fds_first_last": [warm[0]["fds"], warm[-1]["fds"]],
        "threads_first_last": [warm[0]["threads"], warm[-1]["threads"]],
        "per_minute": per_minute,
        "integrity_check": check,
        "trajectory_exchange_count_sum": counted,
        "exchange_rows": rows,
        "db_mib": round(servers.db.stat().st_size / 2**20, 1),
    }


def report(result: dict[str, Any]) -> None:
    print()
    for key, value in result.items():
        if key in ("kills", "per_minute"):
            print(f"{key}:")
            for item in value:
                print(f"  {item}")
        else:
            print(f"{key}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=60.0, help="kill mode: seconds of load")
    parser.add_argument("--kills", type=int, default=3, help="kill mode: SIGKILLs during the run")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    parser.add_argument(
        "--flush-interval-ms", type=int, default=50, help="the proxy's flush interval (default 50)"
    )
    parser.add_argument("--soak-minutes", type=float, default=0.0, help="soak mode: minutes")
    parser.add_argument("--sample-seconds", type=float, default=5.0, help="soak: RSS sample period")
    parser.add_argument(
        "--warmup-seconds", type=float, default=30.0, help="soak: first sample counted"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="soak: total calls per second (0: as fast as it goes)",
    )
    parser.add_argument(
        "--proxy-flag", action="append", default=[], help="extra proxy flag (repeatable)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="understudy-faults-") as tmp:
        servers = Servers(Path(tmp), args.flush_interval_ms, args.proxy_flag)
        try:
            servers.start_upstream()
            servers.start_proxy()
            mode = "soak" if args.soak_minutes else "kill"
            print(f"bench_faults: {mode} mode, {args.concurrency} clients, db {servers.db}")
            runner = run_soak_mode if args.soak_minutes else run_kill_mode
            result = asyncio.run(runner(servers, args))
        finally:
            servers.close()
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = result["lost_at_sigterm"] == 0 and result["integrity_check"] == "ok"
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
