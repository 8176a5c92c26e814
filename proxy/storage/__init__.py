"""Storage: schema, migrations and the one query layer for SQLite and PostgreSQL."""

from proxy.storage.database import Database, DatabaseError, StateRef, database_url, new_id, utc_now

__all__ = ["Database", "DatabaseError", "StateRef", "database_url", "new_id", "utc_now"]
