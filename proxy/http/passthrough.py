"""Every `/v1/*` path other than the recorded APIs: forwarded, streamed both ways, not recorded.

The path is normalised first (`proxy.http.paths.upstream_path`): one that leaves `/v1` or is
ambiguous is refused with 400 and never reaches the upstream, so the proxy's key never leaves
the upstream's base path.
"""

from __future__ import annotations

import logging

from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from proxy.http.errors import error_response
from proxy.http.paths import PathRefused, raw_path_of, upstream_path
from proxy.http.state import ProxyState
from proxy.http.upstream import (
    UPSTREAM_ERRORS,
    forward_headers,
    response_headers,
    transport_error,
    upstream_url,
)

log = logging.getLogger("understudy.passthrough")


async def passthrough(request: Request) -> Response:
    """Forward the request to `upstream + path` and stream the answer back byte for byte."""
    proxy: ProxyState = request.app.state.proxy
    settings = proxy.settings
    try:
        path = upstream_path(raw_path_of(request.scope), azure=settings.upstream_is_azure)
    except PathRefused as exc:
        return error_response(400, f"refused path: {exc}", param="path", code="invalid_path")
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    has_body = request.method not in ("GET", "HEAD", "OPTIONS", "DELETE") or request.headers.get(
        "content-length", "0"
    ) not in ("", "0")
    headers = forward_headers(request.headers.items(), api_key, azure=settings.upstream_is_azure)
    if has_body and "content-length" in request.headers:
        headers.append(("content-length", request.headers["content-length"]))
    try:
        upstream = await proxy.client.request(
            request.method,
            upstream_url(settings, path, request.url.query.encode()),
            data=request.stream() if has_body else None,
            headers=headers,
            allow_redirects=False,
        )
    except ClientDisconnect:
        log.info("client went away while sending its request body to %s", request.method)
        return Response(status_code=499)  # nobody reads it; keeps the server's log quiet
    except UPSTREAM_ERRORS as exc:
        status, message, code = transport_error(exc, settings)
        return error_response(status, message, "upstream_error", code=code)

    async def close() -> None:
        upstream.release()  # synchronous: nothing to shield from cancellation

    response = StreamingResponse(
        upstream.content.iter_any(), status_code=upstream.status, background=BackgroundTask(close)
    )
    response.raw_headers = response_headers(upstream.raw_headers)
    if "content-length" in upstream.headers:
        response.raw_headers.append(
            (b"content-length", upstream.headers["content-length"].encode())
        )
    return response
