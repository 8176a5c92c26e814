"""Replica benchmark (issue 7): throughput of 1, 2 and 4 proxy replicas on one PostgreSQL against
one proxy on SQLite, with a multi-step tool-use workload spread across the replicas.

One run, all on 127.0.0.1, bounded (about 2 minutes with the defaults):

1. starts the fast mock upstream (`bench/mock_upstream.py`, its own process) and times the shared
   stitcher's request-path statements one at a time (what a request pays on PostgreSQL);
2. for each setup (SQLite x1, PostgreSQL x1, x2, x4): a fresh database (a temporary SQLite file,
   or a new PostgreSQL database created on the server and dropped afterwards), `python -m proxy
   migrate` once, then its replicas (`python -m proxy --db ... --journal <own file>`), started at
   once; every setup stays up for the whole run, idle while another is measured;
3. throughput: `--agents` concurrent agents for `--duration` seconds, in `--rounds` rounds that
   interleave the setups (the order rotates), so that other load on the machine spreads over all
   of them; the median round is reported. An agent runs conversations of `--steps` steps (system
   prompt, user message, 3 tools; each answer is a tool call that the agent answers with a tool
   result and sends back at once), half of the steps streamed, each step to a random replica
   other than the one that answered the step before (so every step after the first stitches
   across replicas, before the previous exchange is flushed). CPU seconds of the proxies and of
   the PostgreSQL server (when it runs on this machine) are divided by the requests;
4. latency: one agent, `--latency-requests` sequential steps the same way (p50/p90 per request);
5. stops the replicas with SIGTERM (the recorders drain) and checks each database: one exchange
   per answered request, one trajectory per conversation, steps 0..n-1 chained by parent_id, the
   trajectory id every response carried is the one recorded, no `conversation_states` left.

It prints a table and (with `--markdown FILE`) writes it as Markdown for docs/postgres.md.

    python -m bench.bench_replicas                        # defaults
    python -m bench.bench_replicas --quick                # ~40 s smoke run
    python -m bench.bench_replicas --postgres postgresql://postgres@127.0.0.1:5432/postgres

Needs a PostgreSQL server (`--postgres`, default the env var UNDERSTUDY_TEST_POSTGRES_URL, else
postgresql://postgres@127.0.0.1:5432/postgres) that lets this user create databases. Exit status 1
when a check of the recorded data fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench import loadgen, mock_upstream
from proxy.testing.servers import child_env, free_port, stop_process

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
SETUPS = (("sqlite", 1), ("postgresql", 1), ("postgresql", 2), ("postgresql", 4))


# -- processes -------------------------------------------------------------------------------------


def wait_ready(process: subprocess.Popen[bytes], port: int, timeout: float = 120.0) -> None:
    """Poll until the server accepts connections on `port`; raise with its output if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace") if process.stdout else ""
            raise RuntimeError(f"server exited with {process.returncode}:\n{output}")
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start within {timeout:.0f}s")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the processes `pids` (Linux /proc; 0 elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def postgres_pids() -> list[int]:
    """The PostgreSQL server's processes on this machine (postmaster and backends)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@contextmanager
def mock_server() -> Iterator[int]:
    port = free_port(HOST)
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.mock_upstream", "--port", str(port)],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(process, port)
        yield port
    finally:
        stop_process(process)


async def _admin(server: str, statement: str) -> None:
    conn = await asyncpg.connect(server, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextmanager
def database(kind: str, server: str, workdir: Path) -> Iterator[str]:
    """A fresh database for one setup: its `--db` value."""
    if kind == "sqlite":
        yield str(workdir / f"bench-{secrets.token_hex(4)}.db")
        return
    name = f"understudy_bench_{secrets.token_hex(6)}"
    asyncio.run(_admin(server, f'CREATE DATABASE "{name}"'))
    try:
        yield f"{server.rpartition('/')[0]}/{name}"
    finally:
        asyncio.run(_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def migrate(db: str) -> None:
    """The documented deployment step: `python -m proxy migrate --db URL`, once."""
    subprocess.run(
        [sys.executable, "-m", "proxy", "migrate", "--db", db],
        cwd=ROOT,
        env=child_env(),
        check=True,
        capture_output=True,
    )


@contextmanager
def replicas(
    count: int, db: str, upstream_port: int, workdir: Path
) -> Iterator[list[tuple[int, int]]]:
    """`count` proxy processes on `db`, started at once; yields their (port, pid)."""
    started = []
    for _ in range(count):
        port = free_port(HOST)
        command = [
            sys.executable,
            "-m",
            "proxy",
            "--port",
            str(port),
            "--upstream",
            f"http://{HOST}:{upstream_port}/v1",
            "--db",
            db,
            "--journal",
            str(workdir / f"journal-{port}.jsonl"),
            "--log-level",
            "warning",
        ]
        started.append(
            (
                port,
                subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=child_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                ),
            )
        )
    try:
        for port, process in started:
            wait_ready(process, port)
        yield [(port, process.pid) for port, process in started]
    finally:
        for _, process in started:
            output = stop_process(process)[1]
            if process.returncode not in (0, -signal.SIGTERM):
                print(output, file=sys.stderr)


# -- the workload ----------------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection; `post()` returns (status, headers, body)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """One request; a keep-alive connection the server closed while idle is reopened once."""
        head = (
            f"POST {PATH} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            "Content-Type: application/json\r\nAuthorization: Bearer sk-bench-0000\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        for attempt in (1, 2):
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(HOST, self.port)
            assert self._reader is not None
            self._writer.write(head + body)
            try:
                status_line = await self._reader.readline()
            except ConnectionError:
                status_line = b""
            if status_line or attempt == 2:
                break
            await self.close()  # closed by the server (keep-alive timeout): nothing was read
        reader = self._reader
        assert reader is not None
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            data = await reader.readexactly(int(headers["content-length"]))
        else:  # chunked (the SSE stream)
            parts = []
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await reader.readline()
                    break
                parts.append(await reader.readexactly(size))
                await reader.readline()
            data = b"".join(parts)
        return status, headers, data

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


ASSISTANT = {"role": "assistant", "content": None, "tool_calls": [mock_upstream.TOOL_CALL]}


@dataclass
class Tally:
    """What the agents did: request latencies (ms), conversations and the ids they were given."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    conversations: dict[str, list[str]] = field(default_factory=dict)  # name -> trajectory ids


async def agent(
    name: str,
    ports: list[int],
    steps: int,
    until: float,
    max_requests: int,
    tally: Tally,
    seed: int,
) -> None:
    """Run conversations until `until` (monotonic) or `max_requests`; record into `tally`."""
    rng = random.Random(seed)
    connections = {port: Connection(port) for port in ports}
    sent = 0
    number = 0
    previous = -1
    try:
        while time.monotonic() < until and sent < max_requests:
            conversation = f"{name}-{number}"
            number += 1
            messages: list[dict[str, Any]] = [
                {"role": "system", "content": loadgen.SYSTEM_PROMPT},
                {"role": "user", "content": f"{loadgen.USER_MESSAGE} (ticket {conversation})"},
            ]
            ids: list[str] = []
            tally.conversations[conversation] = ids
            for step in range(steps):
                if time.monotonic() >= until or sent >= max_requests:
                    break
                choices = [n for n in range(len(ports)) if n != previous] or [0]
                previous = rng.choice(choices)
                body: dict[str, Any] = {
                    "model": "gpt-4.1-mini",
                    "messages": messages,
                    "tools": loadgen.TOOLS,
                    "tool_choice": "auto",
                }
                if rng.random() < 0.5:
                    body["stream"] = True
                    body["stream_options"] = {"include_usage": True}
                started = time.perf_counter()
                status, headers, _ = await connections[ports[previous]].post(
                    json.dumps(body).encode()
                )
                tally.latencies_ms.append((time.perf_counter() - started) * 1000)
                sent += 1
                if status != 200:
                    tally.errors += 1
                    break
                ids.append(headers.get("x-understudy-trajectory-id", ""))
                messages = [
                    *messages,
                    ASSISTANT,
                    {
                        "role": "tool",
                        "tool_call_id": mock_upstream.TOOL_CALL["id"],
                        "content": f"order {conversation} step {step}: in transit",
                    },
                ]
    finally:
        for connection in connections.values():
            await connection.close()


async def run_load(
    ports: list[int], agents: int, steps: int, seconds: float, max_requests: int, seed: int
) -> tuple[Tally, float]:
    tally = Tally()
    start = time.monotonic()
    await asyncio.gather(
        *[
            agent(
                f"a{seed}.{n}", ports, steps, start + seconds, max_requests, tally, seed * 1000 + n
            )
            for n in range(agents)
        ]
    )
    return tally, time.monotonic() - start


# -- checking what was recorded --------------------------------------------------------------------


async def recorded(db: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(exchanges, trajectories, pending conversation_states) read back through the project's
    own query layer (`Database.stream`), from either dialect."""
    from sqlalchemy import func, select

    from proxy.storage import Database
    from proxy.storage.schema import conversation_states, exchanges, trajectories

    database_ = await Database.open(db, migrate=False)
    try:
        e = exchanges.c
        rows = [
            row
            async for row in database_.stream(
                select(e.id, e.trajectory_id, e.parent_id, e.step).order_by(e.trajectory_id, e.step)
            )
        ]
        t = trajectories.c
        trajs = [
            row async for row in database_.stream(select(t.id, t.exchange_count, t.created_utc))
        ]
        async with database_.engine.connect() as conn:
            pending = (
                await conn.execute(select(func.count()).select_from(conversation_states))
            ).scalar_one()
    finally:
        await database_.close()
    return rows, trajs, int(pending)


def check(db: str, tallies: list[Tally]) -> list[str]:
    """Problems found in the recorded data (empty: every trajectory whole and single)."""
    rows, trajs, pending = asyncio.run(recorded(db))
    problems = []
    answered = sum(len(ids) for tally in tallies for ids in tally.conversations.values())
    conversations = [ids for tally in tallies for ids in tally.conversations.values() if ids]
    if len(rows) != answered:
        problems.append(f"{len(rows)} exchanges recorded for {answered} answered requests")
    if len(trajs) != len(conversations):
        problems.append(f"{len(trajs)} trajectories for {len(conversations)} conversations")
    if pending:
        problems.append(f"{pending} conversation_states rows left after the recorders drained")
    by_trajectory: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_trajectory.setdefault(row["trajectory_id"], []).append(row)
    split = 0
    for ids in conversations:
        if len(set(ids)) != 1:
            split += 1
            continue
        chain = by_trajectory.get(ids[0], [])
        if [r["step"] for r in chain] != list(range(len(ids))) or [
            r["parent_id"] for r in chain
        ] != [None, *[r["id"] for r in chain[:-1]]]:
            split += 1
    if split:
        problems.append(f"{split} conversations not recorded as one chained trajectory")
    counts = {t["id"]: t["exchange_count"] for t in trajs}
    if any(counts.get(tid) != len(chain) for tid, chain in by_trajectory.items()):
        problems.append("trajectories.exchange_count disagrees with the exchanges")
    return problems


# -- the stitcher's own round trips -----------------------------------------------------------------


async def stitcher_round_trips(db: str, count: int) -> dict[str, float]:
    """Median wall time (ms) of each request-path statement of the shared stitcher, one at a time:
    what a request pays on top of SQLite's in-memory path."""
    from proxy.storage import Database, StateRef, new_id

    database_ = await Database.open(db)
    timings: dict[str, list[float]] = {"remember_state": [], "find_states": [], "claim": []}
    try:
        for number in range(count + 20):
            trajectory_id = new_id()
            ref = StateRef(new_id(), trajectory_id, 0, "student")
            started = time.perf_counter()
            await database_.remember_state(new_id(), ref)
            remembered = time.perf_counter()
            await database_.find_states([new_id(), new_id()], include_pending=True)
            found = time.perf_counter()
            await database_.claim_trajectory(
                f"run-{number}", id_source="header", route="student", shadow=False
            )
            claimed = time.perf_counter()
            if number >= 20:  # warm-up: connections, prepared statements
                timings["remember_state"].append((remembered - started) * 1000)
                timings["find_states"].append((found - remembered) * 1000)
                timings["claim"].append((claimed - found) * 1000)
    finally:
        await database_.close()
    return {name: statistics.median(values) for name, values in timings.items()}


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Setup:
    """One database with its replicas, and what was measured on it."""

    kind: str
    count: int
    db: str
    ports: list[int]
    pids: list[int]
    tallies: list[Tally] = field(default_factory=list)  # every run, for the recording check
    rounds_rps: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    requests: int = 0
    proxy_cpu_s: float = 0.0
    postgres_cpu_s: float = 0.0
    sequential_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "SQLite" if self.kind == "sqlite" else "PostgreSQL"

    @property
    def rps(self) -> float:
        """Median throughput over the rounds, requests per second."""
        return statistics.median(self.rounds_rps) if self.rounds_rps else 0.0

    @property
    def errors(self) -> int:
        return sum(tally.errors for tally in self.tallies)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(setups: list[Setup], args: argparse.Namespace) -> None:
    """Warm up every setup, then throughput in interleaved rounds (the order rotates each round,
    so load that other work puts on the machine spreads over all setups), then latency."""
    runner = _runner()
    server = postgres_pids() if _local(args.postgres) else []
    for number, setup in enumerate(setups):
        tally, _ = runner(run_load(setup.ports, 4, args.steps, 2.0, 10**9, 100 + number))
        setup.tallies.append(tally)
    for round_number in range(args.rounds):
        for offset in range(len(setups)):
            setup = setups[(round_number + offset) % len(setups)]
            measured = server if setup.kind == "postgresql" else []
            proxy_cpu, postgres_cpu = cpu_seconds(setup.pids), cpu_seconds(measured)
            seed = 1000 * (round_number + 1) + 10 * setups.index(setup) + args.seed
            tally, seconds = runner(
                run_load(setup.ports, args.agents, args.steps, args.duration, 10**9, seed)
            )
            setup.proxy_cpu_s += cpu_seconds(setup.pids) - proxy_cpu
            setup.postgres_cpu_s += cpu_seconds(measured) - postgres_cpu
            setup.tallies.append(tally)
            setup.rounds_rps.append(len(tally.latencies_ms) / seconds)
            setup.latencies_ms += tally.latencies_ms
            setup.requests += len(tally.latencies_ms)
            print(
                f"  round {round_number + 1} {setup.name} x{setup.count}: "
                f"{setup.rounds_rps[-1]:.0f} req/s",
                flush=True,
            )
    for number, setup in enumerate(setups):
        tally, _ = runner(
            run_load(setup.ports, 1, args.steps, 120.0, args.latency_requests, 200 + number)
        )
        setup.tallies.append(tally)
        setup.sequential_ms = tally.latencies_ms


def run(args: argparse.Namespace, workdir: Path) -> list[Setup]:
    """Databases and replicas for every setup, the measurements, then the recording check."""
    setups: list[Setup] = []
    with mock_server() as upstream_port, ExitStack() as databases:
        with ExitStack() as processes:
            for kind, count in SETUPS:
                db = databases.enter_context(database(kind, args.postgres, workdir))
                migrate(db)
                started = processes.enter_context(replicas(count, db, upstream_port, workdir))
                setups.append(
                    Setup(kind, count, db, [port for port, _ in started], [p for _, p in started])
                )
            measure(setups, args)
        # the replicas are stopped (SIGTERM): their recorders have drained
        for setup in setups:
            setup.problems = check(setup.db, setup.tallies)
    return setups


def _local(url: str) -> bool:
    host = url.split("@")[-1].split("/")[0].split(":")[0]
    return host in ("127.0.0.1", "localhost", "::1", "")


def _runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def machine() -> str:
    """One line about where the numbers come from."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load:.1f} at the start"
    )


def table(setups: list[Setup], args: argparse.Namespace, about: str, version: str) -> str:
    """The results as a Markdown table with its conditions."""
    sqlite = next((s for s in setups if s.kind == "sqlite"), None)
    lines = [
        f"Workload: {args.agents} concurrent agents, conversations of {args.steps} tool-call "
        "steps (2.5-4 KB requests, half streamed), each step on another replica than the step "
        f"before; {args.rounds} interleaved rounds of {args.duration:.0f} s per setup "
        f"(requests/s: the median round); latency: one agent, {args.latency_requests} "
        f"sequential steps. Mock upstream answers in ~0 ms. {about}; PostgreSQL {version} on "
        "the same machine.",
        "",
        "| setup | replicas | requests/s | vs SQLite | p50 ms | p99 ms | proxy CPU ms/req "
        "| PostgreSQL CPU ms/req | sequential p50 ms | sequential p90 ms | requests "
        "| recorded exactly |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in setups:
        ratio = f"{s.rps / sqlite.rps:.2f}x" if sqlite and sqlite.rps else "-"
        exact = "yes" if not s.problems and not s.errors else "; ".join(s.problems) or "errors"
        per_request = 1000 / max(1, s.requests)
        postgres = f"{s.postgres_cpu_s * per_request:.2f}" if s.kind == "postgresql" else "-"
        lines.append(
            f"| {s.name} | {s.count} | {s.rps:.0f} | {ratio} "
            f"| {statistics.median(s.latencies_ms):.1f} | {percentile(s.latencies_ms, 0.99):.1f} "
            f"| {s.proxy_cpu_s * per_request:.2f} | {postgres} "
            f"| {statistics.median(s.sequential_ms):.2f} "
            f"| {percentile(s.sequential_ms, 0.90):.2f} | {s.requests} | {exact} |"
        )
    return "\n".join(lines) + "\n"


async def server_version(server: str) -> str:
    conn = await asyncpg.connect(server, timeout=5)
    try:
        return str(await conn.fetchval("SHOW server_version")).split()[0]
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--postgres",
        default=os.environ.get("UNDERSTUDY_TEST_POSTGRES_URL", DEFAULT_POSTGRES),
        help="PostgreSQL server URL (a database on it; the benchmark creates its own beside it)",
    )
    parser.add_argument("--duration", type=float, default=8.0, help="one throughput run, seconds")
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs per setup")
    parser.add_argument("--agents", type=int, default=32, help="concurrent agents")
    parser.add_argument("--steps", type=int, default=4, help="steps per conversation")
    parser.add_argument("--latency-requests", type=int, default=200, help="sequential steps")
    parser.add_argument(
        "--quick", action="store_true", help="one round of 4 s, 50 sequential steps"
    )
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds, args.latency_requests = 4.0, 1, 50
    try:
        version = asyncio.run(server_version(args.postgres))
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"bench_replicas: no PostgreSQL at {args.postgres}: {exc}", file=sys.stderr)
        return 2
    about = machine()
    with database("postgresql", args.postgres, Path(tempfile.gettempdir())) as db:
        round_trips = _runner()(stitcher_round_trips(db, args.latency_requests * 5))
    print(
        "shared stitcher, one statement at a time (median ms): "
        + ", ".join(f"{name} {ms:.3f}" for name, ms in round_trips.items()),
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="understudy-bench-") as tmp:
        setups = run(args, Path(tmp))
    text = table(setups, args, about, version) + (
        "\nShared stitcher statements, one at a time, median ms: "
        + ", ".join(f"`{name}` {ms:.3f}" for name, ms in round_trips.items())
        + ".\n"
    )
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 1 if any(s.problems or s.errors for s in setups) else 0


if __name__ == "__main__":
    sys.exit(main())
