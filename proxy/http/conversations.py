"""`/v1/conversations`: passed through as they come, and mirrored so that responses created with
`conversation` stitch, route and export with their whole history.

The upstream keeps a conversation's items; a response created in it carries only its new items.
The proxy mirrors what passes through it (`proxy.storage.conversations`, written through the
shared database, so every replica sees it):
- `POST /v1/conversations`: the conversation began here, with the `items` the client sent;
- `POST /v1/conversations/{id}/items`: the items the upstream says it added (with their ids);
- `GET /v1/conversations/{id}/items`: a whole listing (no `after`, `has_more` false) of a
  conversation the proxy has no item of (it began before the proxy), in chronological order;
- each response created with `conversation` (`proxy.http.responses`): its input and output items.
The client always gets the upstream's status, headers and bytes; mirroring fails open (logged).
Other conversation calls (retrieve, update, delete, a single item) pass through unrecorded; a
`DELETE` leaves the mirror and the recorded exchanges in place (they are the training data).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from proxy.core import responses as items_core
from proxy.core.redaction import Redactor, loggable_error
from proxy.http.body import read_body
from proxy.http.errors import InvalidRequest, error_response
from proxy.http.paths import PathRefused, raw_path_of, upstream_path
from proxy.http.state import ProxyState
from proxy.http.upstream import (
    UPSTREAM_ERRORS,
    BodyDecoder,
    forward_headers,
    response_headers,
    transport_error,
    upstream_url,
)

log = logging.getLogger("understudy.conversations")


async def forward_whole(
    request: Request, content: bytes | None
) -> tuple[Response, int, dict[str, Any] | None, str]:
    """Send the request (its method, normalised path, query, headers and `content`) upstream
    and read the whole answer. Returns the response for the client (the upstream's status,
    headers and bytes, or an OpenAI-shaped 400/502/504), the upstream's status (0 when none
    answered), its body as a JSON object when it is one and the status is 200 (else None), and
    that body as decoded text ("" when none)."""
    proxy: ProxyState = request.app.state.proxy
    settings = proxy.settings
    try:
        path = upstream_path(raw_path_of(request.scope))
    except PathRefused as exc:
        reply = error_response(400, f"refused path: {exc}", param="path", code="invalid_path")
        return reply, 0, None, ""
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    try:
        upstream = await proxy.client.request(
            request.method,
            upstream_url(settings, path, request.url.query.encode()),
            data=content,
            headers=forward_headers(request.headers.items(), api_key),
            allow_redirects=False,
        )
        try:
            raw = await upstream.read()
        finally:
            upstream.release()
    except UPSTREAM_ERRORS as exc:
        status, message, code = transport_error(exc, settings)
        return error_response(status, message, "upstream_error", code=code), 0, None, ""
    reply = Response(raw, status_code=upstream.status)
    reply.raw_headers = [
        *response_headers(upstream.raw_headers),
        (b"content-length", str(len(raw)).encode()),
    ]
    answer: dict[str, Any] | None = None
    text = ""
    if upstream.status == 200:
        text = (
            BodyDecoder(upstream.headers.get("content-encoding"))
            .decode(raw)
            .decode("utf-8", "replace")
        )
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            value = None
        answer = value if isinstance(value, dict) else None
    return reply, upstream.status, answer, text


def redacted(proxy: ProxyState, value: Any) -> Any:
    """`value` (JSON-able) with secrets and the configured PII masked, as the recorder masks
    what it stores (`proxy.core.redaction.Redactor`)."""
    settings = proxy.settings
    text = json.dumps(value, ensure_ascii=False)
    masked = Redactor(settings.redact_pii, settings.phone_region).json_text(text)
    return value if masked == text else json.loads(masked or "null")


def _items_of(body: Any, field: str) -> list[Any]:
    """`body[field]` when it is a list of objects, else []."""
    value = body.get(field) if isinstance(body, dict) else None
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


async def conversations_call(request: Request) -> Response:
    """`POST /v1/conversations`, `POST /v1/conversations/{id}/items` and
    `GET /v1/conversations/{id}/items`: forwarded whole, the answer mirrored (see the module
    docstring). A body over `--max-body-bytes` is a 413, a non-JSON content type a 415."""
    proxy: ProxyState = request.app.state.proxy
    content: bytes | None = None
    sent: Any = None
    if request.method == "POST":
        try:
            content = await read_body(request, proxy.settings.max_body_bytes)
        except InvalidRequest as exc:
            return error_response(exc.status, exc.message, param=exc.param, code=exc.code)
        except ClientDisconnect:
            return Response(status_code=499)
        try:
            sent = json.loads(content) if content else None
        except (ValueError, RecursionError):
            sent = None  # the upstream answers it with its own error
    reply, _status, answer, _text = await forward_whole(request, content)
    if answer is None:
        return reply
    conversation = request.path_params.get("conversation_id")
    try:
        await _mirror(proxy, request, conversation, sent, answer)
    except Exception as exc:  # mirroring fails open: the client has its answer either way
        log.warning("mirroring conversation %r failed: %s", conversation, loggable_error(exc))
    return reply


async def _mirror(
    proxy: ProxyState,
    request: Request,
    conversation: str | None,
    sent: Any,
    answer: dict[str, Any],
) -> None:
    mirror = proxy.db.conversations
    if conversation is None:  # POST /v1/conversations: created with the items sent
        created = answer.get("id")
        if answer.get("object") == "conversation" and isinstance(created, str) and created:
            await mirror.began(created, "create")
            await mirror.append(created, redacted(proxy, _items_of(sent, "items")))
        return
    if answer.get("object") != "list":
        return
    if request.method == "POST":  # items added: the upstream's copies, with their ids
        added = _items_of(answer, "data") or _items_of(sent, "items")
        await mirror.append(conversation, redacted(proxy, added))
        return
    query = request.query_params
    if query.get("after") or answer.get("has_more") is not False:
        return  # a page: not the whole conversation
    if await mirror.has_items(conversation):
        return  # known here already (items listed are ones the mirror has)
    listed = _items_of(answer, "data")
    if query.get("order", "desc") != "asc":
        listed.reverse()
    await mirror.began(conversation, "list")
    await mirror.append(conversation, redacted(proxy, listed))


async def conversation_history(proxy: ProxyState, conversation: str) -> tuple[bool, list[Any]]:
    """`(begun, items)` of a conversation as mirrored (see `ConversationMirror.items`); fails
    open to `(False, [])` with a warning when the database cannot be read."""
    try:
        return await proxy.db.conversations.items(conversation)
    except Exception as exc:
        log.warning("reading conversation %r failed: %s", conversation, loggable_error(exc))
        return False, []


async def mirror_response_items(
    proxy: ProxyState,
    conversation: str,
    body: dict[str, Any],
    response: dict[str, Any],
    exchange_id: str,
) -> None:
    """Append what a response created in `conversation` added to it: its input items
    (`item_reference`s resolved where known) then its output items, tagged with the exchange.
    Fails open (logged)."""
    own, _ = items_core.resolve_references(
        items_core.input_items(body), proxy.stitcher.known_items()
    )
    response_id = response.get("id")
    try:
        await proxy.db.conversations.append(
            conversation,
            redacted(proxy, [*own, *items_core.output_items(response)]),
            exchange_id=exchange_id,
            response_id=response_id if isinstance(response_id, str) else None,
        )
    except Exception as exc:
        log.warning("mirroring conversation %r failed: %s", conversation, loggable_error(exc))
