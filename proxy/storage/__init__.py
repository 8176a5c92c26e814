"""Storage: schema, migrations and the one query layer for SQLite and PostgreSQL."""

from proxy.storage.database import Database
from proxy.storage.engine import DatabaseError, database_url, new_id, utc_now
from proxy.storage.states import StateRef

__all__ = ["Database", "DatabaseError", "StateRef", "database_url", "new_id", "utc_now"]
