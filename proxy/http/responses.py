"""`POST /v1/responses`: the Responses API on the recording pipeline (exchanges of kind `responses`).

What is the Responses API's own (the shared flow is `proxy.http.pipeline`):
- checks: `input` is a string or an array of item objects, `instructions` a string;
- stitching: `previous_response_id` is an explicit parent link, the conversation rebuilt from
  the proxy's records; a full resend stitches by prefix hashing over canonical items, with
  `item_reference`s resolved through recorded items (`Stitcher.link_responses`);
- the state an answer completes: the request's hash chained over the `output` items; the
  response id is remembered for the next `previous_response_id`;
- streams: Responses events assembled by `ResponsesStreamAssembler` (no `[DONE]`);
- the teacher and shadow answers come through litellm's Responses support, given the whole
  visible history (no `previous_response_id`, `item_reference`, encrypted reasoning or
  compaction items: they are tied to the org that issued them).
- Tool-call promotion does not apply: the Responses API has no `logit_bias`.
- `conversation` (an id or `{"id"}`): the request stands for the conversation's items as the
  proxy mirrored them (`proxy.http.conversations`) followed by its input; the answer's input
  and output items are appended to the mirror before the client receives its end.
- `background: true`: the exchange answered `queued` / `in_progress` is held and recorded when
  `GET /v1/responses/{id}` brings its answer (held in this process; never retrieved, it is
  recorded as it was at shutdown). Other Responses endpoints pass through unrecorded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.core import responses as items_core
from proxy.core.sse import ResponsesStreamAssembler
from proxy.http.conversations import conversation_history, mirror_response_items
from proxy.http.errors import InvalidRequest, error_response
from proxy.http.passthrough import passthrough
from proxy.http.pipeline import Exchange, RecordedApi, check_common, handle, parse_json_object
from proxy.http.state import ProxyState
from proxy.http.teacher import Teacher
from proxy.http.upstream import (
    UPSTREAM_ERRORS,
    BodyDecoder,
    forward_headers,
    response_headers,
    transport_error,
    upstream_url,
)
from proxy.recording.stitching import Link


def parse_responses_request(raw: bytes) -> tuple[dict[str, Any], str]:
    """Decode and check a Responses API body; return it as a dict and as text.

    Raises InvalidRequest (400) when it is not UTF-8 JSON, not an object, lacks a string `model`,
    has an `input` that is neither a string nor an array of objects, `instructions` that are not
    a string, a `previous_response_id` that is not a string, a `conversation` that is neither an
    id nor `{"id": ...}`, a non-boolean `stream`, `tools`
    that are not an array of objects, or nests deeper than MAX_NESTING.
    """
    body, text = parse_json_object(raw)
    value = body.get("input")
    if value is not None and not isinstance(value, str):
        if not isinstance(value, list):
            raise InvalidRequest("'input' must be a string or an array of items", param="input")
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise InvalidRequest(f"input[{i}] must be an object", param=f"input[{i}]")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequest("'instructions' must be a string", param="instructions")
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise InvalidRequest(
            "'previous_response_id' must be a string", param="previous_response_id"
        )
    conversation = body.get("conversation")
    if conversation is not None and not (
        isinstance(conversation, str)
        or (isinstance(conversation, dict) and isinstance(conversation.get("id"), str))
    ):
        raise InvalidRequest(
            "'conversation' must be a conversation id or an object with a string 'id'",
            param="conversation",
        )
    check_common(body, raw)
    return body, text


class ResponsesApi(RecordedApi):
    """The Responses API on the recording pipeline (exchanges of kind `responses`)."""

    kind = "responses"
    upstream_path = "/responses"
    items_param = "input"

    def parse(self, raw: bytes) -> tuple[dict[str, Any], str]:
        return parse_responses_request(raw)

    async def link(
        self, proxy: ProxyState, body: dict[str, Any], explicit_id: str | None, id_source: str
    ) -> Link:
        """Stitching (`Stitcher.link_responses`). A request created in a `conversation` stands
        for the conversation's mirrored items followed by its input: it stitches as a client
        that resends everything would, and those items are its context (for the teacher and
        for a later `previous_response_id`)."""
        conversation = items_core.conversation_id(body)
        if conversation is None or items_core.previous_response_id(body) is not None:
            return await proxy.stitcher.link_responses(body, explicit_id, id_source)
        _begun, history = await conversation_history(proxy, conversation)
        resent = {k: v for k, v in body.items() if k != "conversation"}
        resent["input"] = [*history, *items_core.input_items(body)]
        link = await proxy.stitcher.link_responses(resent, explicit_id, id_source)
        return dataclasses.replace(link, context=tuple(history))

    def assembler(self) -> ResponsesStreamAssembler:
        return ResponsesStreamAssembler()

    async def remember(self, exchange: Exchange, response: dict[str, Any]) -> None:
        """State: the request hash chained over the output items; and the response id, whose
        continuation inherits this exchange's context, input and output."""
        stitcher = exchange.proxy.stitcher
        output = items_core.output_items(response)
        state_hash = exchange.link.request_hash
        for item in output:
            state_hash = items_core.chain_hash(state_hash, item)
        if output:
            exchange.record.state_hash = state_hash
            await stitcher.remember(state_hash, exchange.ref)
        response_id = response.get("id")
        if isinstance(response_id, str) and response_id:
            inherited = items_core.inherited_items(
                exchange.link.context, exchange.record.request, response
            )
            await stitcher.remember_response(response_id, exchange.ref, inherited)
        conversation = items_core.conversation_id(exchange.record.request)
        if (
            conversation is not None
            and items_core.previous_response_id(exchange.record.request) is None
            and response.get("status") not in _PENDING  # a background answer: when retrieved
        ):
            await mirror_response_items(
                exchange.proxy, conversation, exchange.record.request, response, exchange.record.id
            )

    def _teacher_body(self, exchange: Exchange, body: dict[str, Any]) -> dict[str, Any]:
        own, _ = items_core.resolve_references(
            items_core.input_items(body), exchange.proxy.stitcher.known_items()
        )
        return items_core.teacher_request(body, [*exchange.link.context, *own])

    async def teacher_complete(
        self, exchange: Exchange, teacher: Teacher, body: dict[str, Any], key: str | None
    ) -> dict[str, Any]:
        return await teacher.respond(self._teacher_body(exchange, body), key)

    async def teacher_stream(
        self, exchange: Exchange, teacher: Teacher, body: dict[str, Any], key: str | None
    ) -> AsyncIterator[bytes]:
        return await teacher.open_response_stream(self._teacher_body(exchange, body), key)

    def hold(self, exchange: Exchange) -> bool:
        """A background response (`background: true`) answered `queued` / `in_progress` is
        recorded when its answer is retrieved (`GET /v1/responses/{id}`), not now."""
        response = exchange.record.response
        if (
            exchange.record.request.get("background") is not True
            or exchange.record.outcome != "ok"
            or not isinstance(response, dict)
            or response.get("status") not in _PENDING
            or not isinstance(response.get("id"), str)
        ):
            return False
        for pushed_out in exchange.proxy.stitcher.await_answer(response["id"], exchange):
            pushed_out.submit()
        return True


_PENDING = ("queued", "in_progress")


RESPONSES = ResponsesApi()


async def retrieve_response(request: Request) -> Response:
    """`GET /v1/responses/{id}`: passed through; when it brings the answer of a background
    response this proxy holds, that exchange is recorded with it (its state remembered so the
    conversation goes on stitching). Streamed retrievals (`?stream=true`) pass through only."""
    proxy: ProxyState = request.app.state.proxy
    response_id = request.path_params["response_id"]
    exchange = proxy.stitcher.awaiting(response_id)
    if exchange is None or request.query_params.get("stream") == "true":
        return await passthrough(request)
    settings = proxy.settings
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    try:
        upstream = await proxy.client.request(
            "GET",
            upstream_url(
                settings, request.url.path.removeprefix("/v1"), request.url.query.encode()
            ),
            headers=forward_headers(request.headers.items(), api_key),
            allow_redirects=False,
        )
    except UPSTREAM_ERRORS as exc:
        status, message, code = transport_error(exc, settings)
        return error_response(status, message, "upstream_error", code=code)
    try:
        raw = await upstream.read()
    except UPSTREAM_ERRORS as exc:
        status, message, code = transport_error(exc, settings)
        return error_response(status, message, "upstream_error", code=code)
    finally:
        upstream.release()
    text = (
        BodyDecoder(upstream.headers.get("content-encoding")).decode(raw).decode("utf-8", "replace")
    )
    answer = _json_object(text) if upstream.status == 200 else None
    if (
        answer is not None
        and answer.get("status") not in _PENDING
        and proxy.stitcher.answered_later(response_id) is exchange
    ):
        record = exchange.record
        record.response_text = text
        record.outcome = "error" if answer.get("status") == "failed" else "ok"
        if record.outcome == "error":
            record.error_text = json.dumps({"error": answer.get("error")})
        await exchange.answered(answer)
        exchange.submit()
    reply = Response(raw, status_code=upstream.status)
    reply.raw_headers = [
        *response_headers(upstream.raw_headers),
        (b"content-length", str(len(raw)).encode()),
    ]
    return reply


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def create_response(request: Request) -> Response:
    """Proxy and record one `POST /v1/responses` call (see `proxy.http.pipeline`)."""
    return await handle(request, RESPONSES)
