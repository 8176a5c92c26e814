"""`SizedMemo`: a dict of recent results with a budget in bytes, for the request path's caches.

Emptied whole when an entry would take it past its budget (no per-lookup bookkeeping: a lookup
is one `dict.get`, which matters on the event loop, where an agent's resent history makes
hundreds of lookups per request). The entries that matter (a system prompt, a tool list, the
history of the conversations in flight) come back at their next use.
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class SizedMemo(Generic[K, V]):
    """Results by key, at most `limit_bytes` of them by the sizes given to `put`.

    get(key): the value or None. put(key, value, size): remember it unless it is known already
    or `size` alone is over the budget; empties the memo first when the entry would not fit.
    Not thread-safe.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._entries: dict[K, V] = {}
        self._bytes = 0
        self.get = self._entries.get

    def put(self, key: K, value: V, size: int) -> None:
        if size > self.limit_bytes or key in self._entries:
            return
        if self._bytes + size > self.limit_bytes:
            self._entries.clear()
            self._bytes = 0
        self._bytes += size
        self._entries[key] = value

    def __len__(self) -> int:
        return len(self._entries)
