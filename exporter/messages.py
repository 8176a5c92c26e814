"""Message normalization: one recorded chat message, tool list or tool call in training form.

Pure functions, no I/O; the rules of the OpenAI fine-tuning chat format (see `exporter.samples`
for the whole list). Anything that cannot be made correct raises `Rejected` with a short stable
`reason` (counted in the export summary) and a one-line detail.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
"""Function and message names OpenAI accepts."""

TOOL_CALL_ID_PATTERN = re.compile(r"^[a-zA-Z0-9]{9}$")
"""Renumbered tool-call ids: exactly 9 alphanumeric characters. Mistral's chat templates reject
shorter or non-alphanumeric ids ("Tool call IDs should be alphanumeric strings with length >= 9")
and its tokenizer wants exactly 9; every other template and OpenAI take them as they are."""

MAX_TOOL_CALLS = 99_999
"""Most tool calls one sample can number (`call00001` ... `call99999`)."""


class Rejected(ValueError):
    """A conversation cannot become a correct sample.

    reason: short stable key for counting (e.g. 'unanswered_tool_call'); detail: one line for people.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# -- content -----------------------------------------------------------------------------------


def text_of(content: Any, where: str) -> str:
    """Content as one string: a string as is, a list of text parts joined, None as "".

    Raises Rejected('unsupported_content') for non-text parts (images, audio, files) or other
    shapes, since system, assistant and tool content must be text in the training format.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in (
                "text",
                "input_text",
                "output_text",
            ):
                texts.append(str(part.get("text") or ""))
            elif isinstance(part, dict) and part.get("type") == "refusal":
                raise Rejected("refusal", f"{where} is a refusal")
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise Rejected("unsupported_content", f"{where} has a {kind!r} content part")
        return "".join(texts)
    if isinstance(content, dict | int | float | bool):
        return json.dumps(content, ensure_ascii=False)
    raise Rejected("unsupported_content", f"{where} content is a {type(content).__name__}")


def _user_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """User content: a string, or a list of text and `image_url` parts when images are present."""
    if not isinstance(content, list) or all(
        isinstance(p, str) or (isinstance(p, dict) and p.get("type") == "text") for p in content
    ):
        return text_of(content, where)
    parts: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            parts.append({"type": "text", "text": str(part.get("text") or "")})
        elif isinstance(part, dict) and part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise Rejected("unsupported_content", f"{where} has an image part without a url")
            image_out: dict[str, Any] = {"url": url}
            if isinstance(image, dict) and isinstance(image.get("detail"), str):
                image_out["detail"] = image["detail"]
            parts.append({"type": "image_url", "image_url": image_out})
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise Rejected("unsupported_content", f"{where} has a {kind!r} content part")
    return parts


def arguments_string(arguments: Any, where: str) -> str:
    """Tool-call `arguments` as the JSON string the format requires.

    A string holding a JSON object is kept byte for byte (the tokens the model produced); an
    object is dumped compactly (`{"a":1}`, non-ASCII kept). Raises Rejected('invalid_arguments')
    when it is not JSON or not a JSON object.
    """
    if isinstance(arguments, dict):
        return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    if arguments is None or arguments == "":
        raise Rejected("invalid_arguments", f"{where} has no arguments")
    if not isinstance(arguments, str):
        raise Rejected("invalid_arguments", f"{where} arguments are a {type(arguments).__name__}")
    try:
        parsed = orjson.loads(arguments)  # what orjson reads, the standard library reads alike
    except orjson.JSONDecodeError:
        try:
            parsed = json.loads(arguments)
        except ValueError:
            raise Rejected("invalid_arguments", f"{where} arguments are not valid JSON") from None
    if not isinstance(parsed, dict):
        raise Rejected("invalid_arguments", f"{where} arguments are not a JSON object")
    return arguments


_GOOD_NAMES: set[str] = set()  # names already checked (tool names repeat in every sample)


def _check_name(name: Any, where: str, *args: Any) -> str:
    """`name` when it is a name OpenAI accepts (`NAME_PATTERN`). Raises Rejected('invalid_name');
    where: the place named in its detail, `%`-formatted with `args` only when raising."""
    if isinstance(name, str) and name in _GOOD_NAMES:
        return name
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise Rejected(
            "invalid_name", f"{where % args} name {name!r} is not ^[a-zA-Z0-9_-]{{1,64}}$"
        )
    if len(_GOOD_NAMES) < 10_000:
        _GOOD_NAMES.add(name)
    return name


# -- messages ----------------------------------------------------------------------------------


def _tool_calls(calls: list[Any], index: int, legacy: bool = False) -> list[dict[str, Any]]:
    """Message `index`'s tool calls in training form, ids not yet renumbered (legacy: the one
    `function_call`, wrapped as a call). Raises Rejected for a call that is not an object, not
    a function call, or has a bad name or bad arguments."""
    out = []
    for number, call in enumerate(calls):
        if not isinstance(call, dict):
            raise Rejected(
                "invalid_tool_call", f"{_call_place(index, number, legacy)} is not an object"
            )
        kind = call.get("type")
        if kind and kind != "function":
            raise Rejected(
                "unsupported_tool", f"{_call_place(index, number, legacy)} has type {kind!r}"
            )
        function = call.get("function")
        if not isinstance(function, dict):
            raise Rejected(
                "invalid_tool_call", f"{_call_place(index, number, legacy)} has no function"
            )
        name = function.get("name")
        if not (isinstance(name, str) and name in _GOOD_NAMES):
            name = _check_name(name, "%s", _call_place(index, number, legacy))
        arguments = function.get("arguments")
        try:  # the common case, a string holding a JSON object, checked without a call
            plain = isinstance(arguments, str) and isinstance(orjson.loads(arguments), dict)
        except orjson.JSONDecodeError:
            plain = False
        if not plain:  # an object to dump, JSON only the standard library reads, or an error
            arguments = arguments_string(arguments, _call_place(index, number, legacy))
        out.append(
            {
                "id": call.get("id"),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return out


def _call_place(index: int, number: int, legacy: bool) -> str:
    """Where a tool call is, for an error's detail."""
    return f"message {index} function_call" if legacy else f"message {index} tool call {number}"


def _named(message: dict[str, Any], role: str, index: int) -> dict[str, Any]:
    """`{"role": role}`, plus the message's `name` when it has one (checked)."""
    name = message.get("name")
    if name:
        return {"role": role, "name": _check_name(name, "message %d", index)}
    return {"role": role}


def _system(message: dict[str, Any], index: int) -> dict[str, Any]:
    out = _named(message, "system", index)
    content = message.get("content")
    out["content"] = content if isinstance(content, str) else text_of(content, f"message {index}")
    return out


def _user(message: dict[str, Any], index: int) -> dict[str, Any]:
    out = _named(message, "user", index)
    content = message.get("content")
    out["content"] = (
        content if isinstance(content, str) else _user_content(content, f"message {index}")
    )
    return out


def normalize_assistant(message: dict[str, Any], index: int) -> dict[str, Any]:
    """An assistant message (whatever its `role` says: a response's answer is one) in training
    form, as `normalize_message` makes it: role, name, content (a non-empty string) and
    tool_calls (`function_call` becomes one), each only when present. Raises Rejected for bad
    tool calls and for a message with neither text nor tool calls."""
    out = _named(message, "assistant", index)
    content = message.get("content")
    if content is None:
        content = ""
    elif not isinstance(content, str):
        content = text_of(content, f"message {index}")
    calls = message.get("tool_calls")
    tool_calls: list[dict[str, Any]] | None = None
    if calls:
        if not isinstance(calls, list):
            raise Rejected("invalid_tool_call", f"message {index} tool_calls is not an array")
        tool_calls = _tool_calls(calls, index)
    else:
        function_call = message.get("function_call")
        if isinstance(function_call, dict):
            legacy = {"id": None, "type": "function", "function": function_call}
            tool_calls = _tool_calls([legacy], index, legacy=True)
    if content:
        out["content"] = content
    if tool_calls:
        out["tool_calls"] = tool_calls
    elif not content:
        raise Rejected(
            "empty_assistant_message", f"message {index} has neither content nor tool calls"
        )
    return out


def _tool(message: dict[str, Any], index: int) -> dict[str, Any]:
    content = message.get("content")
    return {
        "role": "tool",
        "tool_call_id": message.get("tool_call_id"),
        "content": content if isinstance(content, str) else text_of(content, f"message {index}"),
    }


def _function(message: dict[str, Any], index: int) -> dict[str, Any]:
    return {
        "role": "tool",
        "tool_call_id": None,
        "_function_name": message.get("name"),
        "content": text_of(message.get("content"), f"message {index}"),
    }


_BY_ROLE: dict[str, Callable[[dict[str, Any], int], dict[str, Any]]] = {
    "system": _system,
    "developer": _system,
    "user": _user,
    "assistant": normalize_assistant,
    "tool": _tool,
    "function": _function,
}


def normalize_message(message: Any, index: int) -> dict[str, Any]:
    """One recorded chat message in training form (ids not yet renumbered).

    Keeps only role, content, name (system/user/assistant), tool_calls (assistant) and
    tool_call_id (tool). Legacy shapes: role `developer` becomes `system`; role `function`
    becomes a tool message with its `name` kept under `_function_name` until pairing; an
    assistant `function_call` becomes one tool call. Raises Rejected for unknown roles, empty
    assistant messages and bad tool calls.
    """
    if not isinstance(message, dict):
        raise Rejected("invalid_message", f"message {index} is not an object")
    role = message.get("role")
    normalize = _BY_ROLE.get(role) if isinstance(role, str) else None
    if normalize is None:
        raise Rejected("unsupported_role", f"message {index} has role {role!r}")
    return normalize(message, index)


def tool_call_id(number: int) -> str:
    """The renumbered id of a sample's `number`-th tool call (from 1): `call00001`, `call00002`, ...

    Exactly 9 alphanumeric characters (`TOOL_CALL_ID_PATTERN`), deterministic and unique within a
    sample, so every format and chat template (Mistral's included) takes it. Raises
    Rejected('too_many_tool_calls') past `MAX_TOOL_CALLS`.
    """
    if 0 < number < len(_FIRST_IDS):
        return _FIRST_IDS[number]
    if not 0 < number <= MAX_TOOL_CALLS:
        raise Rejected(
            "too_many_tool_calls", f"more than {MAX_TOOL_CALLS} tool calls in one sample"
        )
    return f"call{number:05d}"


_FIRST_IDS: tuple[str, ...] = tuple(f"call{number:05d}" for number in range(256))
"""`tool_call_id` of the numbers below 256 (index 0 unused): what almost every sample needs."""


def pair_and_renumber(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Renumber tool-call ids (`tool_call_id`: `call00001`, ...) and check that calls and results pair up.

    Each assistant message's calls must be answered by exactly one tool message each, directly
    after it (in any order) and before any other message; only the last message of the
    conversation may leave its calls unanswered (a sample that ends in a tool call). Ids are
    matched within their assistant message, so ids an app reuses across turns still pair.
    Raises Rejected: 'duplicate_tool_call_id', 'orphan_tool_message', 'unanswered_tool_call'.
    Mutates and returns `messages`.
    """
    counter = 0
    pending: dict[Any, str] = {}
    pending_names: dict[str, str] = {}
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "tool":
            old = message.get("tool_call_id")
            legacy_name = message.pop("_function_name", None)
            if old is None and legacy_name is not None:
                old = next(
                    (o for o, new in pending.items() if pending_names.get(new) == legacy_name), None
                )
            if old not in pending:
                raise Rejected(
                    "orphan_tool_message",
                    f"message {index} answers {old!r}, which no open tool call has",
                )
            message["tool_call_id"] = pending.pop(old)
            continue
        if pending:
            raise Rejected(
                "unanswered_tool_call",
                f"{len(pending)} tool call(s) not answered before message {index}",
            )
        if role == "assistant" and message.get("tool_calls"):
            for call_index, call in enumerate(message["tool_calls"]):
                counter += 1
                new = _FIRST_IDS[counter] if counter < len(_FIRST_IDS) else tool_call_id(counter)
                old = call.get("id")
                if old is None:
                    old = ("__legacy__", index, call_index)
                if old in pending:
                    raise Rejected("duplicate_tool_call_id", f"message {index} repeats id {old!r}")
                pending[old] = new
                pending_names[new] = call["function"]["name"]
                call["id"] = new
    if pending and messages[-1]["role"] != "assistant":
        raise Rejected("unanswered_tool_call", f"{len(pending)} tool call(s) never answered")
    return messages


def normalize_tools(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's function tools (`tools`, or legacy `functions`) in training form.

    Keeps `name`, `description`, `parameters` and `strict`; tools of other types are left out.
    Raises Rejected('invalid_name') for bad names and 'duplicate_tool' for repeated ones.
    """
    raw = request.get("tools")
    if not raw and isinstance(request.get("functions"), list):
        raw = [{"type": "function", "function": f} for f in request["functions"]]
    tools: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(raw if isinstance(raw, list) else []):
        if not isinstance(tool, dict) or (tool.get("type") or "function") != "function":
            continue
        function = tool.get("function")
        if not isinstance(function, dict):
            continue
        name = _check_name(function.get("name"), f"tool {i}")
        if name in seen:
            raise Rejected("duplicate_tool", f"tool {name!r} is declared twice")
        seen.add(name)
        out: dict[str, Any] = {"name": name}
        if isinstance(function.get("description"), str):
            out["description"] = function["description"]
        if isinstance(function.get("parameters"), dict):
            out["parameters"] = function[
                "parameters"
            ]  # shared, never mutated (see strip_descriptions)
        if isinstance(function.get("strict"), bool):
            out["strict"] = function["strict"]
        tools.append({"type": "function", "function": out})
    return tools
