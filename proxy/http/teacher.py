"""The teacher: calls to any provider through litellm, answered to the app as OpenAI chat completions
or, for the Responses API, as Responses objects and events (litellm's Responses support).

The request is adapted to the teacher: for reasoning models `max_tokens` becomes
`max_completion_tokens` and `temperature`, `top_p`, `logit_bias`, penalties are dropped; other
parameters a provider does not take are dropped by litellm (`drop_params`). OpenAI-only fields
that mean something else to litellm (`metadata`, `store`, `stream_options`) are not passed on.
litellm is imported when the first Teacher is built (it takes seconds), with its cost map read
from the installed package (`LITELLM_LOCAL_MODEL_COST_MAP=True`): no network but the teacher's API.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from proxy.config import Settings
from proxy.core.promotion import is_reasoning_model, use_bundled_tiktoken
from proxy.http.errors import error_body

_NOT_FORWARDED = ("model", "messages", "stream", "stream_options", "metadata", "store", "user")
_REASONING_DROPPED = (
    "temperature",
    "top_p",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
)


class TeacherError(Exception):
    """The teacher call failed. status: HTTP status for the app; body: OpenAI-shaped error dict."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["message"])
        self.status = status
        self.body = body


def teacher_params(body: dict[str, Any], model: str) -> dict[str, Any]:
    """Keyword arguments for `litellm.acompletion` from an OpenAI chat request `body` (pure).

    Result: `{"model", "messages", **params}`; for reasoning teachers, `system` messages become
    `developer` messages, `max_tokens` is renamed `max_completion_tokens` and sampling
    parameters are left out.
    """
    params: dict[str, Any] = {k: v for k, v in body.items() if k not in _NOT_FORWARDED}
    messages = body["messages"]
    if is_reasoning_model(model):
        # Reasoning models take instructions as `developer` messages; litellm would turn a
        # `system` message into a `user` one for models its table does not mark as taking them.
        messages = [
            {**m, "role": "developer"} if isinstance(m, dict) and m.get("role") == "system" else m
            for m in messages
        ]
        for key in _REASONING_DROPPED:
            params.pop(key, None)
        if "max_tokens" in params:
            params.setdefault("max_completion_tokens", params.pop("max_tokens"))
            params.pop("max_tokens", None)
    if isinstance(body.get("user"), str):
        params["user"] = body["user"]
    return {"model": model, "messages": messages, **params}


_RESPONSES_NOT_FORWARDED = (
    "model",
    "stream",
    "stream_options",
    "metadata",
    "store",
    "previous_response_id",
    "conversation",
    "background",
    "prompt",
)


def teacher_responses_params(body: dict[str, Any], model: str) -> dict[str, Any]:
    """Keyword arguments for `litellm.aresponses` from a Responses API request `body` (pure).

    The body must already hold the whole visible history in `input` (see
    `proxy.core.responses.teacher_request`). State on the issuer's servers
    (`previous_response_id`, `conversation`, `prompt`, `store`, `background`) is not passed on;
    reasoning teachers get no sampling parameters.
    """
    params: dict[str, Any] = {k: v for k, v in body.items() if k not in _RESPONSES_NOT_FORWARDED}
    if is_reasoning_model(model):
        for key in _REASONING_DROPPED:
            params.pop(key, None)
    return {"model": model, **params}


def _sse_event(data: dict[str, Any]) -> bytes:
    """One Responses API SSE event: `event: TYPE` and `data: JSON` lines."""
    return (
        b"event: "
        + str(data.get("type", "message")).encode()
        + b"\ndata: "
        + json.dumps(data).encode()
        + b"\n\n"
    )


class Teacher:
    """Calls the configured teacher model. One per proxy; safe to share across requests."""

    def __init__(self, settings: Settings) -> None:
        if not settings.teacher_model:
            raise ValueError("no teacher model configured")
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        use_bundled_tiktoken()
        import litellm

        litellm.drop_params = True
        litellm.telemetry = False
        litellm.suppress_debug_info = True
        logging.getLogger("LiteLLM").setLevel(logging.WARNING)
        self._litellm = litellm
        self.model = settings.teacher_model
        self._base_url = settings.teacher_base_url
        self._timeout = settings.read_timeout_s
        self._retries = settings.teacher_retries
        openai_compatible = "/" not in self.model or self.model.startswith("openai/")
        if openai_compatible:
            # An OpenAI(-compatible) teacher: the upstream unless told otherwise, and its auth.
            self._base_url = (settings.teacher_base_url or settings.upstream).rstrip("/")
            self.model = self.model if "/" in self.model else f"openai/{self.model}"
        self._api_key = (
            settings.teacher_api_key.get_secret_value()
            if settings.teacher_api_key
            else (
                settings.upstream_api_key.get_secret_value()
                if settings.upstream_api_key and openai_compatible
                else None
            )
        )
        # The app's own key goes only to the upstream it was meant for; a teacher elsewhere needs
        # its key configured. Other providers read their env vars (ANTHROPIC_API_KEY, ...).
        self._uses_client_key = (
            self._api_key is None and openai_compatible and self._base_url == settings.upstream
        )

    @property
    def display_model(self) -> str:
        """The teacher's model name without a provider prefix."""
        return self.model.split("/", 1)[1] if "/" in self.model else self.model

    def _kwargs(self, body: dict[str, Any], client_key: str | None, stream: bool) -> dict[str, Any]:
        kwargs = teacher_params(body, self.model)
        kwargs["stream"] = stream
        if stream:
            kwargs["stream_options"] = {"include_usage": True}
        if self._base_url:
            kwargs["api_base"] = self._base_url
        key = self._api_key or (client_key if self._uses_client_key else None)
        if key:
            kwargs["api_key"] = key
        kwargs["timeout"] = self._timeout
        kwargs["num_retries"] = self._retries
        return kwargs

    def _responses_kwargs(
        self, body: dict[str, Any], client_key: str | None, stream: bool
    ) -> dict[str, Any]:
        kwargs = teacher_responses_params(body, self.model)
        kwargs["stream"] = stream
        if self._base_url:
            kwargs["api_base"] = self._base_url
        key = self._api_key or (client_key if self._uses_client_key else None)
        if key:
            kwargs["api_key"] = key
        kwargs["timeout"] = self._timeout
        return kwargs

    async def respond(self, body: dict[str, Any], client_key: str | None = None) -> dict[str, Any]:
        """One non-stream Responses API answer (a `response` dict) through litellm's Responses
        support, for a request whose `input` holds the whole visible history. Raises
        TeacherError."""
        try:
            response: Any = await self._litellm.aresponses(
                **self._responses_kwargs(body, client_key, False)
            )
        except Exception as exc:
            raise self._error(exc) from exc
        answer: dict[str, Any] = json.loads(response.model_dump_json())
        return answer

    async def open_response_stream(
        self, body: dict[str, Any], client_key: str | None = None
    ) -> AsyncIterator[bytes]:
        """Start a streamed Responses API answer; return an iterator of its SSE bytes
        (`event: TYPE\ndata: {event}\n\n`, the Responses event format, no `[DONE]`).

        Raises TeacherError when the call cannot start; an error mid-stream ends the stream with
        an `error` event.
        """
        try:
            response: Any = await self._litellm.aresponses(
                **self._responses_kwargs(body, client_key, True)
            )
        except Exception as exc:
            raise self._error(exc) from exc

        async def events() -> AsyncIterator[bytes]:
            sequence = 0
            try:
                async for event in response:
                    data = json.loads(event.model_dump_json(exclude_none=True))
                    sequence = data.get("sequence_number", sequence)
                    yield _sse_event(data)
            except Exception as exc:
                error = self._error(exc).body["error"]
                yield _sse_event({"type": "error", **error, "sequence_number": sequence + 1})

        return events()

    def _error(self, exc: Exception) -> TeacherError:
        status = getattr(exc, "status_code", None)
        status = status if isinstance(status, int) and 400 <= status < 600 else 502
        message = getattr(exc, "message", None) or str(exc)
        return TeacherError(
            status,
            error_body(
                f"teacher {self.model}: {message}", "teacher_error", code=type(exc).__name__
            ),
        )

    async def complete(self, body: dict[str, Any], client_key: str | None = None) -> dict[str, Any]:
        """One non-stream answer as a `chat.completion` dict. Raises TeacherError."""
        try:
            response = await self._litellm.acompletion(**self._kwargs(body, client_key, False))
        except Exception as exc:
            raise self._error(exc) from exc
        completion: dict[str, Any] = json.loads(response.model_dump_json())
        return completion

    async def open_stream(
        self, body: dict[str, Any], client_key: str | None = None
    ) -> AsyncIterator[bytes]:
        """Start a streamed answer; return an iterator of SSE bytes (`data: {chunk}\\n\\n` ... `[DONE]`).

        Raises TeacherError when the call cannot start; an error mid-stream ends the stream with
        an `{"error": ...}` event.
        """
        try:
            response = await self._litellm.acompletion(**self._kwargs(body, client_key, True))
        except Exception as exc:
            raise self._error(exc) from exc

        async def events() -> AsyncIterator[bytes]:
            try:
                async for chunk in response:
                    yield b"data: " + chunk.model_dump_json(exclude_none=True).encode() + b"\n\n"
            except Exception as exc:
                yield b"data: " + json.dumps(self._error(exc).body).encode() + b"\n\n"
                return
            yield b"data: [DONE]\n\n"

        return events()
