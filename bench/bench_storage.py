"""Benchmark: database bytes against the OpenAI export's bytes as conversations get longer (issue 13).

    python -m bench.bench_storage [--conversations 100] [--steps 3,10,30,60] [--keep DIR]

Replays BFCL-shaped traffic, synthetic but realistic: 20 tools with JSON-schema parameters (nested
objects, enums, arrays), a system prompt, a user question, then tool-calling steps (a third of
them with two parallel calls) whose results are JSON documents, then a final answer; every
request re-sends the whole history and the tool list, as agents do.

The rows are what the recorder writes for an openai SDK call that is not streamed: built by the
recorder's own `ExchangeRecord` -> `proxy.storage.rows.exchange_row`, with the request body as
the SDK sends it (compact JSON; the previous answer re-sent as the SDK serializes
`choices[0].message`), the answer as the API sends it (pretty-printed, every field: `usage` with
its token details, `service_tier`, `system_fingerprint`), the real stitching hashes, and no
`X-Understudy-*` header (the SDK sends none; no other header is stored). For each trajectory
length it writes them through `Database.write_exchanges` (the recorder's write path, batches of
one step of every conversation) into fresh SQLite files, twice:

- **whole**: every exchange holding its whole request body (the shape before migration 003; the
  rows are passed in already marked whole, so nothing is cut), the reference the exports are
  compared with;
- **stored**: the shape the recorder stores today (content-addressed request parts, 003; packed
  JSON texts, 008; hash keys as bytes and binary request references, 009).

Then it runs the real exporter (`python -m exporter export`, OpenAI format) on both, checks the two
exports are byte-identical, and prints database bytes (file size after a WAL checkpoint and
VACUUM), export bytes, their ratio, the CPU time per exchange of the stored write (the process's:
`Database.write_exchanges` and its driver thread; compare trees on the same rows), the bytes per
exchange of each table and index of the longest run (SQLite's `dbstat`), and the ratio of what
one more step adds (database bytes per exchange over export bytes per step, between the two
longest runs: where the ratio heads as conversations grow). Target: stored <= 2x the export at
every length, flat as steps grow.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from proxy.core.canonical import chain_hash, prefix_hashes
from proxy.recording.recorder import ExchangeRecord
from proxy.storage import Database, new_id
from proxy.storage.bodies import WHOLE
from proxy.storage.rows import exchange_row, trajectory_meta
from proxy.storage.rows import trajectory_rows as trajectory_rows_of
from proxy.testing.openai_shapes import chat_completion, openai_usage
from proxy.testing.servers import REPOSITORY_ROOT as ROOT
from proxy.testing.servers import child_env

SYSTEM = (
    "You are an assistant for a travel, banking and office-automation platform. Use the tools to "
    "look facts up before answering; never invent account numbers, prices or dates. When a tool "
    "fails, explain what failed and try another route. Ask for missing required parameters. "
    "Keep answers short and cite the tool results you used. " * 3
)
_NAMES = [
    "search_flights", "book_flight", "cancel_booking", "get_weather", "convert_currency",
    "get_account_balance", "transfer_funds", "list_transactions", "create_calendar_event",
    "send_email", "search_hotels", "book_hotel", "get_stock_quote", "translate_text",
    "create_ticket", "update_ticket", "search_documents", "summarize_document", "get_directions",
    "set_reminder",
]  # fmt: skip


def _tool(rng: random.Random, name: str) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "query": {"type": "string", "description": f"What to {name.replace('_', ' ')} for."},
        "limit": {"type": "integer", "minimum": 1, "maximum": 50, "description": "Max results."},
        "currency": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY", "CHF"]},
        "date_range": {
            "type": "object",
            "properties": {
                "start": {"type": "string", "format": "date"},
                "end": {"type": "string", "format": "date"},
            },
            "required": ["start"],
        },
        "tags": {"type": "array", "items": {"type": "string"}, "description": "Filters."},
    }
    keys = rng.sample(sorted(properties), k=rng.randint(2, 5))
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name.replace('_', ' ').capitalize()}. Returns a JSON document "
            "with the matching records, or an error object with a message.",
            "parameters": {
                "type": "object",
                "properties": {k: properties[k] for k in keys},
                "required": keys[:1],
            },
        },
    }


TOOLS = [_tool(random.Random(i), name) for i, name in enumerate(_NAMES)]
WORDS = [
    "flight",
    "hotel",
    "refund",
    "balance",
    "transfer",
    "meeting",
    "invoice",
    "Zurich",
    "Tokyo",
    "Monday",
    "budget",
    "ticket",
    "report",
    "delay",
    "receipt",
    "currency",
    "weather",
    "reminder",
    "summary",
    "contract",
]


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def _result(rng: random.Random, call_id: str) -> dict[str, Any]:
    records = [
        {
            "id": f"R{rng.randrange(10**6):06d}",
            "title": _sentence(rng, 5),
            "amount": round(rng.uniform(10, 5000), 2),
            "date": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "status": rng.choice(["ok", "pending", "failed"]),
        }
        for _ in range(rng.randint(1, 4))
    ]
    return {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"records": records})}


def _assistant_resent(message: dict[str, Any]) -> dict[str, Any]:
    """The answer's message as the openai SDK sends it back when the agent appends
    `completion.choices[0].message` to its history (pydantic `model_dump(exclude_unset=True)`:
    the model's field order, every field the response carried)."""
    out: dict[str, Any] = {
        "content": message["content"],
        "refusal": None,
        "role": "assistant",
        "annotations": [],
    }
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {
                "id": call["id"],
                "function": {
                    "arguments": call["function"]["arguments"],
                    "name": call["function"]["name"],
                },
                "type": "function",
            }
            for call in message["tool_calls"]
        ]
    return out


def conversation(rng: random.Random, steps: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(request body, answer message) per step: steps-1 tool-calling steps, then the answer.

    The answer message is in the order the API sends it (`role`, `content`, `tool_calls`,
    `refusal`, `annotations`); the next request re-sends it as the SDK does (`_assistant_resent`).
    """
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": _sentence(rng, rng.randint(12, 40))},
    ]
    out = []
    answer: dict[str, Any]
    for step in range(steps):
        request: dict[str, Any] = {
            "messages": list(messages),
            "model": "gpt-4.1-mini",
            "parallel_tool_calls": True,
            "tools": TOOLS,
        }
        if step == steps - 1:
            answer = {
                "role": "assistant",
                "content": _sentence(rng, rng.randint(30, 80)),
                "refusal": None,
                "annotations": [],
            }
            out.append((request, answer))
            break
        calls: list[dict[str, Any]] = [
            {
                "id": f"call_{_random_token(rng, 24)}",
                "type": "function",
                "function": {
                    "name": rng.choice(_NAMES),
                    "arguments": json.dumps(
                        {"query": _sentence(rng, 4), "limit": rng.randint(1, 10)},
                        separators=(",", ":"),
                    ),
                },
            }
            for _ in range(2 if rng.random() < 0.33 else 1)
        ]
        answer = {
            "role": "assistant",
            "content": None,
            "tool_calls": calls,
            "refusal": None,
            "annotations": [],
        }
        out.append((request, answer))
        messages.append(_assistant_resent(answer))
        messages += [_result(rng, call["id"]) for call in calls]
    return out


_TOKEN_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _random_token(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(_TOKEN_ALPHABET) for _ in range(length))


def completion(
    rng: random.Random, answer: dict[str, Any], prompt_tokens: int, created: int
) -> dict[str, Any]:
    """A `chat.completion` as the OpenAI API answers it (every field it sends, usage details)."""
    completion_tokens = 20 + 15 * len(answer.get("tool_calls") or []) + rng.randint(0, 60)
    cached = prompt_tokens // 1024 * 1024 if prompt_tokens >= 1024 else 0
    return chat_completion(
        answer,
        completion_id=f"chatcmpl-{_random_token(rng, 29)}",
        created=created,
        usage=openai_usage(prompt_tokens, completion_tokens, cached),
    )


def rows_for(
    rng: random.Random, conversations: int, steps: int, started: list[int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Exchange rows and trajectory rows for `conversations`, built by the recorder's own code
    (`ExchangeRecord` -> `proxy.storage.rows.exchange_row`), as for an openai SDK call that is
    not streamed: the request body as the SDK sends it (compact JSON, UTF-8), the answer stored
    as the API sent it (pretty-printed, 2-space indent), the real stitching hashes
    (`proxy.core.canonical`), no `X-Understudy-*` header (the SDK sends none; the recorder
    stores no other header)."""
    exchange_rows: list[dict[str, Any]] = []
    trajectory_rows: list[dict[str, Any]] = []
    for _ in range(conversations):
        trajectory_id = new_id()
        parent = None
        first = None
        entries = []
        for step, (request, answer) in enumerate(conversation(rng, steps)):
            started[0] += 1
            at = f"2026-11-21T{started[0] // 3600 % 24:02d}:{started[0] // 60 % 60:02d}:{started[0] % 60:02d}.000+00:00"
            exchange_id = new_id()
            request_text = json.dumps(request, ensure_ascii=False, separators=(",", ":"))
            hashes = prefix_hashes(request["messages"])
            response = completion(rng, answer, len(request_text) // 4, 1_790_000_000 + started[0])
            record = ExchangeRecord(
                id=exchange_id,
                trajectory_id=trajectory_id,
                parent_id=parent,
                step=step,
                new_trajectory=step == 0,
                id_source="hash",
                route="student",
                shadow=False,
                started_utc=at,
                path="/v1/chat/completions",
                stream=False,
                request=request,
                request_text=request_text,
                request_hash=hashes[-1],
                status_code=200,
                outcome="ok",
                response=response,
                response_text=json.dumps(response, indent=2),
                state_hash=chain_hash(hashes[-1], answer),
                duration_ms=rng.uniform(300, 3000),
                upstream_request_id=f"req_{_random_token(rng, 32).lower()}",
            )
            row = exchange_row(record)
            exchange_rows.append(row)
            entries.append((row, trajectory_meta(record)))
            first = first or at
            parent = exchange_id
        trajectory_rows.extend(trajectory_rows_of(entries))
    return exchange_rows, trajectory_rows


async def write(
    path: Path,
    exchange_rows: list[dict[str, Any]],
    trajectory_rows: list[dict[str, Any]],
    *,
    whole: bool,
) -> tuple[float, float]:
    """Write the rows (`whole`: request bodies marked whole, not cut) in recorder-sized batches
    (one step of every conversation per batch, so parents are written in an earlier batch, as in
    production); return (seconds spent, CPU seconds the process spent in
    `Database.write_exchanges`, its driver thread included)."""
    db = await Database.open(str(path))
    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        by_step: dict[int, list[dict[str, Any]]] = {}
        for row in exchange_rows:
            row = {**row, "request_refs_json": WHOLE} if whole else row
            by_step.setdefault(row["step"], []).append(row)
        meta = {
            row["id"]: {"id_source": row["id_source"], "route": row["route"], "shadow": False}
            for row in trajectory_rows
        }
        batches = []
        for step in sorted(by_step):
            rows = by_step[step]
            for start in range(0, len(rows), 500):
                part = rows[start : start + 500]
                batches.append(
                    (part, trajectory_rows_of([(r, meta[r["trajectory_id"]]) for r in part]))
                )
        cpu_started = time.process_time()
        for part, touched in batches:
            await db.write_exchanges(part, touched)
    finally:
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        await db.close()
    return elapsed, cpu


def db_bytes(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("VACUUM")
    finally:
        conn.close()
    return path.stat().st_size


def export(path: Path, out: Path) -> bytes:
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "export", "--db", str(path), "--out", str(out),
         "--format", "openai", "--quiet"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"export failed: {done.stderr.strip()}")
    return out.read_bytes()


def table_bytes(path: Path) -> dict[str, int]:
    """Bytes of each table and index of the SQLite file at `path` (pages, `dbstat`), largest
    first."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"
        ).fetchall()
    return {name: int(size) for name, size in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--steps", default="3,10,30,60", help="trajectory lengths, comma-separated")
    parser.add_argument("--keep", type=Path, help="keep the databases in this directory")
    args = parser.parse_args()
    directory = args.keep or Path(tempfile.mkdtemp(prefix="bench-storage-"))
    directory.mkdir(parents=True, exist_ok=True)
    results = []
    started = [0]
    for steps in [int(s) for s in args.steps.split(",")]:
        rng = random.Random(steps)
        exchange_rows, trajectory_rows = rows_for(rng, args.conversations, steps, started)
        figures: dict[str, Any] = {"steps": steps, "conversations": args.conversations}
        exports = {}
        for shape in ("whole", "stored"):
            path = directory / f"{shape}-{steps}.db"
            path.unlink(missing_ok=True)
            seconds, cpu_seconds = asyncio.run(
                write(path, exchange_rows, trajectory_rows, whole=shape == "whole")
            )
            exports[shape] = export(path, directory / f"{shape}-{steps}.jsonl")
            figures[f"{shape}_db_bytes"] = db_bytes(path)
            figures[f"{shape}_write_s"] = round(seconds, 2)
            figures[f"{shape}_write_cpu_us"] = round(cpu_seconds / len(exchange_rows) * 1e6)
        if exports["whole"] != exports["stored"]:
            raise SystemExit(f"{steps} steps: the exports differ between the two shapes")
        figures["export_bytes"] = len(exports["stored"])
        figures["whole_ratio"] = round(figures["whole_db_bytes"] / figures["export_bytes"], 2)
        figures["stored_ratio"] = round(figures["stored_db_bytes"] / figures["export_bytes"], 2)
        figures["stored_tables"] = {  # past one page: the empty tables left out
            name: size
            for name, size in table_bytes(directory / f"stored-{steps}.db").items()
            if size > 4096
        }
        results.append(figures)
        print(json.dumps(figures), flush=True)
    print()
    print("| steps | conversations | export MB | DB MB (x export) | DB bytes per exchange | "
          "write CPU per exchange | whole bodies: DB MB (x export) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in results:
        exchanges = r["steps"] * r["conversations"]
        print(
            f"| {r['steps']} | {r['conversations']} | {r['export_bytes'] / 1e6:.2f} | "
            f"{r['stored_db_bytes'] / 1e6:.2f} ({r['stored_ratio']}x) | "
            f"{r['stored_db_bytes'] / exchanges:.0f} | {r['stored_write_cpu_us']} us | "
            f"{r['whole_db_bytes'] / 1e6:.2f} ({r['whole_ratio']}x) |"
        )
    longest = results[-1]
    exchanges = longest["steps"] * longest["conversations"]
    print()
    print(f"Bytes per exchange by table and index ({longest['steps']} steps, stored):")
    print()
    print("| table or index | bytes per exchange |")
    print("|---|---|")
    for name, size in longest["stored_tables"].items():
        if size / exchanges >= 1:
            print(f"| {name} | {size / exchanges:.0f} |")
    worst = max(r["stored_ratio"] for r in results)
    spread = worst - min(r["stored_ratio"] for r in results)
    print()
    print(f"- {'PASS' if worst <= 2 else 'MISS'}: stored <= 2x the export (worst {worst}x)")
    print(f"- flat as conversations lengthen: stored ratios spread {spread:.2f}")
    if len(results) >= 2:
        a, b = sorted(results, key=lambda r: r["steps"])[-2:]
        added = (b["steps"] - a["steps"]) * b["conversations"]
        db_step = (b["stored_db_bytes"] - a["stored_db_bytes"]) / added
        export_step = (b["export_bytes"] - a["export_bytes"]) / added
        print(
            f"- {'PASS' if db_step <= 2 * export_step else 'MISS'}: one more step adds "
            f"{db_step:.0f} database bytes per exchange for {export_step:.0f} export bytes "
            f"({db_step / export_step:.2f}x, {a['steps']} -> {b['steps']} steps): the ratio "
            "longer conversations tend to"
        )


if __name__ == "__main__":
    main()
