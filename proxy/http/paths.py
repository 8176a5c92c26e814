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
- `recorded_api(raw)`: which recorded API a path is (`"chat"`, `"responses"`), or None;
  `recorded_spelling(raw)` says more: whether it is an Azure OpenAI path and its deployment.

Azure OpenAI spellings (`AzureOpenAI(azure_endpoint=<proxy>)` and Azure's v1 API) are recorded
too: `/openai/deployments/{deployment}/chat/completions`, `/openai/deployments/{deployment}/
responses`, `/openai/responses`, `/openai/v1/chat/completions`, `/openai/v1/responses`, each also
under `/v1` (`azure_endpoint=<proxy>/v1`). They are forwarded only to an Azure upstream
(`Settings.upstream_is_azure`), with their path kept under `/openai` (`forward_path`); an OpenAI
spelling sent to an Azure upstream goes to Azure's v1 API (`/openai/v1/...`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, unquote

# The recorded APIs, by their path under the API root (`/v1`, which clients may also leave out).
RECORDED_APIS: Final[dict[str, str]] = {"/chat/completions": "chat", "/responses": "responses"}
API_ROOT: Final = "v1"
AZURE_ROOT: Final = "openai"  # Azure OpenAI's API root on a resource (`https://R.openai.azure.com`)
_BY_SEGMENTS: Final[dict[tuple[str, ...], str]] = {
    tuple(path.strip("/").split("/")): api for path, api in RECORDED_APIS.items()
}

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


def _encoded(segments: list[str] | tuple[str, ...]) -> str:
    return "/" + "/".join(quote(segment, safe=_SEGMENT_SAFE) for segment in segments)


def upstream_path(raw_path: str, *, azure: bool = False) -> str:
    """The normalised part of `raw_path` after `/v1`, re-encoded, starting with "/" (e.g.
    "/files/file-1/content"), to append to the upstream's base URL; a trailing slash is kept.

    azure: the upstream is an Azure OpenAI resource (its root URL): a path under `/openai` (or
    `/v1/openai`) is kept whole from `/openai` on, and any other `/v1/X` becomes `/openai/v1/X`
    (Azure's v1 API), so nothing leaves the resource's `/openai` root.

    Raises PathRefused when the path is refused by `normalize` or is not under `/v1` (or, for
    azure, `/openai`).
    """
    segments = normalize(raw_path)
    if azure:
        if segments[:1] == [API_ROOT] and segments[1:2] == [AZURE_ROOT]:
            segments = segments[1:]
        if segments[:1] == [AZURE_ROOT]:
            return _encoded(segments)
        if segments[:1] == [API_ROOT]:
            return "/" + AZURE_ROOT + _encoded([API_ROOT, *segments[1:]])
        raise PathRefused("the path is not under /v1 or /openai")
    if not segments or segments[0] != API_ROOT:
        raise PathRefused("the path is not under /v1")
    return _encoded(segments[1:])


@dataclass(frozen=True)
class Spelling:
    """How a request named a recorded API.

    api: "chat" or "responses". azure: an Azure OpenAI path (under `/openai`). deployment: the
    Azure deployment the path names (`/openai/deployments/{deployment}/...`), else None.
    azure_path: for an Azure spelling, its normalised segments from `openai` on (forwarded so).
    """

    api: str
    azure: bool = False
    deployment: str | None = None
    azure_path: tuple[str, ...] = ()


def recorded_spelling(raw_path: str) -> Spelling | None:
    """The `Spelling` of `raw_path` when it names a recorded API, however it is spelled (a
    trailing slash, doubled slashes, `.` segments, with or without `/v1`, an Azure OpenAI path
    with or without `/v1` before `/openai`); None for any other path or a refused one."""
    try:
        segments = tuple(s for s in normalize(raw_path) if s)
    except PathRefused:
        return None
    if segments[:1] == (API_ROOT,):
        segments = segments[1:]
    if segments[:1] != (AZURE_ROOT,):
        api = _BY_SEGMENTS.get(segments)
        return Spelling(api) if api is not None else None
    rest = segments[1:]
    deployment = None
    if rest[:1] == ("deployments",) and len(rest) > 2:
        deployment, rest = rest[1], rest[2:]
    elif rest[:1] == (API_ROOT,):
        rest = rest[1:]
    api = _BY_SEGMENTS.get(rest)
    return Spelling(api, True, deployment, segments) if api is not None else None


def recorded_api(raw_path: str) -> str | None:
    """Which recorded API `raw_path` names ("chat", "responses"), however it is spelled (see
    `recorded_spelling`); None for any other path."""
    spelling = recorded_spelling(raw_path)
    return spelling.api if spelling is not None else None


def azure_deployment(path: str) -> str | None:
    """The Azure deployment an exchange's path names (`/openai/deployments/{d}/...`), else None:
    the model an Azure client asked for."""
    if "deployments" not in path:  # the usual path: no parsing
        return None
    spelling = recorded_spelling(path)
    return spelling.deployment if spelling is not None else None


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


_USUAL_SPELLINGS: Final[dict[bytes, Spelling]] = {raw: Spelling(api) for raw, api in _USUAL.items()}


def recorded_spelling_of(scope: Mapping[str, Any]) -> Spelling | None:
    """`recorded_spelling` of an ASGI scope's raw path (the usual spelling: one dict lookup)."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw in _USUAL_SPELLINGS:
        return _USUAL_SPELLINGS[raw]
    return recorded_spelling(raw_path_of(scope))


def recorded_api_of(scope: Mapping[str, Any]) -> str | None:
    """`recorded_api` of an ASGI scope's raw path (the usual spelling costs one dict lookup)."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw in _USUAL:
        return _USUAL[raw]
    return recorded_api(raw_path_of(scope))


def forward_path(scope: Mapping[str, Any], api_path: str, azure: bool) -> str:
    """The path (re-encoded, under the upstream's base URL) a recorded call is forwarded to:
    `api_path` (e.g. "/chat/completions") for an OpenAI upstream; for an Azure upstream
    (`azure`), the client's own Azure path from `/openai` on, or `/openai/v1` + `api_path` for
    an OpenAI spelling."""
    if not azure:
        return api_path
    spelling = recorded_spelling_of(scope)
    if spelling is not None and spelling.azure:
        return _encoded(spelling.azure_path)
    return "/" + AZURE_ROOT + "/" + API_ROOT + api_path
