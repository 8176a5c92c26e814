"""Stitching: which trajectory does a request continue?

A request continues the exchange whose state (request messages + response message) equals the
longest prefix of its messages that ends in an assistant message. No match: a new trajectory.
A match that already has a continuation: a fork (the trajectory then has several leaves). An
explicit id (`X-Understudy-Trajectory-Id` header or `metadata.trajectory_id`) wins over hashing.

States of recent exchanges are kept in memory (an LRU), so a request that arrives before the
previous exchange's batch is written still stitches; older states are found with one indexed
query on `exchanges.state_hash` and `choice_states.state_hash`. Every choice of an answer is a
state (`n > 1`: `ChatApi.remember` remembers each one), so continuing choice k links to its
exchange.

The Stitcher has two modes, chosen by the database (`Database.shared`):

- **local** (SQLite: one process owns the database). The in-memory LRU covers the gap until the
  recorder flushes; nothing is written on the request path.
- **shared** (PostgreSQL: replicas behind a load balancer). Step k can be answered by replica A
  and step k+1 reach replica B milliseconds later, before A's recorder has flushed. So
  `remember()` writes the state through to `conversation_states` (one autocommit upsert, awaited
  before the client gets the end of the answer) and `link()` looks there as well as in
  `exchanges`. `claim()` fixes an explicitly named trajectory's route with the primary key of
  `trajectories` (insert-or-ignore, then read the winner), so concurrent first requests on
  several replicas agree on one route. A hash-stitched new trajectory needs no claim: its id is
  fresh and random, and no other replica can reach it before `remember()` has written its
  route along with its first state.

Both modes fail open: a database error on the request path is logged and counted
(`db_errors`), and the request goes on as if nothing were found (or, for `claim`, with its own
route decision); it never fails the call.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.core import responses as items_core
from proxy.core.canonical import (
    CanonicalCache,
    canonical_bytes,
    continuation_candidates,
    prefix_hashes,
)
from proxy.core.redaction import loggable_error
from proxy.storage import Database, StateRef, new_id

log = logging.getLogger("understudy.stitching")

TRAJECTORY_HEADER = "x-understudy-trajectory-id"
MAX_TRAJECTORY_ID_LENGTH = 200


@dataclass(frozen=True)
class Link:
    """Where a new request belongs.

    trajectory_id: existing or new id. parent: the exchange it continues, or None. step: 0 for a
    trajectory's first exchange. route: the trajectory's route when it already exists, else None
    (the caller decides, then calls `Stitcher.claim`); shadow: the trajectory's shadow flag.
    new_trajectory: no exchange of this trajectory is known yet. id_source: 'hash', 'header' or
    'metadata'. request_hash: rolling hash of all request messages ("" for no messages).
    """

    trajectory_id: str
    parent: StateRef | None
    step: int
    route: str | None
    shadow: bool
    new_trajectory: bool
    id_source: str
    request_hash: str
    # Responses API: the items inherited through `previous_response_id` (rebuilt from records),
    # and whether a named parent was unknown here (the trajectory's history is truncated).
    context: tuple[Any, ...] = ()
    truncated: bool = False


class StateStore(Protocol):
    """Where a Stitcher publishes states, finds them and fixes routes: the mode's database side.

    mode: 'local' or 'shared'. writes: database writes made so far (write-throughs and claims).
    """

    mode: str
    writes: int

    async def publish(self, state_hash: str, ref: StateRef) -> None:
        """Make `state_hash -> ref` findable by the other processes on the database."""

    async def find(
        self, state_hashes: Sequence[str], trajectory_id: str | None
    ) -> dict[str, StateRef]:
        """The latest known exchange for each hash found (see `Database.find_states`)."""
        ...

    async def route_of(self, trajectory_id: str) -> tuple[str, bool] | None:
        """(route, shadow) of a known trajectory, or None."""
        ...

    async def claim(
        self, trajectory_id: str, id_source: str, route: str, shadow: bool
    ) -> tuple[str, bool]:
        """Fix a new trajectory's route; return the (route, shadow) that holds."""
        ...


class LocalStates:
    """One process owns the database: states live in memory until the recorder writes them."""

    mode = "local"

    def __init__(self, db: Database) -> None:
        self._db = db
        self.writes = 0

    async def publish(self, state_hash: str, ref: StateRef) -> None:
        """Nothing to write: the Stitcher's LRU covers this process until the batch is flushed."""

    async def find(
        self, state_hashes: Sequence[str], trajectory_id: str | None
    ) -> dict[str, StateRef]:
        return await self._db.find_states(state_hashes, trajectory_id)

    async def route_of(self, trajectory_id: str) -> tuple[str, bool] | None:
        return await self._db.trajectory_route(trajectory_id)

    async def claim(
        self, trajectory_id: str, id_source: str, route: str, shadow: bool
    ) -> tuple[str, bool]:
        """No other writer can race this process: its own decision holds."""
        return route, shadow


class SharedStates:
    """Several processes write the database: states and explicit routes are written through."""

    mode = "shared"

    def __init__(self, db: Database) -> None:
        self._db = db
        self.writes = 0

    async def publish(self, state_hash: str, ref: StateRef) -> None:
        """One upsert into `conversation_states`, committed when this returns."""
        self.writes += 1
        await self._db.remember_state(state_hash, ref)

    async def find(
        self, state_hashes: Sequence[str], trajectory_id: str | None
    ) -> dict[str, StateRef]:
        return await self._db.find_states(state_hashes, trajectory_id, include_pending=True)

    async def route_of(self, trajectory_id: str) -> tuple[str, bool] | None:
        return await self._db.trajectory_route(trajectory_id)

    async def claim(
        self, trajectory_id: str, id_source: str, route: str, shadow: bool
    ) -> tuple[str, bool]:
        """An explicit id can be sent to several replicas at once: the primary key decides.

        A hash-stitched id is fresh and random (`new_id`), so nobody else can hold it: no write.
        """
        if id_source == "hash":
            return route, shadow
        self.writes += 1
        return await self._db.claim_trajectory(
            trajectory_id, id_source=id_source, route=route, shadow=shadow
        )


class Stitcher:
    """Links requests to trajectories. `link()` on the request path, `remember()` once answered.

    mode: 'local' or 'shared' (see the module docstring), chosen by `Database.shared`.
    Counters: cache_hits, db_lookups (reads), db_writes (write-throughs and claims), db_errors
    (request-path database errors, failed open).
    """

    def __init__(self, db: Database, cache_size: int = 100_000) -> None:
        self._db = db
        self._store: StateStore = SharedStates(db) if db.shared else LocalStates(db)
        self._cache_size = cache_size
        self._states: OrderedDict[str, StateRef] = OrderedDict()
        self._routes: OrderedDict[str, tuple[str, bool]] = OrderedDict()  # id -> (route, shadow)
        # Responses API: response id -> (exchange, the items a continuation inherits), and
        # recorded item id (msg_, fc_, rs_) -> item, for `item_reference`.
        self._responses: OrderedDict[str, tuple[StateRef, tuple[Any, ...]]] = OrderedDict()
        self._items: OrderedDict[str, Any] = OrderedDict()
        # Background responses (`background: true`) whose answer is still to come: response id
        # -> the in-flight exchange, recorded when the answer is retrieved (or at shutdown).
        self._awaiting: OrderedDict[str, Any] = OrderedDict()
        # Canonical bytes of the messages and items resent at every step, hashed once each.
        self.message_bytes = CanonicalCache(canonical_bytes)
        self.item_bytes = CanonicalCache(items_core.item_bytes)
        self.cache_hits = 0
        self.db_lookups = 0
        self.db_errors = 0

    @property
    def mode(self) -> str:
        """'local' (SQLite, one process) or 'shared' (PostgreSQL, replicas)."""
        return self._store.mode

    @property
    def db_writes(self) -> int:
        """Database writes on the request path so far (0 in local mode)."""
        return self._store.writes

    def _failed(self, action: str, exc: Exception) -> None:
        self.db_errors += 1
        log.warning("stitching: %s failed, going on without it (%s)", action, loggable_error(exc))

    async def claim(self, link: Link, route: str, shadow: bool) -> tuple[str, bool]:
        """Fix the route of a new trajectory; return the (route, shadow) that holds for it.

        Call once for a `link` with `new_trajectory`, with the route the caller decided, and use
        the answer: in shared mode another replica may have claimed the same explicit id first,
        and its route wins. Later requests of the trajectory find the route through `link()`.
        """
        try:
            held = await self._store.claim(link.trajectory_id, link.id_source, route, shadow)
        except Exception as exc:
            self._failed(f"claiming trajectory {link.trajectory_id!r}", exc)
            held = (route, shadow)
        self.remember_route(link.trajectory_id, *held)
        return held

    async def remember(self, state_hash: str, ref: StateRef) -> None:
        """Record that `ref`'s exchange produced `state_hash`.

        Awaited before the client receives the end of the answer, so its next request stitches:
        in memory always; in shared mode also in the database, committed before this returns
        (one round trip), so the next request stitches on whichever replica it reaches.
        """
        self._remember_local(state_hash, ref)
        try:
            await self._store.publish(state_hash, ref)
        except Exception as exc:
            self._failed(f"writing state of exchange {ref.exchange_id}", exc)

    def _remember_local(self, state_hash: str, ref: StateRef) -> None:
        if self._cache_size <= 0:
            return
        self._states[state_hash] = ref
        self._states.move_to_end(state_hash)
        if len(self._states) > self._cache_size:
            self._states.popitem(last=False)
        self.remember_route(ref.trajectory_id, ref.route, ref.shadow)

    def remember_route(self, trajectory_id: str, route: str, shadow: bool = False) -> None:
        """Record a trajectory's route and shadow flag in memory (its first exchange decided them)."""
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
        # Longer prefixes than the cache hit may have been answered elsewhere (another replica,
        # or before this process started): one indexed query for them.
        longer = candidates[:hit_at]
        if longer:
            self.db_lookups += 1
            try:
                found = await self._store.find(longer, trajectory_id)
            except Exception as exc:
                self._failed("looking up conversation states", exc)
                found = {}
            for state_hash in longer:
                if state_hash in found:
                    return found[state_hash]
        if hit is not None:
            self.cache_hits += 1
        return hit

    async def _known_route(self, trajectory_id: str) -> tuple[str, bool] | None:
        known = self._routes.get(trajectory_id)
        if known is not None:
            return known
        self.db_lookups += 1
        try:
            return await self._store.route_of(trajectory_id)
        except Exception as exc:
            self._failed(f"reading the route of trajectory {trajectory_id!r}", exc)
            return None

    async def link(
        self, messages: Sequence[Any], explicit_id: str | None = None, id_source: str = "hash"
    ) -> Link:
        """Find the trajectory and parent exchange for a request's `messages`.

        explicit_id: a client-chosen trajectory id (then only that trajectory's exchanges can be
        the parent). Reads the database at most twice; never scans.
        """
        hashes = prefix_hashes(messages, self.message_bytes)
        request_hash = hashes[-1] if hashes else ""
        candidates = continuation_candidates(messages, hashes)
        parent = await self._find_parent(candidates, explicit_id) if candidates else None
        if parent is not None:
            return _continuing(parent, explicit_id, id_source, request_hash)
        return await self._new_or_explicit(explicit_id, id_source, request_hash)

    # -- Responses API -------------------------------------------------------------------------

    def _put(self, cache: OrderedDict[str, Any], key: str, value: Any) -> None:
        if self._cache_size <= 0:
            return
        cache[key] = value
        cache.move_to_end(key)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    def known_items(self) -> dict[str, Any]:
        """Recorded items by id (`msg_`, `fc_`, `rs_`, ...) that `item_reference` can name."""
        return dict(self._items)

    async def remember_response(
        self, response_id: str, ref: StateRef, inherited: Sequence[Any]
    ) -> None:
        """Record that `ref`'s exchange produced response `response_id`, whose continuation
        (a request naming it as `previous_response_id`) inherits `inherited` items. In shared
        mode the id is also written through, as a state, for the other replicas."""
        self._put(self._responses, response_id, (ref, tuple(inherited)))
        for item_id, item in items_core.items_by_id(inherited).items():
            self._put(self._items, item_id, item)
        try:
            if self.mode == "shared":
                await self._store.publish(items_core.response_key(response_id), ref)
        except Exception as exc:
            self._failed(f"writing response id of exchange {ref.exchange_id}", exc)

    async def _find_response(
        self, response_id: str
    ) -> tuple[StateRef | None, tuple[Any, ...] | None]:
        """The exchange that produced `response_id`, and its inherited items when known here."""
        cached = self._responses.get(response_id)
        if cached is not None:
            self.cache_hits += 1
            return cached
        self.db_lookups += 1
        try:
            found = None
            if self.mode == "shared":
                key = items_core.response_key(response_id)
                found = (await self._store.find([key], None)).get(key)
            if found is None:
                found = await self._db.find_response(response_id)
            if found is None:
                return None, None
            rows = await self._db.exchanges_of(found.trajectory_id)
        except Exception as exc:
            self._failed(f"looking up response {response_id!r}", exc)
            return None, None
        recorded = {row["id"]: items_core.recorded_exchange(row) for row in rows}
        target = recorded.get(found.exchange_id)
        if target is None:  # written through by another replica, its rows not flushed yet
            return found, None
        context, _truncated = items_core.rebuild_context(recorded, found.exchange_id)
        inherited = items_core.inherited_items(context, target["request"], target["response"])
        return found, tuple(inherited)

    async def link_responses(
        self, body: dict[str, Any], explicit_id: str | None = None, id_source: str = "hash"
    ) -> Link:
        """Find the trajectory and parent exchange of a Responses API request `body`.

        `previous_response_id` is an explicit parent link: the parent is the exchange that
        produced that response (in memory, else one indexed query plus one read of its
        trajectory to rebuild the history); an unknown parent gives a new trajectory marked
        `truncated`. Without it, the request's items (instructions first, `item_reference`s
        resolved through recorded items) stitch by prefix hashing, as chat messages do.
        An explicit trajectory id wins: a parent of another trajectory is not taken.
        """
        previous = items_core.previous_response_id(body)
        known = self.known_items()
        if previous is not None:
            parent, inherited = await self._find_response(previous)
            if (
                parent is not None
                and explicit_id is not None
                and parent.trajectory_id != explicit_id
            ):
                parent = None
            context = inherited or ()
            own, _ = items_core.resolve_references(items_core.input_items(body), known)
            items = items_core.conversation_items({**body, "input": own}, context)
            hashes = items_core.prefix_hashes(items, self.item_bytes)
            request_hash = hashes[-1] if hashes else ""
            if parent is not None:
                return _continuing(parent, explicit_id, id_source, request_hash, context)
            link = await self._new_or_explicit(explicit_id, id_source, request_hash)
            return Link(**{**link.__dict__, "truncated": True})
        resolved, _ = items_core.resolve_references(items_core.input_items(body), known)
        items = items_core.conversation_items({**body, "input": resolved})
        hashes = items_core.prefix_hashes(items, self.item_bytes)
        request_hash = hashes[-1] if hashes else ""
        candidates = items_core.continuation_candidates(items, hashes)
        parent = await self._find_parent(candidates, explicit_id) if candidates else None
        if parent is not None:
            return _continuing(parent, explicit_id, id_source, request_hash)
        return await self._new_or_explicit(explicit_id, id_source, request_hash)

    async def _new_or_explicit(
        self, explicit_id: str | None, id_source: str, request_hash: str
    ) -> Link:
        if explicit_id is not None:
            known = await self._known_route(explicit_id)
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

    # -- background responses ------------------------------------------------------------------

    MAX_AWAITING = 10_000

    def await_answer(self, response_id: str, exchange: Any) -> list[Any]:
        """Keep `exchange` until its background answer is retrieved. Returns exchanges pushed
        out (over MAX_AWAITING, oldest first): the caller records them as they are."""
        self._awaiting[response_id] = exchange
        out = []
        while len(self._awaiting) > self.MAX_AWAITING:
            out.append(self._awaiting.popitem(last=False)[1])
        return out

    def awaiting(self, response_id: str) -> Any:
        """The exchange waiting for background response `response_id`, or None."""
        return self._awaiting.get(response_id)

    def answered_later(self, response_id: str) -> Any:
        """Stop waiting for `response_id`; return its exchange (None when not waiting)."""
        return self._awaiting.pop(response_id, None)

    def drain_awaiting(self) -> list[Any]:
        """Every exchange still waiting (shutdown: they are recorded as they are)."""
        out = list(self._awaiting.values())
        self._awaiting.clear()
        return out


def _continuing(
    parent: StateRef,
    explicit_id: str | None,
    id_source: str,
    request_hash: str,
    context: tuple[Any, ...] = (),
) -> Link:
    """The link of a request that continues `parent`'s exchange: same trajectory, next step,
    the trajectory's route; `context` is the rebuilt history of a Responses request, if any."""
    return Link(
        trajectory_id=parent.trajectory_id,
        parent=parent,
        step=parent.step + 1,
        route=parent.route,
        shadow=parent.shadow,
        new_trajectory=False,
        id_source=id_source if explicit_id else "hash",
        request_hash=request_hash,
        context=context,
    )
