"""Every `/v1/*` path other than chat completions: forwarded as is, streamed both ways, not recorded."""

from __future__ import annotations

import anyio
import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy.errors import error_response
from proxy.state import ProxyState
from proxy.upstream import forward_headers, response_headers, transport_error, upstream_url


async def passthrough(request: Request) -> Response:
    """Forward the request to `upstream + path` and stream the answer back byte for byte."""
    proxy: ProxyState = request.app.state.proxy
    settings = proxy.settings
    path = request.url.path.removeprefix("/v1")
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    has_body = request.method not in ("GET", "HEAD", "OPTIONS", "DELETE") or request.headers.get(
        "content-length", "0"
    ) not in ("", "0")
    headers = forward_headers(request.headers.items(), api_key)
    if has_body and "content-length" in request.headers:
        headers.append(("content-length", request.headers["content-length"]))
    upstream_request = proxy.client.build_request(
        request.method,
        upstream_url(settings, path, request.url.query.encode()),
        content=request.stream() if has_body else None,
        headers=headers,
    )
    try:
        upstream = await proxy.client.send(upstream_request, stream=True)
    except httpx.HTTPError as exc:
        status, message, code = transport_error(exc, settings)
        return error_response(status, message, "upstream_error", code=code)

    async def close() -> None:
        with anyio.CancelScope(shield=True):
            await upstream.aclose()

    response = StreamingResponse(
        upstream.aiter_raw(), status_code=upstream.status_code, background=BackgroundTask(close)
    )
    response.raw_headers = response_headers(upstream.headers)
    if "content-length" in upstream.headers:
        response.raw_headers.append((b"content-length", upstream.headers["content-length"].encode()))
    return response
