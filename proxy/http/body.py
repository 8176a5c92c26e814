"""Request bodies of the recorded APIs: size and content-type limits, the checks every recorded
API shares, nesting depth, and the client-chosen trajectory id. Errors are `InvalidRequest`
(OpenAI-shaped 400/413/415 answers)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from proxy.core import fastjson
from proxy.core.redaction import MAX_PARTS, redact_identifier
from proxy.http.errors import InvalidRequest
from proxy.recording.stitching import MAX_TRAJECTORY_ID_LENGTH, TRAJECTORY_HEADER

MAX_NESTING = 128


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes (InvalidRequest 413) and bodies that are
    not JSON by their content type (415; a missing content type is accepted)."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media_type = content_type.split(";")[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise InvalidRequest(
                f"Content-Type must be application/json, not {media_type!r}",
                code="unsupported_media_type",
                status=415,
            )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InvalidRequest(
            f"request body of {declared} bytes is over the limit of {limit}",
            code="request_too_large",
            status=413,
        )
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise InvalidRequest(
                f"request body is over the limit of {limit} bytes",
                code="request_too_large",
                status=413,
            )
        parts.append(part)
    return b"".join(parts)


def parse_json_object(raw: bytes) -> tuple[dict[str, Any], str]:
    """Decode a request body that every recorded API shares the rules of; return it as a dict
    and as text.

    Raises InvalidRequest (400) when it is not UTF-8 strict JSON (NaN and Infinity refused), not
    an object, lacks a string `model`, has a `stream` that is not a boolean or `tools` that are not an array of objects, or nests
    deeper than MAX_NESTING (everything stored must be readable back by the exporter and the
    dashboard). API-specific checks (`messages`, `input`) come after this.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not UTF-8: {exc}", code="invalid_json") from exc
    try:
        body = fastjson.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise InvalidRequest("request body is nested too deeply", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_type")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter (a string)", param="model")
    return body, text


def _refuse_constant(name: str) -> Any:
    """NaN, Infinity and -Infinity: Python's json takes them, strict JSON (RFC 8259) does not."""
    raise ValueError(f"{name} is not a JSON value")


def check_common(body: dict[str, Any], raw: bytes) -> None:
    """The checks after the API's own: `stream` boolean, `tools` an array of objects, nesting.
    Raises InvalidRequest (400)."""
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    tools = body.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise InvalidRequest("'tools' must be an array of objects", param="tools")
    if raw.count(b"[") + raw.count(b"{") > MAX_NESTING and deeper_than(body, MAX_NESTING):
        raise InvalidRequest(
            f"request body is nested deeper than {MAX_NESTING} levels", code="invalid_json"
        )


def deeper_than(document: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels in `document` (a parsed JSON
    value): `nesting_depth(document) > limit`, at a fraction of its cost on a long request.

    A value nests at most as deeply as it holds arrays and objects, and each of them puts one
    `[` or `{` in its compact JSON (those in strings only add to the count). So each element
    of a top-level array (a message, a tool) and each other top-level value is dumped (orjson)
    and its brackets counted; only one holding more than the levels left is walked (an array of
    more than MAX_PARTS elements is walked whole).
    """
    if not isinstance(document, dict) or limit < 2:
        return nesting_depth(document) > limit
    for value in document.values():
        if isinstance(value, list):
            if len(value) > MAX_PARTS:  # no agent's body: walked whole, as before
                if nesting_depth(value) > limit - 1:
                    return True
            elif any(_part_deeper_than(item, limit - 2) for item in value):
                return True
        elif _part_deeper_than(value, limit - 1):
            return True
    return False


def _part_deeper_than(value: Any, limit: int) -> bool:
    if not isinstance(value, dict | list):
        return False  # limit >= 0 here
    try:
        data = orjson.dumps(value)
    except TypeError:  # a lone surrogate, an integer beyond 64 bits
        return nesting_depth(value) > limit
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    return nesting_depth(value) > limit


def nesting_depth(value: Any) -> int:
    """How deeply arrays and objects nest in `value` (iterative: safe on any depth)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item)
    return deepest


def explicit_trajectory_id(headers: Any, body: dict[str, Any]) -> tuple[str | None, str]:
    """The client-chosen trajectory id and where it came from ('header', 'metadata' or 'hash').

    The header wins over `metadata.trajectory_id`. Raises InvalidRequest for an id that is not a
    string, empty, over-long or not printable ASCII (it is echoed in a response header). A
    key-shaped part of the id is replaced by a stable digest (`redact_identifier`): the id is
    stored and echoed, a secret never is.
    """
    value = headers.get(TRAJECTORY_HEADER)
    source = "header"
    if value is None:
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and metadata.get("trajectory_id") is not None:
            value, source = metadata["trajectory_id"], "metadata"
    if value is None:
        return None, "hash"
    if not isinstance(value, str):
        raise InvalidRequest(
            "metadata.trajectory_id must be a string", param="metadata.trajectory_id"
        )
    value = redact_identifier(value.strip())
    if (
        not value
        or len(value) > MAX_TRAJECTORY_ID_LENGTH
        or not all(" " <= c <= "~" for c in value)
    ):
        raise InvalidRequest(
            f"trajectory id must be 1 to {MAX_TRAJECTORY_ID_LENGTH} printable ASCII characters",
            param=TRAJECTORY_HEADER if source == "header" else "metadata.trajectory_id",
        )
    return value, source
