"""Request bodies read back whole: the half of `proxy.storage.bodies` that needs no SQLAlchemy.

`proxy.storage.bodies.rebuild_requests` (every reader, through the async engine) and
`SqliteRows` (an export worker process, through the standard library's sqlite3 on a read-only
connection) share what is here: unpacking a row's packed texts (`unpack_row`), parsing its
references, resolving the chains of base exchanges (`item_lists`) and splicing the parts back
(`proxy.core.bodies.splice_request`). Only the standard library, orjson and `proxy.core` are
imported (and `proxy.storage` imports its engine lazily), so a worker process that reads with
`SqliteRows` starts without SQLAlchemy. The SQL it runs is compiled by the caller from the
statements in `proxy.storage.bodies` / `proxy.storage.reading` (`SqliteStatements`).
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import orjson

from proxy.core import fastjson
from proxy.core.bodies import splice_request
from proxy.core.packing import (
    PACKED_REFS,
    key_text,
    refs_of_packed,
    register_sqlite_functions,
    stored_key,
    unpack_text,
)

__all__ = [
    "DEFERRED_TOOLS",
    "KEY_BYTES",
    "LOOKUP_CHUNK",
    "PACKED_COLUMNS",
    "PARENT_BASE",
    "USAGE_OF_RESPONSE",
    "WHOLE",
    "CutRow",
    "SqliteRows",
    "SqliteStatements",
    "bases_of",
    "blob_entries",
    "chain_entries",
    "chunks",
    "cut_rows",
    "item_lists",
    "json_array",
    "rebuild_requests_sqlite",
    "splice_rows",
    "unpack_row",
    "usage_of",
    "wanted_parts",
]

log = logging.getLogger("understudy.storage")

PARENT_BASE: Final = ""
"""`request_base_id` of a row whose base is its parent (`parent_id`), as the writer stores it
since migration 009 (32 bytes less per row than the id again); `proxy.storage.bodies.BASE_ID`
reads either form."""

LOOKUP_CHUNK: Final = 10_000
"""Most ids or hashes sent in one lookup statement (as one JSON array parameter)."""

_PACKED_REFS: Final = bytes((PACKED_REFS,))
_REFS: Final = "request_refs_json"
_OPTIONS: Final = "request_json"
_OPTIONS_COLUMN: Final = (_OPTIONS,)
_REFS_COLUMN: Final = (_REFS,)

WHOLE: Final = "{}"
"""`request_refs_json` of a row whose `request_json` is the whole body (nothing was cut)."""

PACKED_COLUMNS: Final = (
    "request_json",
    "request_refs_json",
    "response_json",
    "error_json",
    "request_headers_json",
    "metadata_json",
    "usage_json",
    "injected_logit_bias_json",
    "shadow_response_json",
    "shadow_error_json",
    "request_hash",
)
"""The `exchanges` columns stored packed on SQLite (`proxy.core.packing`, migration 008), as is
`blobs.body_json`: JSON texts that SQL reads only through `stored_text` (the dashboard search,
`RequestItemsLike`), and `request_hash` (no query reads it; `state_hash`, looked up by value,
stays text). `request_json` only once cut (`request_refs_json` set: the 003 conversion reads
unconverted bodies as text). `usage_json` equal to the answer's `usage` is stored as
`USAGE_OF_RESPONSE` (`pack_row`)."""

USAGE_OF_RESPONSE: Final = b"\xff"
"""A packed `usage_json` meaning: `json.dumps` of the `usage` object of the row's `response_json`
(what the recorder writes for an answer that reports usage), derived by `unpack_row`."""


def usage_of(response_json: Any) -> str | None:
    """`json.dumps` of the `usage` object of an answer's JSON text (as `rows.exchange_row`
    writes `usage_json`), None when it has none."""
    if not isinstance(response_json, str):
        return None
    try:
        usage = fastjson.loads(response_json).get("usage")
    except (ValueError, RecursionError, AttributeError):
        return None
    return json.dumps(usage) if isinstance(usage, dict) else None


def unpack_row(row: dict[str, Any]) -> dict[str, Any]:
    """Unpack the packed values of `row`'s `PACKED_COLUMNS` in place (the one way a reader gets
    their text back; texts and NULL stay as they are); returns `row`. A value that cannot be
    unpacked (a damaged file) becomes None and is logged; nothing raises for one bad row.
    `USAGE_OF_RESPONSE` needs the row's `response_json` (select both, as `select(exchanges)`
    does); without it the usage reads as None."""
    _unpack_columns(row, PACKED_COLUMNS)
    if row.get("usage_json") == USAGE_OF_RESPONSE:
        row["usage_json"] = usage_of(row.get("response_json"))
    return row


def _unpack_columns(row: dict[str, Any], columns: Iterable[str]) -> None:
    """`unpack_row`'s unpacking (and logging) of `columns`, without the usage."""
    for column in columns:
        value = row.get(column)
        if value is None or value.__class__ is str:  # the quick test first: most are one of these
            continue
        if isinstance(value, bytes | bytearray | memoryview) and value != USAGE_OF_RESPONSE:
            try:
                row[column] = unpack_text(bytes(value))
            except ValueError as exc:
                log.warning("exchange %s: %s cannot be read (%s)", row.get("id"), column, exc)
                row[column] = None


def chunks(values: Sequence[str]) -> Iterable[list[str]]:
    """`values` in lists of at most `LOOKUP_CHUNK` (one lookup statement each)."""
    for start in range(0, len(values), LOOKUP_CHUNK):
        yield list(values[start : start + LOOKUP_CHUNK])


def _refs_of(text: Any) -> dict[str, Any] | None:
    """The parsed references of a row, None when its `request_json` is the whole body."""
    if isinstance(text, bytes) and text[:1] == _PACKED_REFS:  # binary (009): no text made
        return refs_of_packed(text) or None
    text = unpack_text(text)  # packed on SQLite (008)
    if text is None or text == WHOLE:
        return None
    value = orjson.loads(text)  # our own compact JSON of hash strings: orjson reads it exactly
    return value if isinstance(value, dict) and value else None


def _stored_refs_of(value: Any) -> dict[str, Any] | None:
    """`_refs_of`, each hash in the form `blobs.hash` stores it on SQLite (`stored_key`: the
    16 bytes of a binary reference are kept as they are, no hex text made)."""
    if value.__class__ is bytes and value[:1] == _PACKED_REFS:
        return refs_of_packed(value, hex_keys=False) or None
    refs = _refs_of(value)
    if refs is None:
        return None
    stored = dict(refs)
    if "items" in refs:
        stored["items"] = [stored_key(item_hash) for item_hash in refs["items"]]
    if "tools" in refs:
        stored["tools"] = stored_key(refs["tools"])
    return stored


def json_array(values: list[str]) -> str:
    """`values` as one JSON array text (the single parameter of a lookup statement)."""
    return orjson.dumps(values).decode()


def chain_entries(
    found_rows: Iterable[Sequence[Any]],
) -> dict[str, tuple[str | None, dict[str, Any] | None]]:
    """id -> (request_base_id, refs) of the `(id, request_base_id, request_refs_json)` rows of
    the chain statement."""
    return {exchange_id: (base_id, _refs_of(refs)) for exchange_id, base_id, refs in found_rows}


def blob_entries(found_rows: Iterable[Sequence[Any]], found: dict[str, str]) -> None:
    """Add the `(hash, body_json)` rows of the parts statement to `found`, unpacked (a damaged
    one is logged and left out)."""
    for key, text in found_rows:
        # the hash as its bytes on SQLite since 009 when read without `schema.HashKey`
        blob_hash = cast(str, key_text(key))
        try:
            found[blob_hash] = text if isinstance(text, str) else unpack_text(text) or ""
        except ValueError as exc:
            log.warning("request part %s cannot be read (%s)", blob_hash, exc)


def item_lists(
    chains: dict[str, tuple[str | None, dict[str, Any] | None]],
) -> dict[str, list[str] | None]:
    """id -> the full list of item hashes of each exchange in `chains` (None: a base is missing)."""
    resolved: dict[str, list[str] | None] = {}
    for start in chains:
        path: list[str] = []
        current: str | None = start
        while current is not None and current not in resolved:
            if current not in chains or current in path:
                break
            path.append(current)
            current = chains[current][0]
        prefix: list[str] | None
        if current is None:
            prefix = []
        elif current in resolved:
            prefix = resolved[current]
        else:  # a base that is not stored (or a cycle): these bodies cannot be rebuilt
            prefix = None
        for exchange_id in reversed(path):
            refs = chains[exchange_id][1] or {}
            if prefix is None or "items" not in refs:
                prefix = None if prefix is None else list(refs.get("items", []))
            else:
                prefix = prefix + list(refs["items"])
            resolved[exchange_id] = prefix
    return resolved


CutRow = tuple[dict[str, Any], dict[str, Any], str | None]
"""A row whose body was cut: (the row, its parsed references, its `request_base_id`)."""


def cut_rows(rows: list[dict[str, Any]]) -> list[CutRow]:
    """Unpack each row (`unpack_row`), pop its reference columns; the rows whose body was cut."""
    cut: list[CutRow] = []
    for row in rows:
        unpack_row(row)
        refs_text = row.pop("request_refs_json", None)
        base_id = row.pop("request_base_id", None)
        if base_id == PARENT_BASE:  # a row selected whole, not through BASE_ID
            base_id = row.get("parent_id")
        try:
            refs = _refs_of(refs_text)
        except ValueError:
            log.warning("exchange %s: unreadable request references", row.get("id"))
            continue
        if refs is not None:
            cut.append((row, refs, base_id))
    return cut


def bases_of(cut: list[CutRow]) -> list[str]:
    """The distinct base exchange ids of the cut rows, sorted."""
    return sorted({base_id for _, _, base_id in cut if base_id is not None})


def wanted_parts(
    cut: list[CutRow], lists: dict[str, list[str] | None]
) -> tuple[list[list[str] | None], set[str]]:
    """(the item hashes of each cut row, None when a base is missing; every part hash needed)."""
    wanted: set[str] = set()
    items_of: list[list[str] | None] = []
    for _row, refs, base_id in cut:
        items: list[str] | None = None
        if "items" in refs:
            prefix = lists.get(base_id) if base_id is not None else []
            items = None if prefix is None else [*prefix, *refs["items"]]
            if items:
                wanted.update(items)
        if "tools" in refs:
            wanted.add(refs["tools"])
        items_of.append(items)
    return items_of, wanted


DEFERRED_TOOLS: Final = "request_tools"
"""The key `SqliteRows(defer_tools=True)` adds to a chat row whose tool list it left out of
`request_json`: `(hash, text)` of the list, whose value belongs at the request's `tools`."""

_TOOLS_MEMBER: Final = re.compile(r'"tools"[ \t\n\r]*:[ \t\n\r]*\Z')
"""The text right before the `null` that stands for a cut tool list (as the client spaced it)."""


def splice_rows(
    cut: list[CutRow],
    items_of: list[list[str] | None],
    texts: dict[str, str],
    defer_tools: bool = False,
) -> None:
    """Put each cut row's whole body in its `request_json` (`proxy.core.bodies.splice_request`)
    from its item hashes (`items_of`, None: a base is missing) and the part texts by hash (hex
    texts, or keys as `blobs.hash` stores them: `rebuild_requests_sqlite`); a body that cannot
    be rebuilt keeps its options and is logged. defer_tools: see `rebuild_requests_sqlite`."""
    for (row, refs, _base_id), items in zip(cut, items_of, strict=True):
        try:
            item_texts = list(map(texts.__getitem__, items)) if items is not None else None
            tools_text = texts.get(refs["tools"]) if "tools" in refs else None
            options_json = row["request_json"]
            if (
                defer_tools
                and tools_text is not None
                and row.get("kind") != "responses"
                and _tools_placeholder(options_json, refs)
            ):
                # `tools` stays null in the text: the reader parses the list once per hash
                row[DEFERRED_TOOLS] = (key_text(refs["tools"]), tools_text)
                refs = {"at": refs["at"]} if "at" in refs else {}  # what is spliced
                tools_text = None
            row["request_json"] = splice_request(options_json, refs, item_texts, tools_text)
        except (KeyError, ValueError) as exc:
            row.pop(DEFERRED_TOOLS, None)
            if isinstance(exc, KeyError) and exc.args:  # a part missing: named by its hex text
                exc = KeyError(key_text(exc.args[0]))
            log.warning("exchange %s: request body cannot be rebuilt (%s)", row.get("id"), exc)


def _tools_placeholder(options_json: Any, refs: dict[str, Any]) -> bool:
    """Whether the tool list was cut from the body's top-level `tools` member (its `null` at
    `tools_at` right after the key), so that the value parsed from the rest holds `tools: None`
    in the list's place."""
    at = refs.get("tools_at")
    return (
        isinstance(at, int)
        and isinstance(options_json, str)
        and options_json.startswith("null", at)
        and (  # compact JSON (the usual case) needs no search
            (at >= 0 and options_json.endswith('"tools":', 0, at))
            or _TOOLS_MEMBER.search(options_json, max(0, at - 64), at) is not None
        )
    )


@dataclass(frozen=True)
class SqliteStatements:
    """The SQL texts `SqliteRows` runs, each with one parameter: `rows` (the export's columns
    of the exchanges whose ids are given as a JSON array text,
    `proxy.storage.reading.sqlite_row_statements`), `chains` (`(id, request_base_id,
    request_refs_json)` of the ids given as a JSON array text and of every base exchange their
    chains name), `parts` (`(hash, body_json)` of the part hashes given as a JSON array of hex
    texts), `trajectory_chains` (`(id, request_base_id, request_refs_json)` of every exchange of
    the trajectories whose ids are given as a JSON array text) and `parts_by_key` (`(hash,
    body_json)` of the distinct 16-byte part keys given as one blob, their concatenation, in
    that order).
    """

    rows: str
    chains: str
    parts: str
    trajectory_chains: str
    parts_by_key: str


KEY_BYTES: Final = 16
"""The size of a part's key as SQLite stores it (`blobs.hash`: a 16-byte BLAKE2b digest's bytes,
`proxy.core.packing.stored_key`), as `SqliteStatements.parts_by_key` reads the keys it is given."""


def rebuild_requests_sqlite(
    conn: sqlite3.Connection,
    rows: list[dict[str, Any]],
    statements: SqliteStatements,
    *,
    defer_tools: bool = False,
) -> list[dict[str, Any]]:
    """`proxy.storage.bodies.rebuild_requests` on a standard-library sqlite3 connection: the
    same result and logging. `rows` are those of one statement (the same columns).

    The base exchanges are looked up in the rows' own trajectories first
    (`statements.trajectory_chains`: one index range per trajectory, its exchanges stored side
    by side), then, for any base found elsewhere, as `rebuild_requests` does
    (`statements.chains`). Part hashes stay in the form `blobs.hash` stores them (16 bytes, no
    hex text made): the parts are looked up by those bytes (`statements.parts_by_key`), any key
    of another form as `rebuild_requests` does (`statements.parts`).

    defer_tools: a chat row's tool list, when it was stored as a part, is not spliced in: its
    `request_json` keeps `"tools":null` and the row gets `DEFERRED_TOOLS` = (hash, text) of the
    list instead (a reader that sees the same list in every row parses it once)."""
    cut = _cut_stored_rows(rows)
    if not cut:
        return rows
    chains: dict[str, tuple[str | None, dict[str, Any] | None]] = {}
    elsewhere = _bases_in_trajectories(conn, cut, statements.trajectory_chains, chains)
    for part in chunks(elsewhere):
        for exchange_id, base_id, refs in conn.execute(statements.chains, (json_array(part),)):
            chains[exchange_id] = (base_id, _stored_refs_of(refs))
    items_of, wanted = wanted_parts(cut, item_lists(chains) if chains else {})
    splice_rows(cut, items_of, _part_texts(conn, statements, wanted), defer_tools)
    return rows


def _cut_stored_rows(rows: list[dict[str, Any]]) -> list[CutRow]:
    """`cut_rows` (the same unpacking, logging and rows), the references' hashes as
    `blobs.hash` stores them (`_stored_refs_of`). Only the `PACKED_COLUMNS` the first row has
    are looked at (rows of one statement)."""
    if not rows:
        return []
    columns = [column for column in PACKED_COLUMNS if column in rows[0]]
    # unpack_row's order (its log lines come in it): the columns before the references, after
    refs_at = columns.index(_REFS) if _REFS in columns else len(columns)
    before, after = columns[:refs_at], columns[refs_at + 1 :]
    with_usage = "usage_json" in columns
    # The requests' options repeat (the same model and settings every call): each distinct
    # packed value is unpacked once.
    options = before[:1] == [_OPTIONS]
    if options:
        before = before[1:]
    options_texts: dict[bytes, str] = {}
    cut: list[CutRow] = []
    for row in rows:
        if options:
            packed = row.get(_OPTIONS)
            known = options_texts.get(packed) if packed.__class__ is bytes else None
            if known is not None:
                row[_OPTIONS] = known
            else:
                _unpack_columns(row, _OPTIONS_COLUMN)
                if packed.__class__ is bytes and row[_OPTIONS].__class__ is str:
                    options_texts[packed] = row[_OPTIONS]
        if before:
            _unpack_columns(row, before)
        value: Any = row.get(_REFS)
        refs: dict[str, Any] | None = None
        text = value.__class__ is not bytes or value[:1] != _PACKED_REFS
        if not text:  # binary references (009): parsed straight from their bytes
            try:
                refs = refs_of_packed(value, hex_keys=False)
            except ValueError as exc:
                log.warning("exchange %s: %s cannot be read (%s)", row.get("id"), _REFS, exc)
        else:  # a text, packed (008) or not
            _unpack_columns(row, _REFS_COLUMN)
        value = row.pop(_REFS, None)
        _unpack_columns(row, after)
        if with_usage and row.get("usage_json") == USAGE_OF_RESPONSE:
            row["usage_json"] = usage_of(row.get("response_json"))
        base_id = row.pop("request_base_id", None)
        if base_id == PARENT_BASE:  # a row selected whole, not through BASE_ID
            base_id = row.get("parent_id")
        if text:
            try:
                refs = _stored_refs_of(value)
            except ValueError:
                log.warning("exchange %s: unreadable request references", row.get("id"))
                continue
        if refs:
            cut.append((row, refs, base_id))
    return cut


def _part_texts(
    conn: sqlite3.Connection, statements: SqliteStatements, wanted: set[Any]
) -> dict[Any, str]:
    """key -> text of the stored parts among `wanted` (keys as `blobs.hash` stores them:
    `KEY_BYTES` bytes, or another key's text), unpacked; a damaged one is logged (by its hex)
    and left out."""
    keys = sorted(key for key in wanted if key.__class__ is bytes and len(key) == KEY_BYTES)
    others = (
        sorted(
            {
                cast(str, key_text(key))
                for key in wanted
                if key.__class__ is not bytes or len(key) != KEY_BYTES
            }
        )
        if len(keys) < len(wanted)
        else []
    )
    texts: dict[Any, str] = {}
    if keys:  # one statement, however many keys, its rows in the keys' order (as `parts` gives)
        _add_parts(conn.execute(statements.parts_by_key, (b"".join(keys),)).fetchall(), texts)
    for part in chunks(others):
        _add_parts(conn.execute(statements.parts, (json_array(part),)).fetchall(), texts)
    return texts


def _add_parts(found_rows: list[tuple[Any, Any]], texts: dict[Any, str]) -> None:
    """`blob_entries`, the hash kept as the driver gives it (`blobs.hash` as stored)."""
    for key, text in found_rows:
        if text.__class__ is str:
            texts[key] = text
            continue
        try:
            texts[key] = unpack_text(text) or ""
        except ValueError as exc:
            log.warning("request part %s cannot be read (%s)", key_text(key), exc)


def _bases_in_trajectories(
    conn: sqlite3.Connection,
    cut: list[CutRow],
    statement: str,
    chains: dict[str, tuple[str | None, dict[str, Any] | None]],
) -> list[str]:
    """Fill `chains` with the chains of the cut rows' bases found among the exchanges of the
    rows' trajectories (references as `_stored_refs_of` gives them); return the ids (sorted)
    where a chain leaves them: those are looked up by id."""
    trajectories = list(
        {
            trajectory_id
            for row, _, base_id in cut
            if base_id is not None and isinstance(trajectory_id := row.get("trajectory_id"), str)
        }
    )  # a row without the column: its bases are looked up by id
    stored: dict[str, tuple[str, str | None, Any]] = {}  # id -> (id, request_base_id, refs)
    for part in chunks(trajectories):
        found = conn.execute(statement, (json_array(part),)).fetchall()
        stored.update({exchange[0]: exchange for exchange in found})
    elsewhere: set[str] = set()
    for _row, _refs, current in cut:
        while current is not None and current not in chains:
            exchange = stored.get(current)
            if exchange is None:
                elsewhere.add(current)
                break
            current = exchange[1]
            chains[exchange[0]] = (current, _stored_refs_of(exchange[2]))
    return sorted(elsewhere)


class SqliteRows:
    """Export rows read by id straight from a SQLite file, with the standard library's sqlite3
    on a read-only connection (an export worker process: no event loop, no SQLAlchemy).

    `read(ids)` gives what `proxy.storage.reading.stream_batches` gives for the query
    `statements` were compiled from: dicts keyed by the same column names, request bodies whole,
    packed texts unpacked; in the order of `ids`, an id no longer stored left out. With
    `defer_tools`, chat rows' tool lists are left out of `request_json` as
    `rebuild_requests_sqlite` describes. Raises sqlite3.Error when the file cannot be opened or
    read.
    """

    def __init__(
        self, path: str | Path, statements: SqliteStatements, *, defer_tools: bool = False
    ) -> None:
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        register_sqlite_functions(self._conn)  # what the statements call, as on the engine's
        self._statements = statements
        self._defer_tools = defer_tools

    def read(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """The rows of `ids` (see the class docstring)."""
        cursor = self._conn.execute(self._statements.rows, (json_array(list(ids)),))
        keys = [str(column[0]) for column in cursor.description]
        at = keys.index("id")
        by_id = {row[at]: dict(zip(keys, row, strict=True)) for row in cursor.fetchall()}
        rows = [by_id[exchange_id] for exchange_id in ids if exchange_id in by_id]
        return rebuild_requests_sqlite(
            self._conn, rows, self._statements, defer_tools=self._defer_tools
        )

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()
