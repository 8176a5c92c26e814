"""The journal belongs to one process: concurrent processes (uvicorn workers, replicas sharing a
directory) get files of their own, and a process that starts replays the files of processes that
are gone. Real files, real flock, a real SQLite database and the real recorder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from proxy.recording.journal import Journal, WriteAhead
from proxy.recording.recorder import Recorder, trajectory_meta
from proxy.storage import Database
from tests.support.records import recorded_ids, user_record


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
    records = [user_record("first process"), user_record("second process")]
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

    stored = set(recorded_ids(db_path))
    assert stored == {record.id for record in records}
    assert recorder.stats["replayed"] == 2
    assert not [path for path in paths if path.exists()]


async def test_a_live_process_journal_is_left_alone(tmp_path: Path) -> None:
    db_path = tmp_path / "u.db"
    db = await Database.open(str(db_path))
    base = tmp_path / "u.db.journal.jsonl"
    live = Journal(base)
    live.claim()
    record = user_record("still running")
    live.append([{"exchange": record.to_row(), "trajectory": trajectory_meta(record)}])

    recorder = Recorder(db, journal=Journal(base))
    await recorder.start()
    assert recorder.journal.path == tmp_path / "u.db.journal-2.jsonl"
    await recorder.stop()
    await db.close()

    assert recorded_ids(db_path) == []
    assert base.exists()  # its owner replays it
    live.release()


# -- the write-ahead log (issue 11: 5) ------------------------------------------------------------


def _line(n: int) -> bytes:
    return (json.dumps({"exchange": {"id": f"x{n}"}, "trajectory": {}}) + "\n").encode()


def test_write_ahead_files_are_sealed_and_removed_once_settled(tmp_path: Path) -> None:
    wal = WriteAhead(tmp_path / "u.jsonl", rotate_bytes=200)
    segments = [wal.append(_line(n)) for n in range(12)]
    files = wal.leftovers()
    assert len(files) > 1, "the log was never sealed at its size"
    assert all(f.name.startswith(".u.jsonl.wal-") for f in files)  # hidden, beside the journal
    assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in files)
    for segment in segments[:-1]:
        wal.settle(segment)
    assert len(wal.leftovers()) == 1  # every sealed file was settled: removed
    entries = list(Journal.read(wal.leftovers()[0]))
    assert [e["exchange"]["id"] for e in entries][-1] == "x11"
    wal.settle(segments[-1])
    wal.close()
    assert wal.leftovers() == []  # clean stop: nothing left to replay


def test_a_torn_write_ahead_line_costs_only_itself(tmp_path: Path) -> None:
    wal = WriteAhead(tmp_path / "u.jsonl")
    segment = wal.append(_line(1))
    assert segment.fd is not None
    os.write(segment.fd, b'{"exchange": {"id": "torn"')  # a write cut short (disk full)
    segment.torn = True
    wal.append(_line(2))
    ids = [e["exchange"]["id"] for e in Journal.read(wal.leftovers()[0])]
    assert ids == ["x1", "x2"]


async def test_write_ahead_leftovers_of_a_killed_process_are_replayed_once(tmp_path: Path) -> None:
    """What a killed process left in its write-ahead log reaches the database at the next
    start, without duplicating what the database already held."""
    db_path = tmp_path / "u.db"
    base = tmp_path / "u.db.journal.jsonl"
    db = await Database.open(str(db_path))
    try:
        killed = Recorder(db, journal=Journal(base))
        await killed.start()
        records = [user_record(f"wal {n}") for n in range(4)]
        for record in records[:2]:
            killed.submit(record)
        await killed._write(killed._take(2))  # these two reached the database
        for record in records[2:]:
            killed.submit(record)  # these two only reached the write-ahead log
        assert killed._task is not None
        killed._task.cancel()  # SIGKILL: no stop(); the lock dies with the process
        killed.journal.release()
        assert killed.wal is not None and killed.wal.leftovers()

        again = Recorder(db, journal=Journal(base))
        await again.start()
        await again.stop()
    finally:
        await db.close()
    ids = recorded_ids(db_path)
    assert sorted(ids) == sorted(r.id for r in records)
    assert WriteAhead(base).leftovers() == []
