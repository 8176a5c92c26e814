"""The stitcher's request-path statements: find, remember and claim conversation states and routes.

A database is **shared** when several proxy processes write it at once: PostgreSQL (replicas
behind a load balancer). Then these statements run in autocommit, one round trip each, on a pool
of their own, and `write_exchanges` (`proxy.storage.writes`) clears the `conversation_states`
rows its exchanges supersede. SQLite is owned by one process and never pays for that.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Select, bindparam, literal_column, select, union_all
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from proxy.storage.engine import dialect_insert, utc_now
from proxy.storage.schema import choice_states, conversation_states, exchanges, trajectories

_CLAIM_COLUMNS: Final = ("id", "created_utc", "updated_utc", "id_source", "route", "shadow")
_COUNT_COLUMNS: Final = (
    "exchange_count",
    "error_count",
    "tool_call_count",
    "prompt_tokens",
    "completion_tokens",
)

_ROUTE_OF: Final = select(trajectories.c.route, trajectories.c.shadow).where(
    trajectories.c.id == bindparam("trajectory_id")
)


@functools.cache
def _state_lookup(include_pending: bool, by_trajectory: bool) -> Select[Any]:
    """The `find_states` query, built once per variant. Parameters: `hashes` (a list, expanded
    into IN) and, `by_trajectory`, `trajectory_id`. Rows: state_hash, exchange_id, trajectory_id,
    step, route, shadow, ordered so that the latest state of each hash comes last. A state is
    an exchange's `state_hash` (its first choice) or one of its later choices (`choice_states`,
    `n > 1`): both by index."""
    e, t, c = exchanges.c, trajectories.c, choice_states.c
    later_choices = (
        select(
            c.state_hash,
            e.id.label("exchange_id"),
            e.trajectory_id,
            e.step,
            e.route,
            t.shadow,
            literal_column("0").label("pending"),
            e.started_utc.label("at_utc"),
        )
        .select_from(choice_states)
        .join(exchanges, e.id == c.exchange_id)
        .join(trajectories, t.id == e.trajectory_id)
        .where(c.state_hash.in_(bindparam("hashes", expanding=True)))
    )
    if by_trajectory:
        later_choices = later_choices.where(e.trajectory_id == bindparam("trajectory_id"))
    flushed = (
        select(
            e.state_hash,
            e.id.label("exchange_id"),
            e.trajectory_id,
            e.step,
            e.route,
            t.shadow,
            literal_column("0").label("pending"),
            e.started_utc.label("at_utc"),
        )
        .join(trajectories, t.id == e.trajectory_id)
        .where(e.state_hash.in_(bindparam("hashes", expanding=True)))
    )
    if by_trajectory:
        flushed = flushed.where(e.trajectory_id == bindparam("trajectory_id"))
    if not include_pending:
        recorded = union_all(flushed, later_choices).subquery("states")
        return select(recorded).order_by(recorded.c.at_utc)
    s = conversation_states.c
    pending = select(
        s.state_hash,
        s.exchange_id,
        s.trajectory_id,
        s.step,
        s.route,
        s.shadow,
        literal_column("1").label("pending"),
        s.remembered_utc.label("at_utc"),
    ).where(s.state_hash.in_(bindparam("hashes", expanding=True)))
    if by_trajectory:
        pending = pending.where(s.trajectory_id == bindparam("trajectory_id"))
    both = union_all(flushed, later_choices, pending).subquery("states")
    return select(both).order_by(both.c.pending, both.c.at_utc)


@dataclass(frozen=True)
class StateRef:
    """Where a conversation state was recorded: the exchange that produced it and its trajectory."""

    exchange_id: str
    trajectory_id: str
    step: int
    route: str
    shadow: bool = False


class RequestPathStates:
    """The `Database` methods the stitcher calls on the request path (a mixin of `Database`)."""

    engine: AsyncEngine
    dialect: str
    _request_engine: AsyncEngine | None

    def _build_state_statements(self) -> None:
        """Build the request-path statements once: SQLAlchemy then only binds parameters."""
        states = conversation_states.c
        remember = dialect_insert(self.dialect, conversation_states).values(
            {column.name: bindparam(column.name) for column in conversation_states.columns}
        )
        self._remember_statement = remember.on_conflict_do_update(
            index_elements=[states.state_hash, states.trajectory_id],
            set_={
                name: remember.excluded[name]
                for name in ("exchange_id", "step", "route", "shadow", "remembered_utc")
            },
        )
        t = trajectories.c
        self._claim_statement = (
            dialect_insert(self.dialect, trajectories)
            .values(
                {
                    **{name: bindparam(name) for name in _CLAIM_COLUMNS},
                    **dict.fromkeys(_COUNT_COLUMNS, 0),
                }
            )
            .on_conflict_do_nothing(index_elements=[t.id])
            .returning(t.route, t.shadow)
        )

    @contextlib.asynccontextmanager
    async def _request_path(self) -> AsyncIterator[AsyncConnection]:
        """A connection for the stitcher's small statements on the request path.

        PostgreSQL: a pool of its own (`REQUEST_POOL_SIZE` connections) in autocommit, so a
        statement is one round trip (no BEGIN, COMMIT or ROLLBACK on return to the pool) and a
        write is visible to every replica when it returns; with `synchronous_commit = off`, so a
        commit does not wait for the WAL flush (a server crash can lose the last fraction of a
        second of these rows: a conversation then starts a new trajectory, nothing else; the
        recorder's exchange rows stay fully durable). SQLite: the ordinary engine. Writers call
        `commit()` (a no-op in autocommit).
        """
        async with (self._request_engine or self.engine).connect() as conn:
            yield conn

    async def find_states(
        self,
        state_hashes: Sequence[str],
        trajectory_id: str | None = None,
        *,
        include_pending: bool = False,
    ) -> dict[str, StateRef]:
        """The latest exchange recorded with each of `state_hashes` (one indexed query).

        With `trajectory_id`, only exchanges of that trajectory count. Hashes not found are absent.
        include_pending: also look in `conversation_states` (states written through by
        `remember_state` whose exchange rows are not flushed yet; shared databases); a pending
        state counts as later than any flushed one. Still one statement: a UNION ALL of two
        primary-key/index lookups, read from one snapshot, so a state that the recorder moves
        from one table to the other in the meantime is seen exactly once.
        """
        if not state_hashes:
            return {}
        query = _state_lookup(include_pending, trajectory_id is not None)
        params: dict[str, Any] = {"hashes": list(state_hashes)}
        if trajectory_id is not None:
            params["trajectory_id"] = trajectory_id
        found: dict[str, StateRef] = {}
        async with self._request_path() as conn:
            for row in await conn.execute(query, params):
                found[row.state_hash] = StateRef(
                    row.exchange_id, row.trajectory_id, row.step, row.route, bool(row.shadow)
                )
        return found

    async def remember_state(self, state_hash: str, ref: StateRef) -> None:
        """Write `state_hash -> ref` to `conversation_states` now (one autocommit upsert).

        Visible to every process when this returns. A later exchange with the same state in the
        same trajectory (a retry that got the same answer) replaces the row. The recorder deletes
        the row when it writes `ref`'s exchange (`write_exchanges`). Raises what the driver raises.
        """
        async with self._request_path() as conn:
            await conn.execute(
                self._remember_statement,
                {
                    "state_hash": state_hash,
                    "trajectory_id": ref.trajectory_id,
                    "exchange_id": ref.exchange_id,
                    "step": ref.step,
                    "route": ref.route,
                    "shadow": ref.shadow,
                    "remembered_utc": utc_now(),
                },
            )
            await conn.commit()

    async def claim_trajectory(
        self, trajectory_id: str, *, id_source: str, route: str, shadow: bool
    ) -> tuple[str, bool]:
        """Create the `trajectories` row of a new trajectory unless one exists; return its route.

        Returns `(route, shadow)` of the row that holds: ours when the insert won, else the one
        another process inserted first (the primary key decides, `ON CONFLICT DO NOTHING`; on
        PostgreSQL a conflicting insert still in flight is waited for). The row starts with zero
        counts; `write_exchanges` adds the exchanges. Raises what the driver raises.
        """
        now = utc_now()
        params = {
            "id": trajectory_id,
            "created_utc": now,
            "updated_utc": now,
            "id_source": id_source,
            "route": route,
            "shadow": shadow,
        }
        async with self._request_path() as conn:
            row = (await conn.execute(self._claim_statement, params)).first()
            if row is None:  # lost: read the winner (committed: a new statement sees it)
                row = (await conn.execute(_ROUTE_OF, {"trajectory_id": trajectory_id})).first()
            await conn.commit()
        if row is None:  # only if the row was deleted in between; keep our own decision
            return route, shadow
        return str(row[0]), bool(row[1])

    async def find_response(self, response_id: str) -> StateRef | None:
        """The exchange that produced Responses API response `response_id` (the latest when
        several did), or None. One lookup on `ix_exchanges_response_id`."""
        e, t = exchanges.c, trajectories.c
        query = (
            select(e.id, e.trajectory_id, e.step, e.route, t.shadow)
            .join(trajectories, t.id == e.trajectory_id)
            .where(e.response_id == response_id)
            .order_by(e.started_utc.desc())
            .limit(1)
        )
        async with self._request_path() as conn:
            row = (await conn.execute(query)).first()
        return StateRef(row[0], row[1], row[2], row[3], bool(row[4])) if row else None

    async def trajectory_route(self, trajectory_id: str) -> tuple[str, bool] | None:
        """(route, shadow) of an existing trajectory, or None when it is not recorded."""
        async with self._request_path() as conn:
            row = (await conn.execute(_ROUTE_OF, {"trajectory_id": trajectory_id})).first()
        return (row[0], bool(row[1])) if row else None
