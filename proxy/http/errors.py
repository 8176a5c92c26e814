"""OpenAI-shaped error bodies: `{"error": {"message", "type", "param", "code"}}`, one place for all."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response


class InvalidRequest(ValueError):
    """A client request the proxy refuses before forwarding it (HTTP 400 unless `status` says otherwise)."""

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The error object the OpenAI API returns, as a dict."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """A JSON response with an OpenAI-shaped error body."""
    content = json.dumps(error_body(message, type_, param=param, code=code)).encode()
    return Response(content, status_code=status, media_type="application/json", headers=headers)
