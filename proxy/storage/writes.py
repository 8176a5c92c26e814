"""The recorder's writes: batches of exchange rows, trajectory increments and shadow answers.

One transaction per batch, one statement per table (executemany). Request bodies are cut into
content-addressed parts on the way in (`proxy.storage.bodies`), so the journal and the recorder
keep whole rows and every write path (the writer task, journal replay) stores the same shape.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import bindparam, case, or_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from proxy.core.responses import response_key
from proxy.storage.bodies import BodyWriter, PreparedBatch, nul_safe_row, pack_row
from proxy.storage.engine import dialect_insert
from proxy.storage.schema import (
    blobs,
    choice_states,
    conversation_states,
    exchanges,
    trajectories,
)

THREAD_PREPARE_BYTES: Final = 64 * 1024
"""Batches whose request bodies total at least this many characters are cut in a thread."""

STALE_STATE_AGE_S: Final = 3600
STATE_SWEEP_INTERVAL_S: Final = 300
"""`conversation_states` rows older than an hour are swept (at most every 5 minutes per process):
their exchange was never written because its replica died before flushing. (A conversation that
resumes from such a state later than that starts a new trajectory.)"""


class RecorderWrites:
    """The `Database` methods the recorder calls (a mixin of `Database`)."""

    engine: AsyncEngine
    dialect: str
    shared: bool
    bodies: BodyWriter
    _next_state_sweep: float

    async def _prepare(self, exchange_rows: Sequence[dict[str, Any]]) -> PreparedBatch:
        """`BodyWriter.prepare` off the event loop when the batch's bodies are large (parsing and
        hashing them grows with the batch; a thread hop costs less than that from 64 KB on)."""
        size = sum(len(row.get("request_json") or "") for row in exchange_rows)
        if size < THREAD_PREPARE_BYTES:
            return self.bodies.prepare(exchange_rows)
        return await asyncio.to_thread(self.bodies.prepare, exchange_rows)

    def _insert_ignore(self, table: Any) -> Any:
        return dialect_insert(self.dialect, table).on_conflict_do_nothing()

    async def write_exchanges(
        self,
        exchange_rows: Sequence[dict[str, Any]],
        trajectory_rows: Sequence[dict[str, Any]],
        shadow_rows: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Insert a batch in one transaction.

        exchange_rows: dicts keyed by `exchanges` columns. trajectory_rows: one per trajectory the
        batch touches, with `id`, `created_utc`, `updated_utc`, `id_source`, `route`, `shadow` and
        the batch's increments `exchange_count`, `error_count`, `tool_call_count`,
        `prompt_tokens`, `completion_tokens`. New trajectories are inserted; existing ones get the
        increments. shadow_rows: `{"id", "shadow_model", "shadow_response_json",
        "shadow_error_json", "shadow_duration_ms"}` set on exchanges already written (or in this
        batch).

        A trajectory row may exist before its first exchange is written: claimed early
        (`claim_trajectory`, exchange_count 0) or created by another replica's batch holding a
        later step. Its `created_utc` becomes the earliest `started_utc` written, so the row and
        its exchanges agree whatever order the batches arrive in. On a shared database the
        `conversation_states` rows of these exchanges are deleted in the same transaction: from
        then on `find_states` finds the states in `exchanges`. Trajectory rows are locked in id
        order, so replicas whose batches touch the same trajectories never deadlock.

        Each exchange's `request_json` (the whole body, as the journal keeps it) is cut into
        options and content-addressed parts (`BodyWriter.prepare`, by the row's `kind` when it
        has one): new parts go to `blobs` in one insert-or-ignore, sorted by hash. Text values
        lose raw NUL characters (`nul_safe_row`; PostgreSQL refuses them). On SQLite the JSON
        texts of exchange and shadow rows are stored packed (`proxy.storage.bodies.pack_row`,
        migration 008). The rows passed in are not changed.
        """
        t = trajectories.c
        trajectory_rows = sorted(trajectory_rows, key=lambda row: str(row["id"]))
        shadow_rows = [nul_safe_row(row) for row in shadow_rows]
        if self.bodies.pack:
            shadow_rows = [pack_row(row) for row in shadow_rows]
        prepared = await self._prepare(exchange_rows)
        # An exchange's later choices (`n > 1`, `rows.choice_state_rows`) go to their own table.
        choice_rows = [
            {"exchange_id": row["id"], "choice_index": index, "state_hash": state_hash}
            for row in prepared.rows
            for index, state_hash in row.pop("choice_states", None) or ()
        ]
        async with self.engine.begin() as conn:
            if not trajectory_rows:
                await self._write_shadows(conn, shadow_rows)
                return
            if prepared.blob_rows:
                await conn.execute(self._insert_ignore(blobs), prepared.blob_rows)
            await conn.execute(
                self._insert_ignore(trajectories),
                [
                    {
                        **row,
                        "exchange_count": 0,
                        "error_count": 0,
                        "tool_call_count": 0,
                        "prompt_tokens": 0,
                        "completion_tokens": 0,
                    }
                    for row in trajectory_rows
                ],
            )
            await conn.execute(
                trajectories.update()
                .where(t.id == bindparam("b_id"))
                .values(
                    exchange_count=t.exchange_count + bindparam("b_exchange_count"),
                    error_count=t.error_count + bindparam("b_error_count"),
                    tool_call_count=t.tool_call_count + bindparam("b_tool_call_count"),
                    prompt_tokens=t.prompt_tokens + bindparam("b_prompt_tokens"),
                    completion_tokens=t.completion_tokens + bindparam("b_completion_tokens"),
                    created_utc=case(
                        (
                            or_(
                                t.exchange_count == 0,
                                t.created_utc > bindparam("b_created_utc"),
                            ),
                            bindparam("b_created_utc"),
                        ),
                        else_=t.created_utc,
                    ),
                    updated_utc=case(
                        (t.updated_utc < bindparam("b_updated_utc"), bindparam("b_updated_utc")),
                        else_=t.updated_utc,
                    ),
                ),
                [{f"b_{k}": v for k, v in row.items()} for row in trajectory_rows],
            )
            await conn.execute(exchanges.insert(), prepared.rows)
            if choice_rows:
                await conn.execute(self._insert_ignore(choice_states), choice_rows)
            if self.shared:
                await self._forget_states(conn, prepared.rows, choice_rows)
            await self._write_shadows(conn, shadow_rows)
        self.bodies.committed(prepared)

    async def _forget_states(
        self,
        conn: AsyncConnection,
        exchange_rows: Sequence[dict[str, Any]],
        choice_rows: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Delete the `conversation_states` rows that the exchange rows being inserted supersede.

        Only a row that still names the same exchange goes: a newer exchange that produced the
        same state in the same trajectory (a retry) keeps its own row until it is written. Every
        `STATE_SWEEP_INTERVAL_S` this also deletes rows older than `STALE_STATE_AGE_S`: states of
        a replica that died before its recorder flushed (the table is small: a scan is cheap).
        """
        now = time.monotonic()
        if now >= self._next_state_sweep:
            self._next_state_sweep = now + STATE_SWEEP_INTERVAL_S
            cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=STALE_STATE_AGE_S)
            await conn.execute(
                conversation_states.delete().where(
                    conversation_states.c.remembered_utc < cutoff.isoformat(timespec="milliseconds")
                )
            )
        keys = [
            {
                "b_state_hash": row["state_hash"],
                "b_trajectory_id": row["trajectory_id"],
                "b_exchange_id": row["id"],
            }
            for row in exchange_rows
            if row.get("state_hash")
        ]
        trajectory_of = {row["id"]: row["trajectory_id"] for row in exchange_rows}
        keys += [
            {
                "b_state_hash": row["state_hash"],
                "b_trajectory_id": trajectory_of[row["exchange_id"]],
                "b_exchange_id": row["exchange_id"],
            }
            for row in choice_rows
        ]
        # A Responses exchange's id was written through as a state too (`Stitcher.remember_response`).
        keys += [
            {
                "b_state_hash": response_key(row["response_id"]),
                "b_trajectory_id": row["trajectory_id"],
                "b_exchange_id": row["id"],
            }
            for row in exchange_rows
            if row.get("response_id")
        ]
        if not keys:
            return
        s = conversation_states.c
        await conn.execute(
            conversation_states.delete().where(
                s.state_hash == bindparam("b_state_hash"),
                s.trajectory_id == bindparam("b_trajectory_id"),
                s.exchange_id == bindparam("b_exchange_id"),
            ),
            keys,
        )

    @staticmethod
    async def _write_shadows(conn: AsyncConnection, shadow_rows: Sequence[dict[str, Any]]) -> None:
        if not shadow_rows:
            return
        columns = (
            "shadow_model",
            "shadow_response_json",
            "shadow_error_json",
            "shadow_duration_ms",
        )
        await conn.execute(
            exchanges.update()
            .where(exchanges.c.id == bindparam("b_id"))
            .values({name: bindparam(f"b_{name}") for name in columns}),
            [{f"b_{k}": v for k, v in row.items()} for row in shadow_rows],
        )
