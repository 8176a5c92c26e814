"""The upstream side: one shared httpx client, header filtering both ways, body decoding, and the
mapping of transport errors to OpenAI-shaped 502/504 answers.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterable
from http.cookiejar import CookieJar, DefaultCookiePolicy

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from proxy.config import Settings

# Headers that describe one hop of the connection, not the message (RFC 9110 section 7.6.1),
# plus those the HTTP client or server recomputes.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_SECRET_HEADERS = frozenset({"authorization", "api-key", "x-api-key"})
# Codings the proxy can decode to record a copy; others are not offered upstream.
_DECODABLE = ("gzip", "deflate", "identity")


def create_client(settings: Settings) -> httpx.AsyncClient:
    """The shared upstream client: pooled keep-alive connections, configured timeouts, no retries.

    httpx's API over aiohttp's connection pool (`httpx-aiohttp`): httpcore's pool scans every
    connection on every request and cost ~3 ms of CPU per call at 32 connections. The cookie jar
    refuses every cookie: one client's `Set-Cookie` must never reach another client's requests.
    """
    timeout = httpx.Timeout(
        connect=settings.connect_timeout_s,
        read=settings.read_timeout_s,
        write=settings.read_timeout_s,
        pool=settings.connect_timeout_s,
    )
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=1000, keepalive_expiry=60)
    # Without a client Accept-Encoding, ask for none (httpx would offer gzip on its own).
    return httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits, trust_env=False),
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        timeout=timeout,
        limits=limits,
        follow_redirects=False,
        trust_env=False,
        headers={"accept-encoding": "identity"},
    )


def upstream_url(settings: Settings, path: str, query: bytes = b"") -> str:
    """`settings.upstream` joined with `path` (the part after `/v1`, starting with "/")."""
    url = settings.upstream + path
    return f"{url}?{query.decode('latin-1')}" if query else url


def forward_headers(
    incoming: Iterable[tuple[str, str]], api_key: str | None
) -> list[tuple[str, str]]:
    """The client's headers as sent upstream.

    Drops hop-by-hop headers and the proxy's own `X-Understudy-*` controls; offers only codings
    the proxy can decode; with `api_key`, replaces the client's credentials with the proxy's.
    """
    out: list[tuple[str, str]] = []
    for name, value in incoming:
        lower = name.lower()
        if lower in _HOP_BY_HOP or lower.startswith("x-understudy-"):
            continue
        if api_key is not None and lower in _SECRET_HEADERS:
            continue
        if lower == "accept-encoding":
            offered = [c.strip() for c in value.split(",")]
            kept = [c for c in offered if c.split(";")[0].strip().lower() in _DECODABLE]
            if not kept:
                continue
            value = ", ".join(kept)
        out.append((name, value))
    if api_key is not None:
        out.append(("authorization", f"Bearer {api_key}"))
    return out


def response_headers(upstream: httpx.Headers) -> list[tuple[bytes, bytes]]:
    """Upstream response headers as passed to the client (raw, duplicates kept), minus hop-by-hop."""
    return [
        (name, value)
        for name, value in upstream.raw
        if name.decode("latin-1").lower() not in _HOP_BY_HOP
    ]


class BodyDecoder:
    """Incremental decoder for a response body's `content-encoding` (gzip, deflate or none).

    The client receives the raw bytes; this gives the proxy a decoded copy to record.
    """

    def __init__(self, content_encoding: str | None) -> None:
        coding = (content_encoding or "identity").strip().lower()
        if coding in ("gzip", "x-gzip"):
            self._zlib: zlib._Decompress | None = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif coding == "deflate":
            self._zlib = zlib.decompressobj()
        else:
            self._zlib = None

    @property
    def identity(self) -> bool:
        """The body is not compressed (the proxy may add bytes of its own)."""
        return self._zlib is None

    def decode(self, data: bytes) -> bytes:
        if self._zlib is None:
            return data
        try:
            return self._zlib.decompress(data)
        except zlib.error:
            return b""


def transport_error(exc: httpx.HTTPError, settings: Settings) -> tuple[int, str, str]:
    """(status, message, code) for an upstream call that failed below HTTP.

    Timeouts (connect or read) are 504 `upstream_timeout`; anything else (refused, reset, DNS,
    protocol) is 502 `upstream_unreachable`. The aiohttp error under the httpx one decides, when
    there is one (httpx-aiohttp maps a refused connection to httpx's ConnectTimeout).
    """
    cause = exc.__cause__
    if cause is not None and isinstance(cause, aiohttp.ClientError | asyncio.TimeoutError):
        timed_out = isinstance(cause, asyncio.TimeoutError | aiohttp.ServerTimeoutError)
        kind = type(cause).__name__
    else:
        timed_out = isinstance(exc, httpx.TimeoutException)
        kind = type(exc).__name__
    if timed_out:
        return 504, f"upstream timed out ({kind}) calling {settings.upstream}", "upstream_timeout"
    return (
        502,
        f"upstream unreachable ({kind}: {exc}) at {settings.upstream}",
        "upstream_unreachable",
    )
