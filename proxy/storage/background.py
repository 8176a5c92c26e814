"""Background responses held in the shared database (migration 007_conversations).

A Responses request with `background: true` is answered `queued`; its answer comes later through
`GET /v1/responses/{id}`, which in a replicated deployment may reach another replica. The
replica that created it holds the in-flight exchange here (redacted, as JSON); the replica that
retrieves the final answer claims the row (one `DELETE ... RETURNING`: exactly one claimer wins)
and records the exchange. Callers fail open.
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.storage.engine import dialect_insert, utc_now
from proxy.storage.schema import background_responses


class BackgroundHolds:
    """Held background exchanges, on one engine (`Database.engine`)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name

    async def hold(self, response_id: str, record_json: str) -> None:
        """Hold the exchange of background response `response_id` (`record_json`: its redacted
        record); a second hold of the same id replaces nothing. Raises what the driver raises."""
        statement = (
            dialect_insert(self._dialect, background_responses)
            .values(response_id=response_id, record_json=record_json, held_utc=utc_now())
            .on_conflict_do_nothing(index_elements=[background_responses.c.response_id])
        )
        async with self._engine.begin() as conn:
            await conn.execute(statement)

    async def held(self, response_id: str) -> bool:
        """Whether an exchange is held for `response_id`."""
        c = background_responses.c
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(c.response_id).where(c.response_id == response_id))
            ).first()
        return row is not None

    async def claim(self, response_id: str) -> str | None:
        """Take the held record of `response_id` (its JSON), or None when none is held (never
        held, or another replica claimed it first)."""
        c = background_responses.c
        statement = (
            delete(background_responses)
            .where(c.response_id == response_id)
            .returning(c.record_json)
        )
        async with self._engine.begin() as conn:
            row = (await conn.execute(statement)).first()
        return str(row[0]) if row is not None else None
