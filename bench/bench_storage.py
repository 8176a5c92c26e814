"""Benchmark: database bytes against the OpenAI export's bytes as conversations get longer (issue 13).

    python -m bench.bench_storage [--conversations 100] [--steps 3,10,30] [--keep DIR]

Replays BFCL-shaped traffic, synthetic but realistic: 20 tools with JSON-schema parameters (nested
objects, enums, arrays), a system prompt, a user question, then tool-calling steps (a third of
them with two parallel calls) whose results are JSON documents, then a final answer; every
request re-sends the whole history and the tool list, as agents do. For each trajectory length it
writes the same rows twice through `Database.write_exchanges` (the recorder's write path) into
fresh SQLite files:

- **before**: today's shape until migration 003, every exchange holding its whole request body
  (the rows are passed in already marked whole, so nothing is cut: the baseline is measured in
  the same run, nothing checked out);
- **after**: content-addressed parts (`proxy.storage.bodies`).

Then it runs the real exporter (`python -m exporter export`, OpenAI format) on both, checks the two
exports are byte-identical, and prints database bytes (file size after a WAL checkpoint and
VACUUM), export bytes and their ratio. Target: after <= 2x the export, flat as steps grow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from proxy.storage import Database, new_id
from proxy.storage.bodies import WHOLE  # noqa: E402
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


def conversation(rng: random.Random, steps: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(request body, answer message) per step: steps-1 tool-calling steps, then the answer."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": _sentence(rng, rng.randint(12, 40))},
    ]
    out = []
    answer: dict[str, Any]
    for step in range(steps):
        request: dict[str, Any] = {
            "model": "gpt-4.1-mini",
            "messages": list(messages),
            "tools": TOOLS,
        }
        request["parallel_tool_calls"] = True
        if step == steps - 1:
            answer = {
                "role": "assistant",
                "content": _sentence(rng, rng.randint(30, 80)),
            }
            out.append((request, answer))
            break
        calls: list[dict[str, Any]] = [
            {
                "id": f"call_{new_id()[:24]}",
                "type": "function",
                "function": {
                    "name": rng.choice(_NAMES),
                    "arguments": json.dumps(
                        {"query": _sentence(rng, 4), "limit": rng.randint(1, 10)}
                    ),
                },
            }
            for _ in range(2 if rng.random() < 0.33 else 1)
        ]
        answer = {"role": "assistant", "content": None, "tool_calls": calls}
        out.append((request, answer))
        messages.append(answer)
        messages += [_result(rng, call["id"]) for call in calls]
    return out


def rows_for(
    rng: random.Random, conversations: int, steps: int, started: list[int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Exchange rows (as the recorder builds them) and trajectory rows for `conversations`."""
    exchange_rows: list[dict[str, Any]] = []
    trajectory_rows: list[dict[str, Any]] = []
    for _ in range(conversations):
        trajectory_id = new_id()
        parent = None
        first = None
        for step, (request, answer) in enumerate(conversation(rng, steps)):
            started[0] += 1
            at = f"2026-11-21T{started[0] // 3600 % 24:02d}:{started[0] // 60 % 60:02d}:{started[0] % 60:02d}.000+00:00"
            exchange_id = new_id()
            response: dict[str, Any] = {
                "id": f"chatcmpl-{exchange_id[:20]}",
                "object": "chat.completion",
                "created": 1_790_000_000 + started[0],
                "model": "gpt-4.1-mini-2025-04-14",
                "choices": [
                    {
                        "index": 0,
                        "message": {**answer, "refusal": None, "annotations": []},
                        "finish_reason": "tool_calls" if answer.get("tool_calls") else "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {"prompt_tokens": 900 + 300 * step, "completion_tokens": 40},
            }
            exchange_rows.append(
                {
                    "id": exchange_id,
                    "trajectory_id": trajectory_id,
                    "parent_id": parent,
                    "step": step,
                    "started_utc": at,
                    "duration_ms": rng.uniform(300, 3000),
                    "ttft_ms": None,
                    "path": "/v1/chat/completions",
                    "stream": False,
                    "status_code": 200,
                    "outcome": "ok",
                    "route": "student",
                    "model_requested": "gpt-4.1-mini",
                    "model_answered": "gpt-4.1-mini-2025-04-14",
                    # as the SDKs send it (httpx >= 0.28 and JSON.stringify: compact, UTF-8)
                    "request_json": json.dumps(request, ensure_ascii=False, separators=(",", ":")),
                    # as the recorder stores an assembled stream (json.dumps)
                    "response_json": json.dumps(response),
                    "upstream_request_id": f"req_{exchange_id}",
                    "prompt_tokens": response["usage"]["prompt_tokens"],
                    "completion_tokens": 40,
                    "total_tokens": response["usage"]["prompt_tokens"] + 40,
                    "usage_json": json.dumps(response["usage"]),
                    "finish_reason": response["choices"][0]["finish_reason"],
                    "tool_call_count": len(answer.get("tool_calls") or []),
                    "request_hash": new_id() + new_id(),
                    "state_hash": new_id() + new_id(),
                }
            )
            first = first or at
            parent = exchange_id
        trajectory_rows.append(
            {
                "id": trajectory_id,
                "created_utc": first,
                "updated_utc": at,
                "id_source": "hash",
                "route": "student",
                "shadow": False,
                "exchange_count": steps,
                "error_count": 0,
                "tool_call_count": sum(r["tool_call_count"] for r in exchange_rows[-steps:]),
                "prompt_tokens": 0,
                "completion_tokens": 0,
            }
        )
    return exchange_rows, trajectory_rows


async def write(
    path: Path,
    exchange_rows: list[dict[str, Any]],
    trajectory_rows: list[dict[str, Any]],
    *,
    whole: bool,
) -> float:
    """Write the rows in recorder-sized batches (one step of every conversation per batch, so
    parents are written in an earlier batch, as in production); return seconds spent."""
    db = await Database.open(str(path))
    started = time.perf_counter()
    try:
        by_step: dict[int, list[dict[str, Any]]] = {}
        for row in exchange_rows:
            row = {**row, "request_refs_json": WHOLE} if whole else row
            by_step.setdefault(row["step"], []).append(row)
        trajectories = {row["id"]: row for row in trajectory_rows}
        for step in sorted(by_step):
            rows = by_step[step]
            for start in range(0, len(rows), 500):
                part = rows[start : start + 500]
                touched = [{**trajectories[r["trajectory_id"]], "exchange_count": 1} for r in part]
                await db.write_exchanges(part, touched)
    finally:
        elapsed = time.perf_counter() - started
        await db.close()
    return elapsed


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--steps", default="3,10,30", help="trajectory lengths, comma-separated")
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
        for shape in ("before", "after"):
            path = directory / f"{shape}-{steps}.db"
            path.unlink(missing_ok=True)
            seconds = asyncio.run(
                write(path, exchange_rows, trajectory_rows, whole=shape == "before")
            )
            exports[shape] = export(path, directory / f"{shape}-{steps}.jsonl")
            figures[f"{shape}_db_bytes"] = db_bytes(path)
            figures[f"{shape}_write_s"] = round(seconds, 2)
        if exports["before"] != exports["after"]:
            raise SystemExit(f"{steps} steps: the exports differ between the two shapes")
        figures["export_bytes"] = len(exports["after"])
        figures["before_ratio"] = round(figures["before_db_bytes"] / figures["export_bytes"], 2)
        figures["after_ratio"] = round(figures["after_db_bytes"] / figures["export_bytes"], 2)
        results.append(figures)
        print(json.dumps(figures), flush=True)
    print()
    print(
        "| steps | conversations | export MB | before: DB MB (x export) | after: DB MB (x export) |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['steps']} | {r['conversations']} | {r['export_bytes'] / 1e6:.2f} | "
            f"{r['before_db_bytes'] / 1e6:.2f} ({r['before_ratio']}x) | "
            f"{r['after_db_bytes'] / 1e6:.2f} ({r['after_ratio']}x) |"
        )
    worst = max(r["after_ratio"] for r in results)
    spread = worst - min(r["after_ratio"] for r in results)
    print()
    print(f"- {'PASS' if worst <= 2 else 'FAIL'}: after <= 2x the export (worst {worst}x)")
    print(f"- flat as conversations lengthen: after ratios spread {spread:.2f}")


if __name__ == "__main__":
    main()
