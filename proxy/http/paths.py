"""Which request paths the proxy records, and the one normal form of a client's path.

A client's path is hostile input: `/v1/../../internal/admin`, `/v1/%2e%2e/x` or
`/v1/..%2f..%2fx` must never reach the upstream outside its base path (with the proxy's own key
attached), and `/v1/chat/completions/`, `/v1//chat/completions` or `/chat/completions` are the
chat endpoint spelled differently, so they must be recorded like it. Both questions are answered
here, from the raw path as the client sent it (`scope["raw_path"]`, percent escapes intact), by
pure functions:

- `normalize(raw)`: the path's segments, each percent-decoded once, empty and `.` segments
  dropped, `..` resolved; refused (`PathRefused`) when it climbs above the root or a segment could
  still mean something else to a server that decodes again (an encoded `/` or `\\`, a dot segment
  after a second decoding, control characters, bytes that are not UTF-8).
- `upstream_path(raw)`: the part after `/v1` to append to the upstream's base URL, re-encoded;
  refused when the normalised path is not under `/v1`.
- `recorded_api(raw)`: which recorded API a path is (`"chat"`, `"responses"`), or None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote, unquote

# The recorded APIs, by their path under the API root (`/v1`, which clients may also leave out).
RECORDED_APIS: Final[dict[str, str]] = {"/chat/completions": "chat", "/responses": "responses"}
API_ROOT: Final = "v1"

# Characters kept as they are in a path segment (RFC 3986 pchar without "%"): the rest is escaped.
_SEGMENT_SAFE: Final = "!$&'()*+,;=:@-._~"
# Characters kept as they are in a query (RFC 3986 query chars, and "%" of existing escapes).
_QUERY_SAFE: Final = "!$&'()*+,;=:@-._~/?%"


class PathRefused(ValueError):
    """A request path the proxy will not forward: it leaves the API root or is ambiguous."""


def _unsafe(segment: str) -> bool:
    return "/" in segment or "\\" in segment or any(c < " " or c == "\x7f" for c in segment)


def normalize(raw_path: str) -> list[str]:
    """The decoded segments of `raw_path` (a path with its percent escapes, e.g. "/v1/a%20b/"),
    empty and `.` segments dropped and `..` resolved; a trailing slash gives a last "" segment.

    Raises PathRefused when `..` climbs above the root, a segment decodes to something holding
    `/`, `\\` or a control character, a segment would be `.`/`..` or hold `/`/`\\` after a second
    decoding (a server that decodes twice would resolve it), or an escape is not UTF-8.
    """
    segments: list[str] = []
    for part in raw_path.split("/"):
        try:
            segment = unquote(part, errors="strict")
        except UnicodeDecodeError as exc:
            raise PathRefused("the path is not UTF-8") from exc
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise PathRefused("the path climbs above the API root")
            segments.pop()
            continue
        twice = unquote(segment)
        if _unsafe(segment) or _unsafe(twice) or twice in (".", ".."):
            raise PathRefused(
                "the path holds an encoded '/', '\\', dot segment or control character"
            )
        segments.append(segment)
    if segments and raw_path.endswith("/"):
        segments.append("")
    return segments


def upstream_path(raw_path: str) -> str:
    """The normalised part of `raw_path` after `/v1`, re-encoded, starting with "/" (e.g.
    "/files/file-1/content"), to append to the upstream's base URL; a trailing slash is kept.

    Raises PathRefused when the path is refused by `normalize` or is not under `/v1`.
    """
    segments = normalize(raw_path)
    if not segments or segments[0] != API_ROOT:
        raise PathRefused("the path is not under /v1")
    return "/" + "/".join(quote(segment, safe=_SEGMENT_SAFE) for segment in segments[1:])


def recorded_api(raw_path: str) -> str | None:
    """Which recorded API `raw_path` names ("chat"), however it is spelled (a trailing slash,
    doubled slashes, `.` segments, with or without `/v1`); None for any other path."""
    try:
        segments = [s for s in normalize(raw_path) if s]
    except PathRefused:
        return None
    if segments and segments[0] == API_ROOT:
        segments = segments[1:]
    return RECORDED_APIS.get("/" + "/".join(segments))


def safe_query(query: str) -> str:
    """A query string as forwarded: escapes kept, any character a URL may not hold (space, `#`,
    non-ASCII, ...) percent-encoded, so the query can never end the URL or change its path."""
    return quote(query, safe=_QUERY_SAFE)


def raw_path_of(scope: Mapping[str, Any]) -> str:
    """The path as the client sent it: `scope["raw_path"]` (bytes, escapes intact; bytes that
    are not UTF-8 become U+FFFD), else the decoded `scope["path"]` re-escaped."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        return raw.split(b"?", 1)[0].decode("utf-8", "replace")
    path = scope.get("path")
    return quote(path if isinstance(path, str) else "/", safe="/" + _SEGMENT_SAFE)


# The usual spelling of each recorded API, as raw bytes: one dict lookup on the hot path.
_USUAL: Final[dict[bytes, str]] = {
    f"/{API_ROOT}{path}".encode(): api for path, api in RECORDED_APIS.items()
}


def recorded_api_of(scope: Mapping[str, Any]) -> str | None:
    """`recorded_api` of an ASGI scope's raw path (the usual spelling costs one dict lookup)."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw in _USUAL:
        return _USUAL[raw]
    return recorded_api(raw_path_of(scope))
