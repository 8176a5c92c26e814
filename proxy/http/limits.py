"""Limits on what one client can make the proxy hold: header size and count, how long headers
and bodies may take to arrive, and the request body bytes in flight at once.

- `limited_protocol(settings)`: uvicorn's httptools HTTP protocol with the header and timeout
  limits (uvicorn has none of its own for httptools): headers over `max_header_bytes` or
  `max_header_count` are answered 431; headers not complete within `header_timeout_s` of their
  first byte, or a body that sends nothing for `body_timeout_s`, are answered 408 and the
  connection is closed (a slowloris client holds nothing for long).
- `BodyBudget`: an ASGI wrapper that admits a request only while the declared body bytes of
  the requests in flight stay under `max_inflight_body_bytes`; beyond, 503 with `Retry-After`
  before a byte of the body is read (each in-flight body costs several times its size in
  memory while it is parsed and recorded).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.config import Settings


def _status_response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": reason.lower().replace(" ", "_"),
            }
        }
    ).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class LimitedProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with header size/count limits and header/body read timeouts (the
    class attributes are set by `limited_protocol`)."""

    max_header_bytes = 64 * 1024
    max_header_count = 100
    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_headers = True
        self._header_bytes = 0
        self._header_count = 0
        self._in_body = False
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None

    # -- timers ---------------------------------------------------------------------------------

    def _arm(self, delay_s: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay_s, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self._in_body and self.flow is not None and self.flow.read_paused:
            self._arm(self.body_timeout_s)  # the app is not reading: not the client's fault
            return
        if self._reading_headers and self._header_bytes:
            self._refuse(408, "Request Timeout", "request headers took too long to arrive")
        elif self._in_body:
            self.logger.info("closing a connection whose request body stalled")
            self.transport.close()  # the app sees a disconnect

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a refusal already answered and closed the connection
            super().send_400_response(msg)

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._refused = True
        self._disarm()
        self.logger.info("refused a request: %s", message)
        self.transport.write(_status_response(status, reason, message))
        self.transport.close()

    # -- protocol -------------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._reading_headers:
            end = data.find(b"\r\n\r\n")
            self._header_bytes += len(data) if end < 0 else end + 4
            if self._header_bytes > self.max_header_bytes:
                self._refuse(
                    431,
                    "Request Header Fields Too Large",
                    f"request headers are over {self.max_header_bytes} bytes",
                )
                return
        super().data_received(data)
        # One timer for what this read leaves awaited, armed after the parser ran: a request that
        # arrives whole in one read (the usual case) arms none.
        if self._refused or self.transport is None or self.transport.is_closing():
            return
        if self._reading_headers and self._header_bytes:
            if self._timer is None:  # the headers' deadline runs from their first byte
                self._arm(self.header_timeout_s)
        elif self._in_body:
            self._arm(self.body_timeout_s)  # a body must make progress every body_timeout_s

    def on_message_begin(self) -> None:
        self._header_count = 0
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_header_count:
            self._refuse(
                431,
                "Request Header Fields Too Large",
                f"more than {self.max_header_count} request headers",
            )
            raise ValueError("too many headers")  # stops the parser; the data is ignored
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._header_bytes = 0
        self._in_body = True  # the body timer is armed once this read is parsed (data_received)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._reading_headers = True
        self._disarm()
        super().on_message_complete()


def limited_protocol(settings: Settings) -> type[LimitedProtocol]:
    """The HTTP protocol class for uvicorn (`http=`), with the limits of `settings`."""
    return type(
        "LimitedProtocol",
        (LimitedProtocol,),
        {
            "max_header_bytes": settings.max_header_bytes,
            "max_header_count": settings.max_header_count,
            "header_timeout_s": settings.header_timeout_s,
            "body_timeout_s": settings.body_timeout_s,
        },
    )


class BodyBudget:
    """ASGI wrapper: admits a request while the request body bytes in flight (declared by
    `Content-Length`, or counted as they arrive for chunked bodies) stay within `limit_bytes`;
    otherwise answers 503 with `Retry-After: 1` without reading the body. `in_flight` is the
    current sum, bytes."""

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = 0
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                declared = int(value)
                break
        if declared and self.in_flight + declared > self.limit_bytes:
            await _refuse_busy(send, self.in_flight, self.limit_bytes)
            return
        counted = declared

        async def counting_receive() -> Any:
            nonlocal counted
            message = await receive()
            if not declared and message.get("type") == "http.request":
                size = len(message.get("body", b""))
                counted += size
                self.in_flight += size
            return message

        self.in_flight += declared
        try:
            await self.app(scope, counting_receive if not declared else receive, send)
        finally:
            self.in_flight -= counted


async def _refuse_busy(send: Send, in_flight: int, limit: int) -> None:
    body = json.dumps(
        {
            "error": {
                "message": f"the proxy holds {in_flight} bytes of request bodies (limit "
                f"{limit}); retry shortly",
                "type": "server_error",
                "param": None,
                "code": "too_many_request_bytes",
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
