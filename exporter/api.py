"""The export pipeline, as the CLI and the dashboard call it.

    summary = await write_export(db, options, train_file, valid_file)   # streaming, two files
    lines, summary = await export_samples(db, options)                  # in memory, one list

Per row: decode -> filter -> build the sample (`exporter.samples`, or `formats.dpo.build_pair`)
-> render in the chosen format -> count tokens (`exporter.building.SampleBuilder`, in a worker)
-> drop duplicates -> drop samples over the limit -> assign train/valid by a hash of the trajectory id
(`SampleCollector`, in order). Rows are read in batches through a server-side cursor; batches are
built in a worker thread (or `options.workers` processes) a few ahead of the writer, so memory
stays constant (except the duplicate check: 8 bytes of hash per written sample, ~70 bytes with
the set) and an event loop that serves requests (the dashboard) stays responsive.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import itertools
import multiprocessing
import operator
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, BinaryIO, Protocol, cast

from exporter.building import (
    Built,
    SampleBuilder,
    build_in_worker,
    init_worker,
    slim_row,
    worker_ready,
)
from exporter.direct import init_reading_worker, read_and_build_in_worker
from exporter.options import ExportOptions, ExportSummary, trainer_notes
from exporter.reader import read_batches, read_ids
from exporter.tokens import encoding_name
from proxy.storage import Database
from proxy.storage.reading import sqlite_row_statements

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
    """Where lines go: an open text file, `sys.stdout`, or anything with `write(str)`. A binary
    file (`io.BufferedIOBase` or `io.RawIOBase`, as the CLI opens) is given the UTF-8 bytes
    instead, without a decoding (the same bytes a UTF-8 text file would get)."""

    def write(self, text: str, /) -> int:
        """Write `text`; return the number of characters written."""
        ...


LineWriter = Callable[[list[bytes]], None]
"""Writes JSON lines (UTF-8 bytes without their newline) to a sink, each ending with `\n`."""


def line_writer(sink: TextSink | BinaryIO) -> LineWriter:
    """How lines reach `sink`: a binary file gets the bytes as they are (`writelines`, no joined
    copy), a text sink the decoded text in one `write`."""
    if isinstance(sink, io.BufferedIOBase | io.RawIOBase):
        binary = sink

        def write_bytes(lines: list[bytes]) -> None:
            binary.writelines(itertools.chain.from_iterable(zip(lines, itertools.repeat(b"\n"))))

        return write_bytes
    text = cast(TextSink, sink)

    def write_text(lines: list[bytes]) -> None:
        text.write("".join([f"{line.decode()}\n" for line in lines]))

    return write_text


Progress = Callable[[int], None]
"""Called after each batch with the number of rows just read."""


def in_validation(trajectory_id: str, fraction: float, seed: int) -> bool:
    """Whether a trajectory goes to the validation file: a stable hash of (seed, id) below `fraction`."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{trajectory_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


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

    def collect(
        self, trajectory_ids: Sequence[str], built: list[Built]
    ) -> list[tuple[bool, bytes]]:
        """Lines to write for a batch of rows: `(goes_to_validation, line)`, in row order (line:
        the JSON line as UTF-8 bytes, without its newline).

        trajectory_ids: each row's trajectory id; built: each row's outcome (`Built`)."""
        out: list[tuple[bool, bytes]] = []
        summary = self.summary
        limit = summary.token_limit
        for trajectory_id, result in zip(trajectory_ids, built, strict=True):
            if self.full:
                break
            summary.read += 1
            if result[0] == "drop":
                summary.drop(cast(str, result[2]), result[1])
                continue
            _, _, line, total, trained, cut, key = result  # type: ignore[misc]
            if key in self._seen:
                summary.drop("duplicate", result[1])
                continue
            self._seen.add(key)
            if limit is not None and total > limit:
                summary.drop("over_token_limit", result[1])
                continue
            valid = in_validation(trajectory_id, self.options.val_fraction, self.options.seed)
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


async def write_export(
    db: Database,
    options: ExportOptions,
    train: TextSink | BinaryIO,
    valid: TextSink | BinaryIO | None = None,
    on_progress: Progress | None = None,
) -> ExportSummary:
    """Stream an export into open files: one JSON line per sample (UTF-8, `\\n` endings); text
    files, or binary ones (`line_writer`: the same bytes, fewer copies).

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
    # With worker processes on a SQLite file, each worker reads the rows it builds (by id, with
    # its own read-only connection): this process only lists the ids, collects and writes.
    direct = options.workers > 1 and db.sqlite_file is not None
    executor: concurrent.futures.Executor
    if options.workers > 1:
        setup: tuple[Callable[..., None], tuple[Any, ...]] = (
            (
                init_reading_worker,
                (options, str(db.sqlite_file), sqlite_row_statements(options.preference)),
            )
            if direct
            else (init_worker, (options,))
        )
        executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=options.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=setup[0],
            initargs=setup[1],
        )
        # Every worker starts now (one per submit) and loads its tokenizer while the first
        # batches are read, instead of after the first batch.
        for _ in range(options.workers):
            executor.submit(worker_ready)
        ahead = 3 * options.workers
    else:
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        ahead = 2
    # Each batch in flight: its rows' trajectory ids (None: the worker reads them and returns
    # them with its outcomes) and the future of its outcomes.
    in_flight: collections.deque[tuple[list[str] | None, asyncio.Future[Any]]]
    in_flight = collections.deque()
    write_train = line_writer(train)
    write_valid = line_writer(valid) if valid is not None else None

    async def write_next() -> None:
        trajectory_ids, future = in_flight.popleft()
        if trajectory_ids is None:
            trajectory_ids, built = await future
        else:
            built = await future
        lines = collector.collect(trajectory_ids, built)
        if write_valid is None:
            if lines:
                write_train([line for _, line in lines])
        else:
            for to_valid, group in itertools.groupby(lines, key=operator.itemgetter(0)):
                (write_valid if to_valid else write_train)([line for _, line in group])
        if on_progress is not None:
            on_progress(len(trajectory_ids))

    async def batches() -> AsyncGenerator[tuple[list[str] | None, asyncio.Future[Any]], None]:
        if direct:
            async for ids in read_ids(db, options):
                work = [exchange_id for exchange_id, _ in ids]
                yield None, loop.run_in_executor(executor, read_and_build_in_worker, work)
            return
        build: Callable[[list[dict[str, Any]]], list[Built]]
        build = build_in_worker if options.workers > 1 else SampleBuilder(options).build
        async for rows in read_batches(db, options):
            # a process gets only the columns it builds from (`BUILD_KEYS`): they pickle faster
            rows_sent = rows if options.workers <= 1 else [slim_row(row) for row in rows]
            trajectory_ids = [row["trajectory_id"] for row in rows]
            yield trajectory_ids, loop.run_in_executor(executor, build, rows_sent)

    try:
        # Batches are built ahead (`ahead` of them) while the next ones are read.
        async with contextlib.aclosing(batches()) as source:
            async for entry in source:
                in_flight.append(entry)
                if len(in_flight) > ahead:
                    await write_next()
                    if collector.full:
                        break
        while in_flight and not collector.full:
            await write_next()
    finally:
        for _, future in in_flight:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
    summary = collector.summary
    summary.finish()
    summary.seconds = time.perf_counter() - started
    return summary


class _Lines:
    """A minimal text sink that keeps each written line (for `export_samples`): texts of whole
    lines, each ending with `\\n` (JSON lines hold no raw newline)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self.lines.extend(text.split("\n")[:-1])
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
