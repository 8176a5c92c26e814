"""Filters, DPO, limits and the dashboard API on a real database written through the storage API.

Routes, labels, shadow answers and injected logit_bias come from other issues; these rows are
written the way the recorder writes them (`ExchangeRecord.to_row`, `Database.write_exchanges`).
Every test runs on a SQLite file and, when a server answers (`UNDERSTUDY_TEST_POSTGRES_URL`,
default postgresql://postgres@127.0.0.1:5432/postgres), on a fresh PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.api import ExportOptions, export_samples, write_export
from exporter.options import OptionsError
from exporter.reader import query_for, read_batches
from proxy.dashboard.export import export_options
from proxy.dashboard.params import parse_list_query
from proxy.storage import Database, new_id
from proxy.storage.browse import MAX_PAGE_SIZE, list_trajectories
from proxy.storage.reading import sqlite_row_statements, stream_batches
from proxy.storage.rebuild import DEFERRED_TOOLS, SqliteRows
from tests.support.exporter import (
    completion,
    read_jsonl,
    record,
    simple_trajectory,
    write_records,
)
from tests.support.inprocess import in_process_proxy
from tests.support.inprocess import run_exporter as run_cli
from tests.support.postgres import pg_admin, with_database

TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
    }
]


async def build_db(path: Path | str) -> dict[str, str]:
    """Trajectories with every attribute a filter looks at; returns name -> trajectory id."""
    ids: dict[str, str] = {}
    items: list[Any] = []

    def add(name: str, rows: list[Any]) -> None:
        ids[name] = rows[0][1]["trajectory_id"]
        items.extend(rows)

    add(
        "student",
        simple_trajectory("q student", "a student", started_utc="2026-11-01T10:00:00.000+00:00"),
    )
    add(
        "teacher",
        simple_trajectory(
            "q teacher",
            "a teacher",
            route="teacher",
            model="o3",
            started_utc="2026-11-10T10:00:00.000+00:00",
        ),
    )
    add(
        "approved",
        simple_trajectory("q approved", "a approved", started_utc="2026-11-15T10:00:00.000+00:00"),
    )
    add(
        "rejected",
        simple_trajectory("q rejected", "a rejected", started_utc="2026-11-16T10:00:00.000+00:00"),
    )
    add(
        "tagged",
        simple_trajectory(
            "q tagged", "a tagged", started_utc="2026-11-17T10:00:00.000+00:00", **{}
        ),
    )
    add(
        "promoted",
        simple_trajectory(
            "q promoted",
            "a promoted",
            injected_logit_bias={"316": 5},
            started_utc="2026-11-18T10:00:00.000+00:00",
        ),
    )
    add(
        "gpt4o",
        simple_trajectory(
            "q gpt4o",
            "a gpt4o",
            model="gpt-4o",
            answered_by="gpt-4o-2024-08-06",
            started_utc="2026-11-19T10:00:00.000+00:00",
        ),
    )
    add(
        "long",
        simple_trajectory("long " * 400, "a long", started_utc="2026-11-19T11:00:00.000+00:00"),
    )
    failed = simple_trajectory(
        "q failed", "x", outcome="error", started_utc="2026-11-19T12:00:00.000+00:00"
    )
    failed[0][1]["response_json"] = None
    add("failed", failed)
    garbage = simple_trajectory("q garbage", "x", started_utc="2026-11-19T13:00:00.000+00:00")
    garbage[0][1]["request_json"] = "{not json"
    add("garbage", garbage)
    # A shadowed exchange: the student answered in text, the teacher (shadow) called a tool.
    trajectory = new_id()
    request = {
        "model": "gpt-4.1-mini",
        "tools": TOOLS,
        "messages": [{"role": "user", "content": "find it"}],
    }
    student = completion({"role": "assistant", "content": "I cannot."})
    teacher = completion(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
            ],
        },
        "o3",
    )
    items.append(
        record(
            trajectory,
            request,
            student,
            started_utc="2026-11-20T10:00:00.000+00:00",
            shadow_model="o3",
            shadow_response_json=json.dumps(teacher),
        )
    )
    same = new_id()
    items.append(
        record(
            same,
            {**request, "messages": [{"role": "user", "content": "same"}]},
            student,
            started_utc="2026-11-20T11:00:00.000+00:00",
            shadow_model="o3",
            shadow_response_json=json.dumps(student),
        )
    )
    ids["shadow"] = trajectory
    await write_records(
        path, items, labels={ids["approved"]: "approved", ids["rejected"]: "rejected"}
    )
    db = await Database.open(str(path))
    try:
        from proxy.storage.schema import trajectories

        async with db.engine.begin() as conn:
            await conn.execute(
                trajectories.update()
                .where(trajectories.c.id == ids["tagged"])
                .values(tags_json=json.dumps(["gold", "billing"]))
            )
    finally:
        await db.close()
    return ids


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def filled(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    """The scenario (`build_db`) written once per dialect and module: a SQLite file, or a
    database on the PostgreSQL test server that each test's copy is made from (`TEMPLATE`).
    Returns its location and the trajectory ids by name."""
    if request.param == "sqlite":
        path = str(tmp_path_factory.mktemp("filters") / "filters.db")
        yield path, asyncio.run(build_db(path))
        return
    server = request.getfixturevalue("postgres_server")
    name = f"understudy_filters_{secrets.token_hex(6)}"  # hex only: safe as an identifier
    asyncio.run(pg_admin(server, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(server, name), asyncio.run(build_db(with_database(server, name)))
    finally:
        asyncio.run(pg_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def target(
    filled: tuple[str, dict[str, str]], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A test's own copy of the filled database: a copy of the SQLite file, or a new database
    on the PostgreSQL test server made from the filled one (dropped afterwards)."""
    source, _ = filled
    if "://" not in source:
        copy = tmp_path / "filters.db"
        for suffix in ("", "-wal", "-shm"):
            if Path(source + suffix).exists():
                shutil.copyfile(source + suffix, str(copy) + suffix)
        yield str(copy)
        return
    server, template = request.getfixturevalue("postgres_server"), source.rpartition("/")[2]
    name = f"understudy_test_{secrets.token_hex(6)}"
    asyncio.run(pg_admin(server, f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    try:
        yield with_database(server, name)
    finally:
        asyncio.run(pg_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def db(target: str, filled: tuple[str, dict[str, str]]) -> Any:
    """The test's copy of the scenario, open: (database, ids by name, its location)."""
    database = await Database.open(target, migrate=False, must_exist=True)
    yield database, filled[1], target
    await database.close()


def users(lines: list[str]) -> list[str]:
    return [
        next(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user")
        for line in lines
    ]


async def test_default_export_leaves_out_rejected_failed_and_reports_drops(db: Any) -> None:
    database, _, _ = db
    lines, summary = await export_samples(database, ExportOptions())
    assert users(lines) == [
        "q student",
        "q teacher",
        "q approved",
        "q tagged",
        "q promoted",
        "q gpt4o",
        "long " * 400,
        "find it",
        "same",
    ]
    assert summary.dropped == {"unreadable": 1, "error": 1}  # the failed leaf is counted too
    assert summary.read == 11 and summary.written == 9
    assert summary.base_model == "gpt-4.1-mini" and summary.token_limit == 65_536


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (ExportOptions(route="teacher"), ["q teacher"]),
        (ExportOptions(models=("o3",)), ["q teacher"]),
        (ExportOptions(models=("gpt-4o", "o3")), ["q teacher", "q gpt4o"]),
        (ExportOptions(models=("gpt-4o-2024-08-06",)), ["q gpt4o"]),
        (ExportOptions(models=("gpt-4",)), []),
        (ExportOptions(labels=("approved",)), ["q approved"]),
        (ExportOptions(labels=("rejected", "approved")), ["q approved", "q rejected"]),
        (ExportOptions(tags=("gold",)), ["q tagged"]),
        (ExportOptions(since="2026-11-15", until="2026-11-17T00:00:00"), ["q approved"]),
        (ExportOptions(since="2026-11-19T11:30:00Z", include_incomplete=True), ["find it", "same"]),
        (
            ExportOptions(exclude_promoted=True, until="2026-11-19"),
            ["q student", "q teacher", "q approved", "q tagged"],
        ),
    ],
)
async def test_filters(db: Any, options: ExportOptions, expected: list[str]) -> None:
    database, _, _ = db
    lines, _ = await export_samples(database, options)
    assert users(lines) == expected


async def test_token_limit_drops_and_reports_never_truncates(db: Any) -> None:
    database, ids, _ = db
    lines, summary = await export_samples(database, ExportOptions(max_tokens=100))
    assert "long " * 400 not in users(lines)
    assert summary.dropped["over_token_limit"] == 1
    assert len(summary.dropped_examples["over_token_limit"]) == 1
    assert summary.max_sample_tokens <= 100
    lines, summary = await export_samples(database, ExportOptions(format="hf"))
    assert summary.token_limit is None and summary.estimated_cost_usd is None


async def test_dpo_export_from_shadow_answers(db: Any, tmp_path: Path) -> None:
    database, _, _ = db
    lines, summary = await export_samples(database, ExportOptions(format="dpo"))
    assert summary.read == 2 and summary.dropped == {"identical_answers": 1}
    (pair,) = [json.loads(line) for line in lines]
    assert pair["preferred_output"][0]["tool_calls"][0]["id"] == "call00001"
    assert pair["non_preferred_output"] == [{"role": "assistant", "content": "I cannot."}]


async def test_split_and_limit_through_write_export(db: Any, tmp_path: Path) -> None:
    database, _, _ = db
    train, valid = (tmp_path / "t.jsonl").open("w"), (tmp_path / "v.jsonl").open("w")
    with train, valid:
        summary = await write_export(
            database, ExportOptions(val_fraction=0.5, seed=3), train, valid
        )
    assert summary.train + summary.valid == summary.written == 9
    assert len(read_jsonl(tmp_path / "t.jsonl")) == summary.train
    lines, summary = await export_samples(database, ExportOptions(limit=2))
    assert len(lines) == 2 and summary.written == 2
    with pytest.raises(ValueError, match="validation file"):
        await write_export(database, ExportOptions(val_fraction=0.5), train)


def test_bad_option_combinations() -> None:
    for options in (
        ExportOptions(system_prompt="x", drop_system=True),
        ExportOptions(format="dpo", train_on="last"),
        ExportOptions(format="xml"),
        ExportOptions(val_fraction=1.0),
        ExportOptions(since="yesterday"),
        ExportOptions(labels=("good",)),
    ):
        with pytest.raises(OptionsError):
            options.check()


def test_cli_filters_dpo_and_stats(db: Any, tmp_path: Path) -> None:
    _, _, path = db
    out = tmp_path / "dpo.jsonl"
    result = run_cli("export", "--db", str(path), "--out", str(out), "--format", "dpo", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["written"] == 1
    check = run_cli("validate", str(out), "--format", "dpo", "--min-samples", "1")
    assert check.returncode == 0, check.stdout
    result = run_cli(
        "export",
        "--db",
        str(path),
        "--out",
        str(tmp_path / "p.jsonl"),
        "--exclude-promoted",
        "--label",
        "any",
        "--json",
    )
    assert json.loads(result.stdout)["written"] == 9
    stats = json.loads(run_cli("stats", "--db", str(path), "--json").stdout)
    assert stats["by_route"]["teacher"]["trajectories"] == 1
    assert stats["promoted_exchanges"] == 1 and stats["shadow_exchanges"] == 2
    assert stats["labels"] == {"unlabeled": 10, "approved": 1, "rejected": 1}
    assert stats["errors"] == 1 and stats["outcomes"] == {"error": 1, "ok": 11}


@pytest.mark.parametrize(
    "options",
    [
        ExportOptions(labels=("any",)),
        ExportOptions(labels=("any",), format="dpo"),  # shadow pairs: the other query
        ExportOptions(labels=("any",), leaves="longest", format="hf"),
        ExportOptions(labels=("any",), val_fraction=0.5, limit=6),
    ],
    ids=["leaves", "pairs", "longest", "split-limit"],
)
async def test_worker_processes_write_the_same_file(
    db: Any, tmp_path: Path, options: ExportOptions
) -> None:
    # On SQLite the worker processes read the rows themselves (by id, read-only sqlite3).
    database, _, _ = db
    files = [tmp_path / name for name in ("one", "one.valid", "two", "two.valid")]
    handles = [path.open("w") for path in files]
    try:
        first = await write_export(database, options, handles[0], handles[1])
        second = await write_export(
            database, dataclasses.replace(options, workers=2), handles[2], handles[3]
        )
    finally:
        for handle in handles:
            handle.close()
    assert files[0].read_text() == files[2].read_text()
    assert files[1].read_text() == files[3].read_text()
    assert first.as_dict() | {"seconds": 0} == second.as_dict() | {"seconds": 0}
    assert first.written >= 1


# Worker processes read SQLite files themselves; on PostgreSQL the export streams.
@pytest.mark.parametrize("filled", ["sqlite"], indirect=True)
@pytest.mark.parametrize("preference", [False, True], ids=["leaves", "pairs"])
async def test_sqlite_rows_are_the_streamed_rows(db: Any, preference: bool) -> None:
    database, _, _ = db
    assert database.sqlite_file is not None
    query = query_for(ExportOptions(labels=("any",), format="dpo" if preference else "openai"))
    streamed = [row async for rows in stream_batches(database, query) for row in rows]
    ids = [row["id"] for row in streamed]
    statements = sqlite_row_statements(preference)
    whole = SqliteRows(database.sqlite_file, statements)
    deferred = SqliteRows(database.sqlite_file, statements, defer_tools=True)
    # bases outside the rows' trajectories are looked up by id: here, every base
    nowhere = "SELECT id, request_base_id, request_refs_json FROM exchanges WHERE ? IS NULL"
    by_id = SqliteRows(
        database.sqlite_file, dataclasses.replace(statements, trajectory_chains=nowhere)
    )
    try:
        assert whole.read([*reversed(ids), "no-such-id"]) == streamed[::-1]
        assert by_id.read(ids) == streamed
        apart = deferred.read(ids)
    finally:
        for reader in (whole, deferred, by_id):
            reader.close()
    assert any(DEFERRED_TOOLS in row for row in apart)
    for row, expected in zip(apart, streamed, strict=True):
        if DEFERRED_TOOLS in row:  # `tools` left null in the text; the list given beside it
            _, tools_text = row.pop(DEFERRED_TOOLS)
            request = json.loads(row["request_json"])
            assert request["tools"] is None
            request["tools"] = json.loads(tools_text)
            row["request_json"] = json.dumps(request)
            assert list(request) == list(json.loads(expected["request_json"]))  # same key order
            expected = {
                **expected,
                "request_json": json.dumps(json.loads(expected["request_json"])),
            }
        assert row == expected


async def test_worker_processes_filter_a_large_selection(db: Any, tmp_path: Path) -> None:
    database, ids, _ = db
    chosen = (ids["teacher"], ids["gpt4o"], *(f"missing-{i}" for i in range(6000)))
    options = ExportOptions(labels=("any",), trajectory_ids=chosen, workers=2)
    with (tmp_path / "out.jsonl").open("w") as out:
        summary = await write_export(database, options, out)
    assert users((tmp_path / "out.jsonl").read_text().splitlines()) == ["q teacher", "q gpt4o"]
    assert summary.read == 2


async def test_selection_of_trajectory_ids_small_and_large(db: Any) -> None:
    database, ids, _ = db
    chosen = (ids["teacher"], ids["gpt4o"], ids["rejected"])
    lines, _ = await export_samples(database, ExportOptions(trajectory_ids=chosen))
    assert users(lines) == ["q teacher", "q gpt4o"]  # rejected stays out: labels still apply
    padded = chosen + tuple(f"missing-{i}" for i in range(6000))  # filtered outside SQL
    lines, summary = await export_samples(database, ExportOptions(trajectory_ids=padded))
    assert users(lines) == ["q teacher", "q gpt4o"] and summary.read == 2
    lines, _ = await export_samples(database, ExportOptions(trajectory_ids=()))
    assert lines == []


def test_cli_export_to_stdout(db: Any) -> None:
    _, _, path = db
    result = run_cli("export", "--db", str(path), "--out", "-", "--route", "teacher", "--json")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert json.loads(line)["messages"][1]["content"] == "q teacher"
    assert json.loads(result.stderr)["written"] == 1
    refused = run_cli("export", "--db", str(path), "--out", "-", "--val-fraction", "0.2")
    assert refused.returncode == 1 and "needs files" in refused.stderr


# -- one filter: the list, the API and the export select the same trajectories ---------------

SAME_SET_QUERIES = [
    {},
    {"route": "teacher"},
    {"route": "student", "tools": "no"},
    {"model": "o3"},
    {"model": "gpt-4o"},  # answered by the dated snapshot gpt-4o-2024-08-06
    {"label": "approved"},
    {"label": "rejected"},
    {"label": "unlabeled"},
    {"label": "labeled"},
    {"from": "2026-11-15", "to": "2026-11-16"},  # `to` is inclusive for a date
    {"from": "2026-11-19T11:30:00Z"},
    {"tag": "gold"},
    {"q": "FIND IT"},
    {"errors": "yes"},
    {"errors": "no", "label": "unlabeled"},
    {"tools": "yes"},
]


async def listed(database: Database, query: Any) -> set[str]:
    """Every trajectory id the dashboard list shows for `query`, through all its pages."""
    found: set[str] = set()
    cursor = None
    while True:
        page = await list_trajectories(database, query.filter, limit=MAX_PAGE_SIZE, after=cursor)
        found.update(row["id"] for row in page.rows)
        cursor = page.next_cursor
        if cursor is None:
            return found


async def test_list_api_and_export_select_the_same_trajectories(db: Any, tmp_path: Path) -> None:
    database, ids, target = db
    name_of = {tid: name for name, tid in ids.items()}
    async with in_process_proxy(
        tmp_path,
        upstream="http://127.0.0.1:9/v1",
        db=target,
        journal=str(tmp_path / "journal.jsonl"),  # not ./understudy-journal.jsonl (PostgreSQL)
    ) as proxy:
        for params in SAME_SET_QUERIES:
            query = parse_list_query(params)
            in_list = await listed(database, query)
            answer = await proxy.client.get("/api/trajectories", params={**params, "limit": 500})
            assert answer.status_code == 200, answer.text
            in_api = {row["id"] for row in answer.json()["data"]}
            assert in_api == in_list, params

            # The export reads the leaves of exactly the listed trajectories (rejected ones
            # only when the label filter asks for them, as the CLI does).
            options = export_options(query, params)
            every_leaf = dataclasses.replace(options, include_incomplete=True)
            exported = {
                row["trajectory_id"]
                async for rows in read_batches(database, every_leaf)
                for row in rows
            }
            expected = in_list
            if "label" not in params:
                expected = in_list - {ids["rejected"]}
            assert exported == expected, (params, sorted(name_of.get(t, t) for t in exported))

            # And the dashboard's download is the exporter's own output for that selection.
            lines, _ = await export_samples(database, options)
            download = await proxy.client.get("/api/export", params=params)
            if lines:
                assert download.status_code == 200, (params, download.text)
                assert download.text.splitlines() == lines, params
            else:
                assert download.status_code == 404, params
                assert download.json()["error"]["code"] == "nothing_to_export"

    named = {name_of[t] for t in await listed(database, parse_list_query({"model": "gpt-4o"}))}
    assert named == {"gpt4o"}
    dated = parse_list_query({"from": "2026-11-15", "to": "2026-11-16"})
    assert {name_of[t] for t in await listed(database, dated)} == {"approved", "rejected"}
    teacher = parse_list_query({"model": "o3"})
    assert {name_of[t] for t in await listed(database, teacher)} == {"teacher"}
