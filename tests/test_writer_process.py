"""The writer process (`proxy.recording.writer`): the recorder's batches written by a child
interpreter, so writing never holds the serving interpreter's GIL. Real child processes, real
SQLite files, the fake upstream on loopback; the proxy in-process where the child is what is
tested, as a real `python -m proxy` where the process group and its signals matter."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy.exc import IntegrityError

from proxy.recording.journal import Journal
from proxy.recording.recorder import (
    Recorder,
    _line_bytes,
    is_transient,
    trajectory_meta,
    trajectory_rows,
)
from proxy.recording.writer import IDLE_CLOSE_TIMEOUT_S, WriteFailed, WriterGone, WriterProcess
from proxy.storage import Database
from proxy.storage.rows import batch_rows
from proxy.testing.servers import child_env, free_port, wait_for_http
from tests.support.inprocess import in_process_proxy
from tests.support.processes import FakeUpstream
from tests.support.records import db_rows, recorded_ids, user_record
from tests.support.waiting import poll_async


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _written(db: Path) -> int:
    try:
        return len(recorded_ids(db))
    except sqlite3.OperationalError:  # the writer holds a lock for a moment
        return -1


def _ask(text: str) -> dict[str, object]:
    return {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": text}]}


async def test_batches_are_written_by_a_child_that_exits_with_the_recorder(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    async with in_process_proxy(
        tmp_path, upstream=fake_upstream.base_url, record_writer="process"
    ) as proxy:
        recorder = proxy.app.state.proxy.recorder
        pid = recorder.writer_pid
        assert pid is not None and pid != os.getpid() and _alive(pid)
        health = (await proxy.client.get("/health")).json()
        assert health["record_writer"] == "process"
        for n in range(5):
            answer = await proxy.client.post("/v1/chat/completions", json=_ask(f"in the child {n}"))
            assert answer.status_code == 200
        await poll_async(lambda: _written(proxy.db) == 5, what="5 exchanges written")
    assert not _alive(pid)  # closed and reaped with the recorder
    assert len(recorded_ids(proxy.db)) == 5


async def test_a_writer_process_that_dies_loses_nothing(
    tmp_path: Path, fake_upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL the child mid-run: the batch it was sent is journaled (whether it was written is
    unknown), later batches are written on the event loop, and the journal's replay skips what
    the database already holds: every call recorded exactly once."""
    caplog.set_level(logging.WARNING, logger="understudy.recorder")
    async with in_process_proxy(
        tmp_path, upstream=fake_upstream.base_url, record_writer="process", flush_interval_ms=5
    ) as proxy:
        recorder = proxy.app.state.proxy.recorder
        for n in range(3):
            await proxy.client.post("/v1/chat/completions", json=_ask(f"before {n}"))
        await poll_async(lambda: _written(proxy.db) == 3, what="3 exchanges written")
        os.kill(recorder.writer_pid, signal.SIGKILL)
        for n in range(4):
            answer = await proxy.client.post("/v1/chat/completions", json=_ask(f"after {n}"))
            assert answer.status_code == 200
        await poll_async(lambda: recorder.writer == "loop", what="the recorder writing on the loop")
        assert (await proxy.client.get("/health")).json()["record_writer"] == "loop"
    ids = recorded_ids(proxy.db)
    assert len(ids) == len(set(ids)) == 7
    assert "writing on the event loop from now on" in caplog.text


async def test_a_writer_process_lost_at_shutdown_loses_nothing(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    """The child dies and the proxy stops before the recorder noticed: the batch sent to the dead
    child is journaled, and a lost child is not a database refusing writes, so the shutdown still
    writes the rest on the event loop and replays the journal: all stored before the stop returns."""
    async with in_process_proxy(
        tmp_path, upstream=fake_upstream.base_url, record_writer="process", flush_interval_ms=5
    ) as proxy:
        recorder = proxy.app.state.proxy.recorder
        await proxy.client.post("/v1/chat/completions", json=_ask("before"))
        await poll_async(lambda: _written(proxy.db) == 1, what="1 exchange written")
        os.kill(recorder.writer_pid, signal.SIGKILL)
        for n in range(3):
            answer = await proxy.client.post("/v1/chat/completions", json=_ask(f"after {n}"))
            assert answer.status_code == 200
    ids = recorded_ids(proxy.db)
    assert len(ids) == len(set(ids)) == 4
    assert recorder.stats["lost"] == 0 and not recorder.journal.pending()


async def test_a_refused_batch_raises_the_database_error_itself(tmp_path: Path) -> None:
    """What the child's database raised comes back as that exception, so the recorder tells a
    bad record (set aside one by one) from an unavailable database (kept and retried)."""
    db = await Database.open(str(tmp_path / "u.db"))
    writer = WriterProcess()
    await writer.open(db)
    try:
        record = user_record("once only")
        entries = [(record.to_row(), trajectory_meta(record))]
        rows = [row for row, _ in entries]
        await writer.write(rows, trajectory_rows(entries))
        with pytest.raises(IntegrityError) as refused:
            await writer.write(rows, trajectory_rows(entries))
        assert not is_transient(refused.value)
    finally:
        await writer.close()
        await db.close()
    assert recorded_ids(tmp_path / "u.db") == [record.id]
    with pytest.raises(WriterGone):
        await writer.write(rows, trajectory_rows(entries))


async def test_lines_sent_to_the_child_store_what_the_loop_stores(tmp_path: Path) -> None:
    """The recorder sends the child its write-ahead lines (already encoded) rather than rows:
    the stored rows are those the event loop writes from the same records, tricky text
    included (non-ASCII, a lone surrogate, an integer beyond 64 bits, a NUL, a newline)."""
    texts = [
        "plain",
        "caf\u00e9 \u2603 \U0001f600",
        "lone \ud800 surrogate",
        "nul \x00 and \n line",
    ]
    records = [user_record(text) for text in texts]
    records[0].request_text = '{"model":"m","messages":[],"seed":123456789012345678901234567890}'
    lines = [
        _line_bytes({"exchange": record.to_row(), "trajectory": trajectory_meta(record)})
        for record in records
    ]
    by_child, on_loop = tmp_path / "child.db", tmp_path / "loop.db"
    db = await Database.open(str(by_child))
    writer = WriterProcess()
    await writer.open(db)
    try:
        await writer.write_lines(lines)
    finally:
        await writer.close()
        await db.close()
    db = await Database.open(str(on_loop))
    try:
        entries = [
            {"exchange": record.to_row(), "trajectory": trajectory_meta(record)}
            for record in records
        ]
        await db.write_exchanges(*batch_rows(entries))
    finally:
        await db.close()
    for table in ("exchanges", "trajectories", "blobs"):
        query = f"SELECT * FROM {table} ORDER BY 1"
        assert db_rows(by_child, query) == db_rows(on_loop, query), table
    assert len(db_rows(by_child, "SELECT id FROM exchanges")) == len(texts)


async def test_the_child_imports_the_parents_proxy_whatever_the_working_directory_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started from a directory that holds another `proxy` package (and no PYTHONPATH), the
    child still runs this code."""
    impostor = tmp_path / "cwd" / "proxy"
    impostor.mkdir(parents=True)
    (impostor / "__init__.py").write_text('raise ImportError("the working directory\'s proxy")\n')
    monkeypatch.chdir(impostor.parent)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    db = await Database.open(str(tmp_path / "u.db"))
    writer = WriterProcess()
    try:
        await writer.open(db)
        record = user_record("from the right package")
        await writer.write_lines(
            [_line_bytes({"exchange": record.to_row(), "trajectory": trajectory_meta(record)})]
        )
    finally:
        await writer.close()
        await db.close()
    assert recorded_ids(tmp_path / "u.db") == [record.id]


async def test_a_background_writer_that_falls_behind_is_replaced_at_normal_priority(
    tmp_path: Path,
) -> None:
    """The writer process runs under SCHED_IDLE; when records queue up behind it (here: 3),
    the recorder writes through a new one at normal priority and the old one exits."""
    db = await Database.open(str(tmp_path / "u.db"))
    recorder = Recorder(
        db,
        journal=Journal(tmp_path / "u.db.journal.jsonl"),
        flush_interval_s=0.2,
        writer_lag_records=3,
    )
    await recorder.start()
    try:
        background = recorder.writer_pid
        assert background is not None
        assert os.sched_getscheduler(background) == os.SCHED_IDLE
        records = [user_record(f"queued {n}") for n in range(5)]
        for record in records:
            recorder.submit(record)
        await poll_async(lambda: recorder.stats["written"] == 5, what="5 records written")
        promoted = recorder.writer_pid
        assert promoted is not None and promoted != background
        assert os.sched_getscheduler(promoted) == os.SCHED_OTHER
        assert not _alive(background)
        assert recorder.stats["writer_promoted"] == 1
    finally:
        await recorder.stop()
        await db.close()
    assert sorted(recorded_ids(tmp_path / "u.db")) == sorted(r.id for r in records)


async def test_a_child_with_no_cpu_left_is_ended_once_every_batch_was_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A background child on a machine whose every core is busy may never run again to see its
    input close (simulated: SIGSTOP). Every batch it was sent was answered, so nothing is left
    to write: `close` kills it after a short wait instead of holding the recorder (a promotion,
    a shutdown) for the long timeout meant for a batch still being written."""
    caplog.set_level(logging.INFO, logger="understudy.recorder")
    db = await Database.open(str(tmp_path / "u.db"))
    writer = WriterProcess()
    await writer.open(db)
    pid = writer.pid
    assert pid is not None
    try:
        record = user_record("answered before the stop")
        entries = [(record.to_row(), trajectory_meta(record))]
        await writer.write([row for row, _ in entries], trajectory_rows(entries))
        os.kill(pid, signal.SIGSTOP)
        await writer.close()
    finally:
        await db.close()
    assert not _alive(pid)
    assert f"did not exit in {IDLE_CLOSE_TIMEOUT_S:.0f} s: killed" in caplog.text
    assert recorded_ids(tmp_path / "u.db") == [record.id]


def test_an_error_that_does_not_pickle_keeps_its_text_and_judgement() -> None:
    failed = pickle.loads(pickle.dumps(WriteFailed("OperationalError: disk I/O error", True)))
    assert isinstance(failed, WriteFailed)
    assert str(failed) == "OperationalError: disk I/O error"
    assert is_transient(failed)
    assert not is_transient(WriteFailed("ValueError: bad row", False))


def test_ctrl_c_to_the_process_group_drains_through_the_writer(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    """Ctrl-C in a terminal signals the whole process group, the writer process included: it
    ignores the signal, the proxy drains its queue through it, and both exit cleanly."""
    port = free_port()
    db = tmp_path / "group.db"
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--port", str(port), "--db", str(db)]
        + ["--upstream", fake_upstream.base_url, "--flush-interval-ms", "10000"],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process, timeout=120)
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["record_writer"] == "process"
        for n in range(6):
            answer = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": f"{n}"}]},
                timeout=30,
            )
            assert answer.status_code == 200
        # Queued, not written: the flush interval is 10 s.
        os.killpg(process.pid, signal.SIGINT)
        output = process.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output
    assert "Traceback" not in output, output
    assert "writing on the event loop" not in output, output  # the child lived to the end
    assert len(recorded_ids(db)) == 6
