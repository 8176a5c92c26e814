"""The Responses API over WebSocket (`ws(s)://.../v1/responses`, the transport Codex dials first).

The proxy opens the same WebSocket to the upstream with the client's headers and relays frames
both ways as they come. Client frames `{"type": "response.create", ...}` carry a request body:
each one opens an exchange of kind `responses` (stitched and routed as over HTTP, recorded with
`stream` true); the server's frames are the Responses stream events, assembled as SSE events are,
and the state is remembered before the terminal event reaches the client. `generate: false`
(prewarming) frames and frames that are not a valid body are relayed, not recorded. A client
that goes away leaves its in-flight exchange 'cancelled'.

Teacher route: a `response.create` whose trajectory is routed to the teacher is not sent
upstream; the teacher answers it (litellm's Responses support, streamed, given the whole
visible history as over HTTP) and its events go to the client as text frames, the same JSON as
the SSE events, recorded like the upstream's. The teacher's response ids are the proxy's to
resolve: the trajectory stays with the teacher, so a later `previous_response_id` naming one is
rebuilt from the records, never sent upstream. A teacher that fails answers with an `error`
event (`code`, `message`, `param`, `sequence_number`, as OpenAI's WebSocket does) and the
exchange is recorded as an error. Shadow answers are not taken over WebSocket (the exchange is
recorded without one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import aiohttp
from starlette.websockets import WebSocket, WebSocketDisconnect

from proxy.core.sse import ResponsesStreamAssembler
from proxy.http.errors import InvalidRequest
from proxy.http.pipeline import Exchange, client_key, ms_since, open_exchange
from proxy.http.responses import RESPONSES, parse_responses_request
from proxy.http.state import ProxyState
from proxy.http.teacher import TeacherError
from proxy.http.upstream import UPSTREAM_ERRORS, forward_headers, upstream_url

log = logging.getLogger("understudy.responses_ws")

_HANDSHAKE_HEADERS = ("sec-websocket-", "upgrade", "connection", "host")


class _Session:
    """One client connection: the exchange in flight (one at a time) and its assembler."""

    def __init__(self, proxy: ProxyState, headers: Any, path: str) -> None:
        self.proxy = proxy
        self.headers = headers
        self.path = path
        self.exchange: Exchange | None = None
        self.assembler = ResponsesStreamAssembler()

    async def client_frame(self, text: str) -> dict[str, Any] | None:
        """A frame from the client: a `response.create` opens an exchange. Returns the request
        body when the teacher is to answer it (the frame must then not go upstream), else None."""
        try:
            frame = json.loads(text)
        except ValueError:
            return None
        if not isinstance(frame, dict) or frame.get("type") != "response.create":
            return None
        if frame.get("generate") is False:
            return None
        body = {k: v for k, v in frame.items() if k != "type"}
        body_text = json.dumps(body, ensure_ascii=False)
        try:
            body, _ = parse_responses_request(body_text.encode("utf-8", "surrogatepass"))
            exchange = await open_exchange(
                self.proxy, RESPONSES, body, body_text, self.headers, self.path, time.perf_counter()
            )
        except (InvalidRequest, ValueError, RecursionError):
            return None  # relayed as it is: the upstream answers it with an error event
        self.end("cancelled")  # a new request while one is in flight: the client moved on
        if exchange.record.route != "teacher" or self.proxy.teacher is None:
            exchange.record.route = "student"
        exchange.record.shadow = False
        exchange.record.stream = True
        exchange.record.status_code = 101
        exchange.record.outcome = "cancelled"
        self.exchange = exchange
        self.assembler = ResponsesStreamAssembler()
        return body if exchange.record.route == "teacher" else None

    async def teacher_answer(self, websocket: WebSocket, body: dict[str, Any]) -> None:
        """The teacher answers the exchange in flight: its stream's events are recorded (as the
        upstream's are) and sent to the client as text frames; a teacher that cannot start or
        breaks sends an `error` event and the exchange is recorded as an error."""
        exchange, teacher = self.exchange, self.proxy.teacher
        if exchange is None or teacher is None:
            return
        try:
            events = await RESPONSES.teacher_stream(
                exchange, teacher, {**body, "stream": True}, client_key(self.headers)
            )
        except TeacherError as exc:
            exchange.record.status_code = exc.status
            exchange.record.error_text = json.dumps(exc.body)
            self.exchange = None
            exchange.record.outcome = "error"
            exchange.finish()
            error = exc.body.get("error") or {}
            await websocket.send_text(
                json.dumps(
                    {
                        "type": "error",
                        "code": error.get("code"),
                        "message": error.get("message"),
                        "param": error.get("param"),
                        "sequence_number": 0,
                    }
                )
            )
            return
        exchange.record.status_code = 101
        pending = b""
        ended = "cancelled"  # unless the stream ends: the client went away meanwhile
        try:
            async for chunk in events:
                pending += chunk
                *blocks, pending = pending.split(b"\n\n")
                for block in blocks:
                    for line in block.split(b"\n"):
                        if line.startswith(b"data:"):
                            text = line[5:].strip().decode("utf-8", "surrogatepass")
                            await self.server_frame(text)
                            await websocket.send_text(text)
            ended = "error"  # the teacher's stream ended without a terminal event
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()  # type: ignore[attr-defined]
            if self.exchange is exchange:
                self.end(ended)

    async def server_frame(self, text: str) -> None:
        """A frame from the upstream: fed to the assembler; on the terminal event the state is
        remembered (before the frame is relayed) and the exchange recorded."""
        exchange = self.exchange
        if exchange is None:
            return
        record = exchange.record
        if record.ttft_ms is None:
            record.ttft_ms = ms_since(exchange.start)
        self.assembler.feed(b"data: " + text.encode("utf-8", "surrogatepass") + b"\n\n")
        if self.assembler.done:
            record.outcome = "error" if self.assembler.error else "ok"
            if self.assembler.error is not None:
                record.error_text = json.dumps(self.assembler.error)
            await exchange.answered(self.assembler.result())
            exchange.finish()
            self.exchange = None

    def end(self, outcome: str) -> None:
        """Record the exchange in flight, if any, as `outcome` with what arrived of it."""
        exchange = self.exchange
        if exchange is None:
            return
        self.exchange = None
        exchange.record.outcome = outcome
        if self.assembler.chunks:
            exchange.record.response = self.assembler.result()
        exchange.finish()


async def responses_websocket(websocket: WebSocket) -> None:
    """Relay one client WebSocket on `/v1/responses` to the upstream's, recording each response."""
    proxy: ProxyState = websocket.app.state.proxy
    settings = proxy.settings
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    http_url = upstream_url(settings, "/responses", websocket.url.query.encode())
    url = http_url.with_scheme("wss" if http_url.scheme == "https" else "ws")
    headers = [
        (name, value)
        for name, value in forward_headers(websocket.headers.items(), api_key)
        if not name.lower().startswith(_HANDSHAKE_HEADERS)
    ]
    try:
        upstream = await proxy.client.ws_connect(url, headers=headers, max_msg_size=0)
    except aiohttp.WSServerHandshakeError as exc:
        log.info("upstream refused the WebSocket: %s", exc.status)
        await websocket.close(code=1008 if exc.status in (401, 403) else 1011)
        return
    except UPSTREAM_ERRORS as exc:
        log.warning("upstream WebSocket unreachable: %s", exc)
        await websocket.close(code=1011)
        return
    await websocket.accept()
    session = _Session(proxy, websocket.headers, websocket.url.path)

    async def from_client() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                teacher_body = await session.client_frame(message["text"])
                if teacher_body is None:
                    await upstream.send_str(message["text"])
                else:
                    await session.teacher_answer(websocket, teacher_body)
            elif message.get("bytes") is not None:
                await upstream.send_bytes(message["bytes"])

    async def from_upstream() -> None:
        async for message in upstream:
            if message.type == aiohttp.WSMsgType.TEXT:
                await session.server_frame(message.data)
                await websocket.send_text(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await websocket.send_bytes(message.data)
            else:
                return

    tasks = [asyncio.create_task(from_client()), asyncio.create_task(from_upstream())]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, *UPSTREAM_ERRORS):
                await task
    except Exception:
        log.exception("responses WebSocket relay failed")
    finally:
        for task in tasks:
            task.cancel()
        session.end("cancelled")
        await upstream.close()
        with contextlib.suppress(Exception):
            await websocket.close()
