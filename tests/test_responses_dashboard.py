"""The dashboard shows Responses trajectories like chat ones: the kind visible, the conversation
rebuilt across `previous_response_id` steps, reasoning summaries shown and encrypted reasoning
shown as such, tool calls with their results, captured strings escaped."""

from __future__ import annotations

from pathlib import Path

from tests.support.responses import fake_url, in_process_proxy

__all__ = ["fake_url"]

TOOLS = [
    {"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
    {"type": "function", "name": "find_museums", "parameters": {"type": "object"}},
]
ROOT = "http://127.0.0.1"


async def test_trajectory_page_shows_a_responses_conversation(
    tmp_path: Path, fake_url: str
) -> None:
    async with in_process_proxy(tmp_path / "u.db", fake_url) as client:
        first = (
            await client.post(
                "/responses",
                headers={"x-fake-reasoning": "1"},
                json={
                    "model": "m",
                    "instructions": "Plan <b>trips</b>.",
                    "input": "Plan <script>alert(1)</script> Lisbon",
                    "tools": TOOLS,
                    "include": ["reasoning.encrypted_content"],
                },
            )
        ).json()
        call = next(i for i in first["output"] if i["type"] == "function_call")
        second = await client.post(
            "/responses",
            json={
                "model": "m",
                "instructions": "Plan <b>trips</b>.",  # per request: not inherited
                "previous_response_id": first["id"],
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": call["call_id"],
                        "output": "sunny <i>",
                    }
                ],
                "tools": TOOLS,
            },
        )
        tid = second.headers["x-understudy-trajectory-id"]
        # let the recorder write both exchanges, then read them back through the dashboard
        for _ in range(200):
            api = (await client.get(f"{ROOT}/api/trajectories/{tid}")).json()
            if len(api.get("exchanges", [])) == 2:
                break
        assert [e["kind"] for e in api["exchanges"]] == ["responses", "responses"]
        [listed] = (await client.get(f"{ROOT}/api/trajectories")).json()["data"]
        assert listed["first_user_text"] == "Plan <script>alert(1)</script> Lisbon"
        page = await client.get(f"{ROOT}/dashboard/trajectories/{tid}")
    assert page.status_code == 200
    html = page.text
    assert html.count(">responses</span>") == 2  # the kind, on each step
    assert "Planning step" in html  # the reasoning summary
    assert "[encrypted reasoning: " in html
    assert "get_weather" in html
    assert "sunny &lt;i&gt;" in html  # the tool result, escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    assert "Plan &lt;b&gt;trips&lt;/b&gt;." in html  # instructions as the system message
    assert "find_museums" in html  # the answer of step 1: the next tool call
    assert "truncated" not in html and "prompt template unresolved" not in html


async def test_truncated_history_and_prompt_templates_are_shown_as_such(
    tmp_path: Path, fake_url: str
) -> None:
    async with in_process_proxy(tmp_path / "u.db", fake_url) as client:
        reply = await client.post(
            "/responses",
            json={
                "model": "m",
                "previous_response_id": "resp_recorded_elsewhere",
                "prompt": {"id": "pmpt_123", "version": "2"},
                "input": "go on",
            },
        )
        assert reply.status_code == 400  # the fake does not know the parent either
        tid = reply.headers["x-understudy-trajectory-id"]
        for _ in range(200):
            api = (await client.get(f"{ROOT}/api/trajectories/{tid}")).json()
            if api.get("exchanges"):
                break
        html = (await client.get(f"{ROOT}/dashboard/trajectories/{tid}")).text
    assert ">truncated</span>" in html
    assert "prompt template unresolved" in html
