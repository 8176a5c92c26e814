"""Replay evaluation storage (`proxy.storage.evaluations`, migration 005_evaluations) on a SQLite
file and on a fresh database of the PostgreSQL test server: a whole run through
`run_evaluation`, then the queries the dashboard and a resumed run use."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.evaluation import EvalConfig, run_evaluation
from proxy.storage import Database
from proxy.storage.evaluations import (
    answered_exchange_ids,
    disagreed_steps,
    get_run,
    list_runs,
    open_run_with,
    run_steps,
    save_step,
)
from proxy.testing.fake_candidate import create_candidate_app
from proxy.testing.servers import serve_in_thread
from tests.support.evaluation import CANDIDATE_MODEL, EXPECTED, candidate_script, record_scenario


@pytest.fixture(params=["sqlite", "postgresql"])
def db_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database of each dialect holding the eval scenario."""
    target = (
        str(tmp_path / "eval.db")
        if request.param == "sqlite"
        else str(request.getfixturevalue("pg_url"))
    )
    record_scenario(target)  # type: ignore[arg-type]  # a URL works where a path does
    return target


@pytest.fixture
def candidate() -> Iterator[str]:
    script = candidate_script()
    with serve_in_thread(create_candidate_app(script)) as root:
        try:
            yield f"{root}/v1"
        finally:
            script.release()


async def test_a_run_is_stored_and_read_back(db_target: str, candidate: str) -> None:
    db = await Database.open(db_target)
    try:
        config = EvalConfig(
            base_url=candidate, model=CANDIDATE_MODEL, api_key="sk-test", split="all"
        )
        result = await run_evaluation(db, config)
        for key in ("decision_agreement", "tool_name_agreement", "argument_agreement"):
            assert result.report[key] == EXPECTED[key]
        run_id = result.run_id

        runs = await list_runs(db)
        assert [r["id"] for r in runs] == [run_id] and runs[0]["status"] == "finished"
        assert json.loads(runs[0]["report_json"])["steps"] == 11
        run = await get_run(db, run_id)
        assert run is not None and run["stored"] == 11 and run["answered"] == 11
        assert await get_run(db, "no-such-run") is None
        assert await open_run_with(db, runs[0]["fingerprint"]) is None  # finished: not resumed

        page, total = await disagreed_steps(db, run_id, limit=3)
        assert total == 5 and len(page) == 3
        rest, _ = await disagreed_steps(db, run_id, limit=3, offset=3)
        assert len(rest) == 2 and not {s["exchange_id"] for s in page} & {
            s["exchange_id"] for s in rest
        }
        assert all(s["agrees"] is False or s["agrees"] == 0 for s in page + rest)

        # An error stored for a step is replaced by its later answer (one row per step).
        steps = await run_steps(db, run_id)
        first = dict(steps[0])
        await save_step(db, {**first, "outcome": "error", "error_type": "timeout"})
        assert first["exchange_id"] not in await answered_exchange_ids(db, run_id)
        await save_step(db, first)
        assert len(await run_steps(db, run_id)) == 11
        assert first["exchange_id"] in await answered_exchange_ids(db, run_id)
    finally:
        await db.close()
