"""Benchmark: export 100,000 recorded trajectories (issue 3: "seconds, not minutes").

    python -m bench.bench_export [--trajectories 100000] [--db PATH] [--reuse] [--stages N]

Builds a SQLite database the way the recorder writes it (`ExchangeRecord.to_row`,
`trajectory_rows`, `Database.write_exchanges`, in large batches), shaped like the seed use case:
a shared system prompt and 5 tools, a user question, two tool-calling steps (a third of them with
two parallel calls) and a final answer, so 3 exchanges per trajectory and one leaf each. Then it
times `python -m exporter export` (the real CLI, as a subprocess, tokens counted, duplicates
checked) and `validate` on the output, and prints one JSON line with the numbers: wall-clock
rate beside issue 13's floor (20,000 samples/s), the export's own CPU time (process and
workers, and each apart: the steadier figures on a shared machine), and its largest resident
set; then one line for people: the rate, PASS or MISS against the floor, the load average.
With `--stages N`, it then times each stage of a worker process on N samples (`stage_costs`)
and prints them beside the CPU the floor allows per sample.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from proxy.recording.recorder import ExchangeRecord, trajectory_meta, trajectory_rows
from proxy.storage import Database, new_id

ROOT = Path(__file__).resolve().parent.parent


SYSTEM = (
    "You are the support agent of an online shop. Look orders up before answering, never guess "
    "amounts, refund only delivered orders, and answer in the customer's language. " * 2
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name.replace('_', ' ')} in the shop's back office.",
            "parameters": {
                "type": "object",
                "properties": {
                    "order_id": {"type": "string", "description": "the order number"},
                    "reason": {"type": "string", "description": "why, in a few words"},
                },
                "required": ["order_id"],
            },
        },
    }
    for name in ("lookup_order", "track_parcel", "refund_order", "email_customer", "open_ticket")
]
WORDS = [
    "parcel",
    "late",
    "refund",
    "broken",
    "address",
    "invoice",
    "colour",
    "size",
    "wrong",
    "missing",
    "box",
    "courier",
]


def _completion(message: dict[str, Any], n: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": 1_763_000_000,
        "model": "gpt-4.1-mini-2025-04-14",
        "choices": [
            {
                "index": 0,
                "message": {"refusal": None, "annotations": [], **message},
                "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
            }
        ],
        "usage": {"prompt_tokens": 900, "completion_tokens": 60, "total_tokens": 960},
    }


def _call(i: int, name: str, order: str) -> dict[str, Any]:
    return {
        "id": f"call_{i}",
        "type": "function",
        "function": {
            "name": name,
            "arguments": json.dumps({"order_id": order, "reason": "customer asked"}),
        },
    }


def _record(**kwargs: Any) -> ExchangeRecord:
    names = {f.name for f in dataclasses.fields(ExchangeRecord)}
    if "shadow" in names:
        kwargs.setdefault("shadow", False)
    return ExchangeRecord(**{k: v for k, v in kwargs.items() if k in names})


def trajectory(n: int, rng: random.Random) -> list[ExchangeRecord]:
    """The three exchanges of one conversation, as the recorder would have built them."""
    order = f"A{rng.randrange(10**7):07d}"
    question = (
        f"Hi, my order {order} is {' '.join(rng.choices(WORDS, k=8))}. What can you do? ({n})"
    )
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
    ]
    plans = [["lookup_order", "track_parcel"] if n % 3 == 0 else ["lookup_order"], ["refund_order"]]
    trajectory_id, parent, records = new_id(), None, []
    minute = n // 60
    for step in range(3):
        answer: dict[str, Any]
        if step < 2:
            answer = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    _call(10 * step + i, name, order) for i, name in enumerate(plans[step])
                ],
            }
        else:
            answer = {
                "role": "assistant",
                "content": f"Order {order}: refunded, you will get an email. "
                + " ".join(rng.choices(WORDS, k=30)),
            }
        request = {
            "model": "gpt-4.1-mini",
            "messages": list(messages),
            "tools": TOOLS,
            "parallel_tool_calls": True,
        }
        record = _record(
            id=new_id(),
            trajectory_id=trajectory_id,
            parent_id=parent,
            step=step,
            new_trajectory=step == 0,
            id_source="hash",
            route="student",
            started_utc=f"2026-11-{1 + minute // 1440:02d}T{minute // 60 % 24:02d}:{minute % 60:02d}:{step:02d}.000+00:00",
            path="/v1/chat/completions",
            stream=False,
            request=request,
            request_text=json.dumps(request),
            request_hash=new_id(),
            status_code=200,
            response=_completion(answer, n),
            state_hash=new_id(),
        )
        records.append(record)
        parent = record.id
        messages.append(answer)
        for call in answer.get("tool_calls") or ():
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call["id"],
                    "content": json.dumps(
                        {
                            "order_id": order,
                            "status": rng.choice(WORDS),
                            "eta_days": rng.randrange(9),
                        }
                    ),
                }
            )
    return records


async def build(path: Path, count: int) -> float:
    started = time.perf_counter()
    db = await Database.open(str(path))
    rng = random.Random(1)
    try:
        batch: list[ExchangeRecord] = []
        for n in range(count):
            batch.extend(trajectory(n, rng))
            if len(batch) >= 6000 or n == count - 1:
                entries = [(r.to_row(), trajectory_meta(r)) for r in batch]
                await db.write_exchanges([row for row, _ in entries], trajectory_rows(entries))
                batch = []
    finally:
        await db.close()
    return time.perf_counter() - started


TARGET_SAMPLES_PER_S = 20_000
"""Issue 13's floor for the export rate on this benchmark."""


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _children_max_rss_mb() -> float:
    """The largest resident set of any finished child so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# `python -m exporter ARGS` that also reports, as the last line on stderr, the CPU seconds of its
# own process and of its worker processes (getrusage SELF and CHILDREN as it exits).
_SPLIT_RUNNER = """
import json, resource, sys
from exporter.cli import main
try:
    main(sys.argv[1:])
finally:
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"main_cpu_s": own.ru_utime + own.ru_stime,
                      "workers_cpu_s": workers.ru_utime + workers.ru_stime}), file=sys.stderr)
"""


def timed(*args: str) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """(wall seconds, CPU seconds of the exporter process and its workers, the result)."""
    cpu = _children_cpu_s()
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _SPLIT_RUNNER, *args], cwd=ROOT, capture_output=True, text=True
    )
    return time.perf_counter() - started, _children_cpu_s() - cpu, result


def cpu_split(result: subprocess.CompletedProcess[str]) -> dict[str, float]:
    """`{"main_cpu_s", "workers_cpu_s"}` of a `timed` run (its last stderr line), rounded."""
    lines = result.stderr.strip().splitlines()
    split = json.loads(lines[-1]) if lines else {}
    return {key: round(value, 2) for key, value in split.items()}


async def _leaf_ids(db: Path, count: int) -> list[str]:
    """The ids of the first `count` leaves an export reads, in its order."""
    from exporter.options import ExportOptions
    from exporter.reader import read_ids

    database = await Database.open(str(db), migrate=False, must_exist=True)
    ids: list[str] = []
    try:
        async for batch in read_ids(database, ExportOptions()):
            ids.extend(exchange_id for exchange_id, _ in batch)
            if len(ids) >= count:
                break
    finally:
        await database.close()
    return ids[:count]


def stage_costs(db: Path, out: Path, count: int) -> dict[str, float]:
    """CPU microseconds per sample of each stage of a worker process, in this process, on the
    first `count` samples (the export's own classes, batches of 1,000; the least of three
    passes): `read` (`exporter.direct.DirectReader`: SQLite, unpacking, splicing bodies back),
    `build` (`exporter.building.SampleBuilder.build`: parse, build, render, line, key, the two
    token counts), `tokens` (those counts alone, `exporter.tokens.TokenCounter.count` on the
    exported messages: the same texts, the same cache)."""
    from exporter.building import SampleBuilder
    from exporter.direct import DirectReader
    from exporter.options import ExportOptions
    from exporter.tokens import TokenCounter, encoding_name
    from proxy.storage.reading import sqlite_row_statements

    options = ExportOptions()
    ids = asyncio.run(_leaf_ids(db, count))
    batches = [ids[start : start + 1000] for start in range(0, len(ids), 1000)]
    reader = DirectReader(db, sqlite_row_statements(options.preference), options)
    builder = SampleBuilder(options)
    counter = TokenCounter(encoding_name(options.model_for_tokens))
    with out.open(encoding="utf-8") as lines:
        samples = [json.loads(next(lines)) for _ in range(len(ids))]
    # each sample's tool list as the builder hands it to the counter: its compact JSON, written once
    tools_json = [
        json.dumps(s["tools"], separators=(",", ":"), ensure_ascii=False)
        if s.get("tools")
        else None
        for s in samples
    ]

    def least(run: Any) -> float:
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            run()
            best = min(best, time.process_time() - started)
        return round(best / len(ids) * 1e6, 1)

    rows = [reader.read(batch) for batch in batches]
    gc.collect()
    gc.freeze()  # as a worker does after its start: what is loaded here is not scanned again
    return {
        "read": least(lambda: [reader.read(batch) for batch in batches]),
        "build": least(lambda: [builder.build([dict(row) for row in batch]) for batch in rows]),
        "tokens": least(
            lambda: [
                counter.count(s["messages"], tools_json=tools)
                for s, tools in zip(samples, tools_json, strict=True)
            ]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trajectories", type=int, default=100_000)
    parser.add_argument("--db", type=Path, help="database file (default: a temporary directory)")
    parser.add_argument("--reuse", action="store_true", help="use --db as it is if it exists")
    parser.add_argument(
        "--stages",
        type=int,
        default=0,
        metavar="N",
        help="then time each stage of a worker on N samples in this process (`stage_costs`)",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="understudy-bench-"))
    db = args.db or workdir / "bench.db"
    build_s = None
    if not (args.reuse and db.exists()):
        db.unlink(missing_ok=True)
        build_s = asyncio.run(build(db, args.trajectories))
    out = workdir / "train.jsonl"
    export_s, export_cpu_s, result = timed("export", "--db", str(db), "--out", str(out), "--json")
    if result.returncode != 0:
        sys.exit(f"export failed: {result.stderr.strip()}")
    summary = json.loads(result.stdout)
    export_rss_mb = _children_max_rss_mb()  # the export and its workers (validate runs next)
    validate_s, _, checked = timed("validate", str(out), "--json")
    rate = summary["written"] / export_s
    split = cpu_split(result)
    stages = stage_costs(db, out, min(args.stages, summary["written"])) if args.stages else None
    print(
        json.dumps(
            {
                "trajectories": args.trajectories,
                "db_mb": round(db.stat().st_size / 1e6, 1),
                "build_s": round(build_s, 1) if build_s is not None else None,
                "export_s": round(export_s, 2),
                "export_pipeline_s": summary["seconds"],
                "export_cpu_s": round(export_cpu_s, 2),
                **{f"export_{key}": value for key, value in split.items()},
                "export_max_rss_mb": round(export_rss_mb, 1),
                "samples_per_s": round(rate),
                "samples_per_cpu_s": round(summary["written"] / export_cpu_s),
                "target_samples_per_s": TARGET_SAMPLES_PER_S,
                "pass": rate >= TARGET_SAMPLES_PER_S,
                "written": summary["written"],
                "dropped": summary["dropped"],
                "tokens": summary["tokens"],
                "out_mb": round(out.stat().st_size / 1e6, 1),
                "validate_s": round(validate_s, 2),
                "valid": json.loads(checked.stdout)["valid"] if checked.stdout else False,
                "stages_us_per_sample": stages,
            }
        )
    )
    print(
        f"export: {summary['written']:,} samples in {export_s:.2f} s = {rate:,.0f} samples/s "
        f"({summary['written'] / export_cpu_s:,.0f} per CPU second), "
        f"{'PASS' if rate >= TARGET_SAMPLES_PER_S else 'MISS'} against {TARGET_SAMPLES_PER_S:,}/s; "
        f"max RSS {export_rss_mb:.0f} MB; load average {os.getloadavg()[0]:.1f}"
    )
    if stages is not None:
        budget = 2 * 1e6 / TARGET_SAMPLES_PER_S  # two cores' microseconds per sample at the floor
        main_us = split.get("main_cpu_s", 0) / summary["written"] * 1e6
        print(
            f"per sample, CPU us: worker read {stages['read']}, build {stages['build']} (of "
            f"which the two exact token counts {stages['tokens']}), main process "
            f"{main_us:.1f} (all of it, start included); {TARGET_SAMPLES_PER_S:,}/s on two "
            f"cores leaves {budget:.0f} us per sample for everything"
        )


if __name__ == "__main__":
    main()
