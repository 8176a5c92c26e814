"""The proxy's mirror of Responses API conversations (`/v1/conversations`, migration
007_conversations).

A response created with `conversation` carries only its new items; the conversation itself lives
on the upstream's servers. The proxy keeps, per conversation, the items it saw added, in order:
the `items` of `POST /v1/conversations` and `POST /v1/conversations/{id}/items`, a whole listing
(`GET .../items`) of a conversation it knew nothing of, and the input and output items of each
response created in it (tagged with that exchange). The history an exchange saw is then the
conversation's items before its own (`attach_conversation_contexts`).

Writes happen on the request path (a response's items are appended before the client receives
its end, so the next request of the conversation finds them on any replica); callers fail open.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from proxy.core.responses import conversation_id
from proxy.storage.engine import dialect_insert, utc_now
from proxy.storage.schema import conversation_items, conversations

_APPEND_ATTEMPTS = 5


class ConversationMirror:
    """Reads and writes of the conversation mirror, on one engine (`Database.engine`)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name

    async def began(self, conversation_id: str, source: str) -> None:
        """Note that the proxy saw `conversation_id` begin (`source`: 'create' | 'list'); a second
        call changes nothing. Raises what the driver raises."""
        statement = (
            dialect_insert(self._dialect, conversations)
            .values(id=conversation_id, created_utc=utc_now(), source=source)
            .on_conflict_do_nothing(index_elements=[conversations.c.id])
        )
        async with self._engine.begin() as conn:
            await conn.execute(statement)

    async def append(
        self,
        conversation_id: str,
        items: Sequence[Any],
        *,
        exchange_id: str | None = None,
        response_id: str | None = None,
    ) -> None:
        """Append `items` (JSON-able) to the conversation, after every item it has, in one
        transaction. Replicas appending at once collide on the position key; the loser retries
        after the winner's items (up to 5 times, then IntegrityError). Raises what the driver
        raises."""
        if not items:
            return
        c = conversation_items.c
        now = utc_now()
        for attempt in range(_APPEND_ATTEMPTS):
            try:
                async with self._engine.begin() as conn:
                    last = (
                        await conn.execute(
                            select(func.max(c.position)).where(c.conversation_id == conversation_id)
                        )
                    ).scalar()
                    start = -1 if last is None else int(last)
                    await conn.execute(
                        conversation_items.insert(),
                        [
                            {
                                "conversation_id": conversation_id,
                                "position": start + 1 + i,
                                "item_id": _item_id(item),
                                "item_json": json.dumps(item, ensure_ascii=False),
                                "exchange_id": exchange_id,
                                "response_id": response_id,
                                "added_utc": now,
                            }
                            for i, item in enumerate(items)
                        ],
                    )
                return
            except IntegrityError:
                if attempt == _APPEND_ATTEMPTS - 1:
                    raise

    async def items(self, conversation_id: str) -> tuple[bool, list[Any]]:
        """`(begun, items)`: whether the proxy saw the conversation begin (`began`), and its
        mirrored items in order (parsed JSON). Unknown: `(False, [])`. Raises what the driver
        raises."""
        async with self._engine.connect() as conn:
            begun = (
                await conn.execute(
                    select(conversations.c.id).where(conversations.c.id == conversation_id)
                )
            ).first() is not None
            rows = await _item_rows(conn, [conversation_id])
        return begun, [_load(row.item_json) for row in rows]

    async def has_items(self, conversation_id: str) -> bool:
        """Whether any item of the conversation is mirrored."""
        c = conversation_items.c
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(c.position).where(c.conversation_id == conversation_id).limit(1)
                )
            ).first()
        return row is not None


async def _item_rows(conn: AsyncConnection, conversation_ids: Sequence[str]) -> list[Any]:
    c = conversation_items.c
    query = (
        select(c.conversation_id, c.position, c.item_json, c.exchange_id)
        .where(c.conversation_id.in_(list(conversation_ids)))
        .order_by(c.conversation_id, c.position)
    )
    return list(await conn.execute(query))


async def attach_conversation_contexts(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Give each `responses` row (an `exchanges` row with its whole `request_json`) whose request
    names a `conversation` its `conversation_context`: the conversation's mirrored items before
    the first item its own request and answer added, or None when the proxy does not know them
    (the conversation began before the proxy, or the exchange added no items: it failed).
    One query for all the conversations the rows name; rows without one are left as they are."""
    wanted: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("kind") != "responses":
            continue
        conversation = _conversation_of(row.get("request_json"))
        if conversation is not None:
            wanted.setdefault(conversation, []).append(row)
    if not wanted:
        return
    ids = sorted(wanted)
    begun = {
        r[0]
        for r in await conn.execute(select(conversations.c.id).where(conversations.c.id.in_(ids)))
    }
    items: dict[str, list[Any]] = {}
    for item in await _item_rows(conn, ids):
        items.setdefault(item.conversation_id, []).append(item)
    for conversation, named in wanted.items():
        mirrored = items.get(conversation, [])
        for row in named:
            first = next((i for i, r in enumerate(mirrored) if r.exchange_id == row["id"]), None)
            if first is None or conversation not in begun:
                row["conversation_context"] = None
            else:
                row["conversation_context"] = [_load(r.item_json) for r in mirrored[:first]]


def _conversation_of(request_json: Any) -> str | None:
    if not isinstance(request_json, str) or '"conversation"' not in request_json:
        return None
    try:
        request = json.loads(request_json)
    except ValueError:
        return None
    return conversation_id(request) if isinstance(request, dict) else None


def _item_id(item: Any) -> str | None:
    value = item.get("id") if isinstance(item, dict) else None
    return value if isinstance(value, str) else None


def _load(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {"invalid": text}
