"""Proxy benchmark (issue 2, "Performance"): added latency and throughput, direct vs through the proxy.

One run, all on 127.0.0.1, bounded (about 1.5 minutes with the defaults):

1. starts a fast mock upstream (`bench/mock_upstream.py`, its own process) and the real proxy
   (`python -m proxy --port P --upstream http://127.0.0.1:M/v1 --db TMP`, one process, one
   worker, recording on);
2. checks once that a proxied answer is byte-identical to the direct one;
3. for JSON and for streaming requests: latency at 1 keep-alive connection (warm-up, then N
   sequential requests, direct and proxied in alternating blocks) and throughput at 32 keep-alive
   connections for a fixed time, against the mock directly and through the proxy;
4. stops the proxy with SIGTERM (the recorder drains) and checks that the SQLite database holds
   exactly one exchange per request the proxy answered.

It prints a table and writes the head of `bench/RESULTS.md` (`--out`): what is above its
`KEPT_BELOW` line; the rest of the file is kept as it is. The request is an SDK-shaped chat.completions
call (system prompt, user message, 3 tools); the answer a tool call (JSON or SSE).

Run (from the repository root, in the project's venv):

    python -m bench.proxy_bench                      # defaults: 2000 requests, 10 s, 32 connections
    python -m bench.proxy_bench --quick              # a 20-second smoke run
    python -m bench.proxy_bench --generator wrk      # throughput with wrk (Debian `wrk`) if installed

Options: --requests N, --duration S, --connections C, --generator auto|python|wrk (auto: wrk when
installed, else the built-in asyncio generator), --out FILE, --proxy-command "CMD ..." (measure a
variant: {port}, {upstream} and {db} are filled in). Exit status 1 when the recording check fails.

A database already holding N exchanges underneath (issue 13: the tail with a big database):
`--prefill 1000000` builds one with `bench.bench_export.build` (the recorder's own row path,
3-step tool-use conversations) into `--prefill-db PATH` (default: a file per N in
`~/.cache/understudy-bench/`), once: later runs reuse that file and copy it for the proxy to
write into.
The recording check then counts only the exchanges the run added.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import http.client
import json
import math
import os
import platform
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from rich.console import Console
from rich.table import Table

from bench import loadgen, mock_upstream
from proxy.testing.servers import child_env, free_port, stop_process

BENCH = Path(__file__).resolve().parent
KEPT_BELOW = "<!-- bench/proxy_bench.py rewrites what is above this line; what follows is kept -->"
"""The line of `--out` below which a run keeps the file as it is (bench/RESULTS.md goes on with
the runs compared by hand, the storage and the export figures)."""
ROOT = BENCH.parent


HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
TARGET_ADDED_P50_MS = 1.0
TARGET_RPS = 1500.0
# Issue 13: the tail and streams.
TARGET_ADDED_P99_MS = 2.0  # added p99 at one connection (JSON)
TARGET_P99_OVER_P50 = 4.0  # p99 / p50 through the proxy at 32 connections (JSON)
TARGET_STREAM_SHARE = 0.75  # streamed requests/s over JSON requests/s at 32 connections
TARGET_STREAM_ADDED_TTFB_MS = 0.5  # added first-byte p50 of a stream at one connection
LITELLM_ADDED_MS = 10.7
LITELLM_RPS = 94.0


# -- processes ---------------------------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_post(port: int, body: bytes, path: str = PATH) -> tuple[int, list[tuple[str, str]], bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=dict(loadgen.SDK_HEADERS))
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        conn.close()


def wait_ready(
    process: subprocess.Popen[bytes],
    port: int,
    path: str,
    timeout: float = 60.0,
    log: BinaryIO | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = read_log(log) if log is not None else ""
            if process.stdout:
                output += process.stdout.read().decode(errors="replace")
            raise RuntimeError(f"server exited with {process.returncode}:\n{output}")
        try:
            http_get(port, path, timeout=1.0)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not answer {path} within {timeout:.0f}s")


def start(command: list[str], log: BinaryIO | None = None) -> subprocess.Popen[bytes]:
    """Start a server; its output goes to `log` (a file: a process that logs a lot, e.g. the
    proxy while its database is gone, must never block on a full pipe), else to a pipe."""
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=child_env(),
        stdout=log if log is not None else subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def read_log(log: BinaryIO) -> str:
    """Everything written to `log` so far (see `start`)."""
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all threads, and of its running children (the
    proxy's writer process) (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for child in _children(pid):
        total += cpu_seconds(child)
    return total


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used so far (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@contextmanager
def cpu_meter(pids: dict[str, int], into: dict[str, float]) -> Iterator[None]:
    """Fill `into[name]` with each process's CPU use during the block, in % of one core, and
    `into[name + "_s"]` with its CPU seconds."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    busy_before, self_before = machine_busy_seconds(), _self_cpu()
    started = time.perf_counter()
    yield
    elapsed = time.perf_counter() - started
    ours = _self_cpu() - self_before
    for name, pid in pids.items():
        used = cpu_seconds(pid) - before[name]
        into[name] = 100 * used / elapsed
        into[name + "_s"] = used
        ours += used
    # Whatever else ran on the machine meanwhile (other users, builds, tests): it skews the numbers.
    into["other"] = max(0.0, 100 * (machine_busy_seconds() - busy_before - ours) / elapsed)


def _self_cpu() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# -- measurements ------------------------------------------------------------------------------


@dataclass
class KindResult:
    """Results for one kind of request (JSON or stream)."""

    kind: str
    latency: dict[str, loadgen.RunResult] = field(default_factory=dict)  # "direct" / "proxy"
    throughput: dict[str, loadgen.RunResult] = field(default_factory=dict)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # target -> process -> %
    proxy_answered: int = 0  # 200s the generator saw through the proxy (exact for python runs)
    proxy_cpu_s_sequential: float = 0.0  # proxy CPU seconds during the 1-connection runs
    proxy_requests_sequential: int = 0  # requests (warm-up included) in those runs
    mock_answered_via_proxy: int = 0  # chat requests the mock answered during proxy phases


def merge(into: loadgen.RunResult, part: loadgen.RunResult) -> None:
    into.requests += part.requests
    into.errors += part.errors
    for status, count in part.statuses.items():
        into.statuses[status] = into.statuses.get(status, 0) + count
    into.latencies_ms += part.latencies_ms
    into.ttfb_ms += part.ttfb_ms
    into.elapsed_s += part.elapsed_s
    into.cpu_s += part.cpu_s


def mock_count(mock_port: int) -> int:
    stats = json.loads(http_get(mock_port, "/_stats")[1])
    return sum(int(count) for count in stats.values())


async def counted(
    mock_port: int, run: Callable[[], Awaitable[loadgen.RunResult]]
) -> tuple[loadgen.RunResult, int]:
    """Run a proxy phase and return its result and how many chat requests the mock answered.

    wrk hangs up with requests in flight that the proxy still forwards afterwards, so the count
    is read once the mock has seen no new request for 0.5 s.
    """
    before = mock_count(mock_port)
    result = await run()
    return result, await settled_count(mock_port) - before


async def settled_count(mock_port: int, quiet_s: float = 0.5, limit_s: float = 15.0) -> int:
    """The mock's chat count once it stops changing (at most `limit_s` of waiting)."""
    deadline = time.monotonic() + limit_s
    count = mock_count(mock_port)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet_s)
        now = mock_count(mock_port)
        if now == count:
            break
        count = now
    return count


async def throughput_run(
    path: str,
    port: int,
    request: bytes,
    body: bytes,
    pids: dict[str, int],
    cpu: dict[str, float],
    args: argparse.Namespace,
) -> loadgen.RunResult:
    """One throughput run against `port` (wrk or the built-in generator); fills `cpu`."""
    if args.generator == "wrk":
        if args.warmup_s > 0:
            await asyncio.to_thread(
                loadgen.run_wrk, HOST, port, path, body, args.connections, args.warmup_s
            )
        with cpu_meter(pids, cpu):
            return await asyncio.to_thread(
                loadgen.run_wrk, HOST, port, path, body, args.connections, args.duration
            )
    with cpu_meter(pids, cpu):
        return await loadgen.concurrent(
            HOST, port, request, args.connections, args.duration, args.warmup_s
        )


async def measure_kind(
    kind: str,
    ports: dict[str, int],
    pids: dict[str, int],
    args: argparse.Namespace,
    console: Console,
) -> KindResult:
    path, body = loadgen.request_for(kind)
    requests = {
        target: loadgen.http_request(HOST, port, path, body) for target, port in ports.items()
    }
    out = KindResult(kind)
    mock_port = ports["direct"]

    # Latency: one connection, alternating blocks so drift hits both targets alike.
    blocks = max(1, args.blocks)
    per_block = max(1, args.requests // blocks)
    for target in ports:
        out.latency[target] = loadgen.RunResult()
    for block in range(blocks):
        for target, port in ports.items():
            warmup = args.warmup if block == 0 else 0
            if target == "proxy":
                cpu_before = cpu_seconds(pids["proxy"])
                part, via = await counted(
                    mock_port,
                    functools.partial(
                        loadgen.sequential, HOST, port, requests[target], warmup, per_block
                    ),
                )
                out.proxy_cpu_s_sequential += cpu_seconds(pids["proxy"]) - cpu_before
                out.proxy_requests_sequential += sum(part.statuses.values())
                out.mock_answered_via_proxy += via
                out.proxy_answered += part.ok()
            else:
                part = await loadgen.sequential(HOST, port, requests[target], warmup, per_block)
            merge(out.latency[target], part)
    console.print(
        f"  {kind}: latency  direct p50 {out.latency['direct'].percentile(50):.3f} ms, "
        f"proxy p50 {out.latency['proxy'].percentile(50):.3f} ms"
    )

    # Throughput: C connections for a fixed time.
    for target, port in ports.items():
        cpu: dict[str, float] = {}
        if target == "proxy":
            result, via = await counted(
                mock_port,
                functools.partial(
                    throughput_run, path, port, requests[target], body, pids, cpu, args
                ),
            )
            out.mock_answered_via_proxy += via
            out.proxy_answered += result.ok()
        else:
            result = await throughput_run(path, port, requests[target], body, pids, cpu, args)
        # The python generator's CPU window includes its warm-up: fine for shares of a core.
        cpu["generator"] = 100 * result.cpu_s / (result.elapsed_s or 1)
        out.throughput[target] = result
        out.cpu[target] = cpu
        console.print(
            f"  {kind}: throughput {target} {result.rps:,.0f} req/s "
            f"({args.connections} connections, {result.generator})"
        )
    return out


FIDELITY_KINDS = ("json", "stream", "responses-json", "responses-stream")


def fidelity_check(ports: dict[str, int]) -> list[str]:
    """Problems found comparing one proxied answer with the direct one (chat and Responses,
    JSON and stream: one request each, `FIDELITY_KINDS`)."""
    problems: list[str] = []
    for label in FIDELITY_KINDS:
        path, body = loadgen.request_for(label)
        direct = http_post(ports["direct"], body, path)
        proxied = http_post(ports["proxy"], body, path)
        if proxied[0] != 200 or direct[0] != 200:
            problems.append(f"{label}: status direct {direct[0]}, proxy {proxied[0]}")
        if proxied[2] != direct[2]:
            problems.append(f"{label}: proxied body differs from the direct body")
        names = {name.lower() for name, _ in proxied[1]}
        for needed in (
            "x-request-id",
            "x-ratelimit-remaining-requests",
            "x-understudy-trajectory-id",
        ):
            if needed not in names:
                problems.append(f"{label}: header {needed} missing from the proxied answer")
    return problems


def count_recorded(db: Path, after_rowid: int = 0) -> dict[str, Any]:
    """Exchanges (by kind, stream and outcome) and trajectories written to `db` after the
    exchange with rowid `after_rowid` (0: all; see `prefilled`)."""
    with sqlite3.connect(db) as conn:
        total = conn.execute(
            "SELECT count(*) FROM exchanges WHERE rowid > ?", (after_rowid,)
        ).fetchone()[0]
        by = conn.execute(
            "SELECT kind, stream, outcome, count(*) FROM exchanges WHERE rowid > ? "
            "GROUP BY kind, stream, outcome",
            (after_rowid,),
        ).fetchall()
        trajectories = conn.execute(
            "SELECT count(DISTINCT trajectory_id) FROM exchanges WHERE rowid > ?", (after_rowid,)
        ).fetchone()[0]
    return {
        "exchanges": int(total),
        "trajectories": int(trajectories),
        "by_kind": {
            f"{'' if k == 'chat' else k + '-'}{'stream' if s else 'json'}/{o}": int(n)
            for k, s, o, n in by
        },
    }


def prefilled(db: Path) -> tuple[int, int]:
    """(exchanges, highest exchange rowid) already in `db` before the run."""
    with sqlite3.connect(db) as conn:
        count, last = conn.execute("SELECT count(*), max(rowid) FROM exchanges").fetchone()
    return int(count), int(last or 0)


def prefill_path(args: argparse.Namespace) -> Path:
    """The cached prefilled database for `--prefill N` (`--prefill-db`, else one per N in the
    user's cache directory, `$XDG_CACHE_HOME` or `~/.cache`: temporary directories get swept)."""
    if args.prefill_db is not None:
        return Path(args.prefill_db)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "understudy-bench" / f"prefill-{args.prefill}.db"


def prepare_prefill(args: argparse.Namespace, console: Console) -> Path:
    """The cached database of `args.prefill` exchanges, built first when missing (into a
    temporary name, renamed when complete, so a build cut short is never reused)."""
    from bench.bench_export import build

    path = prefill_path(args)
    if path.exists():
        count, _ = prefilled(path)
        if count >= args.prefill:
            console.print(f"prefilled database: {path} ({count:,} exchanges, reused)")
            return path
        console.print(f"{path} holds {count:,} exchanges, fewer than {args.prefill:,}: rebuilding")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".building")
    for leftover in (partial, *(partial.with_name(partial.name + x) for x in ("-wal", "-shm"))):
        leftover.unlink(missing_ok=True)
    trajectories = -(-args.prefill // 3)  # bench_export's conversations have 3 exchanges each
    console.print(f"building a database of {3 * trajectories:,} exchanges in {partial} ...")
    seconds = asyncio.run(build(partial, trajectories))
    partial.rename(path)
    console.print(f"  built in {seconds:.0f} s ({path.stat().st_size / 1e6:,.0f} MB)")
    return path


# -- reporting ---------------------------------------------------------------------------------


def machine_info(args: argparse.Namespace) -> dict[str, str]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = _read_only_git(["rev-parse", "--short", "HEAD"])
    dirty = _read_only_git(["status", "--porcelain", "--", "proxy"])
    loop = "uvloop" if _importable("uvloop") else "asyncio"
    http = "httptools" if _importable("httptools") else "h11"
    try:
        load = Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        load = "?"
    return {
        "load": load,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{os.cpu_count()} (nproc), {cpu_model or platform.processor() or 'unknown CPU'}",
        "python": platform.python_version(),
        "proxy": f"commit {commit or '?'}{' + uncommitted changes in proxy/' if dirty else ''}; "
        f"uvicorn auto loop/http here: {loop} + {http}",
        "command": args.proxy_command
        or "python -m proxy --port P --upstream http://127.0.0.1:M/v1 --db TMP",
    }


def _read_only_git(argv: list[str]) -> str:
    try:
        out = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def latency_rows(results: list[KindResult]) -> list[list[str]]:
    rows = []
    for r in results:
        d, p = r.latency["direct"], r.latency["proxy"]
        rows.append(
            [
                r.kind,
                f"{d.percentile(50):.3f} / {d.percentile(90):.3f} / {d.percentile(99):.3f}",
                f"{p.percentile(50):.3f} / {p.percentile(90):.3f} / {p.percentile(99):.3f}",
                f"{p.percentile(50) - d.percentile(50):.3f}",
                f"{p.percentile(99) - d.percentile(99):.3f}",
                f"{d.percentile(50, ttfb=True):.3f} / {p.percentile(50, ttfb=True):.3f}",
                f"{1000 * r.proxy_cpu_s_sequential / max(1, r.proxy_requests_sequential):.3f}",
            ]
        )
    return rows


LATENCY_HEADER = [
    "request",
    "direct p50 / p90 / p99 ms",
    "proxy p50 / p90 / p99 ms",
    "added p50 ms",
    "added p99 ms",
    "first byte p50 ms direct / proxy",
    "proxy CPU ms per request",
]
THROUGHPUT_HEADER = [
    "request",
    "direct req/s",
    "proxy req/s",
    "proxy p50 / p99 ms",
    "CPU % proxy / mock / generator / other",
    "proxy CPU ms per request",
]


def throughput_rows(results: list[KindResult]) -> list[list[str]]:
    rows = []
    for r in results:
        d, p = r.throughput["direct"], r.throughput["proxy"]
        cpu = r.cpu["proxy"]
        rows.append(
            [
                r.kind,
                f"{d.rps:,.0f}",
                f"{p.rps:,.0f}",
                f"{p.percentile(50):.2f} / {p.percentile(99):.2f}",
                f"{cpu.get('proxy', 0):.0f} / {cpu.get('mock', 0):.0f} / {cpu.get('generator', 0):.0f} / {cpu.get('other', 0):.0f}",
                f"{1000 * cpu.get('proxy_s', 0) / max(1, p.requests if p.generator == 'wrk' else sum(p.statuses.values())):.3f}",
            ]
        )
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def verdicts(results: list[KindResult]) -> list[tuple[str, bool]]:
    json_result = next(r for r in results if r.kind == "json")
    added = json_result.latency["proxy"].percentile(50) - json_result.latency["direct"].percentile(
        50
    )
    rps = json_result.throughput["proxy"].rps
    out = []
    responses = next((r for r in results if r.kind == "responses-json"), None)
    if responses is not None:  # the Responses path within 10% of chat's
        added_r = responses.latency["proxy"].percentile(50) - responses.latency[
            "direct"
        ].percentile(50)
        rps_r = responses.throughput["proxy"].rps
        out = [
            (
                f"Responses added p50 latency {added_r:.3f} ms <= 110% of chat's ({added:.3f} ms)",
                added_r <= 1.1 * added,
            ),
            (
                f"Responses throughput {rps_r:,.0f} req/s >= 90% of chat's ({rps:,.0f} req/s)",
                rps_r >= 0.9 * rps,
            ),
        ]
    out += [
        (
            f"added p50 latency (JSON) {added:.3f} ms <= {TARGET_ADDED_P50_MS:g} ms",
            added <= TARGET_ADDED_P50_MS,
        ),
        (
            f"throughput (JSON, proxy) {rps:,.0f} req/s >= {TARGET_RPS:,.0f} req/s",
            rps >= TARGET_RPS,
        ),
    ]
    return out + tail_and_stream_verdicts(results)


def tail_and_stream_verdicts(results: list[KindResult]) -> list[tuple[str, bool]]:
    """Issue 13's floors: added p99 at one connection, p99 / p50 at 32 connections (JSON);
    stream throughput as a share of JSON's and the stream's added first-byte p50."""
    json_result = next(r for r in results if r.kind == "json")
    direct, proxy = json_result.latency["direct"], json_result.latency["proxy"]
    added_p99 = proxy.percentile(99) - direct.percentile(99)
    loaded = json_result.throughput["proxy"]
    ratio = loaded.percentile(99) / loaded.percentile(50) if loaded.percentile(50) else math.inf
    out = [
        (
            f"added p99 latency (JSON, 1 connection) {added_p99:.3f} ms "
            f"<= {TARGET_ADDED_P99_MS:g} ms",
            added_p99 <= TARGET_ADDED_P99_MS,
        ),
        (
            f"p99 / p50 (JSON, proxy, 32 connections) {ratio:.1f}x <= {TARGET_P99_OVER_P50:g}x",
            ratio <= TARGET_P99_OVER_P50,
        ),
    ]
    stream = next((r for r in results if r.kind == "stream"), None)
    if stream is not None:
        share = stream.throughput["proxy"].rps / max(loaded.rps, 1e-9)
        ttfb = stream.latency["proxy"].percentile(50, ttfb=True) - stream.latency[
            "direct"
        ].percentile(50, ttfb=True)
        out += [
            (
                f"stream throughput {share:.0%} of JSON's (32 connections) "
                f">= {TARGET_STREAM_SHARE:.0%}",
                share >= TARGET_STREAM_SHARE,
            ),
            (
                f"stream added first-byte p50 {ttfb:.3f} ms <= {TARGET_STREAM_ADDED_TTFB_MS:g} ms",
                ttfb <= TARGET_STREAM_ADDED_TTFB_MS,
            ),
        ]
    return out


def write_markdown(
    path: Path,
    info: dict[str, str],
    args: argparse.Namespace,
    results: list[KindResult],
    recording: dict[str, Any],
    problems: list[str],
) -> None:
    targets = "\n".join(f"- {'PASS' if ok else 'MISS'}: {text}" for text, ok in verdicts(results))
    by_kind = ", ".join(f"{k}: {v}" for k, v in sorted(recording["by_kind"].items()))
    text = f"""# Proxy benchmark results

Written by `python -m bench.proxy_bench` (issue 2, "Performance"). Loopback only; one proxy
process (one uvicorn worker) with recording on (SQLite, WAL), in front of a fast mock upstream
(`bench/mock_upstream.py`, raw asyncio). The request is an SDK-shaped chat.completions call
(system prompt, user message, 3 tools, {
        len(loadgen.chat_body(False))
    } bytes); the answer a tool call,
as JSON or as an SSE stream of {len(mock_upstream.EVENTS)} events{
        f", written {args.pace_ms:g} ms apart (--pace-ms)" if args.pace_ms > 0 else ""
    }.

- date: {info["date"]}
- machine: {info["cpus"]}; Python {info["python"]}; load average at start {info["load"]}
- proxy: {info["proxy"]}
- proxy command: `{info["command"]}`
- latency: 1 keep-alive connection, {args.warmup} warm-up then {args.requests} requests per target,
  direct and proxied in {args.blocks} alternating blocks (generator: built-in asyncio client)
- throughput: {args.connections} keep-alive connections, {args.warmup_s:g} s warm-up then
  {args.duration:g} s measured per target (generator: {results[0].throughput["proxy"].generator})

## Latency at 1 connection (ms)

{markdown_table(LATENCY_HEADER, latency_rows(results))}

"added" is proxy minus direct at the same percentile.

## Throughput at {args.connections} connections

{markdown_table(THROUGHPUT_HEADER, throughput_rows(results))}

CPU is % of one core during the proxied run ({os.cpu_count()} cores shared by generator, mock and
proxy; "other" is every other process on the machine, which skews the numbers when it is not ~0).
"proxy CPU ms per request" is the proxy's own CPU time (all its threads and its writer process)
divided by the requests it answered.

## Targets

{targets}

For scale: on this machine class the LiteLLM proxy (one worker) added ~{LITELLM_ADDED_MS} ms and
served ~{LITELLM_RPS:.0f} requests/s on the same request.

## Recording

- answered through the proxy: {recording["answered_client"]} (seen by the generator{
        "; wrk hangs up on the requests in flight at the end, which the proxy still forwards"
        " and records (a stream cut short is recorded as 'cancelled')"
        if args.generator == "wrk"
        else ""
    }), {recording["answered_mock"]} (forwarded to the mock)
- recorded exchanges after SIGTERM: {recording["exchanges"]} ({by_kind});
  trajectories: {recording["trajectories"]}; database underneath: {
        recording["prefill"]:,} exchanges before the run
- proxy shutdown (drain) took {recording["shutdown_s"]:.2f} s; recorder counters before it:
  {recording["recorder"]}
- check: {"PASS" if recording["ok"] else "FAIL"}{"".join(f"; {p}" for p in problems)}
"""
    write_keeping(path, text)


def write_keeping(path: Path, text: str) -> None:
    """Write `text` to `path`, followed by what the file holds from its `KEPT_BELOW` line on
    (a file without that line is replaced whole)."""
    kept = ""
    if path.exists():
        existing = path.read_text(encoding="utf-8")
        at = existing.find(KEPT_BELOW)
        kept = existing[at:] if at >= 0 else ""
    path.write_text(text + ("\n" + kept if kept else ""), encoding="utf-8")


def print_tables(
    console: Console, results: list[KindResult], recording: dict[str, Any], problems: list[str]
) -> None:
    table = Table(title="Latency at 1 connection (ms)")
    for name in LATENCY_HEADER:
        table.add_column(name, justify="right")
    for row in latency_rows(results):
        table.add_row(*row)
    console.print(table)
    table = Table(title="Throughput")
    for name in THROUGHPUT_HEADER:
        table.add_column(name, justify="right")
    for row in throughput_rows(results):
        table.add_row(*row)
    console.print(table)
    for text, ok in verdicts(results):
        console.print(f"[{'green' if ok else 'red'}]{'PASS' if ok else 'MISS'}[/]: {text}")
    console.print(
        f"recording: answered {recording['answered_client']} (generator) / "
        f"{recording['answered_mock']} (mock), recorded {recording['exchanges']} "
        f"(over {recording['prefill']:,} prefilled) "
        f"-> [{'green' if recording['ok'] else 'red'}]{'PASS' if recording['ok'] else 'FAIL'}[/]"
    )
    for problem in problems:
        console.print(f"[red]problem[/]: {problem}")


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=2000, help="timed sequential requests per target and kind"
    )
    parser.add_argument("--warmup", type=int, default=200, help="untimed sequential requests first")
    parser.add_argument(
        "--blocks", type=int, default=4, help="alternate direct/proxy in this many blocks"
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of measured load per throughput run"
    )
    parser.add_argument(
        "--warmup-s", type=float, default=1.0, help="seconds of load before each measured run"
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--generator", choices=["auto", "python", "wrk"], default="auto")
    parser.add_argument(
        "--kinds",
        default="json,stream",
        help="comma-separated: json, stream (chat completions), responses-json, responses-stream",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument(
        "--proxy-command", default=None, help="measure a variant; {port} {upstream} {db}"
    )
    parser.add_argument(
        "--keep-db", action="store_true", help="keep the SQLite file (its path is printed)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 500 requests, 3 s runs")
    parser.add_argument(
        "--pace-ms",
        type=float,
        default=0.0,
        help="the mock writes a stream's events this many ms apart (each then reaches the proxy "
        "as a read of its own, as a model's tokens do); default: all at once",
    )
    parser.add_argument(
        "--prefill",
        type=int,
        default=0,
        help="exchanges already in the database underneath (built once, then reused)",
    )
    parser.add_argument(
        "--prefill-db",
        default=None,
        help="where the --prefill database is cached (default: ~/.cache/understudy-bench/)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.warmup, args.duration, args.warmup_s = 500, 100, 3.0, 0.5
    if args.generator == "auto":
        args.generator = "wrk" if loadgen.wrk_path() else "python"
    elif args.generator == "wrk" and not loadgen.wrk_path():
        print("wrk is not installed: using the built-in generator", file=sys.stderr)
        args.generator = "python"
    return args


def run_loop(coro: Awaitable[Any]) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=max(150, Console().width))
    info = machine_info(args)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if "json" not in kinds:
        kinds.insert(0, "json")  # the targets are about JSON requests
    source = prepare_prefill(args, console) if args.prefill > 0 else None
    tmp = Path(tempfile.mkdtemp(prefix="understudy-bench-"))
    db = tmp / "bench.db"
    prefill_count = prefill_rowid = 0
    if source is not None:
        shutil.copyfile(source, db)
        prefill_count, prefill_rowid = prefilled(db)
    mock_port, proxy_port = free_port(HOST), free_port(HOST)
    upstream = f"http://{HOST}:{mock_port}/v1"
    if args.proxy_command:
        proxy_cmd = shlex.split(
            args.proxy_command.format(port=proxy_port, upstream=upstream, db=db)
        )
    else:
        proxy_cmd = [
            sys.executable,
            "-m",
            "proxy",
            "--port",
            str(proxy_port),
            "--upstream",
            upstream,
            "--db",
            str(db),
            "--log-level",
            "warning",
        ]
    console.print(f"[bold]Understudy proxy benchmark[/] ({info['cpus']}, Python {info['python']})")
    mock = start(
        [
            sys.executable,
            *("-m", "bench.mock_upstream", "--port", str(mock_port)),
            *("--pace-ms", str(args.pace_ms)),
        ]
    )
    # Anonymous (nothing in a directory to sweep); closed in the `finally` below.
    proxy_log = tempfile.TemporaryFile()  # noqa: SIM115
    proxy: subprocess.Popen[bytes] | None = None
    try:
        wait_ready(mock, mock_port, "/v1/models")
        proxy = start(proxy_cmd, proxy_log)
        wait_ready(proxy, proxy_port, "/health", log=proxy_log)
        ports = {"direct": mock_port, "proxy": proxy_port}
        pids = {"proxy": proxy.pid, "mock": mock.pid}
        problems = fidelity_check(ports)
        before = mock_count(mock_port)
        results: list[KindResult] = []
        for kind in kinds:
            results.append(run_loop(measure_kind(kind, ports, pids, args, console)))
        health = json.loads(http_get(proxy_port, "/health")[1])
        shutdown_s, _ = stop_process(proxy)
        output = read_log(proxy_log)
        proxy = None
        recorded = count_recorded(db, prefill_rowid)
        checked = len(FIDELITY_KINDS)  # the fidelity check's requests
        answered_client = checked + sum(r.proxy_answered for r in results)
        answered_mock = checked + sum(r.mock_answered_via_proxy for r in results)
        ok = recorded["exchanges"] == answered_mock
        if args.generator == "python":  # every request is awaited: exact counts, all answered
            ok = ok and recorded["exchanges"] == answered_client
            ok = ok and all(key.endswith("/ok") for key in recorded["by_kind"])
        if mock_count(mock_port) - before < answered_mock - checked:
            problems.append("mock counters went backwards")
        if "Traceback" in output:
            problems.append("the proxy logged a traceback:\n" + output[-2000:])
        recording = {
            **recorded,
            "answered_client": answered_client,
            "answered_mock": answered_mock,
            "shutdown_s": shutdown_s,
            "recorder": health.get("recorder"),
            "prefill": prefill_count,
            "ok": ok and not problems,
        }
        print_tables(console, results, recording, problems)
        write_markdown(args.out, info, args, results, recording, problems)
        console.print(f"results written to {args.out}")
        return 0 if recording["ok"] else 1
    finally:
        if proxy is not None:
            stop_process(proxy)
        stop_process(mock)
        proxy_log.close()
        if args.keep_db:
            console.print(f"database kept: {db}")
        else:
            for leftover in tmp.iterdir():
                leftover.unlink()
            tmp.rmdir()


if __name__ == "__main__":
    sys.exit(main())
