"""Storage: schema, migrations and the one query layer for SQLite and PostgreSQL.

The names below are imported when first used, so that a module of this package that needs no
SQLAlchemy (`proxy.storage.rebuild`, which export worker processes read with) loads without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.storage.database import Database
    from proxy.storage.engine import DatabaseError, database_url, new_id, utc_now
    from proxy.storage.states import StateRef

__all__ = ["Database", "DatabaseError", "StateRef", "database_url", "new_id", "utc_now"]

_HOMES = {
    "Database": "proxy.storage.database",
    "DatabaseError": "proxy.storage.engine",
    "database_url": "proxy.storage.engine",
    "new_id": "proxy.storage.engine",
    "utc_now": "proxy.storage.engine",
    "StateRef": "proxy.storage.states",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
