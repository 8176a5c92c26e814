"""Operations (issue 6): `/metrics`, `/health`, `/ready` and JSON logs of a real proxy process.

- `/metrics` after known traffic (JSON, streamed, an upstream 429, a refused request): request
  counters by route/stream/outcome, latency and time-to-first-token histograms whose counts match,
  the record queue and journal gauges, the recorder's counters (measured as deltas, so the module
  can share one proxy).
- `/health` (liveness, with the recorder's counters) and `/ready` (database and recorder).
- `/ready` turns 503 when the database file is gone (its directory removed under the proxy),
  while `/health` stays 200.
- The journal gauge counts every journal file waiting to be replayed, also a replay file left by a
  replay that failed.
- `--log-format json`: every line the process writes is one JSON object.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import FakeUpstream, ProxyServer, launch_proxy
from tests.support.records import db_rows, recorded_ids
from tests.support.waiting import poll

pytestmark = pytest.mark.e2e

MODEL = "gpt-4.1-mini"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def proxy(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    server = launch_proxy(tmp_path_factory.mktemp("operations"), upstream=fake_upstream.base_url)
    yield server
    server.stop()


def scrape(proxy: ProxyServer) -> Samples:
    """Every sample of `/metrics`, keyed by (name, sorted labels)."""
    response = httpx.get(proxy.root_url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def health(proxy: ProxyServer) -> dict[str, Any]:
    response = httpx.get(proxy.root_url + "/health", timeout=10)
    assert response.status_code == 200
    return dict(response.json())


def post(proxy: ProxyServer, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(proxy.base_url + "/chat/completions", json=body, headers=headers, timeout=30)


def test_metrics_count_what_happened(proxy: ProxyServer) -> None:
    before = scrape(proxy)
    submitted = health(proxy)["recorder"].get("submitted", 0)
    user = [{"role": "user", "content": "metrics please"}]
    for _ in range(3):
        assert post(proxy, {"model": MODEL, "messages": user}).status_code == 200
    for _ in range(2):
        streamed = post(proxy, {"model": MODEL, "messages": user, "stream": True})
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert post(proxy, {"model": "fake-error-429", "messages": user}).status_code == 429
    assert post(proxy, {"model": MODEL}).status_code == 400  # refused: no exchange
    poll(
        lambda: health(proxy)["recorder"].get("written", 0) >= submitted + 6,
        what="the six exchanges to be written",
    )
    after = scrape(proxy)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "understudy_requests_total"
    assert delta(requests, kind="chat", route="student", stream="false", outcome="ok") == 3
    assert delta(requests, kind="chat", route="student", stream="true", outcome="ok") == 2
    assert delta(requests, kind="chat", route="student", stream="false", outcome="error") == 1

    duration = "understudy_request_duration_seconds"
    assert delta(duration + "_count", kind="chat", route="student", stream="false") == 4
    assert delta(duration + "_count", kind="chat", route="student", stream="true") == 2
    for stream in ("false", "true"):
        seconds = delta(duration + "_sum", kind="chat", route="student", stream=stream)
        assert 0 < seconds < 60, seconds
        infinite = value(
            after, duration + "_bucket", kind="chat", route="student", stream=stream, le="+Inf"
        )
        assert infinite == value(
            after, duration + "_count", kind="chat", route="student", stream=stream
        )
        buckets = sorted(
            (float(dict(labels)["le"]), count)
            for (name, labels), count in after.items()
            if name == duration + "_bucket" and dict(labels)["stream"] == stream
        )
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), "histogram buckets must be cumulative"
    assert delta("understudy_time_to_first_token_seconds_count", kind="chat", route="student") == 2
    ttft = delta("understudy_time_to_first_token_seconds_sum", kind="chat", route="student")
    assert 0 < ttft <= delta(duration + "_sum", kind="chat", route="student", stream="true")

    assert value(after, "understudy_record_queue_depth") == 0
    assert value(after, "understudy_journal_bytes") == 0
    records = "understudy_recorder_records_total"
    assert delta(records, event="submitted") == 6
    assert delta(records, event="written") == 6
    for event in ("journaled", "spilled", "lost"):
        assert value(after, records, event=event) == 0, event
    assert value(after, "understudy_recorder_failed_batches_total") == 0
    assert ("understudy_stitch_lookups_total", (("source", "cache"),)) in after


def test_health_and_ready(proxy: ProxyServer) -> None:
    body = health(proxy)
    assert body["status"] == "ok"
    assert isinstance(body["record_queue_depth"], int)
    assert isinstance(body["journal_bytes"], int)
    assert isinstance(body["recorder"], dict)
    ready = httpx.get(proxy.root_url + "/ready", timeout=10)
    assert (ready.status_code, ready.json()["status"]) == (200, "ready")


def test_ready_is_503_when_the_database_is_gone(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    """The SQLite file and its directory removed under the running proxy (a volume unmounted, a
    cleanup job): `SELECT 1` on a pooled connection still answers, so a ping alone cannot tell."""
    directory = tmp_path / "data"
    directory.mkdir()
    server = launch_proxy(tmp_path, upstream=fake_upstream.base_url, db=directory / "u.db")
    try:
        assert post(server, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert httpx.get(server.root_url + "/ready", timeout=10).status_code == 200
        shutil.rmtree(directory)
        deadline = time.monotonic() + 10
        status = 200
        while time.monotonic() < deadline and status != 503:
            status = httpx.get(server.root_url + "/ready", timeout=10).status_code
            time.sleep(0.2)
        assert health(server)["status"] == "ok", "liveness must not depend on the database"
        assert status == 503, "/ready still says ready with the database file gone"
    finally:
        server.stop()


def test_a_journaled_record_the_database_refuses_is_set_aside_and_counted(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    """A journaled row the database refuses even on its own (here: a row from a newer schema)
    must not block the journal: it is moved to `<journal>.rejected`, counted, and shown by
    `/health` and `/metrics`, so the operator sees records that wait for a person."""
    db = tmp_path / "gauge.db"
    journal = tmp_path / (db.name + ".journal.jsonl")
    row = {"id": "from-a-newer-version", "no_such_column": 1}
    meta = {"id_source": "hash", "route": "student", "shadow": False}
    journal.write_text(json.dumps({"exchange": row, "trajectory": meta}) + "\n")
    server = launch_proxy(tmp_path, upstream=fake_upstream.base_url, db=db)
    try:
        rejected = tmp_path / (db.name + ".journal.jsonl.rejected")
        assert rejected.is_file()
        assert "from-a-newer-version" in rejected.read_text()
        status = health(server)
        assert status["journal_bytes"] == 0
        assert status["journal_rejected_bytes"] == rejected.stat().st_size
        assert status["recorder"]["rejected"] == 1
        metrics = scrape(server)
        assert value(metrics, "understudy_journal_rejected_bytes") == rejected.stat().st_size
    finally:
        server.stop()
    assert db_rows(db, "SELECT COUNT(*) AS n FROM exchanges")[0]["n"] == 0


def test_backpressure_spills_to_the_journal_and_loses_nothing(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    """A full record queue (size 2; the writer holds its first record for the 3 s flush
    interval) sends records straight to the journal; they reach the database after the write."""
    server = launch_proxy(
        tmp_path, upstream=fake_upstream.base_url, record_queue_size=2, flush_interval_ms=3000
    )
    try:
        user = [{"role": "user", "content": "backpressure"}]
        ids = set()
        for _ in range(10):
            response = post(server, {"model": MODEL, "messages": user})
            assert response.status_code == 200
            ids.add(response.headers["x-understudy-exchange-id"])
        stats = health(server)["recorder"]
        assert stats.get("spilled", 0) >= 5, stats
        assert value(scrape(server), "understudy_recorder_records_total", event="spilled") >= 5

        def all_stored() -> bool:
            stored = set(recorded_ids(server.db))
            return ids <= stored and health(server)["journal_bytes"] == 0

        poll(all_stored, what="the spilled records to be replayed")
        stats = health(server)["recorder"]
        assert stats.get("lost", 0) == 0
        assert stats["replayed"] == stats["spilled"]
    finally:
        server.stop()
    assert set(recorded_ids(server.db)) == ids


def test_json_logs_are_one_object_per_line(tmp_path: Path, fake_upstream: FakeUpstream) -> None:
    server = launch_proxy(tmp_path, upstream=fake_upstream.base_url, log_format="json")
    post(server, {"model": MODEL, "messages": [{"role": "user", "content": "log me"}]})
    post(server, {"model": MODEL})
    output = server.stop()
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise AssertionError(f"not a JSON log line: {line!r}") from exc
        assert isinstance(record, dict)
        assert {"levelname", "name", "message"} <= set(record), record
        records.append(record)
    names = {record["name"] for record in records}
    assert "understudy" in names and "uvicorn.error" in names, names
    assert any("Application shutdown complete" in record["message"] for record in records)
