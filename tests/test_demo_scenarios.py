"""The demo's conversations read like real traffic: schema-valid tool arguments, answers that are
sentences, promotion only when asked. Played through the proxy served in this process (a uvicorn
thread, lifespan run) against the fake upstream with the demo's scripted model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from proxy.app import FastPath, create_app
from proxy.demo import CONVERSATIONS, TOOLS, demo_settings, play
from proxy.demo.scenarios import scripted_model, tool_output
from proxy.testing.fake_openai import create_fake_app
from proxy.testing.servers import ServerThread, serve_in_thread
from tests.support.records import recorded_exchanges


def test_every_scripted_call_validates_against_its_tool_schema() -> None:
    calls = 0
    for convo in CONVERSATIONS:
        for turn in convo.turns:
            for round_ in turn.rounds:
                for name, args in round_:
                    assert name in convo.tools, (convo.name, name)
                    jsonschema.validate(args, TOOLS[name]["function"]["parameters"])
                    output = tool_output(name, args)
                    assert output.startswith("<") if name == "fetch_page" else json.loads(output)
                    calls += 1
    assert calls >= 10


def test_scripted_model_answers_only_demo_conversations() -> None:
    body = {"messages": [{"role": "user", "content": "something else"}], "tools": []}
    assert scripted_model(body, 1) is None
    trip = CONVERSATIONS[0]
    body = {
        "messages": [{"role": "user", "content": trip.users[0]}],
        "tools": [TOOLS[name] for name in trip.tools],
    }
    first = scripted_model(body, 1)
    assert first is not None and [c["function"]["name"] for c in first["tool_calls"]] == [
        "search_flights",
        "get_weather",
    ]
    # The same conversation without the tools it needs is not the demo's: the default plan.
    assert scripted_model({**body, "tools": []}, 1) is None


@dataclass
class DemoProxy:
    """The demo's proxy served in a thread: its root URL, database file and server."""

    root: str
    db: Path
    server: ServerThread

    def stop_and_read(self) -> list[dict[str, Any]]:
        """Stop the server (its lifespan drains the recorder) and read what it recorded."""
        self.server.stop()
        return recorded_exchanges(self.db)


@pytest.fixture
def demo_proxy(tmp_path: Path) -> Iterator[DemoProxy]:
    """The demo's fake upstream and proxy (demo settings, port chosen here), served in threads."""
    with serve_in_thread(create_fake_app(scripted_model)) as upstream_root:
        settings = demo_settings(
            {"db": str(tmp_path / "demo.db"), "port": 0}, upstream_root + "/v1"
        )
        server = ServerThread(FastPath(create_app(settings)), lifespan="on")
        server.start()
        try:
            yield DemoProxy(server.root_url, Path(settings.db), server)
        finally:
            server.stop()


def test_recorded_demo_traffic_validates_and_reads_like_a_model(demo_proxy: DemoProxy) -> None:
    client = openai.OpenAI(
        base_url=f"{demo_proxy.root}/v1", api_key="demo-no-real-key", max_retries=0
    )
    for convo in CONVERSATIONS:
        if convo.model.startswith("fake-error"):
            with pytest.raises(openai.RateLimitError):
                play(client, convo, "test")
        else:
            assert play(client, convo, "test") >= 1
    client.close()
    rows = demo_proxy.stop_and_read()
    messages = [
        row["response"]["choices"][0]["message"]
        for row in rows
        if row["outcome"] == "ok" and row["response"]
    ]
    calls = [call for message in messages for call in message.get("tool_calls") or []]
    assert len(calls) >= 10
    for call in calls:
        schema = TOOLS[call["function"]["name"]]["function"]["parameters"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    finals = [m["content"] for m in messages if not m.get("tool_calls")]
    assert len(finals) >= 6
    assert all(text and "{" not in text and len(text.split()) >= 8 for text in finals), finals
    assert all(row["injected_logit_bias_json"] is None for row in rows)  # not asked for
    assert {row["route"] for row in rows} == {"student", "teacher"}
