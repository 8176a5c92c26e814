"""Hostile upstream answers on the recording pipeline: recording fails open. An answer nested too
deeply to canonicalize, or to parse at all, still reaches the client byte for byte; the exchange
is recorded (without a state, or as an unparsable body) and the failure logged once."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.testing.servers import serve_in_thread
from tests.support.responses import exchanges, in_process_proxy


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


ANSWERS = {
    # parses, but canonicalizing the output item goes deeper than Python's recursion limit
    "deep-item": json.dumps(
        {
            "id": "resp_deep",
            "object": "response",
            "status": "completed",
            "output": [{"type": "web_search_call", "payload": "@"}],
        }
    ).replace('"@"', nested(600)),
    # too deep for the JSON parser itself
    "too-deep": '{"id": "resp_x", "output": ' + nested(200_000) + "}",
}


@pytest.fixture(scope="module")
def hostile_url() -> Iterator[str]:
    async def answer(request: Request) -> Response:
        body = json.loads(await request.body())
        return Response(ANSWERS[body["model"]], media_type="application/json")

    app = Starlette(routes=[Route("/v1/responses", answer, methods=["POST"])])
    with serve_in_thread(app) as root:
        yield root + "/v1"


@pytest.mark.parametrize("model", sorted(ANSWERS))
async def test_a_hostile_answer_reaches_the_client_and_is_recorded(
    tmp_path: Path, hostile_url: str, model: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "u.db"
    with caplog.at_level(logging.ERROR, logger="understudy.pipeline"):
        async with in_process_proxy(db, hostile_url) as client:
            reply = await client.post("/responses", json={"model": model, "input": "x"})
    assert reply.status_code == 200
    assert reply.text == ANSWERS[model]  # byte for byte
    [row] = exchanges(db)
    assert row["state_hash"] is None
    if model == "deep-item":
        assert row["outcome"] == "ok"
        assert len([r for r in caplog.records if "remembering the state" in r.message]) == 1
    else:
        assert row["outcome"] == "error"
        assert row["error"]["error"]["code"] == "upstream_invalid_body"
