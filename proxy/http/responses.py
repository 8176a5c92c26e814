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
  `GET /v1/responses/{id}` brings its answer, streamed or not (held in this process and, on a
  shared database, written through so that whichever replica retrieves the answer records it,
  exactly once; never retrieved, it is recorded as it was at shutdown). Other Responses
  endpoints pass through unrecorded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy.core import responses as items_core
from proxy.core.redaction import loggable_error
from proxy.core.sse import (
    RESPONSES_TERMINAL_MARKERS,
    DeferredAssembly,
    ResponsesStreamAssembler,
)
from proxy.http.conversations import (
    conversation_history,
    forward_whole,
    mirror_response_items,
    redacted,
)
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
from proxy.recording.recorder import ExchangeRecord
from proxy.recording.stitching import Link

log = logging.getLogger("understudy.responses")


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

    def assembler(self) -> DeferredAssembly:
        """A Responses assembler, fed in one pass when a terminal event may have arrived."""
        return DeferredAssembly(ResponsesStreamAssembler(), RESPONSES_TERMINAL_MARKERS)

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
        if exchange.proxy.db.shared and _pending_background(exchange.record.request, response):
            await _hold_shared(exchange)
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
        if exchange.record.outcome != "ok" or not _pending_background(
            exchange.record.request, exchange.record.response
        ):
            return False
        response_id = exchange.record.response["id"]  # type: ignore[index]
        for pushed_out in exchange.proxy.stitcher.await_answer(response_id, exchange):
            pushed_out.submit()
        return True


_PENDING = ("queued", "in_progress")


def _pending_background(request: dict[str, Any], response: Any) -> bool:
    """Whether `response` is a background response's first answer (`queued` / `in_progress`,
    with an id): its exchange is recorded when the final answer is retrieved."""
    return (
        request.get("background") is True
        and isinstance(response, dict)
        and response.get("status") in _PENDING
        and isinstance(response.get("id"), str)
    )


RESPONSES = ResponsesApi()


async def retrieve_response(request: Request) -> Response:
    """`GET /v1/responses/{id}`: passed through; when it brings the final answer of a background
    response held by this proxy (in this process, or by any replica in the shared database),
    that exchange is recorded with it (its state remembered so the conversation goes on
    stitching), by exactly one replica. A streamed retrieval (`?stream=true`, optionally
    `starting_after=N`) is relayed event by event and recorded from its terminal event."""
    proxy: ProxyState = request.app.state.proxy
    response_id = request.path_params["response_id"]
    if proxy.stitcher.awaiting(response_id) is None and not await _held_elsewhere(
        proxy, response_id
    ):
        return await passthrough(request)
    if request.query_params.get("stream") == "true":
        return await _retrieve_stream(request, proxy, response_id)
    reply, _status, answer, text = await forward_whole(request, None)
    if answer is not None and answer.get("status") not in _PENDING:
        await _record_answer(proxy, response_id, answer, text)
    return reply


async def _held_elsewhere(proxy: ProxyState, response_id: str) -> bool:
    if not proxy.db.shared:
        return False
    try:
        return await proxy.db.background.held(response_id)
    except Exception as exc:
        log.warning("reading held background responses failed: %s", loggable_error(exc))
        return False


async def _hold_shared(exchange: Exchange) -> None:
    """Write a background exchange through to the shared database (redacted), so whichever
    replica retrieves its answer records it. Fails open (then only this replica can)."""
    proxy = exchange.proxy
    record = exchange.record
    fields = {k: v for k, v in dataclasses.asdict(record).items() if k != "queued_at"}
    held = redacted(proxy, {"record": fields, "context": list(exchange.link.context)})
    try:
        await proxy.db.background.hold(record.response["id"], json.dumps(held))  # type: ignore[index]
    except Exception as exc:
        log.warning("holding background response in the database failed: %s", loggable_error(exc))


def _rebuilt(proxy: ProxyState, record_json: str) -> Exchange | None:
    """The exchange another replica held (`_hold_shared`), or None when it does not decode."""
    try:
        held = json.loads(record_json)
        names = {f.name for f in dataclasses.fields(ExchangeRecord)}
        record = ExchangeRecord(**{k: v for k, v in held["record"].items() if k in names})
        context = tuple(held.get("context") or ())
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("a held background response does not decode: %s", loggable_error(exc))
        return None
    link = Link(
        trajectory_id=record.trajectory_id,
        parent=None,
        step=record.step,
        route=record.route,
        shadow=record.shadow,
        new_trajectory=record.new_trajectory,
        id_source=record.id_source,
        request_hash=record.request_hash,
        context=context,
    )
    return Exchange(proxy, RESPONSES, record, link, time.perf_counter())


async def _claimed(proxy: ProxyState, response_id: str) -> Exchange | None:
    """The held exchange of `response_id` this replica is to record now, or None (none held,
    or another replica claimed it). In shared mode the database decides who records it."""
    local = proxy.stitcher.answered_later(response_id)
    if not proxy.db.shared:
        return local
    try:
        record_json = await proxy.db.background.claim(response_id)
    except Exception as exc:
        log.warning("claiming a background response failed: %s", loggable_error(exc))
        return local  # fail open: this replica records what it holds
    if record_json is None:
        return None
    return local if local is not None else _rebuilt(proxy, record_json)


async def _record_answer(
    proxy: ProxyState, response_id: str, answer: dict[str, Any], text: str
) -> None:
    exchange = await _claimed(proxy, response_id)
    if exchange is None:
        return
    record = exchange.record
    record.response_text = text
    record.outcome = "error" if answer.get("status") == "failed" else "ok"
    if record.outcome == "error":
        record.error_text = json.dumps({"error": answer.get("error")})
    await exchange.answered(answer)
    exchange.submit()


async def _retrieve_stream(request: Request, proxy: ProxyState, response_id: str) -> Response:
    """A streamed retrieval: events relayed as they arrive, assembled on the side; the held
    exchange is recorded from the terminal event before that event reaches the client."""
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
    decoder = BodyDecoder(upstream.headers.get("content-encoding"))
    assembler = ResponsesStreamAssembler()
    streamed = upstream.status == 200 and upstream.headers.get("content-type", "").startswith(
        "text/event-stream"
    )

    async def relay() -> AsyncIterator[bytes]:
        assembling = streamed
        try:
            async for chunk in upstream.content.iter_any():
                if assembling:
                    try:
                        assembler.feed(decoder.decode(chunk))
                        if assembler.done:
                            assembling = False
                            final = assembler.result()
                            if assembler.error is None and final.get("status") not in _PENDING:
                                await _record_answer(proxy, response_id, final, json.dumps(final))
                    except Exception:
                        assembling = False
                        log.exception("responses: recording a streamed retrieval failed")
                yield chunk
        except UPSTREAM_ERRORS as exc:
            log.info("a streamed retrieval broke: %s", loggable_error(exc))
        finally:
            upstream.release()

    response = StreamingResponse(relay(), status_code=upstream.status)
    response.raw_headers = response_headers(upstream.raw_headers)
    return response


async def drain_background(proxy: ProxyState) -> None:
    """Shutdown: record the background exchanges this process still holds as they are (a
    response never retrieved). In shared mode only those no other replica recorded (claimed)."""
    for exchange in proxy.stitcher.drain_awaiting():
        response = exchange.record.response
        if proxy.db.shared and isinstance(response, dict) and isinstance(response.get("id"), str):
            try:
                if await proxy.db.background.claim(response["id"]) is None:
                    continue
            except Exception as exc:
                log.warning("claiming a background response failed: %s", loggable_error(exc))
        exchange.submit()


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def create_response(request: Request) -> Response:
    """Proxy and record one `POST /v1/responses` call (see `proxy.http.pipeline`)."""
    return await handle(request, RESPONSES)
