"""The export pipeline, as the CLI and the dashboard call it.

    summary = await write_export(db, options, train_file, valid_file)   # streaming, two files
    lines, summary = await export_samples(db, options)                  # in memory, one list

Per row: decode -> filter -> build the sample (`exporter.samples`, or `formats.dpo.build_pair`)
-> render in the chosen format -> count tokens (`SampleBuilder`, in a worker) -> drop duplicates
-> drop samples over the limit -> assign train/valid by a hash of the trajectory id
(`SampleCollector`, in order). Rows are read in batches through a server-side cursor; batches are
built in a worker thread (or `options.workers` processes) a few ahead of the writer, so memory
stays constant (except the duplicate check: 8 bytes of hash per written sample, ~70 bytes with
the set) and an event loop that serves requests (the dashboard) stays responsive.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import re
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

import orjson

from exporter.formats import RENDERERS
from exporter.formats.dpo import build_pair
from exporter.formats.hf_dpo import render_pair
from exporter.options import ExportOptions, ExportSummary, trainer_notes
from exporter.reader import read_batches
from exporter.samples import Conversation, Rejected, apply_options, build_conversation
from exporter.tokens import TokenCounter, encoding_name
from proxy.core.fastjson import loads
from proxy.storage import Database

__all__ = [
    "ExportOptions",
    "ExportSummary",
    "SampleBuilder",
    "SampleCollector",
    "TextSink",
    "export_samples",
    "write_export",
]


class TextSink(Protocol):
    """Where lines go: an open text file, `sys.stdout`, or anything with `write(str)`."""

    def write(self, text: str, /) -> int:
        """Write `text`; return the number of characters written."""
        ...


Progress = Callable[[int], None]
"""Called after each batch with the number of rows just read."""


def in_validation(trajectory_id: str, fraction: float, seed: int) -> bool:
    """Whether a trajectory goes to the validation file: a stable hash of (seed, id) below `fraction`."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{trajectory_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


# A digit followed by a point or an exponent: orjson's output may hold a float, whose text can
# differ from Python's (1e-05 vs 0.00001); such lines are written by the standard library.
_FLOAT_TOKEN: Final = re.compile(rb"[0-9][.eE]")


def _json_line(record: Any, fast: bool = True) -> str:
    """Compact JSON of `record`, byte for byte what `json.dumps(record, ensure_ascii=False,
    separators=(",", ":"))` writes.

    fast: try orjson first (several times cheaper); pass False when the record may hold NaN or
    an infinity. Those are written as null (strict JSON; stored by proxies older than the 400 on
    NaN). orjson's output is kept only when it holds no
    float at all (strings, integers, booleans and null are written identically by both);
    anything else, and what orjson refuses (lone surrogates, integers beyond 64 bits, non-string
    keys), goes to the standard library."""
    if fast:
        try:
            data = orjson.dumps(record)
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            pass
        else:
            if _FLOAT_TOKEN.search(data) is None:
                return data.decode()
    try:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN or an infinity stored by an older version: not JSON, so null
        return json.dumps(_finite(record), ensure_ascii=False, separators=(",", ":"))


def _finite(value: Any) -> Any:
    """`value` with every NaN and infinity replaced by None (what the dashboard shows too):
    a training file must be strict JSON (RFC 8259), whatever an older proxy stored."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _may_hold_non_finite(*texts: str | None) -> bool:
    """Whether stored JSON texts may hold NaN or an infinity (the standard library reads the
    `NaN` / `Infinity` literals; orjson would write them back as null)."""
    return any(t is not None and ("NaN" in t or "Infinity" in t) for t in texts)


def _line_with_tools(
    record: dict[str, Any], tools: list[dict[str, Any]], fast: bool = True
) -> tuple[str, str | None]:
    """(JSON line of `record`, compact JSON of `tools`), dumping the tools only once.

    When the record holds `tools` itself at the top level (openai, hf), its line is spliced from
    the rest of the record and the tools' JSON, which the token count reuses. fast: as
    `_json_line`.
    """
    if not tools:
        return _json_line(record, fast), None
    tools_json = _json_line(tools, fast)
    if record.get("tools") is tools:
        rest = {k: v for k, v in record.items() if k != "tools"}
        return f'{_json_line(rest, fast)[:-1]},"tools":{tools_json}}}', tools_json
    return _json_line(record, fast), tools_json


Built = tuple[str, str, str, int, int, str | None] | tuple[str, str, str]
"""One row's outcome: `("ok", exchange_id, json_line, total_tokens, trained_tokens, cut)` (cut:
why the leaf's own answer was left out, see `Conversation.cut`, or None) or
`("drop", exchange_id, reason)`."""


class SampleBuilder:
    """Turns rows into rendered, token-counted samples (one per process; no export state)."""

    def __init__(self, options: ExportOptions) -> None:
        options.check()
        self.options = options
        self.counter = TokenCounter(encoding_name(options.model_for_tokens))
        self._render = RENDERERS.get(options.format)

    def build(self, rows: list[dict[str, Any]]) -> list[Built]:
        """The outcome of each row, in row order (see `Built`)."""
        out: list[Built] = []
        for row in rows:
            try:
                line, messages, tools_json, cut = self._sample(row)
            except Rejected as exc:
                out.append(("drop", row["id"], exc.reason))
                continue
            tokens = self.counter.count(messages, tools_json=tools_json)
            out.append(("ok", row["id"], line, tokens.total, tokens.trained, cut))
        return out

    def _sample(
        self, row: dict[str, Any]
    ) -> tuple[str, list[dict[str, Any]], str | None, str | None]:
        """(line, messages to count, compact JSON of the tools or None, cut) for one row.

        Raises Rejected."""
        options = self.options
        if row.get("rejected"):  # a Responses row with no faithful chat form (exporter.reader)
            raise Rejected(*row["rejected"])
        try:
            request = loads(row["request_json"])
            response = loads(row["response_json"]) if row.get("response_json") else None
            shadow = loads(row["shadow_response_json"]) if row.get("shadow_response_json") else None
            tags = loads(row["trajectory_tags_json"]) if row.get("trajectory_tags_json") else []
        except (ValueError, TypeError):
            raise Rejected("unreadable", "stored JSON does not decode") from None
        if not isinstance(request, dict):
            raise Rejected("unreadable", "the request is not a JSON object")
        fast = not _may_hold_non_finite(
            row["request_json"], row.get("response_json"), row.get("shadow_response_json")
        )
        if options.tags and not (isinstance(tags, list) and all(t in tags for t in options.tags)):
            raise Rejected("missing_tag", "the trajectory lacks a --tag")
        if options.preference:
            record = build_pair(
                request,
                response,
                shadow,
                system_prompt=options.system_prompt,
                drop_system=options.drop_system,
                strip_tool_descriptions=options.strip_tool_descriptions,
            )
            data = record["input"]
            calls = sum(
                len(m.get("tool_calls") or ())
                for m in [*data["messages"], record["preferred_output"][0]]
            )
            if calls < options.min_tool_calls:
                raise Rejected("below_min_tool_calls", f"{calls} tool calls")
            tools = data.get("tools")
            return (
                _json_line(render_pair(record) if options.format == "hf-dpo" else record, fast),
                [*data["messages"], *record["preferred_output"]],
                _json_line(tools, fast) if tools else None,
                None,
            )
        conversation: Conversation = build_conversation(
            request,
            response,
            require_final_answer=not options.include_incomplete,
            outcome=row.get("outcome") or "ok",
        )
        if conversation.tool_call_count < options.min_tool_calls:
            raise Rejected("below_min_tool_calls", f"{conversation.tool_call_count} tool calls")
        conversation = apply_options(
            conversation,
            train_on=options.train_on,
            system_prompt=options.system_prompt,
            drop_system=options.drop_system,
            strip_tool_descriptions=options.strip_tool_descriptions,
        )
        assert self._render is not None
        line, tools_json = _line_with_tools(self._render(conversation), conversation.tools, fast)
        return line, conversation.messages, tools_json, conversation.cut


class SampleCollector:
    """The export's state: drops duplicates and over-long samples, splits, counts (main process)."""

    def __init__(self, options: ExportOptions) -> None:
        options.check()
        self.options = options
        self.summary = ExportSummary(
            format=options.format,
            token_limit=options.token_limit,
            base_model=options.pricing_model,
            encoding=encoding_name(options.model_for_tokens),
            epochs=options.epochs,
            notes=trainer_notes(options.format, options.train_on),
        )
        self._seen: set[int] = set()

    @property
    def full(self) -> bool:
        """`options.limit` samples have been written."""
        return self.options.limit is not None and self.summary.written >= self.options.limit

    def collect(self, rows: list[dict[str, Any]], built: list[Built]) -> list[tuple[bool, str]]:
        """Lines to write for a batch: `(goes_to_validation, json_line)`, in row order."""
        out: list[tuple[bool, str]] = []
        summary = self.summary
        limit = summary.token_limit
        for row, result in zip(rows, built, strict=True):
            if self.full:
                break
            summary.read += 1
            if result[0] == "drop":
                summary.drop(result[2], row["id"])
                continue
            _, _, line, total, trained, cut = result  # type: ignore[misc]
            key = int.from_bytes(hashlib.blake2b(line.encode(), digest_size=8).digest(), "big")
            if key in self._seen:
                summary.drop("duplicate", row["id"])
                continue
            self._seen.add(key)
            if limit is not None and total > limit:
                summary.drop("over_token_limit", row["id"])
                continue
            valid = in_validation(
                row["trajectory_id"], self.options.val_fraction, self.options.seed
            )
            summary.written += 1
            summary.valid += valid
            summary.train += not valid
            summary.tokens += total
            summary.trained_tokens += trained
            summary.max_sample_tokens = max(summary.max_sample_tokens, total)
            if cut is not None:
                summary.cut[cut] += 1
            out.append((valid, line))
        return out


_worker_builder: SampleBuilder | None = None


def _init_worker(options: ExportOptions) -> None:
    global _worker_builder
    _worker_builder = SampleBuilder(options)


def _build_in_worker(rows: list[dict[str, Any]]) -> list[Built]:
    assert _worker_builder is not None
    return _worker_builder.build(rows)


async def write_export(
    db: Database,
    options: ExportOptions,
    train: TextSink,
    valid: TextSink | None = None,
    on_progress: Progress | None = None,
) -> ExportSummary:
    """Stream an export into open text files: one JSON line per sample (UTF-8, `\\n` endings).

    train: receives every sample not chosen for validation. valid: receives the validation split;
    required when `options.val_fraction` > 0. on_progress: called after each batch with the rows
    read. Returns the summary (written == 0 means nothing matched; the caller decides whether that
    is an error). Raises OptionsError for bad options, TokenizerError when the tokenizer cannot
    load, sqlalchemy errors for database failures.
    """
    if options.val_fraction > 0 and valid is None:
        raise ValueError("a validation file is needed when val_fraction > 0")
    started = time.perf_counter()
    collector = SampleCollector(options)
    loop = asyncio.get_running_loop()
    executor: concurrent.futures.Executor
    if options.workers > 1:
        executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=options.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(options,),
        )
        build: Callable[[list[dict[str, Any]]], list[Built]] = _build_in_worker
    else:
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        build = SampleBuilder(options).build
    in_flight: collections.deque[tuple[list[dict[str, Any]], asyncio.Future[list[Built]]]]
    in_flight = collections.deque()

    def write(rows: list[dict[str, Any]], built: list[Built]) -> None:
        for to_valid, line in collector.collect(rows, built):
            target = valid if to_valid and valid is not None else train
            target.write(line)
            target.write("\n")
        if on_progress is not None:
            on_progress(len(rows))

    try:
        # Batches are built ahead (two per worker) while the next ones are read.
        async for rows in read_batches(db, options):
            in_flight.append((rows, loop.run_in_executor(executor, build, rows)))
            if len(in_flight) > 2 * max(options.workers, 1):
                done_rows, future = in_flight.popleft()
                write(done_rows, await future)
                if collector.full:
                    break
        while in_flight and not collector.full:
            done_rows, future = in_flight.popleft()
            write(done_rows, await future)
    finally:
        for _, future in in_flight:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
    summary = collector.summary
    summary.finish()
    summary.seconds = time.perf_counter() - started
    return summary


class _Lines:
    """A minimal text sink that keeps each written line (for `export_samples`)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        if text != "\n":
            self.lines.append(text)
        return len(text)


async def export_samples(db: Database, options: ExportOptions) -> tuple[list[str], ExportSummary]:
    """The dashboard's export: every sample as a JSON line (no trailing newline) plus the summary.

    Same pipeline as `write_export` and the CLI, held in memory (use it for downloads of a
    curated selection; `options.limit` bounds it). No train/validation split: `val_fraction` is
    ignored. Raises as `write_export`.
    """
    sink = _Lines()
    summary = await write_export(db, dataclasses.replace(options, val_fraction=0.0), sink)
    return sink.lines, summary
