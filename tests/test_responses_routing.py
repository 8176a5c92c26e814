"""Routing on the Responses API: a teacher trajectory answered through litellm's Responses support
(JSON and streamed, in the Responses format), given the whole rebuilt visible history; shadow
answers stored beside the student's; the route kept for every step of a trajectory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette

from proxy.testing.fake_openai import create_fake_app
from proxy.testing.servers import serve_in_thread
from tests.support.responses import exchanges, in_process_proxy, sse_events

TOOLS = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
TEACHER = "gpt-4.1-teacher"


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[Starlette, str]]:
    """The fake upstream (student and teacher alike) and its base URL; its received requests
    are `app.state.requests`."""
    app = create_fake_app()
    with serve_in_thread(app) as root:
        yield app, root + "/v1"


def teacher_requests(app: Starlette) -> list[dict[str, Any]]:
    return [r["body"] for r in app.state.requests if r["body"].get("model") == TEACHER]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_teacher_answers_every_step_with_the_rebuilt_history(
    tmp_path: Path, fake: tuple[Starlette, str], stream: bool
) -> None:
    app, url = fake
    app.state.requests.clear()
    db = tmp_path / "u.db"
    async with in_process_proxy(db, url, teacher_model=TEACHER, teacher_base_url=url) as client:
        first = await client.post(
            "/responses",
            headers={"x-understudy-route": "teacher"},
            json={
                "model": "student-model",
                "instructions": "Be brief.",
                "input": "Plan Paris",
                "tools": TOOLS,
                "stream": stream,
            },
        )
        assert first.status_code == 200, first.text
        assert first.headers["x-understudy-teacher-model"] == TEACHER
        answer = sse_events(first.content)[-1]["response"] if stream else first.json()
        [call] = [i for i in answer["output"] if i["type"] == "function_call"]
        second = await client.post(
            "/responses",
            json={
                "model": "student-model",
                "previous_response_id": answer["id"],
                "input": [
                    {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}
                ],
                "tools": TOOLS,
                "stream": stream,
            },
        )
        assert second.status_code == 200, second.text
        assert second.headers["x-understudy-route"] == "teacher"
    rows = exchanges(db)
    assert [r["route"] for r in rows] == ["teacher", "teacher"]
    assert rows[1]["parent_id"] == rows[0]["id"]
    assert all(r["kind"] == "responses" and r["outcome"] == "ok" for r in rows)
    assert rows[0]["response"]["output"][0]["call_id"] == call["call_id"]
    if stream:
        events = sse_events(second.content)
        assert events[-1]["type"] == "response.completed"
        assert b"[DONE]" not in second.content
    sent = teacher_requests(app)
    assert len(sent) == 2
    assert "previous_response_id" not in sent[1]
    # the teacher got the whole visible history: first input, its own call, the result
    kinds = [i.get("type", "message") for i in sent[1]["input"]]
    assert kinds == ["message", "function_call", "function_call_output"]
    assert sent[1]["input"][0]["content"] == "Plan Paris"
    assert all(r["body"].get("model") != "student-model" for r in app.state.requests)


async def test_shadow_answer_is_stored_beside_the_student(
    tmp_path: Path, fake: tuple[Starlette, str]
) -> None:
    app, url = fake
    db = tmp_path / "u.db"
    async with in_process_proxy(
        db, url, teacher_model=TEACHER, teacher_base_url=url, routing_rules=[{"route": "shadow"}]
    ) as client:
        reply = await client.post(
            "/responses", json={"model": "student-model", "input": "Plan Rome", "tools": TOOLS}
        )
    assert reply.status_code == 200
    assert reply.json()["model"] == "student-model"
    [row] = exchanges(db)
    assert row["route"] == "student"
    assert row["shadow_model"] == TEACHER
    shadow = json.loads(row["shadow_response_json"])
    assert shadow["object"] == "response"
    assert shadow["output"][0]["type"] == "function_call"
