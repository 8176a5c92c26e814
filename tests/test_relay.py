"""`RelayResponse` (proxy/http/relay.py) at the ASGI level: chunks passed on in order as they
arrive, the last one sent with the end of the body when the upstream says nothing can follow, a
client that goes away mid-stream ends the relay (the body iterator's `finally` runs at once) and
a cancellation from elsewhere (shutdown) still propagates. The server side is a pair of plain
ASGI `receive` / `send` functions, as uvicorn calls them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from proxy.http.relay import RelayResponse

SCOPE: dict[str, Any] = {"type": "http", "asgi": {"spec_version": "2.3"}}


class Server:
    """What an ASGI server gives a response: `receive` (blocks until `disconnect()`) and `send`
    (records each message)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def disconnect(self) -> None:
        self._gone.set()


async def test_chunks_in_order_and_the_end_sent_with_the_last_chunk() -> None:
    server = Server()
    state = {"upstream_done": False}

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield b"data: 1\n\n"
        state["upstream_done"] = True
        yield b"data: [DONE]\n\n"

    response = RelayResponse(chunks(), ended=lambda: state["upstream_done"])
    response.raw_headers = [(b"content-type", b"text/event-stream")]
    await response(SCOPE, server.receive, server.send)
    assert server.sent == [
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        },
        {"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True},
        {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False},
    ]


async def test_without_ended_the_body_ends_with_an_empty_message() -> None:
    server = Server()

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield b"a"
        yield b"b"

    await RelayResponse(chunks(), media_type="text/event-stream")(
        SCOPE, server.receive, server.send
    )
    start, *body = server.sent
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert body == [
        {"type": "http.response.body", "body": b"a", "more_body": True},
        {"type": "http.response.body", "body": b"b", "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]


async def test_a_client_gone_mid_stream_ends_the_relay_and_closes_the_body() -> None:
    server = Server()
    waiting = asyncio.Event()
    closed: list[str] = []

    async def chunks() -> AsyncGenerator[bytes, None]:
        try:
            yield b"first"
            waiting.set()
            await asyncio.Event().wait()  # the upstream sends nothing more
            yield b"never"
        except asyncio.CancelledError:
            closed.append("cancelled")
            raise
        finally:
            closed.append("finally")

    relay = asyncio.create_task(RelayResponse(chunks())(SCOPE, server.receive, server.send))
    await waiting.wait()
    server.disconnect()
    await asyncio.wait_for(relay, 5)  # returns quietly: the cancellation was the relay's own
    assert closed == ["cancelled", "finally"]
    assert [m.get("body") for m in server.sent[1:]] == [b"first"]
    assert not relay.cancelled()


async def test_a_cancellation_from_elsewhere_still_propagates() -> None:
    server = Server()
    waiting = asyncio.Event()
    closed: list[str] = []

    async def chunks() -> AsyncGenerator[bytes, None]:
        try:
            waiting.set()
            await asyncio.Event().wait()
            yield b"never"
        finally:
            closed.append("finally")

    relay = asyncio.create_task(RelayResponse(chunks())(SCOPE, server.receive, server.send))
    await waiting.wait()
    relay.cancel()  # e.g. the server shutting down
    with pytest.raises(asyncio.CancelledError):
        await relay
    assert closed == ["finally"]
