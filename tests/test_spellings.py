"""Less common Chat Completions spellings recorded whole (issue 16): a streamed audio answer keeps
`delta.audio` as the openai SDK's own accumulator assembles it, legacy `functions` /
`function_call` exchanges count their call (SQLite and PostgreSQL), and a retry of an identical
request after an upstream error is not shown as a fork by the dashboard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from proxy.core.sse import _joined, merge_delta
from tests.support.inprocess import in_process_proxy
from tests.support.processes import FakeUpstream
from tests.support.spellings import db_url, exchanges_in, stats_of

__all__ = ["db_url"]  # the fixture, used by parameter name

AUDIO = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
FUNCTIONS = [
    {
        "name": "lookup",
        "description": "Look a thing up.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    }
]


# -- 3. streamed audio ------------------------------------------------------------------------------


def test_merge_delta_merges_as_the_sdk_does_but_keeps_ids_once() -> None:
    merged: Any = None
    for piece in (
        {"id": "audio_1", "transcript": "Hel"},
        {"transcript": "lo", "id": "audio_1"},
        {"data": "UklG"},
        {"data": "Rg=="},
        {"expires_at": 1_700_000_000},
    ):
        merged = merge_delta(merged, piece)
    merged = merge_delta(merged, {"expires_at": 1_700_000_000})
    assert _joined(merged) == {
        "id": "audio_1",
        "transcript": "Hello",
        "data": "UklGRg==",
        "expires_at": 1_700_000_000,
    }
    parts = merge_delta(None, [{"index": 0, "text": "a"}])
    parts = merge_delta(parts, [{"index": 0, "text": "b"}, {"index": 1, "text": "c"}])
    assert _joined(parts) == [{"index": 0, "text": "ab"}, {"index": 1, "text": "c"}]


async def test_streamed_audio_answer_is_recorded_as_the_sdk_assembles_it(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    async with in_process_proxy(tmp_path, upstream=fake_upstream.base_url) as proxy:
        sdk = proxy.openai()
        async with sdk.chat.completions.stream(
            model="gpt-4o-audio-preview",
            messages=[{"role": "user", "content": "say hello to the audio test"}],
            **AUDIO,  # type: ignore[arg-type]
        ) as stream:
            final = await stream.get_final_completion()
        whole = await sdk.chat.completions.create(
            model="gpt-4o-audio-preview",
            messages=[{"role": "user", "content": "say hello to the audio test"}],
            **AUDIO,  # type: ignore[arg-type]
        )
    sdk_audio = final.choices[0].message.audio
    assert sdk_audio is not None and sdk_audio.transcript.startswith("Answer to")
    streamed, plain = await exchanges_in(str(proxy.db))
    assert streamed["stream"] and not plain["stream"]
    recorded = json.loads(streamed["response_json"])["choices"][0]["message"]
    assert recorded["audio"] == sdk_audio.model_dump()
    assert recorded["content"] is None
    # The same fields a whole (non-stream) answer carries, id aside (each answer has its own).
    whole_audio = whole.choices[0].message.audio
    assert whole_audio is not None
    assert recorded["audio"]["transcript"] == whole_audio.transcript
    assert set(recorded["audio"]) == {"id", "data", "expires_at", "transcript"}


# -- 4. legacy functions / function_call ----------------------------------------------------------


async def test_legacy_function_call_is_counted_as_a_tool_call(
    tmp_path: Path, fake_upstream: FakeUpstream, db_url: str
) -> None:
    async with in_process_proxy(tmp_path, upstream=fake_upstream.base_url, db=db_url) as proxy:
        sdk = proxy.openai()
        ask = [{"role": "user", "content": "look up the legacy way"}]
        first = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=ask,  # type: ignore[arg-type]
            functions=FUNCTIONS,  # type: ignore[arg-type]
        )
        call = first.choices[0].message.function_call
        assert call is not None and call.name == "lookup"
        assert first.choices[0].finish_reason == "function_call"
        chunks = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "stream the legacy way"}],
            functions=FUNCTIONS,  # type: ignore[arg-type]
            stream=True,
        )
        async for _ in chunks:
            pass
        last = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[
                *ask,
                {"role": "assistant", "content": None, "function_call": call.model_dump()},
                {"role": "function", "name": "lookup", "content": "found it"},
            ],  # type: ignore[list-item]
            functions=FUNCTIONS,  # type: ignore[arg-type]
        )
        assert last.choices[0].message.function_call is not None  # step 1 calls again
    rows = await exchanges_in(db_url)
    assert [row["tool_call_count"] for row in rows if row["stream"]] == [1]
    assert all(row["tool_call_count"] == 1 for row in rows), rows
    streamed = next(row for row in rows if row["stream"])
    message = json.loads(streamed["response_json"])["choices"][0]["message"]
    assert message["function_call"]["name"] == "lookup"
    stats = stats_of(db_url)
    # Two trajectories: the stitched legacy conversation (2 calls) and the streamed one (1).
    assert stats["tool_call_histogram"] == {"1": 1, "2": 1}


# -- 5. a retry after an upstream error is not a fork -----------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {"name": "search", "parameters": {"type": "object", "properties": {}}},
    }
]


async def test_retried_call_is_not_a_fork_in_the_dashboard(
    tmp_path: Path, fake_upstream: FakeUpstream, db_url: str
) -> None:
    """Step 1 fails upstream (500) and the SDK's own retry sends the identical request, which
    answers: the dashboard shows one branch, the failed attempt marked as retried; a real fork
    (another request after step 0) is still a branch."""
    key = f"retry-{tmp_path.name}-{db_url[-8:]}"
    async with in_process_proxy(tmp_path, upstream=fake_upstream.base_url, db=db_url) as proxy:
        sdk = proxy.openai()
        messages: list[Any] = [{"role": "user", "content": "find the retry doc"}]
        first = await sdk.chat.completions.create(model="m", messages=messages, tools=TOOLS)
        call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
        messages += [
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "doc found"},
        ]
        retrying = proxy.openai(max_retries=1, default_headers={"x-fake-fail-once": key})
        answer = await retrying.chat.completions.create(model="m", messages=messages, tools=TOOLS)
        assert answer.choices[0].finish_reason == "tool_calls"  # the fake calls again at step 1
        await proxy.flushed()
        rows = await exchanges_in(db_url)
        trajectory_id = rows[0]["trajectory_id"]
        assert [(r["step"], r["outcome"], r["status_code"]) for r in rows] == [
            (0, "ok", 200),
            (1, "error", 500),
            (1, "ok", 200),
        ]
        view = (await proxy.client.get(f"/api/trajectories/{trajectory_id}")).json()
        assert len(view["branches"]) == 1
        assert view["branches"][0]["leaf_id"] == rows[2]["id"]
        by_id = {e["id"]: e for e in view["exchanges"]}
        assert by_id[rows[1]["id"]]["retried_by"] == rows[2]["id"]
        page = await proxy.client.get(f"/dashboard/trajectories/{trajectory_id}")
        assert page.status_code == 200 and 'aria-label="branches"' not in page.text

        # A different request after step 0 is a real fork: two branches.
        other = [*messages[:3], {"role": "tool", "tool_call_id": call.id, "content": "other"}]
        await sdk.chat.completions.create(model="m", messages=other, tools=TOOLS)
        await proxy.flushed()
        view = (await proxy.client.get(f"/api/trajectories/{trajectory_id}")).json()
        assert len(view["branches"]) == 2
        page = await proxy.client.get(f"/dashboard/trajectories/{trajectory_id}")
        assert 'aria-label="branches"' in page.text
