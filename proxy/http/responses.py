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
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.core import responses as items_core
from proxy.core.sse import ResponsesStreamAssembler
from proxy.http.errors import InvalidRequest
from proxy.http.pipeline import Exchange, RecordedApi, check_common, handle, parse_json_object
from proxy.http.state import ProxyState
from proxy.http.teacher import Teacher
from proxy.recording.stitching import Link


def parse_responses_request(raw: bytes) -> tuple[dict[str, Any], str]:
    """Decode and check a Responses API body; return it as a dict and as text.

    Raises InvalidRequest (400) when it is not UTF-8 JSON, not an object, lacks a string `model`,
    has an `input` that is neither a string nor an array of objects, `instructions` that are not
    a string, a `previous_response_id` that is not a string, a non-boolean `stream`, `tools`
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
        return await proxy.stitcher.link_responses(body, explicit_id, id_source)

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


RESPONSES = ResponsesApi()


async def create_response(request: Request) -> Response:
    """Proxy and record one `POST /v1/responses` call (see `proxy.http.pipeline`)."""
    return await handle(request, RESPONSES)
