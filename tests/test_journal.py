"""The journal belongs to one process: concurrent processes (uvicorn workers, replicas sharing a
directory) get files of their own, and a process that starts replays the files of processes that
are gone. Real files, real flock, a real SQLite database and the real recorder."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from proxy.recording.journal import Journal
from proxy.recording.recorder import ExchangeRecord, Recorder, trajectory_meta
from proxy.storage import Database, new_id, utc_now


def _record(text: str) -> ExchangeRecord:
    body = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": text}]}
    return ExchangeRecord(
        id=new_id(),
        trajectory_id=new_id(),
        parent_id=None,
        step=0,
        new_trajectory=True,
        id_source="hash",
        route="student",
        shadow=False,
        started_utc=utc_now(),
        path="/v1/chat/completions",
        stream=False,
        request=body,
        request_text=json.dumps(body),
        request_hash="h-" + text,
        status_code=200,
    )


def test_a_second_live_process_gets_its_own_file(tmp_path: Path) -> None:
    base = tmp_path / "u.db.journal.jsonl"
    first, second, third = Journal(base), Journal(base), Journal(base)
    assert first.claim() == base
    assert second.claim() == tmp_path / "u.db.journal-2.jsonl"
    first.release()
    assert third.claim() == base  # a released name is free again
    second.release()
    third.release()


async def test_journals_of_gone_processes_are_replayed_at_start(tmp_path: Path) -> None:
    db_path = tmp_path / "u.db"
    db = await Database.open(str(db_path))
    base = tmp_path / "u.db.journal.jsonl"
    # Two processes journaled records while the database was unavailable, then went away.
    gone = [Journal(base), Journal(base)]
    records = [_record("first process"), _record("second process")]
    for journal, record in zip(gone, records, strict=True):
        journal.claim()
        journal.append([{"exchange": record.to_row(), "trajectory": trajectory_meta(record)}])
    paths = [journal.path for journal in gone]
    assert paths == [base, tmp_path / "u.db.journal-2.jsonl"]
    for journal in gone:
        journal.release()

    recorder = Recorder(db, journal=Journal(base))
    await recorder.start()
    await recorder.stop()
    await db.close()

    with sqlite3.connect(db_path) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM exchanges")}
    assert stored == {record.id for record in records}
    assert recorder.stats["replayed"] == 2
    assert not [path for path in paths if path.exists()]


async def test_a_live_process_journal_is_left_alone(tmp_path: Path) -> None:
    db_path = tmp_path / "u.db"
    db = await Database.open(str(db_path))
    base = tmp_path / "u.db.journal.jsonl"
    live = Journal(base)
    live.claim()
    record = _record("still running")
    live.append([{"exchange": record.to_row(), "trajectory": trajectory_meta(record)}])

    recorder = Recorder(db, journal=Journal(base))
    await recorder.start()
    assert recorder.journal.path == tmp_path / "u.db.journal-2.jsonl"
    await recorder.stop()
    await db.close()

    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM exchanges").fetchone() == (0,)
    assert base.exists()  # its owner replays it
    live.release()
