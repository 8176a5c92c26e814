"""Reading request bodies straight from a SQLite file, as tests that open it with `sqlite3` do.

Since migration 003 an exchange row holds its request's options and references, the items and
tool lists living in `blobs` (`proxy.storage.bodies`), and since 008 SQLite stores those texts
packed (`proxy.core.packing`), since 009 a base that is the parent as '' and part hashes as
their bytes; `whole_requests` gives such rows their whole body back, with the
same functions the storage layer uses.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from proxy.core.bodies import splice_request
from proxy.core.packing import key_text, unpack_text
from proxy.storage.bodies import PARENT_BASE, WHOLE, item_lists, unpack_row


def whole_requests(db: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` (dicts read with `SELECT *` from `exchanges`) with `request_json` the whole body;
    the reference columns removed. Reads every reference and blob of the file (test sizes)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        try:
            chains = {
                exchange_id: (
                    parent if base == PARENT_BASE else base,
                    json.loads(refs) if refs not in (None, WHOLE) else None,
                )
                for exchange_id, parent, base, packed in conn.execute(
                    "SELECT id, parent_id, request_base_id, request_refs_json FROM exchanges"
                )
                for refs in [unpack_text(packed)]  # SQLite texts are packed (008)
            }
            texts = {
                key_text(blob_hash): unpack_text(text)  # 16-byte keys since 009
                for blob_hash, text in conn.execute("SELECT hash, body_json FROM blobs")
            }
        except sqlite3.OperationalError:  # not migrated to 003: bodies are whole
            return rows
    lists = item_lists(chains)
    for row in rows:
        unpack_row(row)
        refs_text = row.pop("request_refs_json", None)
        base = row.pop("request_base_id", None)
        if base == PARENT_BASE:
            base = row.get("parent_id")
        if refs_text in (None, WHOLE):
            continue
        refs = json.loads(refs_text)
        items = None
        if "items" in refs:
            prefix = lists.get(base) if base is not None else []
            items = [texts[h] for h in (prefix or []) + refs["items"]]
        tools = texts.get(refs["tools"]) if "tools" in refs else None
        row["request_json"] = splice_request(row["request_json"], refs, items, tools)
    return rows
