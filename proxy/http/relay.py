"""`RelayResponse`: the ASGI response that passes a streamed (SSE) answer on, chunk by chunk.

Starlette's `StreamingResponse` runs each response in an anyio task group, the body in one task
and a listener for the client's disconnect in another: measurable per stream under load
(bench/). This response sends the chunks itself, in the task that serves the request; one plain
asyncio task waits for `http.disconnect` and cancels the relay only when the client goes away
before the answer ended (the ASGI server's `send` drops data silently for a gone client, so a
failing send cannot tell). The body iterator is always closed before `__call__` returns, so its
`finally` (recording the exchange, releasing the upstream connection) runs at once, also when
the client went away while a chunk was being sent.

When `ended()` says, right after a chunk arrived, that nothing can follow it (the upstream body
is complete), that chunk goes out together with the end of the response: one write instead of
two. The bytes the client receives are the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

__all__ = ["RelayResponse"]


async def _until_disconnect(receive: Receive) -> None:
    """Return when the ASGI server reports `http.disconnect` (client gone, or response done)."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


class RelayResponse(Response):
    """A streamed response whose body is the async generator `chunks` (bytes, passed on as they
    arrive). status_code: the status sent; media_type: the content-type added to `raw_headers`
    when given (set `raw_headers` after construction to send others). ended: called after each
    chunk; True when no chunk can follow it (then it is sent with the end of the body)."""

    def __init__(
        self,
        chunks: AsyncGenerator[bytes, None],
        status_code: int = 200,
        media_type: str | None = None,
        ended: Callable[[], bool] | None = None,
    ) -> None:
        self.body_iterator = chunks
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.init_headers(None)
        self._ended = ended

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        streaming = True
        gone = False

        def on_disconnect(listener: asyncio.Task[None]) -> None:
            nonlocal gone
            if streaming and not listener.cancelled() and listener.exception() is None:
                gone = True
                task.cancel()

        listener = asyncio.ensure_future(_until_disconnect(receive))
        listener.add_done_callback(on_disconnect)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            complete = False
            async for chunk in self.body_iterator:
                if complete:  # `ended()` was wrong: nothing may follow the end of the body
                    raise RuntimeError("a chunk arrived after the upstream body had ended")
                if self._ended is not None and self._ended():
                    streaming, complete = False, True
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                else:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            streaming = False
            if not complete:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # Our own cancellation (the client went away) ends the response quietly; any other
            # (shutdown) goes on.
            if not gone or task.uncancel() > 0:
                raise
        finally:
            streaming = False
            listener.cancel()
            await self.body_iterator.aclose()
