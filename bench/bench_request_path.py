"""Benchmark: the proxy's work per request that grows with the history an agent resends (issue 13).

    python -m bench.bench_request_path [--conversations 50] [--steps 3,10,30,60] [--repeat 3]

An agent resends its whole history (and its tool list) at every step, so whatever the proxy does
to every message of a request costs, over a conversation, the square of its length. On the event
loop, before the answer's last byte, the proxy parses the body, hashes every message for
stitching (`proxy.core.canonical.prefix_hashes`) and redacts the record it journals
(`proxy.core.redaction.Redactor`). This replays BFCL-shaped conversations (`bench.bench_storage`:
20 tools, a system prompt, tool-calling steps with JSON results; requests as the SDK sends them),
every conversation's step k before any step k + 1 as concurrent agents do, and times per request,
side by side in one run on the same requests:

- **before**: each message canonicalized and hashed at every step, the whole request text
  redacted at every step (`prefix_hashes(messages)`, `Redactor.json_text(text)`);
- **now**: what the proxy runs (`Stitcher`'s `CanonicalCache`, `Redactor.document_json`): a
  message seen before costs a compact dump and a lookup; only what is new is canonicalized and
  looked at for secrets.

Parsing (orjson) is shown for scale; it is the same in both. CPU time, one thread, the minimum
of `--repeat` runs per figure (the least disturbed by other work on the machine).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.bench_storage import conversation
from proxy.core.canonical import CanonicalCache, canonical_bytes, prefix_hashes
from proxy.core.redaction import Redactor
from proxy.http.chat import parse_chat_request


def requests_of(conversations: int, steps: int) -> list[bytes]:
    """Request bodies (compact JSON, as the SDK sends them), step by step across conversations."""
    rng = random.Random(steps)
    runs = [conversation(rng, steps) for _ in range(conversations)]
    return [
        json.dumps(run[step][0], separators=(",", ":")).encode()
        for step in range(steps)
        for run in runs
    ]


def timed(requests: list[bytes], now: bool) -> dict[str, list[float]]:
    """Per request: CPU seconds to parse, hash and redact it, in the order given."""
    cache = CanonicalCache(canonical_bytes)
    redactor = Redactor()
    out: dict[str, list[float]] = {"parse": [], "hash": [], "redact": []}
    clock = time.process_time
    for raw in requests:
        t0 = clock()
        body, text = parse_chat_request(raw)
        t1 = clock()
        if now:
            prefix_hashes(body["messages"], cache)
        else:
            prefix_hashes(body["messages"])
        t2 = clock()
        if now:
            redactor.document_json(text, body)
        else:
            redactor.json_text(text)
        t3 = clock()
        out["parse"].append(t1 - t0)
        out["hash"].append(t2 - t1)
        out["redact"].append(t3 - t2)
    return out


def best_of(repeat: int, requests: list[bytes], now: bool) -> dict[str, list[float]]:
    """`timed` `repeat` times; each request's figure is its least disturbed run's."""
    runs = [timed(requests, now) for _ in range(repeat)]
    return {
        stage: [min(values) for values in zip(*(r[stage] for r in runs), strict=True)]
        for stage in runs[0]
    }


def cell(figures: dict[Any, tuple[float, float]], stage: str, now: bool) -> str:
    """`last / mean` microseconds of one stage."""
    last, mean = figures[stage, now]
    return f"{last:,.0f} / {mean:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument(
        "--steps", default="3,10,30,60", help="conversation lengths, comma-separated"
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    console = Console()
    table = Table(title="Per request, microseconds of CPU (last step / mean over all steps)")
    for column in (
        "steps",
        "last request KB",
        "parse",
        "hash before",
        "hash now",
        "redact before",
        "redact now",
        "hash + redact, before / now",
    ):
        table.add_column(column, justify="right")
    for steps in (int(s) for s in args.steps.split(",")):
        requests = requests_of(args.conversations, steps)
        figures: dict[str, Any] = {}
        for now in (False, True):
            result = best_of(args.repeat, requests, now)
            for stage, values in result.items():
                last = values[-args.conversations :]
                figures[stage, now] = (
                    sum(last) / len(last) * 1e6,
                    sum(values) / len(values) * 1e6,
                )
        last_kb = sum(map(len, requests[-args.conversations :])) / args.conversations / 1024

        before = figures["hash", False][0] + figures["redact", False][0]
        after = figures["hash", True][0] + figures["redact", True][0]
        table.add_row(
            str(steps),
            f"{last_kb:.1f}",
            cell(figures, "parse", False),
            cell(figures, "hash", False),
            cell(figures, "hash", True),
            cell(figures, "redact", False),
            cell(figures, "redact", True),
            f"{before:,.0f} / {after:,.0f} ({before / after:.1f}x)",
        )
    console.print(table)


if __name__ == "__main__":
    main()
