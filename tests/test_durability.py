"""Nothing lost (issue 11: 5, 6, 7), with real proxy processes and real files.

- SIGKILL under load: every exchange whose answer a client received in full is in the database
  after a new proxy starts on it (the write-ahead log is replayed), over repeated kills. The
  flush interval is long (2 s), so at each kill many answered exchanges exist only in memory
  and in the write-ahead log.
- A journal written while the database was locked is replayed as soon as the database takes
  writes again, with no new traffic to trigger it, and at SIGTERM.
- Disk full: the database and its journal on a 2 MiB tmpfs filled to the last byte. Calls go
  on; records are held in memory; `/ready` answers 503 and `understudy_recording_impaired` is
  1; nothing is set aside as `.rejected`; when space returns, recording resumes by itself and
  every answered exchange is stored. With `--on-record-failure refuse`, calls are refused with
  503 and `Retry-After` while recording is impaired.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.processes import FakeUpstream, ProxyServer, launch_proxy
from tests.support.records import db_rows, recorded_ids
from tests.support.waiting import poll

pytestmark = pytest.mark.e2e

MODEL = "gpt-4.1-mini"


def stored_ids(db: Path) -> set[str]:
    try:
        return set(recorded_ids(db))
    except sqlite3.OperationalError:  # a writer holds a lock for a moment
        return set()


def call(proxy: ProxyServer, content: str, *, stream: bool = False) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": stream}
    with httpx.Client(timeout=60) as client:
        response = client.post(proxy.base_url + "/chat/completions", json=body)
        response.read()
    return response


def complete(response: httpx.Response, stream: bool) -> bool:
    """The client received the whole answer: a JSON completion, or a stream through [DONE]."""
    if response.status_code != 200:
        return False
    if stream:
        return response.content.rstrip().endswith(b"data: [DONE]")
    return json.loads(response.content).get("object") == "chat.completion"


def load(proxy: ProxyServer, clients: int, answered: set[str], stop: threading.Event) -> None:
    """`clients` threads calling in a loop until `stop`; ids of complete answers go to
    `answered` (a call the kill interrupts is not complete and not counted)."""

    def run(number: int) -> None:
        with httpx.Client(timeout=30) as client:
            sent = 0
            while not stop.is_set():
                stream = (number + sent) % 2 == 1
                body = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"load {number}-{sent}"}],
                    "stream": stream,
                }
                sent += 1
                try:
                    response = client.post(proxy.base_url + "/chat/completions", json=body)
                except httpx.HTTPError:
                    return  # the proxy is gone
                if complete(response, stream):
                    answered.add(response.headers["x-understudy-exchange-id"])

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join(timeout=60)


def test_sigkill_under_load_loses_no_answered_exchange(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    db = tmp_path / "killed.db"
    answered: set[str] = set()
    for _ in range(3):
        proxy = launch_proxy(
            tmp_path, upstream=fake_upstream.base_url, db=db, flush_interval_ms=2000
        )
        stop = threading.Event()
        loader = threading.Thread(target=load, args=(proxy, 8, answered, stop), daemon=True)
        loader.start()
        before = len(answered)
        poll(lambda: len(answered) >= before + 150, what="calls to be answered")  # noqa: B023
        proxy.process.send_signal(signal.SIGKILL)  # mid-load: calls in flight, a batch queued
        proxy.process.wait(timeout=30)
        stop.set()
        loader.join(timeout=60)
    # The next proxy replays what the killed ones left in their write-ahead logs.
    last = launch_proxy(tmp_path, upstream=fake_upstream.base_url, db=db)
    try:
        poll(lambda: answered <= stored_ids(db), what="every answered exchange to be stored")
    finally:
        last.stop()
    missing = answered - stored_ids(db)
    assert not missing, f"{len(missing)} of {len(answered)} answered exchanges were lost"
    ids = recorded_ids(db)
    assert len(ids) == len(set(ids))
    counted = db_rows(db, "SELECT SUM(exchange_count) AS n FROM trajectories")[0]["n"]
    assert counted == len(ids)


@contextlib.contextmanager
def locked(db: Path) -> Iterator[None]:
    conn = sqlite3.connect(db, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
        conn.execute("COMMIT")
    finally:
        conn.close()


def health(proxy: ProxyServer) -> dict[str, Any]:
    return dict(httpx.get(proxy.root_url + "/health", timeout=10).json())


def test_journal_is_replayed_as_soon_as_the_database_takes_writes(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    db = tmp_path / "unlocked.db"
    proxy = launch_proxy(tmp_path, upstream=fake_upstream.base_url, db=db)
    try:
        with locked(db):
            ids = {call(proxy, f"locked {n}").headers["x-understudy-exchange-id"] for n in range(4)}
            poll(
                lambda: health(proxy)["recorder"].get("journaled", 0) >= 4,
                what="the records to be journaled",
            )
        # No new call: the proxy notices by itself that the database takes writes again.
        poll(lambda: ids <= stored_ids(db), timeout_s=30, what="the journal to be replayed")
        poll(lambda: health(proxy)["journal_bytes"] == 0, what="the journal to be emptied")
    finally:
        proxy.stop()


def test_journal_is_replayed_at_sigterm(tmp_path: Path, fake_upstream: FakeUpstream) -> None:
    db = tmp_path / "term.db"
    proxy = launch_proxy(tmp_path, upstream=fake_upstream.base_url, db=db)
    with locked(db):
        ids = {call(proxy, f"term {n}").headers["x-understudy-exchange-id"] for n in range(3)}
        poll(
            lambda: health(proxy)["recorder"].get("journaled", 0) >= 3,
            what="the records to be journaled",
        )
    proxy.stop()
    assert ids <= stored_ids(db)
    assert not list(tmp_path.glob("term.db.journal.jsonl*"))


# -- disk full ------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root required, as in CI), unmounted afterwards."""
    directory = tmp_path / "small"
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


def metric(proxy: ProxyServer, name: str) -> float:
    for line in httpx.get(proxy.root_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_disk_full_loses_nothing_turns_ready_503_and_resumes_by_itself(
    small_disk: Path, fake_upstream: FakeUpstream
) -> None:
    db = small_disk / "full.db"
    proxy = launch_proxy(small_disk, upstream=fake_upstream.base_url, db=db)
    try:
        first = {call(proxy, f"before {n}").headers["x-understudy-exchange-id"] for n in range(3)}
        poll(lambda: first <= stored_ids(db), what="the first exchanges to be stored")
        assert httpx.get(proxy.root_url + "/ready", timeout=10).status_code == 200
        filler = fill(small_disk)
        during = set()
        for n in range(40):
            response = call(proxy, f"full {n} " + "x" * 2000, stream=n % 2 == 1)
            assert response.status_code == 200  # calls go on
            during.add(response.headers["x-understudy-exchange-id"])
        poll(
            lambda: httpx.get(proxy.root_url + "/ready", timeout=10).status_code == 503,
            what="/ready to say recording is impaired",
        )
        ready = httpx.get(proxy.root_url + "/ready", timeout=10).json()
        assert any("recording impaired" in problem for problem in ready["problems"]), ready
        assert metric(proxy, "understudy_recording_impaired") == 1
        # Held in memory, unless a retry already fitted them into pages SQLite had free (then
        # only the write-ahead log refuses appends, which keeps /ready at 503 as well). The WAL
        # refusing is what turns /ready first: the records may still be queued then.
        poll(
            lambda: health(proxy)["record_buffer_bytes"] > 0 or during <= stored_ids(db),
            what="the records written during the outage to be held in memory (or stored)",
        )
        filler.unlink()  # space returns
        poll(
            lambda: first | during <= stored_ids(db),
            what="the held records to be stored once space returned",
        )
        poll(
            lambda: httpx.get(proxy.root_url + "/ready", timeout=10).status_code == 200,
            what="/ready to recover",
        )
        assert metric(proxy, "understudy_recording_impaired") == 0
        assert health(proxy)["recorder"].get("lost", 0) == 0
    finally:
        proxy.stop()
    assert first | during <= stored_ids(db)
    assert not list(small_disk.glob("*.rejected")), "records set aside although nothing was wrong"


def test_on_record_failure_refuse_fails_calls_instead_of_losing_data(
    small_disk: Path, fake_upstream: FakeUpstream
) -> None:
    db = small_disk / "refuse.db"
    proxy = launch_proxy(
        small_disk, upstream=fake_upstream.base_url, db=db, on_record_failure="refuse"
    )
    try:
        assert call(proxy, "before").status_code == 200
        filler = fill(small_disk)
        answers = [call(proxy, f"full {n} " + "x" * 2000) for n in range(20)]
        accepted = {a.headers["x-understudy-exchange-id"] for a in answers if a.status_code == 200}
        refused = [a for a in answers if a.status_code == 503]
        assert refused, "no call was refused while recording was impaired"
        error = refused[-1].json()["error"]
        assert error["code"] == "recording_impaired" and refused[-1].headers["retry-after"]
        filler.unlink()
        poll(lambda: accepted <= stored_ids(db), what="the accepted calls to be stored")
        poll(lambda: call(proxy, "after").status_code == 200, what="calls to be served again")
    finally:
        proxy.stop()


def test_a_replay_that_meets_a_full_disk_sets_nothing_aside(
    small_disk: Path, fake_upstream: FakeUpstream
) -> None:
    """Records journaled while the database was locked meet a full disk when they are
    replayed: SQLite's "database or disk is full" says nothing about them, so they wait in the
    journal (not `.rejected`) and reach the database once space returns."""
    db = small_disk / "replay-full.db"
    proxy = launch_proxy(small_disk, upstream=fake_upstream.base_url, db=db)
    try:
        with locked(db):
            ids = {
                call(proxy, f"big {n} " + "y" * 20_000).headers["x-understudy-exchange-id"]
                for n in range(12)
            }
            poll(
                lambda: health(proxy)["recorder"].get("journaled", 0) >= 12,
                what="the records to be journaled",
            )
            filler = fill(small_disk)
        # the writer retries the replay every second: wait until one has met the full disk
        proxy.wait_for_output("journal replay stopped", timeout=60)
        assert not list(small_disk.glob("*.rejected")), "a full disk set records aside"
        assert health(proxy)["recorder"].get("rejected", 0) == 0
        filler.unlink()
        poll(lambda: ids <= stored_ids(db), what="the journal to be replayed once space returned")
    finally:
        output = proxy.stop()
    assert "journal replay stopped" in output and "full" in output  # it did meet the full disk
    assert not list(small_disk.glob("*.rejected"))
