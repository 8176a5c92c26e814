"""Stitching: which trajectory does a request continue?

A request continues the exchange whose state (request messages + response message) equals the
longest prefix of its messages that ends in an assistant message. No match: a new trajectory.
A match that already has a continuation: a fork (the trajectory then has several leaves). An
explicit id (`X-Understudy-Trajectory-Id` header or `metadata.trajectory_id`) wins over hashing.

States of recent exchanges are kept in memory (an LRU), so a request that arrives before the
previous exchange's batch is written still stitches; older states are found with one indexed
query on `exchanges.state_hash`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.canonical import continuation_candidates, prefix_hashes
from proxy.storage import Database, StateRef, new_id

TRAJECTORY_HEADER = "x-understudy-trajectory-id"
MAX_TRAJECTORY_ID_LENGTH = 200


@dataclass(frozen=True)
class Link:
    """Where a new request belongs.

    trajectory_id: existing or new id. parent: the exchange it continues, or None. step: 0 for a
    trajectory's first exchange. route: the trajectory's route when it already exists, else None
    (the caller decides); shadow: the trajectory's shadow flag. new_trajectory: no exchange of this trajectory is known yet.
    request_hash: rolling hash of all request messages ("" for no messages).
    """

    trajectory_id: str
    parent: StateRef | None
    step: int
    route: str | None
    shadow: bool
    new_trajectory: bool
    id_source: str
    request_hash: str


class Stitcher:
    """Links requests to trajectories. `link()` on the request path, `remember()` once answered."""

    def __init__(self, db: Database, cache_size: int = 100_000) -> None:
        self._db = db
        self._cache_size = cache_size
        self._states: OrderedDict[str, StateRef] = OrderedDict()
        self._routes: OrderedDict[str, tuple[str, bool]] = OrderedDict()  # id -> (route, shadow)
        self.cache_hits = 0
        self.db_lookups = 0

    async def claim(self, link: Link, route: str, shadow: bool) -> tuple[str, bool]:
        """Fix the route of a new trajectory; return the (route, shadow) that holds for it.

        Call once for a `link` with `new_trajectory`; later requests of the trajectory find the
        route through `link()`.
        """
        self.remember_route(link.trajectory_id, route, shadow)
        return route, shadow

    async def remember(self, state_hash: str, ref: StateRef) -> None:
        """Record that `ref`'s exchange produced `state_hash`.

        Awaited before the client receives the end of the answer, so its next request stitches.
        """
        self._remember_local(state_hash, ref)

    def _remember_local(self, state_hash: str, ref: StateRef) -> None:
        if self._cache_size <= 0:
            return
        self._states[state_hash] = ref
        self._states.move_to_end(state_hash)
        if len(self._states) > self._cache_size:
            self._states.popitem(last=False)
        self.remember_route(ref.trajectory_id, ref.route, ref.shadow)

    def remember_route(self, trajectory_id: str, route: str, shadow: bool = False) -> None:
        """Record a trajectory's route and shadow flag (its first exchange decided them)."""
        if self._cache_size <= 0:
            return
        self._routes[trajectory_id] = (route, shadow)
        self._routes.move_to_end(trajectory_id)
        if len(self._routes) > self._cache_size:
            self._routes.popitem(last=False)

    async def _find_parent(
        self, candidates: Sequence[str], trajectory_id: str | None
    ) -> StateRef | None:
        hit_at = len(candidates)
        hit: StateRef | None = None
        for position, state_hash in enumerate(candidates):
            ref = self._states.get(state_hash)
            if ref is not None and (trajectory_id is None or ref.trajectory_id == trajectory_id):
                hit_at, hit = position, ref
                break
        longer = candidates[:hit_at]
        if longer:
            self.db_lookups += 1
            found = await self._db.find_states(longer, trajectory_id)
            for state_hash in longer:
                if state_hash in found:
                    return found[state_hash]
        if hit is not None:
            self.cache_hits += 1
        return hit

    async def link(
        self, messages: Sequence[Any], explicit_id: str | None = None, id_source: str = "hash"
    ) -> Link:
        """Find the trajectory and parent exchange for a request's `messages`.

        explicit_id: a client-chosen trajectory id (then only that trajectory's exchanges can be
        the parent). Reads the database at most twice; never scans.
        """
        hashes = prefix_hashes(messages)
        request_hash = hashes[-1] if hashes else ""
        candidates = continuation_candidates(messages, hashes)
        parent = await self._find_parent(candidates, explicit_id) if candidates else None
        if parent is not None:
            return Link(
                trajectory_id=parent.trajectory_id,
                parent=parent,
                step=parent.step + 1,
                route=parent.route,
                shadow=parent.shadow,
                new_trajectory=False,
                id_source=id_source if explicit_id else "hash",
                request_hash=request_hash,
            )
        if explicit_id is not None:
            known = self._routes.get(explicit_id)
            if known is None:
                self.db_lookups += 1
                known = await self._db.trajectory_route(explicit_id)
            return Link(
                trajectory_id=explicit_id,
                parent=None,
                step=0,
                route=known[0] if known else None,
                shadow=known[1] if known else False,
                new_trajectory=known is None,
                id_source=id_source,
                request_hash=request_hash,
            )
        return Link(
            trajectory_id=new_id(),
            parent=None,
            step=0,
            route=None,
            shadow=False,
            new_trajectory=True,
            id_source="hash",
            request_hash=request_hash,
        )
