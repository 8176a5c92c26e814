"""The recording pipeline every recorded API shares (chat completions, Responses).

Flow per request: read the body (size and content-type limits), parse and check it (per API),
find the trajectory (an explicit id, or the API's own stitching), decide or keep the route, then
either ask the teacher or forward the exact body bytes upstream and relay the answer: a whole JSON
body, or SSE events passed on as they arrive while the API's assembler builds the answer on the
side. Without a teacher configured every call goes upstream whatever its trajectory, so the call
is forwarded first and stitched while the upstream works (hashing, and on PostgreSQL the
database reads, then cost the call nothing); every refusal (400) still comes before forwarding.
The exchange's state is remembered before the client can send its next step; the record goes to
the recorder's queue. Recording never changes what the client receives.

Body limits and the checks every API shares are `proxy.http.body`. An API plugs in as a
`RecordedApi` subclass (`proxy.http.chat.ChatApi`,
`proxy.http.responses.ResponsesApi`). `handle(request, api)` is the one error boundary: an
unexpected exception becomes an OpenAI-shaped 500, the exchange is recorded as an error and the
traceback is logged once.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from proxy.core.routing import ROUTE_HEADER, RouteHeaderError, check_route_header, decide_route
from proxy.http.body import (
    MAX_NESTING,
    check_common,
    explicit_trajectory_id,
    nesting_depth,
    parse_json_object,
    read_body,
)
from proxy.http.errors import InvalidRequest, error_body, error_response
from proxy.http.paths import forward_path
from proxy.http.relay import RelayResponse
from proxy.http.state import ProxyState
from proxy.http.teacher import Teacher, TeacherError
from proxy.http.upstream import (
    UPSTREAM_ERRORS,
    BodyDecoder,
    forward_headers,
    response_headers,
    transport_error,
    upstream_url,
)
from proxy.recording.recorder import ExchangeRecord, ShadowUpdate, control_headers
from proxy.recording.stitching import Link
from proxy.storage import StateRef, new_id, utc_now

__all__ = [
    "EXCHANGE_HEADER",
    "MAX_NESTING",
    "Assembler",
    "Exchange",
    "RecordedApi",
    "check_common",
    "explicit_trajectory_id",
    "handle",
    "nesting_depth",
    "open_exchange",
    "parse_json_object",
    "read_body",
]

log = logging.getLogger("understudy.pipeline")

EXCHANGE_HEADER = "x-understudy-exchange-id"


def error_json(text: str) -> str:
    """An upstream error body as stored: itself when it is JSON, else wrapped in an error object."""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return json.dumps(error_body(text, "upstream_error", code="upstream_invalid_body"))
    return text


def ms_since(start: float) -> float:
    """Milliseconds since `start` (a `time.perf_counter()` value), to the microsecond."""
    return round((time.perf_counter() - start) * 1000, 3)


def client_key(headers: Any) -> str | None:
    """The bearer token the app sent (given to the teacher only when it is the same upstream)."""
    value = headers.get("authorization", "")
    return value[7:].strip() or None if value[:7].lower() == "bearer " else None


class Assembler(Protocol):
    """Builds one answer from a stream's decoded bytes (`proxy.core.sse.StreamAssembler`,
    `proxy.core.responses.ResponsesStreamAssembler`, either behind
    `proxy.core.sse.DeferredAssembly`)."""

    @property
    def done(self) -> bool:
        """The stream's terminal event arrived."""

    @property
    def error(self) -> Any:
        """An error object the stream carried, or None."""

    @property
    def chunks(self) -> int:
        """Events that contributed to the answer."""

    def feed(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def result(self) -> dict[str, Any]: ...


class Exchange:
    """The state of one proxied call while it is in flight: its record, link and API."""

    def __init__(
        self,
        proxy: ProxyState,
        api: RecordedApi,
        record: ExchangeRecord,
        link: Link,
        start: float,
    ) -> None:
        self.proxy = proxy
        self.api = api
        self.record = record
        self.link = link
        self.start = start
        self.submitted = asyncio.Event()

    @property
    def own_headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-understudy-trajectory-id", self.record.trajectory_id.encode("ascii")),
            (EXCHANGE_HEADER.encode(), self.record.id.encode()),
            (ROUTE_HEADER.encode(), self.record.route.encode()),
        ]

    @property
    def ref(self) -> StateRef:
        record = self.record
        return StateRef(record.id, record.trajectory_id, record.step, record.route, record.shadow)

    async def answered(self, response: dict[str, Any] | None) -> None:
        """The model answered with `response` (the API's answer object): remember the new state."""
        self.record.response = response
        if self.record.outcome == "ok" and response is not None:
            try:
                await self.api.remember(self, response)
            except Exception:  # recording fails open: the answer still reaches the client
                self.record.state_hash = None
                log.exception("%s: remembering the state of an answer failed", self.api.kind)

    def failed(self, status: int, body: dict[str, Any]) -> Response:
        """Record an error the proxy answers itself (502/504/500 or a teacher error) and build it."""
        self.record.status_code, self.record.outcome = status, "error"
        self.record.error_text = json.dumps(body)
        self.finish()
        response = Response(
            self.record.error_text.encode(), status_code=status, media_type="application/json"
        )
        response.raw_headers = [*response.raw_headers, *self.own_headers]
        return response

    def finish(self) -> None:
        """Stamp the duration and hand the record to the recorder (once), unless the API holds
        it for an answer that arrives later (`RecordedApi.hold`)."""
        if self.submitted.is_set():
            return
        self.record.duration_ms = ms_since(self.start)
        self.submitted.set()
        if self.api.hold(self):
            return
        self.submit()

    def submit(self) -> None:
        """Hand the record to the recorder now (also a held one: see `RecordedApi.hold`)."""
        self.proxy.recorder.submit(self.record)
        self.proxy.metrics.observe(self.record)


class RecordedApi(abc.ABC):
    """What one recorded API adds to the pipeline. Subclasses set `kind` ('chat', 'responses')
    and `upstream_path` (under the upstream's base URL) and implement the hooks."""

    kind = ""
    upstream_path = ""
    items_param = "messages"  # the body field that holds the conversation

    @abc.abstractmethod
    def parse(self, raw: bytes) -> tuple[dict[str, Any], str]:
        """The checked body as a dict and as text; raises InvalidRequest (400)."""

    @abc.abstractmethod
    async def link(
        self, proxy: ProxyState, body: dict[str, Any], explicit_id: str | None, id_source: str
    ) -> Link:
        """The trajectory and parent exchange of this request (stitching)."""

    @abc.abstractmethod
    def assembler(self) -> Assembler:
        """A fresh stream assembler for this API's SSE events."""

    @abc.abstractmethod
    async def remember(self, exchange: Exchange, response: dict[str, Any]) -> None:
        """Remember the state `response` completes (awaited before the client sees the end)."""

    def hold(self, exchange: Exchange) -> bool:
        """Keep the finished exchange's record back (True) because its answer comes later; the
        API then calls `exchange.submit()` itself. Default: never."""
        return False

    def forwarded(
        self, proxy: ProxyState, body: dict[str, Any], raw: bytes
    ) -> tuple[bytes, dict[str, int | float] | None]:
        """The body bytes to send upstream (the client's own bytes unless the API changes them)
        and the `logit_bias` the proxy added to them (recorded), or None."""
        return raw, None

    @abc.abstractmethod
    async def teacher_complete(
        self, exchange: Exchange, teacher: Teacher, body: dict[str, Any], key: str | None
    ) -> dict[str, Any]:
        """A whole teacher answer in this API's answer shape. Raises TeacherError."""

    @abc.abstractmethod
    async def teacher_stream(
        self, exchange: Exchange, teacher: Teacher, body: dict[str, Any], key: str | None
    ) -> AsyncIterator[bytes]:
        """A streamed teacher answer as this API's SSE bytes. Raises TeacherError."""


async def handle(request: Request, api: RecordedApi) -> Response:
    """Proxy and record one call of `api`: the one error boundary around `_call`."""
    start = time.perf_counter()
    holder: list[Exchange] = []
    try:
        return await _call(request, api, start, holder)
    except Exception as exc:
        log.exception("%s: unexpected error proxying %s", api.kind, request.url.path)
        body = error_body(
            f"the proxy failed on this request: {type(exc).__name__}",
            "server_error",
            code="proxy_error",
        )
        if holder and not holder[0].submitted.is_set():
            return holder[0].failed(500, body)
        return Response(json.dumps(body).encode(), status_code=500, media_type="application/json")


async def open_exchange(
    proxy: ProxyState,
    api: RecordedApi,
    body: dict[str, Any],
    request_text: str,
    headers: Any,
    path: str,
    start: float,
    explicit: tuple[str | None, str] | None = None,
) -> Exchange:
    """Link a checked request `body` to its trajectory, decide or keep its route, and build its
    in-flight exchange. explicit: `explicit_trajectory_id(headers, body)` when the caller has it
    already. Raises InvalidRequest (bad trajectory id), RouteHeaderError, and RecursionError for
    input nested too deeply to hash."""
    explicit_id, id_source = explicit or explicit_trajectory_id(headers, body)
    link = await api.link(proxy, body, explicit_id, id_source)
    if link.route is None:
        decision = decide_route(body, headers.get(ROUTE_HEADER), link.request_hash, proxy.settings)
        route, shadow = await proxy.stitcher.claim(link, decision.route, decision.shadow)
    else:
        route, shadow = link.route, link.shadow
    if proxy.teacher is None:  # routed earlier by a proxy that had a teacher configured
        route, shadow = "student", False
    record = ExchangeRecord(
        id=new_id(),
        trajectory_id=link.trajectory_id,
        parent_id=link.parent.exchange_id if link.parent else None,
        step=link.step,
        new_trajectory=link.new_trajectory,
        id_source=link.id_source,
        route=route,
        shadow=shadow,
        started_utc=utc_now(),
        path=path,
        stream=body.get("stream") is True,
        request=body,
        request_text=request_text,
        request_hash=link.request_hash,
        control_headers=control_headers(headers),
        kind=api.kind,
    )
    return Exchange(proxy, api, record, link, start)


async def _open_once_sent(
    proxy: ProxyState,
    api: RecordedApi,
    body: dict[str, Any],
    request_text: str,
    request: Request,
    start: float,
    explicit: tuple[str | None, str],
) -> Exchange:
    """`open_exchange` run beside the upstream call (see `_call`). It first lets the loop go
    round once, so that the upstream request's bytes leave before this work starts: aiohttp
    writes a body in a task of its own on Python < 3.12, queued after this one."""
    await asyncio.sleep(0)
    return await open_exchange(
        proxy, api, body, request_text, request.headers, request.url.path, start, explicit
    )


def refused(
    proxy: ProxyState,
    api: RecordedApi,
    status: int,
    message: str,
    param: str | None,
    code: str | None,
) -> Response:
    """The OpenAI-shaped error for a request refused before forwarding, counted in `/metrics` and
    logged in one line by `Metrics.rejected` (under the API's own path, never the client's)."""
    proxy.metrics.rejected(status, code, param, f"/v1{api.upstream_path}")
    return error_response(status, message, param=param, code=code)


async def _call(
    request: Request, api: RecordedApi, start: float, holder: list[Exchange]
) -> Response:
    proxy: ProxyState = request.app.state.proxy
    settings = proxy.settings
    if settings.on_record_failure == "refuse" and proxy.recorder.impaired:
        return error_response(
            503,
            f"recording is impaired ({proxy.recorder.impaired}); this proxy refuses calls "
            "until it records again (--on-record-failure refuse)",
            "server_error",
            code="recording_impaired",
            headers={"retry-after": "5"},
        )
    opening: asyncio.Future[Exchange] | None = None
    try:
        raw = await read_body(request, settings.max_body_bytes)
        body, request_text = api.parse(raw)
        explicit = explicit_trajectory_id(request.headers, body)
        if proxy.teacher is None:
            # Without a teacher every call goes upstream, whatever its trajectory: forward it
            # now and stitch while the upstream works (`_open_once_sent`). Refusals come first.
            check_route_header(request.headers.get(ROUTE_HEADER))
            opening = asyncio.ensure_future(
                _open_once_sent(proxy, api, body, request_text, request, start, explicit)
            )
        else:
            exchange = await open_exchange(
                proxy, api, body, request_text, request.headers, request.url.path, start, explicit
            )
    except InvalidRequest as exc:
        return refused(proxy, api, exc.status, exc.message, exc.param, exc.code)
    except ClientDisconnect:
        log.info("client went away while sending its request body; nothing forwarded")
        return Response(status_code=499)  # nobody reads it; keeps the server's log quiet
    except RecursionError:
        message = f"{api.items_param} are nested too deeply"
        return refused(proxy, api, 400, message, api.items_param, None)
    except RouteHeaderError as exc:
        return refused(proxy, api, 400, str(exc), ROUTE_HEADER, None)
    key = client_key(request.headers)
    if opening is None:
        holder.append(exchange)
        if exchange.record.route == "teacher" and proxy.teacher is not None:
            return await _teacher_call(exchange, proxy.teacher, body, key)
        if exchange.record.shadow and proxy.teacher is not None:
            proxy.track(_shadow_call(exchange, proxy.teacher, body, key))

    upstream: aiohttp.ClientResponse | None = None
    failure: BaseException | None = None
    try:
        content, injected = api.forwarded(proxy, body, raw)
        api_key = (
            settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        )
        upstream = await proxy.client.request(
            "POST",
            upstream_url(
                settings,
                forward_path(request.scope, api.upstream_path, settings.upstream_is_azure),
                request.url.query.encode(),
            ),
            data=content,
            headers=forward_headers(
                request.headers.items(), api_key, azure=settings.upstream_is_azure
            ),
            allow_redirects=False,
        )
    except UPSTREAM_ERRORS as exc:
        failure = exc
    except BaseException:  # cancelled (the client went away), or a bug: stop stitching too
        if opening is not None:
            opening.cancel()
        raise
    if opening is not None:
        try:
            exchange = await opening
        except BaseException:
            if upstream is not None:
                upstream.close()
            raise
        holder.append(exchange)
    record = exchange.record
    record.injected_logit_bias = injected
    if failure is not None:
        status, message, code = transport_error(failure, settings)
        return exchange.failed(status, error_body(message, "upstream_error", code=code))
    assert upstream is not None

    record.status_code = upstream.status
    record.upstream_request_id = upstream.headers.get("x-request-id")
    content_type = upstream.headers.get("content-type", "")
    if upstream.status == 200 and content_type.startswith("text/event-stream"):
        response_to = upstream

        def close() -> None:
            response_to.release()  # back to the pool; closed instead when the body was not all read

        def ended() -> bool:
            """The exchange is recorded and the upstream body complete: no chunk can follow."""
            return exchange.submitted.is_set() and response_to.content.at_eof()

        response = RelayResponse(
            relay_stream(
                exchange,
                upstream.content.iter_any(),
                BodyDecoder(upstream.headers.get("content-encoding")),
                close,
            ),
            ended=ended,
        )
        response.raw_headers = [*response_headers(upstream.raw_headers), *exchange.own_headers]
        return response
    return await relay_body(exchange, upstream)


async def relay_body(exchange: Exchange, upstream: aiohttp.ClientResponse) -> Response:
    """A whole (JSON) answer: read it raw, record a decoded copy, return the raw bytes."""
    record = exchange.record
    try:
        raw = await upstream.read()
    except UPSTREAM_ERRORS as exc:
        upstream.release()
        status, message, code = transport_error(exc, exchange.proxy.settings)
        return exchange.failed(status, error_body(message, "upstream_error", code=code))
    upstream.release()
    text = (
        BodyDecoder(upstream.headers.get("content-encoding")).decode(raw).decode("utf-8", "replace")
    )
    if 200 <= upstream.status < 300:
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):  # nested past the parser: kept as an error text
            parsed = None
        if isinstance(parsed, dict):
            record.response_text = text
            await exchange.answered(parsed)
        else:
            record.outcome = "error"
            record.error_text = error_json(text)
    else:
        record.outcome = "error"
        record.error_text = error_json(text)
    exchange.finish()
    response = Response(raw, status_code=upstream.status)
    response.raw_headers = [
        *response_headers(upstream.raw_headers),
        *exchange.own_headers,
        (b"content-length", str(len(raw)).encode()),
    ]
    return response


async def relay_stream(
    exchange: Exchange,
    chunks: AsyncIterator[bytes],
    decoder: BodyDecoder,
    close: Callable[[], Awaitable[None] | None],
) -> AsyncGenerator[bytes, None]:
    """SSE: yield each chunk as it arrives; assemble a decoded copy on the side. `close` ends
    the source when the stream ends however it ends: a plain function, or one returning an
    awaitable, which is awaited shielded from cancellation (a client that went away).

    The new state is remembered before the chunk holding the terminal event (`[DONE]`,
    `response.completed`, ...) is passed on. A client that goes away leaves the exchange recorded
    as 'cancelled'; an upstream that breaks mid-stream, as 'error'. An assembler that fails
    (a bug) stops assembling, is logged once and never breaks the client's stream.
    """
    record = exchange.record
    assembler = exchange.api.assembler()
    assembling = True
    record.outcome = "cancelled"
    answered = False

    async def answer() -> None:
        nonlocal answered
        answered = True
        record.outcome = "error" if assembler.error else "ok"
        await exchange.answered(assembler.result())
        if assembler.error is not None:
            record.error_text = json.dumps(assembler.error)
        exchange.finish()  # recorded (write-ahead log) before the last event goes out

    try:
        async for chunk in chunks:
            if record.ttft_ms is None:
                record.ttft_ms = ms_since(exchange.start)
            if assembling:
                try:
                    assembler.feed(decoder.decode(chunk))
                    if assembler.done and not answered:
                        await answer()
                except Exception:
                    assembling = False
                    log.exception("%s: assembling the stream failed", exchange.api.kind)
            yield chunk
        if not answered and assembling:
            assembler.close()
            await answer()
    except UPSTREAM_ERRORS as exc:
        record.outcome = "error"
        # The same words whichever HTTP client is underneath (tests and users grep for them).
        kind = "ReadTimeout" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
        error = error_body(f"upstream stream broke: {kind}: {exc}", "upstream_error")
        record.error_text = json.dumps(error)
        if decoder.identity:  # end the stream with an error event the SDKs raise on
            yield b"data: " + record.error_text.encode() + b"\n\n"
    finally:
        closing = close()
        if closing is not None:
            with anyio.CancelScope(shield=True):
                await closing
        if not answered:
            try:
                record.response = assembler.result() if assembler.chunks else None
            except Exception:
                log.exception("%s: assembling the stream failed", exchange.api.kind)
        if not assembling and record.outcome == "ok":
            record.outcome = "error"
            record.error_text = json.dumps(
                error_body("the proxy could not assemble this stream", "server_error")
            )
        carried: Any = None  # an error object the stream carried
        try:
            carried = assembler.error
        except Exception:
            log.exception("%s: assembling the stream failed", exchange.api.kind)
        if carried is not None:
            record.error_text = json.dumps(carried)
        exchange.finish()


async def _teacher_call(
    exchange: Exchange, teacher: Teacher, body: dict[str, Any], key: str | None
) -> Response:
    """Answer from the teacher (litellm), in the API's format, streamed when the app asked."""
    record = exchange.record
    api = exchange.api
    try:
        if record.stream:
            events = await api.teacher_stream(exchange, teacher, body, key)
        else:
            answer = await api.teacher_complete(exchange, teacher, body, key)
    except TeacherError as exc:
        return exchange.failed(exc.status, exc.body)
    record.status_code = 200
    headers = [
        *exchange.own_headers,
        (b"x-understudy-teacher-model", teacher.display_model.encode()),
    ]
    if record.stream:

        async def close() -> None:
            await events.aclose()  # type: ignore[attr-defined]

        response: Response = RelayResponse(
            relay_stream(exchange, events, BodyDecoder(None), close),
            media_type="text/event-stream",
        )
        response.raw_headers = [*response.raw_headers, *headers]
        return response
    text = json.dumps(answer)
    record.response_text = text
    await exchange.answered(answer)
    exchange.finish()
    response = Response(text.encode(), media_type="application/json")
    response.raw_headers = [*response.raw_headers, *headers]
    return response


async def _shadow_call(
    exchange: Exchange, teacher: Teacher, body: dict[str, Any], key: str | None
) -> None:
    """Ask the teacher the same request in the background; store its answer beside the exchange."""
    start = time.perf_counter()
    response_json = error_text = None
    try:
        answer = await exchange.api.teacher_complete(
            exchange, teacher, {**body, "stream": False}, key
        )
        response_json = json.dumps(answer)
    except TeacherError as exc:
        error_text = json.dumps(exc.body)
    except Exception as exc:  # never let a shadow failure escape into the event loop
        log.exception("shadow call failed")
        error_text = json.dumps(error_body(f"shadow call failed: {exc}", "teacher_error"))
    await exchange.submitted.wait()
    exchange.proxy.recorder.submit(
        ShadowUpdate(
            exchange.record.id, teacher.display_model, response_json, error_text, ms_since(start)
        )
    )
