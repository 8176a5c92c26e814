"""`POST /v1/chat/completions`: forward to the upstream, pass the answer on unchanged, record it.

Flow per request: validate the body, link it to a trajectory (stitching), forward the exact body
bytes, then either relay the JSON answer or relay SSE chunks as they arrive while assembling them.
The exchange's state is remembered before the client can send its next step; the record goes to
the recorder's queue. Recording never changes what the client receives.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy.canonical import chain_hash
from proxy.errors import InvalidRequest, error_body, error_response
from proxy.recorder import ExchangeRecord, control_headers
from proxy.sse import StreamAssembler
from proxy.state import ProxyState
from proxy.stitching import MAX_TRAJECTORY_ID_LENGTH, TRAJECTORY_HEADER, Link
from proxy.storage import StateRef, new_id, utc_now
from proxy.upstream import BodyDecoder, forward_headers, response_headers, transport_error, upstream_url

log = logging.getLogger("understudy.chat")

EXCHANGE_HEADER = "x-understudy-exchange-id"


def parse_chat_request(raw: bytes) -> dict[str, Any]:
    """Decode and check a chat-completions body; return it as a dict.

    Raises InvalidRequest (400) when it is not UTF-8 JSON, not an object, lacks a string `model`
    or a non-empty `messages` array of objects with a string `role`.
    """
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_type")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter (a string)", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]"
            )
    return body


def explicit_trajectory_id(headers: Any, body: dict[str, Any]) -> tuple[str | None, str]:
    """The client-chosen trajectory id and where it came from ('header', 'metadata' or 'hash').

    The header wins over `metadata.trajectory_id`. Raises InvalidRequest for an empty or over-long id.
    """
    value = headers.get(TRAJECTORY_HEADER)
    source = "header"
    if value is None:
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and metadata.get("trajectory_id") is not None:
            value, source = metadata["trajectory_id"], "metadata"
    if value is None:
        return None, "hash"
    value = str(value).strip()
    if not value or len(value) > MAX_TRAJECTORY_ID_LENGTH:
        raise InvalidRequest(
            f"trajectory id must be 1 to {MAX_TRAJECTORY_ID_LENGTH} characters",
            param=TRAJECTORY_HEADER if source == "header" else "metadata.trajectory_id",
        )
    return value, source


def _response_message(response: dict[str, Any]) -> dict[str, Any] | None:
    choices = response.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict):
            return message
    return None


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


class _Exchange:
    """The state of one proxied call while it is in flight."""

    def __init__(self, proxy: ProxyState, record: ExchangeRecord, link: Link, start: float) -> None:
        self.proxy = proxy
        self.record = record
        self.link = link
        self.start = start
        self.finished = False

    @property
    def own_headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-understudy-trajectory-id", self.record.trajectory_id.encode("latin-1", "replace")),
            (EXCHANGE_HEADER.encode(), self.record.id.encode()),
        ]

    def answered(self, response: dict[str, Any] | None) -> None:
        """The upstream answered with `response` (a chat.completion): remember the new state."""
        self.record.response = response
        message = _response_message(response) if response else None
        if self.record.outcome == "ok" and message is not None:
            state_hash = chain_hash(self.link.request_hash, message)
            self.record.state_hash = state_hash
            self.proxy.stitcher.remember(
                state_hash,
                StateRef(self.record.id, self.record.trajectory_id, self.record.step, self.record.route),
            )

    def finish(self) -> None:
        """Stamp the duration and hand the record to the recorder (once)."""
        if self.finished:
            return
        self.finished = True
        self.record.duration_ms = _ms_since(self.start)
        if self.link.new_trajectory:
            self.proxy.stitcher.remember_route(self.record.trajectory_id, self.record.route)
        self.proxy.recorder.submit(self.record)


async def chat_completions(request: Request) -> Response:
    """Proxy one chat-completions call; see the module docstring."""
    start = time.perf_counter()
    proxy: ProxyState = request.app.state.proxy
    raw = await request.body()
    try:
        body = parse_chat_request(raw)
        explicit_id, id_source = explicit_trajectory_id(request.headers, body)
    except InvalidRequest as exc:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code)

    link = await proxy.stitcher.link(body["messages"], explicit_id, id_source)
    record = ExchangeRecord(
        id=new_id(),
        trajectory_id=link.trajectory_id,
        parent_id=link.parent.exchange_id if link.parent else None,
        step=link.step,
        new_trajectory=link.new_trajectory,
        id_source=link.id_source,
        route=link.route or "student",
        started_utc=utc_now(),
        path=request.url.path,
        stream=body.get("stream") is True,
        request=body,
        request_text=raw.decode("utf-8"),
        request_hash=link.request_hash,
        control_headers=control_headers(request.headers),
    )
    exchange = _Exchange(proxy, record, link, start)
    settings = proxy.settings
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    upstream_request = proxy.client.build_request(
        "POST",
        upstream_url(settings, "/chat/completions", request.url.query.encode()),
        content=raw,
        headers=forward_headers(request.headers.items(), api_key),
    )
    try:
        upstream = await proxy.client.send(upstream_request, stream=True)
    except httpx.HTTPError as exc:
        status, message, code = transport_error(exc, settings)
        record.status_code, record.outcome = status, "error"
        record.error_text = json.dumps(error_body(message, "upstream_error", code=code))
        exchange.finish()
        return _proxy_error(exchange, status)

    record.status_code = upstream.status_code
    record.upstream_request_id = upstream.headers.get("x-request-id")
    content_type = upstream.headers.get("content-type", "")
    if upstream.status_code == 200 and content_type.startswith("text/event-stream"):
        response = StreamingResponse(_relay_stream(exchange, upstream))
        response.raw_headers = [*response_headers(upstream.headers), *exchange.own_headers]
        return response
    return await _relay_body(exchange, upstream)


def _proxy_error(exchange: _Exchange, status: int) -> Response:
    """The proxy's own error answer (502/504), with the trajectory headers."""
    response = Response(
        (exchange.record.error_text or "").encode(), status_code=status, media_type="application/json"
    )
    response.raw_headers = [*response.raw_headers, *exchange.own_headers]
    return response


async def _relay_body(exchange: _Exchange, upstream: httpx.Response) -> Response:
    """A whole (JSON) answer: read it raw, record a decoded copy, return the raw bytes."""
    record = exchange.record
    try:
        raw = b"".join([chunk async for chunk in upstream.aiter_raw()])
    except httpx.HTTPError as exc:
        await upstream.aclose()
        status, message, code = transport_error(exc, exchange.proxy.settings)
        record.status_code, record.outcome = status, "error"
        record.error_text = json.dumps(error_body(message, "upstream_error", code=code))
        exchange.finish()
        return _proxy_error(exchange, status)
    await upstream.aclose()
    text = BodyDecoder(upstream.headers.get("content-encoding")).decode(raw).decode("utf-8", "replace")
    if 200 <= upstream.status_code < 300:
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            record.response_text = text
            exchange.answered(parsed)
        else:
            record.outcome = "error"
            record.error_text = text
    else:
        record.outcome = "error"
        record.error_text = text
    exchange.finish()
    response = Response(raw, status_code=upstream.status_code)
    response.raw_headers = [
        *response_headers(upstream.headers),
        *exchange.own_headers,
        (b"content-length", str(len(raw)).encode()),
    ]
    return response


async def _relay_stream(exchange: _Exchange, upstream: httpx.Response) -> AsyncIterator[bytes]:
    """SSE: yield each upstream chunk as it arrives; assemble a decoded copy on the side.

    The new state is remembered before the `[DONE]` event is passed on. A client that goes away
    leaves the exchange recorded as 'cancelled'; an upstream that breaks mid-stream, as 'error'.
    """
    record = exchange.record
    assembler = StreamAssembler()
    decoder = BodyDecoder(upstream.headers.get("content-encoding"))
    record.outcome = "cancelled"
    answered = False
    try:
        async for chunk in upstream.aiter_raw():
            if record.ttft_ms is None:
                record.ttft_ms = _ms_since(exchange.start)
            assembler.feed(decoder.decode(chunk))
            if assembler.done and not answered:
                answered = True
                record.outcome = "error" if assembler.error else "ok"
                exchange.answered(assembler.result())
            yield chunk
        if not answered:
            assembler.close()
            answered = True
            record.outcome = "error" if assembler.error else "ok"
            exchange.answered(assembler.result())
    except httpx.HTTPError as exc:
        record.outcome = "error"
        record.error_text = json.dumps(
            error_body(f"upstream stream broke: {type(exc).__name__}: {exc}", "upstream_error")
        )
    finally:
        with anyio.CancelScope(shield=True):
            await upstream.aclose()
        if not answered:
            record.response = assembler.result() if assembler.chunks else None
        if assembler.error is not None:
            record.error_text = json.dumps(assembler.error)
        exchange.finish()
