"""Prometheus metrics (`GET /metrics`), one registry per app so several apps never collide.

- `understudy_requests_total{kind,route,stream,outcome}`: exchanges answered; `kind` is the
  exchange's kind, `chat` (Chat Completions) or `responses` (Responses API, HTTP or WebSocket).
- `understudy_request_duration_seconds{kind,route,stream}`: whole call, histogram.
- `understudy_time_to_first_token_seconds{kind,route}`: streams only, histogram.
- `understudy_record_queue_depth`, `understudy_journal_bytes`,
  `understudy_journal_rejected_bytes`: gauges read at scrape time.
- `understudy_recorder_records_total{event}`: submitted, written, journaled, spilled, replayed,
  rejected, lost; `understudy_recorder_failed_batches_total`.
- `understudy_stitch_lookups_total{source}`: cache hits and database lookups.
- `understudy_rejected_requests_total{status,code}`: requests refused before reaching the
  upstream (400 bad body or header, 413 too large, 415 not JSON), never recorded as exchanges;
  each is also logged once at INFO (`Metrics.rejected`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from proxy.recording.recorder import ExchangeRecord, Recorder
    from proxy.recording.stitching import Stitcher

log = logging.getLogger("understudy.requests")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_RECORDER_EVENTS = (
    "submitted",
    "written",
    "journaled",
    "held",
    "wal_failed",
    "spilled",
    "replayed",
    "rejected",
    "lost",
)


class _StateCollector(Collector):
    """Reads the recorder's and stitcher's counters at scrape time."""

    def __init__(self, recorder: Recorder, stitcher: Stitcher) -> None:
        self._recorder = recorder
        self._stitcher = stitcher

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily(
            "understudy_record_queue_depth",
            "Exchanges waiting to be written to the database.",
            value=self._recorder.queue_depth,
        )
        yield GaugeMetricFamily(
            "understudy_journal_bytes",
            "Size of the journal of records waiting for the database, bytes.",
            value=self._recorder.journal.size_bytes,
        )
        yield GaugeMetricFamily(
            "understudy_journal_rejected_bytes",
            "Size of the journal records the database refused, set aside for a person, bytes.",
            value=self._recorder.journal.rejected_bytes,
        )
        yield GaugeMetricFamily(
            "understudy_recording_impaired",
            "1 while recording is impaired (records held in memory, or the write-ahead log "
            "refusing appends: disk full?), else 0. Alert on it.",
            value=1 if self._recorder.impaired else 0,
        )
        yield GaugeMetricFamily(
            "understudy_record_buffer_bytes",
            "Records held in memory because neither the database nor the journal takes them, "
            "bytes.",
            value=self._recorder.held_bytes,
        )
        records = CounterMetricFamily(
            "understudy_recorder_records", "Records by what happened to them.", labels=["event"]
        )
        for event in _RECORDER_EVENTS:
            records.add_metric([event], self._recorder.stats[event])
        yield records
        yield CounterMetricFamily(
            "understudy_recorder_failed_batches",
            "Database writes that failed (their records went to the journal).",
            value=self._recorder.stats["failed_batches"],
        )
        lookups = CounterMetricFamily(
            "understudy_stitch_lookups",
            "Stitching lookups by where they were answered.",
            labels=["source"],
        )
        lookups.add_metric(["cache"], self._stitcher.cache_hits)
        lookups.add_metric(["database"], self._stitcher.db_lookups)
        yield lookups


class Metrics:
    """The proxy's metrics. `observe(record)` once per exchange; `render()` for the scrape."""

    def __init__(self, recorder: Recorder, stitcher: Stitcher) -> None:
        disable_created_metrics()  # `*_created` series only add noise here
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "understudy_requests",
            "Exchanges answered, by kind (chat, responses), route, stream and outcome.",
            ["kind", "route", "stream", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "understudy_request_duration_seconds",
            "Duration of recorded calls through the proxy, by kind (chat, responses).",
            ["kind", "route", "stream"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "understudy_time_to_first_token_seconds",
            "Time to the first streamed chunk (SSE chunk or WebSocket event).",
            ["kind", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejections = Counter(
            "understudy_rejected_requests",
            "Requests refused before reaching the upstream (not recorded), by status and code.",
            ["status", "code"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(recorder, stitcher))

    def observe(self, record: ExchangeRecord) -> None:
        """Count one finished exchange under its kind (`chat` | `responses`), route, stream flag
        and outcome; its duration and time to first token (seconds) go to the histograms."""
        stream = "true" if record.stream else "false"
        kind = record.kind or "chat"
        self.requests.labels(kind, record.route, stream, record.outcome).inc()
        if record.duration_ms is not None:
            self.duration.labels(kind, record.route, stream).observe(record.duration_ms / 1000)
        if record.ttft_ms is not None:
            self.ttft.labels(kind, record.route).observe(record.ttft_ms / 1000)

    def rejected(self, status: int, code: str | None, param: str | None, path: str) -> None:
        """Count a refused request and log one INFO line: status (400, 413, 415), the error's
        `code` (`invalid_request` when it has none), the `param` at fault and the path. The
        request's content is never logged (it is client-controlled and may hold secrets)."""
        label = code or "invalid_request"
        self.rejections.labels(str(status), label).inc()
        log.info("rejected %s: %d %s (param %s)", path, status, label, param or "-")

    def render(self) -> bytes:
        """The exposition text (Prometheus format 0.0.4)."""
        return generate_latest(self.registry)
