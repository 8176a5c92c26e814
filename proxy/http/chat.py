"""`POST /v1/chat/completions`: forward to the upstream, pass the answer on unchanged, record it.

The shared flow (body limits, trajectory id, routing, relaying JSON and SSE, teacher and shadow
calls, the error boundary) is `proxy.http.pipeline`; this module adds what is chat's own: the
`messages` checks, stitching by the rolling hash of canonical messages, the `chat.completion.chunk`
assembler, tool-call promotion (`logit_bias`) and the teacher's chat answers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.core.canonical import chain_hash, response_message
from proxy.core.promotion import promote_tool_calls
from proxy.core.sse import CHAT_TERMINAL_MARKERS, DeferredAssembly, StreamAssembler
from proxy.http.errors import InvalidRequest
from proxy.http.pipeline import (
    EXCHANGE_HEADER,
    MAX_NESTING,
    Exchange,
    RecordedApi,
    check_common,
    explicit_trajectory_id,
    handle,
    nesting_depth,
    parse_json_object,
    read_body,
)
from proxy.http.state import ProxyState
from proxy.http.teacher import Teacher
from proxy.recording.stitching import Link
from proxy.storage.rows import choice_state_rows

__all__ = [
    "EXCHANGE_HEADER",
    "MAX_NESTING",
    "ChatApi",
    "chat_completions",
    "explicit_trajectory_id",
    "nesting_depth",
    "parse_chat_request",
    "read_body",
]


def parse_chat_request(raw: bytes) -> tuple[dict[str, Any], str]:
    """Decode and check a chat-completions body; return it as a dict and as text.

    Raises InvalidRequest (400) when it is not UTF-8 JSON, not an object, lacks a string `model`
    or a non-empty `messages` array of objects with a string `role`, has a `stream` that is not
    a boolean or `tools` that are not an array of objects, or nests deeper than MAX_NESTING.
    """
    body, text = parse_json_object(raw)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]"
            )
    check_common(body, raw)
    return body, text


class ChatApi(RecordedApi):
    """Chat Completions on the recording pipeline (exchanges of kind `chat`)."""

    kind = "chat"
    upstream_path = "/chat/completions"

    def parse(self, raw: bytes) -> tuple[dict[str, Any], str]:
        return parse_chat_request(raw)

    async def link(
        self, proxy: ProxyState, body: dict[str, Any], explicit_id: str | None, id_source: str
    ) -> Link:
        return await proxy.stitcher.link(body["messages"], explicit_id, id_source)

    def assembler(self) -> DeferredAssembly:
        """A chat-completions assembler, fed in one pass when `[DONE]` may have arrived."""
        return DeferredAssembly(StreamAssembler(), CHAT_TERMINAL_MARKERS)

    async def remember(self, exchange: Exchange, response: dict[str, Any]) -> None:
        """Every choice's message closes a state (`n > 1`: the app may continue any of them);
        choice 0's is the exchange's `state_hash`, the others are stored by the recorder
        (`proxy.storage.rows.choice_state_rows`)."""
        message = response_message(response)
        if message is None:
            return
        request_hash = exchange.link.request_hash
        state_hash = chain_hash(request_hash, message)
        exchange.record.state_hash = state_hash
        stitcher = exchange.proxy.stitcher
        await stitcher.remember(state_hash, exchange.ref)
        for _, later in choice_state_rows(request_hash, response):
            await stitcher.remember(later, exchange.ref)

    def forwarded(
        self, proxy: ProxyState, body: dict[str, Any], raw: bytes
    ) -> tuple[bytes, dict[str, int | float] | None]:
        """The client's bytes, or the body with `logit_bias` added when promotion is on (then
        also what was added)."""
        settings = proxy.settings
        if settings.promote_tool_calls is None:
            return raw, None
        forwarded = dict(body)
        injected = promote_tool_calls(
            forwarded, settings.promote_tool_calls, drop_sampling=settings.promote_drop_sampling
        )
        if not injected:
            return raw, None
        return json.dumps(forwarded).encode(), injected

    async def teacher_complete(
        self, exchange: Exchange, teacher: Teacher, body: dict[str, Any], key: str | None
    ) -> dict[str, Any]:
        return await teacher.complete(body, key)

    async def teacher_stream(
        self, exchange: Exchange, teacher: Teacher, body: dict[str, Any], key: str | None
    ) -> AsyncIterator[bytes]:
        return await teacher.open_stream(body, key)


CHAT = ChatApi()


async def chat_completions(request: Request) -> Response:
    """Proxy and record one chat-completions call (see `proxy.http.pipeline`)."""
    return await handle(request, CHAT)
