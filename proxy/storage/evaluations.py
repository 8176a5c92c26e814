"""SQL of replay evaluation: the recorded steps a run replays, and its runs and step results.

`understudy-export eval` reads the exchanges of held-out trajectories (`steps_of`), creates or
resumes a run (`create_run`, `open_run_with`), writes each step's result as soon as the candidate
answered (`save_step`), and stores the report (`update_run`). The dashboard lists runs
(`list_runs`), shows one (`get_run`) and its disagreements (`disagreed_steps`). Queries are
SQLAlchemy Core, the same on SQLite and PostgreSQL; parameters only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, delete, false, func, or_, select, update

from proxy.storage.bodies import REQUEST_COLUMNS, rebuild_requests
from proxy.storage.database import Database
from proxy.storage.reading import MAX_SQL_IDS
from proxy.storage.schema import eval_runs, eval_steps, exchanges

RUN_STATUSES = ("running", "finished", "incomplete")

_STEP_COLUMNS = (
    exchanges.c.id,
    exchanges.c.trajectory_id,
    exchanges.c.parent_id,
    exchanges.c.step,
    exchanges.c.path,
    exchanges.c.outcome,
    exchanges.c.route,
    exchanges.c.model_requested,
    exchanges.c.model_answered,
    *REQUEST_COLUMNS,
    exchanges.c.response_json,
    exchanges.c.duration_ms,
    exchanges.c.prompt_tokens,
    exchanges.c.completion_tokens,
    exchanges.c.shadow_model,
    exchanges.c.shadow_response_json,
    exchanges.c.shadow_duration_ms,
)


async def steps_of(db: Database, trajectory_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Every exchange of these trajectories, ordered by trajectory, step, start.

    Dicts with `id`, `trajectory_id`, `parent_id`, `step`, `path`, `outcome`, `route`, the
    models, `request_json` / `response_json` / `shadow_response_json` (JSON texts or None),
    `duration_ms`, `shadow_duration_ms`, `prompt_tokens`, `completion_tokens`. Reads in chunks of
    `MAX_SQL_IDS` ids.
    """
    ids = list(dict.fromkeys(trajectory_ids))
    rows: list[dict[str, Any]] = []
    async with db.engine.connect() as conn:
        for start in range(0, len(ids), MAX_SQL_IDS):
            chunk = ids[start : start + MAX_SQL_IDS]
            result = await conn.execute(
                select(*_STEP_COLUMNS)
                .where(exchanges.c.trajectory_id.in_(chunk))
                .order_by(
                    exchanges.c.trajectory_id,
                    exchanges.c.step,
                    exchanges.c.started_utc,
                    exchanges.c.id,
                )
            )
            chunk_rows = [dict(row._mapping) for row in result]
            rows.extend(await rebuild_requests(conn, chunk_rows))  # whole bodies (migration 003)
    return rows


async def open_run_with(db: Database, fingerprint: str) -> dict[str, Any] | None:
    """The latest run with this fingerprint that did not finish cleanly (status 'running' or
    'incomplete'), as a dict of `eval_runs` columns; None when there is none."""
    async with db.engine.connect() as conn:
        row = (
            await conn.execute(
                select(eval_runs)
                .where(eval_runs.c.fingerprint == fingerprint, eval_runs.c.status != "finished")
                .order_by(eval_runs.c.created_utc.desc(), eval_runs.c.id.desc())
                .limit(1)
            )
        ).first()
    return dict(row._mapping) if row else None


async def create_run(db: Database, run: dict[str, Any]) -> None:
    """Insert a run: a dict of `eval_runs` columns (`id`, times, `status`, `fingerprint`,
    `base_url`, `model`, `split`, `reference`, `options_json`, counts)."""
    async with db.engine.begin() as conn:
        await conn.execute(eval_runs.insert().values(**run))


async def update_run(db: Database, run_id: str, **values: Any) -> None:
    """Set columns of a run (e.g. `status`, `updated_utc`, `finished_utc`, `report_json`)."""
    async with db.engine.begin() as conn:
        await conn.execute(update(eval_runs).where(eval_runs.c.id == run_id).values(**values))


async def answered_exchange_ids(db: Database, run_id: str) -> set[str]:
    """Exchange ids of the run's steps the candidate answered (a resumed run skips them)."""
    async with db.engine.connect() as conn:
        result = await conn.execute(
            select(eval_steps.c.exchange_id).where(
                eval_steps.c.run_id == run_id, eval_steps.c.outcome == "answered"
            )
        )
        return {row[0] for row in result}


async def save_step(db: Database, step: dict[str, Any]) -> None:
    """Write one step's result (a dict of `eval_steps` columns), replacing an earlier result of
    the same (run_id, exchange_id): an error asked again on resume."""
    async with db.engine.begin() as conn:
        await conn.execute(
            delete(eval_steps).where(
                eval_steps.c.run_id == step["run_id"],
                eval_steps.c.exchange_id == step["exchange_id"],
            )
        )
        await conn.execute(eval_steps.insert().values(**step))


async def run_steps(db: Database, run_id: str) -> list[dict[str, Any]]:
    """Every stored step of a run (dicts of `eval_steps` columns), by trajectory and step."""
    async with db.engine.connect() as conn:
        result = await conn.execute(
            select(eval_steps)
            .where(eval_steps.c.run_id == run_id)
            .order_by(eval_steps.c.trajectory_id, eval_steps.c.step, eval_steps.c.exchange_id)
        )
        return [dict(row._mapping) for row in result]


async def list_runs(db: Database, limit: int = 100) -> list[dict[str, Any]]:
    """The latest runs first (dicts of `eval_runs` columns), at most `limit`."""
    async with db.engine.connect() as conn:
        result = await conn.execute(
            select(eval_runs)
            .order_by(eval_runs.c.created_utc.desc(), eval_runs.c.id.desc())
            .limit(limit)
        )
        return [dict(row._mapping) for row in result]


async def get_run(db: Database, run_id: str) -> dict[str, Any] | None:
    """One run (a dict of `eval_runs` columns) plus `answered` and `stored` step counts, or None."""
    async with db.engine.connect() as conn:
        row = (await conn.execute(select(eval_runs).where(eval_runs.c.id == run_id))).first()
        if row is None:
            return None
        counts = (
            await conn.execute(
                select(
                    func.count(),
                    func.count().filter(eval_steps.c.outcome == "answered"),
                ).where(eval_steps.c.run_id == run_id)
            )
        ).one()
    return {**dict(row._mapping), "stored": int(counts[0]), "answered": int(counts[1])}


async def disagreed_steps(
    db: Database, run_id: str, limit: int = 50, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """Steps of a run where the candidate disagreed or did not answer, by trajectory and step.

    Returns (up to `limit` rows from `offset`, as dicts of `eval_steps` columns; the total).
    """
    condition = and_(
        eval_steps.c.run_id == run_id,
        or_(eval_steps.c.agrees == false(), eval_steps.c.outcome != "answered"),
    )
    async with db.engine.connect() as conn:
        total = (
            await conn.execute(select(func.count()).select_from(eval_steps).where(condition))
        ).scalar_one()
        result = await conn.execute(
            select(eval_steps)
            .where(condition)
            .order_by(eval_steps.c.trajectory_id, eval_steps.c.step, eval_steps.c.exchange_id)
            .limit(limit)
            .offset(offset)
        )
        return [dict(row._mapping) for row in result], int(total)
