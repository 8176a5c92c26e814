"""Request bodies in storage: written as content-addressed parts, read back whole.

Writing (`BodyWriter`, used by `write_exchanges` and the 003 conversion): each exchange row's
`request_json` is cut by `proxy.core.bodies.split_request`; its items and tool list go to `blobs`
(insert-or-ignore, one statement per batch), the row keeps its options in `request_json`, its
references in `request_refs_json` and, when its items start with its parent's, `PARENT_BASE` in
`request_base_id` (the base is the parent; rows before 009 name its id): then `request_refs_json`
lists only the new items. On SQLite the references are packed in binary and part hashes are keys
of 16 bytes (009, `proxy.core.packing.pack_refs`, `schema.HashKey`).

Reading (`rebuild_requests`, the one entry point every reader goes through): rows that carry
`request_json`, `request_base_id` and `request_refs_json` (`REQUEST_COLUMNS`) get the whole body
back in `request_json`, JSON-equal to what the client sent. One recursive query fetches the
reference lists of every base exchange the rows need and one query fetches the parts (ids and
hashes bound as one JSON array each): never a query per message. Rows written before migration 003 and not yet converted
(`request_refs_json` NULL) and rows with nothing cut (`{}`) already hold the whole body.

Packing (SQLite, migration 008): the row's other JSON texts (`PACKED_COLUMNS`: options, answer,
usage, errors, shadow answer) are stored as zstd frames against a built-in dictionary
(`proxy.core.packing`) where that is smaller, which gives back the exact text. `unpack_row` is the
one way back, and `rebuild_requests` calls it for every row it is given; SQL that must look into
them (the dashboard search) goes through `stored_text`. PostgreSQL stores them as text (it
compresses large values itself, and searches them in SQL).

Texts are made safe for both databases here too (`nul_safe_row`): PostgreSQL refuses the NUL
character in TEXT. JSON texts never hold a raw NUL (JSON escapes it as `\\u0000`, losslessly);
plain text columns copied out of the body (`end_user`, models, `finish_reason`) get U+FFFD
instead: the exact value stays in the body.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import (
    JSON,
    Boolean,
    ColumnElement,
    Select,
    String,
    Text,
    bindparam,
    case,
    cast,
    func,
    literal,
    literal_column,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.compiler import compiles

from proxy.core.bodies import (
    RecentItems,
    Remembered,
    ToolLists,
    compact_json,
    refs_for,
    remembered,
    split_request,
)
from proxy.core.packing import KEY_FUNCTION, STORED_TEXT_FUNCTION, pack_text
from proxy.storage.rebuild import (
    KEY_BYTES,
    LOOKUP_CHUNK,
    PACKED_COLUMNS,
    PARENT_BASE,
    USAGE_OF_RESPONSE,
    WHOLE,
    bases_of,
    blob_entries,
    chain_entries,
    chunks,
    cut_rows,
    item_lists,
    json_array,
    splice_rows,
    unpack_row,
    usage_of,
    wanted_parts,
)
from proxy.storage.schema import blobs, exchanges

__all__ = [  # the read half's names live in proxy.storage.rebuild; they are imported from here too
    "LOOKUP_CHUNK",
    "BASE_ID",
    "PACKED_COLUMNS",
    "PARENT_BASE",
    "REQUEST_COLUMNS",
    "USAGE_OF_RESPONSE",
    "WHOLE",
    "BodyWriter",
    "KnownBlobs",
    "PreparedBatch",
    "RequestItemsLike",
    "StoredText",
    "item_lists",
    "json_array_values",
    "nul_safe_row",
    "pack_row",
    "rebuild_requests",
    "sqlite_lookups",
    "sqlite_sql",
    "stored_text",
    "unpack_row",
]

log = logging.getLogger("understudy.storage")


def _base_id(table: Any) -> ColumnElement[Any]:
    c = table.c
    # the constant written in the SQL, not bound: `sqlite_sql` statements bind one value only
    parent = literal_column("'" + PARENT_BASE.replace("'", "''") + "'", String())
    return case((c.request_base_id == parent, c.parent_id), else_=c.request_base_id)


BASE_ID: Final = _base_id(exchanges).label("request_base_id")
"""SQL: the id of an exchange's base (`request_base_id`, with `PARENT_BASE` read as `parent_id`)."""

REQUEST_COLUMNS: Final = (
    exchanges.c.request_json,
    BASE_ID,
    exchanges.c.request_refs_json,
)
"""The columns a query must select for `rebuild_requests` to give the whole body back (the base
as `BASE_ID`, labelled `request_base_id`). A row selected whole (`select(exchanges)`) works too:
`rebuild_requests` reads `PARENT_BASE` as its `parent_id`."""


# -- NUL -----------------------------------------------------------------------------------------


def nul_safe_row(row: dict[str, Any]) -> dict[str, Any]:
    """`row` (a copy only when something changes) with no NUL character in any text value.

    `*_json` columns: a JSON text holding a raw NUL (only possible when it was not written by a
    JSON encoder) is re-encoded, which escapes it (`\\u0000`); text that does not parse gets the
    escape spelled out. Other text columns: NUL becomes U+FFFD (they are copies of body values
    for filtering and display; the body keeps the exact value).
    """
    changed: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, str) and "\x00" in value:
            if key.endswith("_json"):
                try:
                    changed[key] = compact_json(json.loads(value, strict=False))
                except (ValueError, RecursionError):
                    changed[key] = value.replace("\x00", "\\u0000")
            else:
                changed[key] = value.replace("\x00", "\ufffd")
    return {**row, **changed} if changed else row


# -- packing -------------------------------------------------------------------------------------


def pack_row(row: dict[str, Any]) -> dict[str, Any]:
    """`row` (a copy) with each of its `PACKED_COLUMNS` text packed where that is smaller
    (`proxy.core.packing.pack_text`); `request_json` only when `request_refs_json` is set; a
    `usage_json` that repeats the answer's usage as `USAGE_OF_RESPONSE`."""
    out = dict(row)
    usage = out.get("usage_json")
    if isinstance(usage, str) and usage == usage_of(out.get("response_json")):
        out["usage_json"] = USAGE_OF_RESPONSE
    for column in PACKED_COLUMNS:
        value = out.get(column)
        if isinstance(value, str) and (
            column != "request_json" or out.get("request_refs_json") is not None
        ):
            out[column] = pack_text(value)
    return out


# -- writing -------------------------------------------------------------------------------------


@dataclass
class PreparedBatch:
    """Rows ready to insert: `rows` (copies, request cut), `blob_rows` (`{"hash", "body_json"}`,
    sorted by hash so concurrent writers lock in one order), and what to remember once the
    transaction has committed (`remember`, `blob_hashes`)."""

    rows: list[dict[str, Any]]
    blob_rows: list[dict[str, str | bytes]]
    remember: list[tuple[str, Remembered]] = field(default_factory=list)
    blob_hashes: list[str] = field(default_factory=list)


class KnownBlobs:
    """An LRU set of blob hashes known to be stored (at most `capacity`): the system prompt and
    tool list of every call need not travel to the database again."""

    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = capacity
        self._hashes: dict[str, None] = {}

    def __contains__(self, blob_hash: object) -> bool:
        return blob_hash in self._hashes

    def add_all(self, hashes: Iterable[str]) -> None:
        """Mark `hashes` as stored (most recent last); forget the oldest beyond capacity."""
        for blob_hash in hashes:
            self._hashes.pop(blob_hash, None)
            self._hashes[blob_hash] = None
        excess = len(self._hashes) - self.capacity
        if excess > 0:
            for old in list(self._hashes)[:excess]:
                del self._hashes[old]


class BodyWriter:
    """Cuts exchange rows into parts for storage, remembering recent exchanges' items (one per
    `Database`; the writer calls it from one task at a time).

    recent: `RecentItems` of exchanges written (only after their transaction committed, so a base
    is always a stored row). A row whose parent is not remembered (another replica wrote it, or
    this process restarted) stores its full list of references.
    """

    def __init__(
        self, recent_capacity: int = 20_000, known_capacity: int = 50_000, *, pack: bool = False
    ) -> None:
        self.recent = RecentItems(recent_capacity)
        self.known = KnownBlobs(known_capacity)
        self.tool_lists = ToolLists()
        self.pack = pack

    def prepare(self, rows: Sequence[dict[str, Any]]) -> PreparedBatch:
        """Cut each row's `request_json` (whole body text) by its `kind` (absent: chat). A row
        that already carries `request_refs_json` is taken as already cut. Rows earlier in the
        batch count as remembered for later ones (same transaction). With `pack` (SQLite), the
        `PACKED_COLUMNS` are packed (`pack_row`). Input rows are not changed."""
        out = PreparedBatch([], [])
        pending: dict[str, Remembered] = {}
        blob_texts: dict[str, str] = {}
        for row in rows:
            row = nul_safe_row(row)
            if row.get("request_refs_json") is not None or not isinstance(
                row.get("request_json"), str
            ):
                out.rows.append({"request_base_id": None, "request_refs_json": None, **row})
                continue
            parent_id = row.get("parent_id")
            parent = pending.get(parent_id) if parent_id else None
            if parent is None:
                parent = self.recent.get(parent_id)
            # The parent's items are not parsed again when the body starts with their text.
            split = split_request(row["request_json"], row.get("kind"), parent, self.tool_lists)
            uses_base, refs = refs_for(split, parent)
            out.rows.append(
                {
                    **row,
                    "request_json": split.options_json,
                    "request_base_id": PARENT_BASE if uses_base else None,
                    "request_refs_json": compact_json(refs) if refs else WHOLE,
                }
            )
            entry = remembered(split)
            if entry is not None:
                pending[row["id"]] = entry
            for blob_hash, text in split.blobs.items():
                if blob_hash not in self.known:
                    blob_texts[blob_hash] = text
        if self.pack:
            out.rows = [pack_row(row) for row in out.rows]
        out.remember = list(pending.items())
        out.blob_hashes = sorted(blob_texts)
        out.blob_rows = [
            {"hash": h, "body_json": pack_text(blob_texts[h]) if self.pack else blob_texts[h]}
            for h in out.blob_hashes
        ]
        return out

    def committed(self, batch: PreparedBatch) -> None:
        """The batch is stored: remember its exchanges' items and its blobs."""
        for exchange_id, entry in batch.remember:
            self.recent.put(exchange_id, entry)
        self.known.add_all(batch.blob_hashes)


# -- reading -------------------------------------------------------------------------------------


def json_array_values(name: str, dialect: str) -> Select[Any]:
    """`SELECT value` of the strings in the JSON array text bound as `name`: one parameter
    however many strings, so the statement is compiled once and cached (an expanding IN list
    renders one placeholder per value at every execution). `json_each` on SQLite,
    `json_array_elements_text` on PostgreSQL."""
    param = bindparam(name, type_=String())
    if dialect == "postgresql":
        values = (
            func.json_array_elements_text(cast(param, JSON)).table_valued("value").render_derived()
        )
    else:
        values = func.json_each(param).table_valued("value")
    return select(values.c.value)


@functools.cache
def _lookups(dialect: str) -> tuple[Select[Any], Select[Any]]:
    """The two read statements of `rebuild_requests` for a dialect, built once: (the recursive
    chain of base exchanges of the ids bound as `ids`: `(id, request_base_id,
    request_refs_json)` rows; the parts of the hashes bound as `hashes`: `(hash, body_json)`)."""
    e = exchanges.c
    seed = select(e.id, BASE_ID, e.request_refs_json).where(
        e.id.in_(json_array_values("ids", dialect))
    )
    chain = seed.cte("chain", recursive=True)
    ancestor = exchanges.alias("ancestor")
    chain = chain.union(
        select(
            ancestor.c.id,
            _base_id(ancestor).label("request_base_id"),
            ancestor.c.request_refs_json,
        ).where(ancestor.c.id == chain.c.request_base_id)
    )
    hashes = json_array_values("hashes", dialect)
    if dialect == "sqlite":  # keys stored as their bytes (009): converted in SQL
        hashes = select(getattr(func, KEY_FUNCTION)(hashes.selected_columns[0]))
    parts = select(blobs.c.hash, blobs.c.body_json).where(blobs.c.hash.in_(hashes))
    return select(chain), parts


async def _ancestors(
    conn: AsyncConnection, base_ids: Sequence[str]
) -> dict[str, tuple[str | None, dict[str, Any] | None]]:
    """id -> (request_base_id, refs) of `base_ids` and of every exchange their chains name (one
    recursive query per LOOKUP_CHUNK ids)."""
    query = _lookups(conn.dialect.name)[0]
    found: dict[str, tuple[str | None, dict[str, Any] | None]] = {}
    for part in chunks(base_ids):
        # .all(): one fetchall, not a fetchone per row through the async adapter
        result = await conn.execute(query, {"ids": json_array(part)})
        found.update(chain_entries(result.all()))
    return found


async def _blob_texts(conn: AsyncConnection, hashes: Iterable[str]) -> dict[str, str]:
    """hash -> text of the stored parts among `hashes` (unpacked; a damaged one is left out)."""
    query = _lookups(conn.dialect.name)[1]
    found: dict[str, str] = {}
    for part in chunks(sorted(set(hashes))):
        blob_entries((await conn.execute(query, {"hashes": json_array(part)})).all(), found)
    return found


async def rebuild_requests(
    conn: AsyncConnection, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Give each row (dicts with the `REQUEST_COLUMNS` keys and `id`) its whole request body in
    `request_json`, in place; drop the `request_base_id` and `request_refs_json` keys. Returns
    `rows`.

    Two kinds of statements per call, whatever the number of rows (one per LOOKUP_CHUNK ids or
    hashes): the chains of base exchanges, then the parts. A body whose parts are missing (a
    damaged database) keeps its options (the array and tools `null`) and is logged; nothing
    raises for one bad row. Packed texts (`PACKED_COLUMNS`, on SQLite) are unpacked first
    (`unpack_row`), whichever columns the rows carry.
    """
    cut = cut_rows(rows)
    if not cut:
        return rows
    bases = bases_of(cut)
    lists = item_lists(await _ancestors(conn, bases)) if bases else {}
    items_of, wanted = wanted_parts(cut, lists)
    splice_rows(cut, items_of, await _blob_texts(conn, wanted))
    return rows


def sqlite_lookups() -> tuple[str, str, str, str]:
    """The statements of `rebuild_requests_sqlite` as SQL text for the standard library's
    sqlite3, one parameter each: `SqliteStatements.chains` and `.parts` (`rebuild_requests`'
    two: the JSON array of ids, then of hashes), `.trajectory_chains` (`(id, request_base_id,
    request_refs_json)` of every exchange of the trajectories whose ids are given, through the
    `(trajectory_id, step)` index) and `.parts_by_key` (`(hash, body_json)` of the
    distinct `KEY_BYTES`-byte keys given concatenated as one blob, in their order: each key cut
    out in SQL, no SQL function called per key)."""
    chain, parts = _lookups("sqlite")
    e = exchanges.c
    of_trajectories = select(e.id, BASE_ID, e.request_refs_json).where(
        e.trajectory_id.in_(json_array_values("ids", "sqlite"))
    )
    h = blobs.c
    # CROSS JOIN: SQLite keeps the keys as the outer loop, one index lookup each, in their order
    parts_by_key = (
        f"WITH RECURSIVE key_at(at) AS (SELECT 1 UNION ALL SELECT at + {KEY_BYTES} FROM key_at "
        f"WHERE at + {KEY_BYTES} <= length(?1)) "
        f"SELECT {blobs.name}.{h.hash.name}, {blobs.name}.{h.body_json.name} "
        f"FROM key_at CROSS JOIN {blobs.name} "
        f"ON {blobs.name}.{h.hash.name} = substr(?1, key_at.at, {KEY_BYTES})"
    )
    return sqlite_sql(chain), sqlite_sql(parts), sqlite_sql(of_trajectories), parts_by_key


def sqlite_sql(statement: Select[Any]) -> str:
    """The SQL text of `statement` for the standard library's sqlite3, whose only parameter is
    bound as `?` (raises ValueError for a statement with any other number of parameters)."""
    from sqlalchemy.dialects import sqlite

    compiled = statement.compile(
        dialect=sqlite.dialect(), compile_kwargs={"render_postcompile": True}
    )
    if len(compiled.positiontup or ()) != 1:
        raise ValueError("a direct SQLite statement takes exactly one parameter")
    return str(compiled)


# -- searching -----------------------------------------------------------------------------------


class StoredText(ColumnElement[str]):
    """SQL expression: the text of a `PACKED_COLUMNS` column, packed or not. SQLite:
    `understudy_text(column)`; PostgreSQL (never packed): the column itself."""

    inherit_cache = True
    type = Text()

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column


@compiles(StoredText)
def _stored_text_default(element: StoredText, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column, **kw))


@compiles(StoredText, "sqlite")
def _stored_text_sqlite(element: StoredText, compiler: Any, **kw: Any) -> str:
    return f"{STORED_TEXT_FUNCTION}({compiler.process(element.column, **kw)})"


def stored_text(column: ColumnElement[Any]) -> StoredText:
    """The text of a `PACKED_COLUMNS` column for SQL conditions (`LIKE`, `ILIKE`)."""
    return StoredText(column)


class RequestItemsLike(ColumnElement[bool]):
    """SQL condition: one of the items an exchange's request added (`request_refs_json`'s
    `items`: the new ones, or all when it has no base) has a JSON text containing `pattern`, case
    insensitively (`pattern`: a LIKE pattern escaped with a backslash). Every item of a
    trajectory is added by one of its exchanges, so testing each exchange's own items finds any
    text of the conversation. Compiled per dialect: `json_each` on SQLite,
    `json_array_elements_text` on PostgreSQL; each item a primary-key lookup in `blobs`."""

    inherit_cache = True
    type = Boolean()

    def __init__(self, refs: ColumnElement[Any], pattern: str) -> None:
        self.refs = refs
        self.pattern = literal(pattern)
        self.escape = literal("\\")


@compiles(RequestItemsLike, "sqlite")
def _items_like_sqlite(element: RequestItemsLike, compiler: Any, **kw: Any) -> str:
    refs = compiler.process(element.refs, **kw)
    pattern = compiler.process(element.pattern, **kw)
    escape = compiler.process(element.escape, **kw)
    return (  # references and parts may be packed (008): read through the stored-text function
        f"EXISTS (SELECT 1 FROM json_each({STORED_TEXT_FUNCTION}({refs}), '$.items') "
        f"AS request_item JOIN blobs ON blobs.hash = {KEY_FUNCTION}(request_item.value) "
        f"WHERE lower({STORED_TEXT_FUNCTION}(blobs.body_json)) LIKE lower({pattern}) "
        f"ESCAPE {escape})"
    )


@compiles(RequestItemsLike, "postgresql")
def _items_like_postgresql(element: RequestItemsLike, compiler: Any, **kw: Any) -> str:
    refs = compiler.process(element.refs, **kw)
    pattern = compiler.process(element.pattern, **kw)
    escape = compiler.process(element.escape, **kw)
    return (
        f"EXISTS (SELECT 1 FROM json_array_elements_text(CAST({refs} AS json) -> 'items') "
        "AS request_item (value) JOIN blobs ON blobs.hash = request_item.value "
        f"WHERE blobs.body_json ILIKE {pattern} ESCAPE {escape})"
    )
