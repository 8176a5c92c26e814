"""Validation of training files: the rules OpenAI (and open-model trainers) reject files for.

Pure functions, no I/O, written independently of the sample builder so that a round trip
(`export` then `validate`) checks one against the other. `validate_record` returns the errors of
one record; `exporter.validate_file.validate_lines` checks a whole file given as lines and adds file-level
rules (JSON on every line, at least `min_samples` records, samples over the token limit) and
token statistics.

Formats: `openai`, `hf` (TRL `messages`, or `prompt` + `completion`), `axolotl` (`hf` messages
each with a boolean `training`), `sharegpt`, `dpo` (OpenAI preference) and `hf-dpo` (TRL
`prompt` / `chosen` / `rejected`). Rules for the `openai` chat format (and, adapted, the others): top-level keys `messages`,
`tools`, `parallel_tool_calls` (and legacy `functions`) only; roles system, user, assistant, tool
with only their own keys (`refusal`, `annotations`, `audio` are rejected); at least one assistant
message, and one whose `weight` is not 0; `weight` only on assistant messages, 0 or 1; tool calls
`{"id", "type": "function", "function": {"name", "arguments"}}` with unique ids, names matching
`^[a-zA-Z0-9_-]{1,64}$`, `arguments` a JSON string holding an object (an object in `hf`), the name
declared in `tools`; every call answered by exactly one tool message directly after its assistant
message (only the last message may leave calls open), no orphan tool message; tool content a
string; no parallel calls when `parallel_tool_calls` is false; the last message from the assistant.
"""

from __future__ import annotations

import json
from typing import Any

from exporter.messages import NAME_PATTERN

VALIDATE_FORMATS: tuple[str, ...] = ("openai", "hf", "axolotl", "sharegpt", "dpo", "hf-dpo")
MIN_SAMPLES = 10
"""OpenAI rejects training files with fewer examples."""

_ROLE_KEYS: dict[str, frozenset[str]] = {
    "system": frozenset({"role", "content", "name"}),
    "user": frozenset({"role", "content", "name"}),
    "assistant": frozenset({"role", "content", "name", "tool_calls", "weight", "function_call"}),
    "tool": frozenset({"role", "content", "tool_call_id"}),
}
_HF_EXTRA_KEYS = {"tool": frozenset({"name"})}
_USER_PART_TYPES = ("text", "image_url")


def _is_text_parts(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    )


def _check_tools(tools: Any, errors: list[str]) -> set[str]:
    """Errors in a `tools` list; returns the declared function names."""
    names: set[str] = set()
    if not isinstance(tools, list):
        errors.append("tools must be an array")
        return names
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
        ):
            errors.append(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
            continue
        unknown = set(tool) - {"type", "function"}
        unknown |= set(function) - {"name", "description", "parameters", "strict"}
        if unknown:
            errors.append(f"tools[{i}] has unknown keys {sorted(unknown)}")
        name = function.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            errors.append(f"tools[{i}] name {name!r} does not match ^[a-zA-Z0-9_-]{{1,64}}$")
        elif name in names:
            errors.append(f"tools[{i}] name {name!r} is declared twice")
        else:
            names.add(name)
        if "parameters" in function and not isinstance(function["parameters"], dict):
            errors.append(f"tools[{i}] parameters must be a JSON schema object")
    return names


def _check_arguments(arguments: Any, as_object: bool, where: str, errors: list[str]) -> None:
    if as_object:
        if not isinstance(arguments, dict):
            errors.append(f"{where} arguments must be a JSON object (hf format)")
        return
    if not isinstance(arguments, str):
        errors.append(f"{where} arguments must be a JSON string, not {type(arguments).__name__}")
        return
    try:
        parsed = json.loads(arguments)
    except ValueError:
        errors.append(f"{where} arguments are not valid JSON")
        return
    if not isinstance(parsed, dict):
        errors.append(f"{where} arguments must hold a JSON object")


def check_messages(
    messages: Any,
    errors: list[str],
    *,
    declared: set[str] | None,
    arguments_as_object: bool = False,
    parallel_allowed: bool = True,
    must_end_with_assistant: bool = True,
    hf: bool = False,
) -> None:
    """Append to `errors` every rule a chat message list breaks (see the module docstring).

    declared: function names from `tools` (None: the record has no tools).
    """
    if not isinstance(messages, list) or not messages:
        errors.append("messages must be a non-empty array")
        return
    ids: set[str] = set()
    pending: set[str] = set()
    assistants = trained = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            errors.append(f"{where} is not an object")
            continue
        role = message.get("role")
        if role not in _ROLE_KEYS:
            errors.append(f"{where} has role {role!r} (allowed: system, user, assistant, tool)")
            continue
        allowed = _ROLE_KEYS[role] | (_HF_EXTRA_KEYS.get(role, frozenset()) if hf else frozenset())
        unknown = set(message) - allowed
        if unknown:
            errors.append(f"{where} ({role}) has unknown keys {sorted(unknown)}")
        if (
            "name" in message
            and role != "tool"
            and not (isinstance(message["name"], str) and NAME_PATTERN.match(message["name"]))
        ):
            errors.append(
                f"{where} name {message['name']!r} does not match ^[a-zA-Z0-9_-]{{1,64}}$"
            )
        content = message.get("content")
        if role == "tool":
            if not isinstance(content, str):
                errors.append(f"{where} tool content must be a string")
            call_id = message.get("tool_call_id")
            if call_id not in pending:
                errors.append(f"{where} answers {call_id!r}, which no open tool call has (orphan)")
            else:
                pending.discard(call_id)
            continue
        if pending:
            errors.append(f"{where}: tool calls {sorted(pending)} are not answered before it")
            pending = set()
        if role == "system" and not isinstance(content, str):
            errors.append(f"{where} system content must be a string")
        if (
            role == "user"
            and not isinstance(content, str)
            and not (
                isinstance(content, list)
                and content
                and all(isinstance(p, dict) and p.get("type") in _USER_PART_TYPES for p in content)
            )
        ):
            errors.append(f"{where} user content must be a string or text/image_url parts")
        if role != "assistant":
            if "weight" in message:
                errors.append(f"{where}: weight is allowed on assistant messages only")
            continue
        assistants += 1
        weight = message.get("weight", 1)
        if type(weight) is not int or weight not in (0, 1):
            errors.append(f"{where} weight must be 0 or 1")
        elif weight:
            trained += 1
        if content is not None and not isinstance(content, str) and not _is_text_parts(content):
            errors.append(f"{where} assistant content must be a string")
        calls = message.get("tool_calls")
        if "function_call" in message and message["function_call"] is None:
            errors.append(f"{where} has a null function_call (a response-only field)")
        if not content and not calls and not message.get("function_call"):
            errors.append(f"{where} assistant message has neither content nor tool calls")
        if calls is None:
            continue
        if not isinstance(calls, list) or not calls:
            errors.append(f"{where} tool_calls must be a non-empty array")
            continue
        if len(calls) > 1 and not parallel_allowed:
            errors.append(
                f"{where} has {len(calls)} parallel calls but parallel_tool_calls is false"
            )
        for j, call in enumerate(calls):
            cwhere = f"{where}.tool_calls[{j}]"
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(call, dict) or not isinstance(function, dict):
                errors.append(f"{cwhere} must be an object with a function")
                continue
            unknown = (set(call) - {"id", "type", "function"}) | (
                set(function) - {"name", "arguments"}
            )
            if unknown:
                errors.append(f"{cwhere} has unknown keys {sorted(unknown)}")
            if call.get("type") != "function":
                errors.append(f"{cwhere} type must be 'function'")
            call_id = call.get("id")
            if not isinstance(call_id, str) or not call_id:
                errors.append(f"{cwhere} id must be a non-empty string")
            elif call_id in ids:
                errors.append(f"{cwhere} id {call_id!r} is used twice")
            else:
                ids.add(call_id)
                pending.add(call_id)
            name = function.get("name")
            if not isinstance(name, str) or not NAME_PATTERN.match(name):
                errors.append(f"{cwhere} name {name!r} does not match ^[a-zA-Z0-9_-]{{1,64}}$")
            elif declared is None:
                errors.append(f"{cwhere} calls {name!r} but the record has no tools")
            elif name not in declared:
                errors.append(f"{cwhere} calls {name!r}, which tools do not declare")
            _check_arguments(function.get("arguments"), arguments_as_object, cwhere, errors)
    last = messages[-1] if isinstance(messages[-1], dict) else {}
    if pending and last.get("role") != "assistant":
        errors.append(f"tool calls {sorted(pending)} are never answered")
    if must_end_with_assistant:
        if not assistants:
            errors.append("no assistant message")
        elif not trained:
            errors.append("every assistant message has weight 0: nothing to train")
        elif last.get("role") != "assistant":
            errors.append("the last message must be from the assistant")


def _validate_chat(record: dict[str, Any], errors: list[str], hf: bool) -> None:
    allowed = (
        {"messages", "tools"} if hf else {"messages", "tools", "parallel_tool_calls", "functions"}
    )
    unknown = set(record) - allowed
    if unknown:
        errors.append(f"unknown top-level keys {sorted(unknown)}")
    declared = _check_tools(record["tools"], errors) if record.get("tools") is not None else None
    if declared is not None and not declared and not record["tools"]:
        declared = None
    parallel = record.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        errors.append("parallel_tool_calls must be true or false")
    check_messages(
        record.get("messages"),
        errors,
        declared=declared,
        arguments_as_object=hf,
        parallel_allowed=parallel is not False,
        hf=hf,
    )


def _validate_dpo(record: dict[str, Any], errors: list[str]) -> None:
    unknown = set(record) - {"input", "preferred_output", "non_preferred_output"}
    if unknown:
        errors.append(f"unknown top-level keys {sorted(unknown)}")
    data = record.get("input")
    if not isinstance(data, dict):
        errors.append("input must be an object with messages")
        return
    unknown = set(data) - {"messages", "tools", "parallel_tool_calls"}
    if unknown:
        errors.append(f"unknown input keys {sorted(unknown)}")
    declared = _check_tools(data["tools"], errors) if data.get("tools") else None
    parallel = data.get("parallel_tool_calls", True) is not False
    messages = data.get("messages")
    check_messages(messages, errors, declared=declared, must_end_with_assistant=False)
    if (
        isinstance(messages, list)
        and messages
        and isinstance(messages[-1], dict)
        and messages[-1].get("role") not in ("user", "tool")
    ):
        errors.append("input messages must end with a user or tool message")
    for key in ("preferred_output", "non_preferred_output"):
        answer = _one_assistant_message(record, key, errors)
        if answer is None:
            continue
        sub: list[str] = []
        check_messages(
            [*(messages if isinstance(messages, list) else []), answer],
            sub,
            declared=declared,
            parallel_allowed=parallel,
        )
        errors.extend(f"{key}: {e}" for e in sub if e not in errors)


def _validate_sharegpt(record: dict[str, Any], errors: list[str]) -> None:
    unknown = set(record) - {"conversations", "system", "tools"}
    if unknown:
        errors.append(f"unknown top-level keys {sorted(unknown)}")
    if "system" in record and not isinstance(record["system"], str):
        errors.append("system must be a string")
    declared: set[str] | None = None
    if "tools" in record:
        try:
            tools = json.loads(record["tools"]) if isinstance(record["tools"], str) else None
        except ValueError:
            tools = None
        if not isinstance(tools, list):
            errors.append("tools must be a JSON string holding an array")
        else:
            declared = {str(t.get("name")) for t in tools if isinstance(t, dict)}
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        errors.append("conversations must be a non-empty array")
        return
    for i, turn in enumerate(turns):
        expected = ("human", "observation") if i % 2 == 0 else ("gpt", "function_call")
        if not isinstance(turn, dict) or set(turn) != {"from", "value"}:
            errors.append(f"conversations[{i}] must be {{'from', 'value'}}")
            continue
        if turn["from"] not in expected:
            errors.append(
                f"conversations[{i}] is {turn['from']!r}, expected {' or '.join(expected)}"
            )
        if not isinstance(turn["value"], str):
            errors.append(f"conversations[{i}] value must be a string")
            continue
        if turn["from"] == "function_call":
            try:
                value = json.loads(turn["value"])
            except ValueError:
                errors.append(f"conversations[{i}] function_call value is not JSON")
                continue
            calls = value if isinstance(value, list) else [value]
            for call in calls:
                if not isinstance(call, dict) or not isinstance(call.get("arguments"), dict):
                    errors.append(f"conversations[{i}] each call needs a name and object arguments")
                elif declared is None or call.get("name") not in declared:
                    errors.append(f"conversations[{i}] calls {call.get('name')!r}, not in tools")
        if turn["from"] == "observation" and i and turns[i - 1].get("from") != "function_call":
            errors.append(f"conversations[{i}] observation does not follow a function_call")
    if len(turns) % 2:
        errors.append("conversations must end with a gpt or function_call turn")


def _message_list(value: Any, key: str, errors: list[str]) -> list[Any]:
    if not isinstance(value, list) or not value:
        errors.append(f"{key} must be a non-empty array of messages")
        return []
    return value


def _declared(record: dict[str, Any], errors: list[str]) -> set[str] | None:
    tools = record.get("tools")
    if tools is None or tools == []:
        return None
    return _check_tools(tools, errors)


def _validate_prompt_completion(record: dict[str, Any], errors: list[str]) -> None:
    """TRL's conversational prompt-completion layout (`hf` with `--train-on last`)."""
    unknown = set(record) - {"prompt", "completion", "tools"}
    if unknown:
        errors.append(f"unknown top-level keys {sorted(unknown)}")
    declared = _declared(record, errors)
    prompt = _message_list(record.get("prompt"), "prompt", errors)
    completion = _message_list(record.get("completion"), "completion", errors)
    if not all(isinstance(m, dict) and m.get("role") == "assistant" for m in completion):
        errors.append("completion must hold assistant messages only")
    if prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        errors.append("prompt must not end with an assistant message")
    untrained = [
        {**m, "weight": 0} if isinstance(m, dict) and m.get("role") == "assistant" else m
        for m in prompt
    ]
    check_messages(
        [*untrained, *completion], errors, declared=declared, arguments_as_object=True, hf=True
    )


def axolotl_as_weighted(messages: Any, errors: list[str]) -> Any:
    """Axolotl messages with `training` turned into `weight` (assistant) and removed, so the
    chat rules apply; appends an error for a missing or non-boolean flag."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            out.append(message)
            continue
        flag = message.get("training")
        if not isinstance(flag, bool):
            errors.append(f"messages[{i}] training must be true or false")
        rest = {k: v for k, v in message.items() if k != "training"}
        if message.get("role") == "assistant":
            rest["weight"] = int(flag is not False)
        elif flag is True:
            errors.append(f"messages[{i}] is a {message.get('role')} message marked for training")
        out.append(rest)
    return out


def _one_assistant_message(
    record: dict[str, Any], key: str, errors: list[str]
) -> dict[str, Any] | None:
    """`record[key]` when it is a list of exactly one assistant message (a preference pair's
    answer, in either DPO layout), else None with the reason appended to `errors`."""
    output = record.get(key)
    if not isinstance(output, list) or len(output) != 1 or not isinstance(output[0], dict):
        errors.append(f"{key} must be a list of exactly one assistant message")
        return None
    if output[0].get("role") != "assistant":
        errors.append(f"{key} must be an assistant message")
        return None
    return output[0]


def _validate_hf_dpo(record: dict[str, Any], errors: list[str]) -> None:
    """TRL's conversational preference layout."""
    unknown = set(record) - {"prompt", "chosen", "rejected", "tools"}
    if unknown:
        errors.append(f"unknown top-level keys {sorted(unknown)}")
    declared = _declared(record, errors)
    prompt = _message_list(record.get("prompt"), "prompt", errors)
    if prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") not in ("user", "tool"):
        errors.append("prompt must end with a user or tool message")
    for key in ("chosen", "rejected"):
        answer = _one_assistant_message(record, key, errors)
        if answer is None:
            continue
        sub: list[str] = []
        check_messages([*prompt, answer], sub, declared=declared, arguments_as_object=True, hf=True)
        errors.extend(f"{key}: {e}" for e in sub if e not in errors)


def validate_record(record: Any, fmt: str = "openai") -> list[str]:
    """Errors of one decoded JSONL record in format `fmt` (empty list: valid)."""
    errors: list[str] = []
    if not isinstance(record, dict):
        return ["a record must be a JSON object"]
    if fmt == "hf" and "prompt" in record:
        _validate_prompt_completion(record, errors)
    elif fmt in ("openai", "hf"):
        _validate_chat(record, errors, hf=fmt == "hf")
    elif fmt == "axolotl":
        weighted = {**record, "messages": axolotl_as_weighted(record.get("messages"), errors)}
        _validate_chat(weighted, errors, hf=True)
    elif fmt == "dpo":
        _validate_dpo(record, errors)
    elif fmt == "hf-dpo":
        _validate_hf_dpo(record, errors)
    elif fmt == "sharegpt":
        _validate_sharegpt(record, errors)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return errors


def guess_format(record: Any) -> str | None:
    """The format a record looks like, from its keys and argument types, or None."""
    if not isinstance(record, dict):
        return None
    if "conversations" in record:
        return "sharegpt"
    if "preferred_output" in record:
        return "dpo"
    if "chosen" in record:
        return "hf-dpo"
    if "completion" in record:
        return "hf"
    messages = record.get("messages")
    if isinstance(messages, list) and any(
        isinstance(m, dict) and "training" in m for m in messages
    ):
        return "axolotl"
    for message in record.get("messages") or ():
        for call in (message.get("tool_calls") or ()) if isinstance(message, dict) else ():
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                return "hf" if isinstance(call["function"].get("arguments"), dict) else "openai"
    return "openai" if "messages" in record else None
