"""Stitching (`proxy.recording.stitching.Stitcher`) over a real SQLite `Database` file.

Each test plays the request path as `proxy.http.chat` does: `link()` a request's messages, build the
exchange record, `remember()` its state, write the row with `Database.write_exchanges`. Covered: linking through the in-memory
cache and through the database (a fresh Stitcher on the same file, as after a restart), the
longest assistant-ended prefix winning, forks (two continuations of one state, two leaves),
echoed SDK objects still linking, explicit ids (header / metadata) and their routes, and cache
eviction falling back to one indexed query.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletionMessage

from proxy.core.canonical import chain_hash, prefix_hashes
from proxy.recording.recorder import ExchangeRecord
from proxy.recording.stitching import Link, Stitcher
from proxy.storage import Database, StateRef, new_id, utc_now
from tests.support.records import recorded_exchanges, recorded_trajectories

SYSTEM = {"role": "system", "content": "You are a travel agent."}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def call(call_id: str, name: str, arguments: str = '{"city": "Paris"}') -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        ],
    }


def result(call_id: str, text: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def answer(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


class Recorded:
    """The exchanges one test produced, in order, with the links they got."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.records: list[ExchangeRecord] = []
        self.links: list[Link] = []

    async def exchange(
        self,
        stitcher: Stitcher,
        messages: list[dict[str, Any]],
        response: dict[str, Any],
        *,
        explicit_id: str | None = None,
        id_source: str = "hash",
        route: str = "student",
        write: bool = True,
    ) -> ExchangeRecord:
        """One proxied call: link, remember the new state, then (optionally) write the row."""
        link = await stitcher.link(messages, explicit_id, id_source)
        record = ExchangeRecord(
            id=new_id(),
            trajectory_id=link.trajectory_id,
            parent_id=link.parent.exchange_id if link.parent else None,
            step=link.step,
            new_trajectory=link.new_trajectory,
            id_source=link.id_source,
            route=link.route or route,
            shadow=link.shadow,
            started_utc=utc_now(),
            path="/v1/chat/completions",
            stream=False,
            request={"model": "gpt-4.1-mini", "messages": messages},
            request_text=json.dumps({"model": "gpt-4.1-mini", "messages": messages}),
            request_hash=link.request_hash,
            status_code=200,
            response={
                "id": "chatcmpl-x",
                "object": "chat.completion",
                "model": "gpt-4.1-mini",
                "choices": [{"index": 0, "message": response, "finish_reason": "stop"}],
            },
        )
        record.state_hash = chain_hash(link.request_hash, response)
        await stitcher.remember(
            record.state_hash,
            StateRef(record.id, record.trajectory_id, record.step, record.route, record.shadow),
        )
        if link.new_trajectory:
            stitcher.remember_route(record.trajectory_id, record.route, record.shadow)
        if write:
            row = record.to_row()
            trajectory = {
                "id": record.trajectory_id,
                "created_utc": record.started_utc,
                "updated_utc": record.started_utc,
                "id_source": record.id_source,
                "route": record.route,
                "shadow": record.shadow,
                "exchange_count": 1,
                "error_count": 0,
                "tool_call_count": row["tool_call_count"],
                "prompt_tokens": 0,
                "completion_tokens": 0,
            }
            await self.db.write_exchanges([row], [trajectory])
        self.records.append(record)
        self.links.append(link)
        return record


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(str(tmp_path / "stitch.db"))
    yield database
    await database.close()


async def three_step_conversation(
    rec: Recorded, stitcher: Stitcher, **kwargs: Any
) -> tuple[list[ExchangeRecord], list[dict[str, Any]]]:
    """system, user -> call A -> result -> call B -> result -> answer; returns records and messages."""
    messages = [SYSTEM, user("Plan a day in Paris")]
    r0 = await rec.exchange(stitcher, messages, call("call_a", "weather"), **kwargs)
    messages = [*messages, call("call_a", "weather"), result("call_a", "sunny")]
    r1 = await rec.exchange(stitcher, messages, call("call_b", "museums"), **kwargs)
    messages = [*messages, call("call_b", "museums"), result("call_b", "Louvre")]
    r2 = await rec.exchange(stitcher, messages, answer("Go to the Louvre."), **kwargs)
    return [r0, r1, r2], [*messages, answer("Go to the Louvre.")]


def assert_chain(records: list[ExchangeRecord]) -> None:
    assert len({r.trajectory_id for r in records}) == 1
    assert [r.step for r in records] == list(range(len(records)))
    assert records[0].parent_id is None
    for parent, child in zip(records, records[1:], strict=False):
        assert child.parent_id == parent.id


async def test_first_request_starts_a_new_trajectory(db: Database) -> None:
    stitcher = Stitcher(db)
    messages = [SYSTEM, user("hi")]
    link = await stitcher.link(messages)
    assert link.new_trajectory
    assert link.parent is None
    assert link.step == 0
    assert link.route is None
    assert link.id_source == "hash"
    assert link.request_hash == prefix_hashes(messages)[-1]
    assert len(link.trajectory_id) == 32
    # no assistant message: nothing to look up, not even the database
    assert stitcher.db_lookups == 0
    again = await stitcher.link(messages)
    assert again.trajectory_id != link.trajectory_id


async def test_steps_link_through_the_cache(db: Database) -> None:
    stitcher = Stitcher(db)
    rec = Recorded(db)
    records, _ = await three_step_conversation(rec, stitcher, write=False)
    assert_chain(records)
    assert [link.new_trajectory for link in rec.links] == [True, False, False]
    assert stitcher.cache_hits == 2
    assert stitcher.db_lookups == 0


async def test_steps_link_through_the_database_after_a_restart(
    db: Database, tmp_path: Path
) -> None:
    rec = Recorded(db)
    messages = [SYSTEM, user("Plan a day in Paris")]
    r0 = await rec.exchange(Stitcher(db), messages, call("call_a", "weather"), route="teacher")
    await db.close()

    reopened = await Database.open(str(tmp_path / "stitch.db"))
    try:
        fresh = Stitcher(reopened)
        rec.db = reopened
        step1 = [*messages, call("call_a", "weather"), result("call_a", "sunny")]
        r1 = await rec.exchange(fresh, step1, answer("Sunny: walk."))
        assert fresh.db_lookups == 1
        assert fresh.cache_hits == 0
        assert_chain([r0, r1])
        assert rec.links[1].route == "teacher"  # the trajectory keeps its first route
        assert r1.route == "teacher"
    finally:
        await reopened.close()

    rows = [
        (r["id"], r["parent_id"], r["step"], r["route"])
        for r in recorded_exchanges(tmp_path / "stitch.db")
    ]
    traj = [
        (t["id"], t["exchange_count"], t["route"])
        for t in recorded_trajectories(tmp_path / "stitch.db")
    ]
    assert rows == [(r0.id, None, 0, "teacher"), (r1.id, r0.id, 1, "teacher")]
    assert traj == [(r0.trajectory_id, 2, "teacher")]


async def test_longest_prefix_wins_in_cache_and_in_database(db: Database) -> None:
    rec = Recorded(db)
    records, _ = await three_step_conversation(rec, Stitcher(db))
    assert_chain(records)
    # the last request holds both earlier states; a fresh stitcher must pick the later one
    fresh = Stitcher(db)
    link = await fresh.link(rec.records[2].request["messages"])
    assert link.parent is not None
    assert link.parent.exchange_id == records[1].id
    assert link.step == 2


async def test_longer_state_in_database_beats_shorter_state_in_cache(db: Database) -> None:
    rec = Recorded(db)
    records, _ = await three_step_conversation(rec, Stitcher(db))
    stitcher = Stitcher(db)
    # this stitcher only knows step 0's state in memory; step 1's is only in the database
    await stitcher.remember(
        records[0].state_hash or "", StateRef(records[0].id, records[0].trajectory_id, 0, "student")
    )
    link = await stitcher.link(records[2].request["messages"])
    assert link.parent is not None and link.parent.exchange_id == records[1].id
    assert stitcher.db_lookups == 1


async def test_fork_two_continuations_of_one_state(db: Database) -> None:
    stitcher = Stitcher(db)
    rec = Recorded(db)
    base = [SYSTEM, user("Weather?")]
    r0 = await rec.exchange(stitcher, base, call("call_a", "weather"))
    sunny = [*base, call("call_a", "weather"), result("call_a", "sunny")]
    rainy = [*base, call("call_a", "weather"), result("call_a", "rainy")]
    a = await rec.exchange(stitcher, sunny, answer("Sunny."))
    b = await rec.exchange(stitcher, rainy, answer("Take an umbrella."))
    assert a.trajectory_id == b.trajectory_id == r0.trajectory_id
    assert a.parent_id == b.parent_id == r0.id
    assert a.step == b.step == 1
    # a branch continues on its own
    c = await rec.exchange(
        stitcher, [*rainy, answer("Take an umbrella."), user("Thanks")], answer("Bye")
    )
    assert c.parent_id == b.id and c.step == 2

    leaves = [row async for row in db.stream(db.leaves_query())]
    assert sorted(row["id"] for row in leaves) == sorted([a.id, c.id])
    assert {row["trajectory_id"] for row in leaves} == {r0.trajectory_id}


async def test_retry_of_the_same_step_forks_from_the_same_parent(db: Database) -> None:
    stitcher = Stitcher(db)
    rec = Recorded(db)
    base = [SYSTEM, user("Weather?")]
    r0 = await rec.exchange(stitcher, base, call("call_a", "weather"))
    step1 = [*base, call("call_a", "weather"), result("call_a", "sunny")]
    first = await rec.exchange(stitcher, step1, answer("Sunny."))
    retry = await rec.exchange(stitcher, copy.deepcopy(step1), answer("It is sunny."))
    assert first.parent_id == retry.parent_id == r0.id
    assert first.trajectory_id == retry.trajectory_id


async def test_echoed_sdk_objects_still_link(db: Database) -> None:
    stitcher = Stitcher(db)
    rec = Recorded(db)
    base = [{"role": "developer", "content": SYSTEM["content"]}, user("Weather?")]
    response = call("call_a", "weather", '{"city": "Paris", "days": 2}')
    r0 = await rec.exchange(stitcher, base, response)
    echoed = ChatCompletionMessage.model_validate(
        {**response, "refusal": None, "annotations": []}
    ).model_dump()
    echoed["tool_calls"][0]["function"]["arguments"] = json.dumps(
        {"days": 2, "city": "Paris"}, indent=2
    )
    step1 = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM["content"]}]},
        user("Weather?"),
        echoed,
        {"role": "tool", "tool_call_id": "call_a", "content": [{"type": "text", "text": "sunny"}]},
    ]
    fresh = Stitcher(db)  # through the database too
    for stitcher_ in (stitcher, fresh):
        link = await stitcher_.link(step1)
        assert link.parent is not None and link.parent.exchange_id == r0.id


async def test_changed_tool_call_id_does_not_link(db: Database) -> None:
    stitcher = Stitcher(db)
    rec = Recorded(db)
    base = [SYSTEM, user("Weather?")]
    await rec.exchange(stitcher, base, call("call_a", "weather"))
    other = [*base, call("call_OTHER", "weather"), result("call_OTHER", "sunny")]
    link = await stitcher.link(other)
    assert link.parent is None and link.new_trajectory
    assert stitcher.db_lookups == 1  # missed the cache, asked the database once


async def test_explicit_id_starts_and_continues_its_trajectory(db: Database) -> None:
    stitcher = Stitcher(db)
    rec = Recorded(db)
    records, _ = await three_step_conversation(
        rec, stitcher, explicit_id="run-42", id_source="header"
    )
    assert_chain(records)
    assert {r.trajectory_id for r in records} == {"run-42"}
    assert [link.id_source for link in rec.links] == ["header"] * 3
    assert rec.links[0].new_trajectory and not rec.links[1].new_trajectory


async def test_explicit_id_wins_over_hashing(db: Database) -> None:
    stitcher = Stitcher(db)
    rec = Recorded(db)
    base = [SYSTEM, user("Weather?")]
    r0 = await rec.exchange(stitcher, base, call("call_a", "weather"))
    step1 = [*base, call("call_a", "weather"), result("call_a", "sunny")]
    link = await stitcher.link(step1, "elsewhere", "metadata")
    assert link.trajectory_id == "elsewhere"
    assert link.parent is None and link.step == 0
    assert link.id_source == "metadata"
    assert link.new_trajectory
    # while hashing alone would have continued r0
    assert (await stitcher.link(step1)).trajectory_id == r0.trajectory_id


async def test_explicit_id_of_a_recorded_trajectory_keeps_its_route(db: Database) -> None:
    rec = Recorded(db)
    await rec.exchange(
        Stitcher(db), [SYSTEM, user("a")], answer("b"), explicit_id="t-1", route="teacher"
    )
    fresh = Stitcher(db)
    # a new conversation (no shared prefix) under the same explicit id: known trajectory, step 0
    link = await fresh.link([SYSTEM, user("unrelated")], "t-1", "header")
    assert link.trajectory_id == "t-1"
    assert link.route == "teacher"
    assert not link.new_trajectory
    assert link.parent is None


async def test_cache_eviction_falls_back_to_the_database(db: Database) -> None:
    stitcher = Stitcher(db, cache_size=1)
    rec = Recorded(db)
    first = await rec.exchange(stitcher, [SYSTEM, user("one")], call("call_1", "f"))
    await rec.exchange(stitcher, [SYSTEM, user("two")], call("call_2", "f"))  # evicts the first
    lookups = stitcher.db_lookups
    link = await stitcher.link([SYSTEM, user("one"), call("call_1", "f"), result("call_1", "x")])
    assert link.parent is not None and link.parent.exchange_id == first.id
    assert stitcher.db_lookups == lookups + 1


async def test_cache_disabled_still_links_through_the_database(db: Database) -> None:
    stitcher = Stitcher(db, cache_size=0)
    rec = Recorded(db)
    records, _ = await three_step_conversation(rec, stitcher)
    assert_chain(records)
    assert stitcher.cache_hits == 0
    assert stitcher.db_lookups == 2


async def test_many_interleaved_conversations_stay_apart(db: Database) -> None:
    stitcher = Stitcher(db)
    rec = Recorded(db)
    histories = {n: [SYSTEM, user(f"question {n}")] for n in range(6)}
    by_conversation: dict[int, list[ExchangeRecord]] = {n: [] for n in histories}
    for step in range(3):
        for n, messages in histories.items():
            reply = call(f"call_{n}_{step}", "f") if step < 2 else answer(f"done {n}")
            by_conversation[n].append(await rec.exchange(stitcher, messages, reply))
            histories[n] = (
                [*messages, reply, result(f"call_{n}_{step}", "ok")] if step < 2 else messages
            )
    for records in by_conversation.values():
        assert_chain(records)
    assert len({records[0].trajectory_id for records in by_conversation.values()}) == 6
    assert await db.counts() == {"exchanges": 18, "trajectories": 6}
