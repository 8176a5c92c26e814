"""Sample building: a recorded conversation becomes one training conversation in OpenAI form.

Pure functions, no I/O. A leaf's request messages plus its response message are the whole
conversation (DESIGN.md, "what a correct OpenAI sample is"). `build_conversation` turns them into a
`Conversation` that obeys every rule of the OpenAI fine-tuning chat format:

- roles are system, user, assistant, tool (`developer` becomes `system`; legacy `function`
  messages and `function_call` become tool messages and `tool_calls`);
- `arguments` is a JSON **string** holding a JSON object, as the format requires (an object the
  client re-serialized is dumped compactly);
- tool `content` and system/assistant `content` are strings (text-part arrays are joined);
- response-only and unknown fields (`refusal`, `annotations`, `audio`, null `function_call`,
  provider reasoning fields, `index`) are dropped;
- tool-call ids are renumbered `call00001`, `call00002`, ... (9 alphanumeric characters, as
  Mistral's templates require) in order of appearance, each tool message keeping its pair;
  parallel calls stay in one assistant message, answered by one tool message each before the
  next non-tool message;
- `tools` are the leaf request's function tools; `parallel_tool_calls` is the request's.

Anything that cannot be made correct raises `Rejected` with a short stable `reason` (the export
summary counts drops by reason) and a human-readable detail. Formats (`exporter.formats.*`) render
a `Conversation` into their own record shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from exporter.messages import (
    NAME_PATTERN,
    Rejected,
    arguments_string,
    normalize_assistant,
    normalize_message,
    normalize_tools,
    pair_and_renumber,
    text_of,
)
from proxy.core.canonical import response_message

__all__ = [
    "NAME_PATTERN",
    "TRAIN_ON_CHOICES",
    "Conversation",
    "Rejected",
    "apply_options",
    "arguments_string",
    "build_conversation",
    "is_final_answer",
    "outcome_reason",
    "normalize_message",
    "normalize_tools",
    "pair_and_renumber",
    "response_message",
    "set_system_prompt",
    "set_weights",
    "strip_descriptions",
    "text_of",
    "unfinished_reason",
    "without_tool_descriptions",
]

TrainOn = Literal["all", "final", "tool-calls", "last"]
TRAIN_ON_CHOICES: tuple[str, ...] = ("all", "final", "tool-calls", "last")

_UNFINISHED = frozenset({"length", "content_filter", "tool_calls", "function_call"})
CUT_SHORT = frozenset({"length", "content_filter"})
"""finish_reason values of an answer cut short: never trained, even with `--include-incomplete`."""


@dataclass(frozen=True)
class Conversation:
    """One training conversation in OpenAI fine-tuning form.

    messages: OpenAI chat messages (see the module docstring for their exact shape); assistant
    messages may carry `weight` (0 or 1). tools: `[{"type": "function", "function": {"name",
    "description"?, "parameters"?, "strict"?}}]`, possibly empty. parallel_tool_calls: the
    recorded request's value, or None when it did not set one. cut: why the leaf's own answer
    was left out (`unfinished_reason`: 'length', 'content_filter', 'refusal', ...), or None when
    it is the last message; only `--include-incomplete` exports such conversations.
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    parallel_tool_calls: bool | None = None
    cut: str | None = None

    @property
    def tool_call_count(self) -> int:
        """Tool calls made by all assistant messages."""
        return sum(
            len(m.get("tool_calls") or ()) for m in self.messages if m["role"] == "assistant"
        )


def finish_reason(response: Any) -> str | None:
    """`choices[0].finish_reason` of a `chat.completion` dict, or None."""
    if isinstance(response, dict):
        choices = response.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            reason = choices[0].get("finish_reason")
            return reason if isinstance(reason, str) else None
    return None


def is_final_answer(message: dict[str, Any] | None, reason: str | None) -> bool:
    """An assistant message with text and no tool calls, not cut short (length, content filter)."""
    if message is None or message.get("tool_calls") or message.get("function_call"):
        return False
    if reason in _UNFINISHED:
        return False
    try:
        return bool(text_of(message.get("content"), "answer").strip())
    except Rejected:
        return False


def unfinished_reason(message: dict[str, Any] | None, reason: str | None) -> str:
    """Why an answer is not a complete final answer: the drop reason the export summary counts.

    'error' (no answer message), 'length' / 'content_filter' (cut short by the upstream),
    'pending_tool_call' (the answer calls tools: the trajectory stopped before their results),
    'refusal' (a `refusal` and no text), 'audio' (audio output and no text),
    'empty_assistant_message', or 'incomplete' for anything else.
    """
    if message is None:
        return "error"
    if reason in CUT_SHORT:
        return reason
    if message.get("tool_calls") or message.get("function_call") or reason in _UNFINISHED:
        return "pending_tool_call"
    content = message.get("content")
    has_text = isinstance(content, str) and bool(content.strip())
    if isinstance(content, list):
        if any(isinstance(p, dict) and p.get("type") == "refusal" for p in content):
            return "refusal"
        has_text = any(isinstance(p, dict) and str(p.get("text") or "").strip() for p in content)
    if not has_text and isinstance(message.get("refusal"), str) and message["refusal"]:
        return "refusal"
    if not has_text and message.get("audio"):
        return "audio"
    if not has_text:
        return "empty_assistant_message"
    return "incomplete"


def outcome_reason(outcome: Any) -> str | None:
    """The drop reason of an exchange that did not answer ('error', 'cancelled'), or None when ok.

    An error leaf is never a training sample, not even with `--include-incomplete` (an app's retry
    after an upstream error would otherwise export the failed branch as a duplicate prefix).
    """
    if outcome in (None, "ok"):
        return None
    return "cancelled" if outcome == "cancelled" else "error"


def build_conversation(
    request: dict[str, Any],
    response: dict[str, Any] | None,
    *,
    require_final_answer: bool = True,
    outcome: str = "ok",
    tools: list[dict[str, Any]] | None = None,
) -> Conversation:
    """The training conversation of one leaf: its request messages plus its response message.

    request: the client's request body (dict with `messages`, maybe `tools`/`functions`,
    `parallel_tool_calls`). response: the answer as a `chat.completion` dict, or None when the
    exchange failed. outcome: the exchange's recorded outcome ('ok', 'error', 'cancelled').
    A failed exchange (outcome not ok, or no answer message) raises Rejected('error' or
    'cancelled') in every mode. With `require_final_answer`, an answer that is not a complete
    final answer raises Rejected with `unfinished_reason` ('length', 'pending_tool_call',
    'refusal', ...). Without it, such a conversation is kept: an answer that calls tools ends it;
    an answer cut short (length, content filter) or without text is left out and named in
    `Conversation.cut`, and the conversation ends at its last assistant message (trailing user
    and tool messages are left out). Raises Rejected for anything the training format cannot
    hold (see the module docstring). tools: the request's tools in training form when the caller
    has them already (`normalize_tools(request)`, descriptions possibly stripped: the exporter
    keeps them per distinct tool list); never mutated.
    """
    raw_messages = request.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise Rejected("unreadable", "request has no messages")
    failed = outcome_reason(outcome)
    if failed is not None:
        raise Rejected(failed, f"the exchange ended with outcome {outcome!r}")
    answer = response_message(response)
    if answer is None:
        raise Rejected("error", "the leaf has no answer message")
    finish = finish_reason(response)
    cut: str | None = None
    if not is_final_answer(answer, finish):
        why = unfinished_reason(answer, finish)
        if require_final_answer:
            raise Rejected(why, "the leaf did not end with a final answer")
        if why != "pending_tool_call":
            cut = why
    messages = [normalize_message(m, i) for i, m in enumerate(raw_messages)]
    if cut is None:
        messages.append(normalize_assistant(answer, len(messages)))
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not messages:
        raise Rejected(
            cut or "no_assistant_message", "the conversation has no assistant message to train"
        )
    pair_and_renumber(messages)
    if tools is None:
        tools = normalize_tools(request)
    declared = {t["function"]["name"] for t in tools}
    parallel_calls = False
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            for call in calls:
                name = call["function"]["name"]
                if name not in declared:
                    raise Rejected(
                        "undeclared_tool", f"tool call to {name!r}, which the request's tools lack"
                    )
            parallel_calls = parallel_calls or len(calls) > 1
    parallel = request.get("parallel_tool_calls")
    parallel = parallel if isinstance(parallel, bool) and tools else None
    if parallel is False and parallel_calls:
        raise Rejected(
            "parallel_calls_disallowed", "parallel tool calls while parallel_tool_calls is false"
        )
    return Conversation(messages=messages, tools=tools, parallel_tool_calls=parallel, cut=cut)


# -- options -----------------------------------------------------------------------------------


def strip_descriptions(schema: Any) -> Any:
    """A JSON schema without `description` keywords (property *names* called description stay)."""
    if isinstance(schema, list):
        return [strip_descriptions(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "description":
            continue
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(
            value, dict
        ):
            out[key] = {name: strip_descriptions(sub) for name, sub in value.items()}
        elif key in (
            "items",
            "additionalProperties",
            "not",
            "anyOf",
            "oneOf",
            "allOf",
            "prefixItems",
        ):
            out[key] = strip_descriptions(value)
        else:
            out[key] = value
    return out


def without_tool_descriptions(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools with the function `description` and every parameter description removed."""
    out = []
    for tool in tools:
        function = {k: v for k, v in tool["function"].items() if k != "description"}
        if "parameters" in function:
            function["parameters"] = strip_descriptions(function["parameters"])
        out.append({"type": "function", "function": function})
    return out


def set_system_prompt(
    messages: list[dict[str, Any]], system_prompt: str | None, drop_system: bool
) -> list[dict[str, Any]]:
    """Apply `--system-prompt` (replace every system message by one leading message) or
    `--drop-system` (remove them all); neither: unchanged."""
    if system_prompt is None and not drop_system:
        return messages
    rest = [m for m in messages if m["role"] != "system"]
    if system_prompt is not None:
        return [{"role": "system", "content": system_prompt}, *rest]
    return rest


def set_weights(messages: list[dict[str, Any]], train_on: str) -> list[dict[str, Any]]:
    """Set `weight` (0/1) on assistant messages for `--train-on`.

    all: no weights (OpenAI trains every assistant message). final: answers without tool calls.
    tool-calls: messages with tool calls. last: only the last assistant message.
    Raises Rejected('nothing_to_train') when no assistant message gets weight 1.
    """
    if train_on == "all":
        return messages
    if train_on not in TRAIN_ON_CHOICES:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON_CHOICES)}")
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    out = []
    trained = 0
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            has_calls = bool(message.get("tool_calls"))
            if train_on == "final":
                weight = int(not has_calls)
            elif train_on == "tool-calls":
                weight = int(has_calls)
            else:
                weight = int(i == last)
            trained += weight
            message = {**message, "weight": weight}
        out.append(message)
    if not trained:
        raise Rejected(
            "nothing_to_train", f"no assistant message to train with --train-on {train_on}"
        )
    return out


def apply_options(
    conversation: Conversation,
    *,
    train_on: str = "all",
    system_prompt: str | None = None,
    drop_system: bool = False,
    strip_tool_descriptions: bool = False,
) -> Conversation:
    """The conversation with the export options applied (system prompt, weights, tool descriptions)."""
    messages = set_system_prompt(conversation.messages, system_prompt, drop_system)
    messages = set_weights(messages, train_on)
    tools = (
        without_tool_descriptions(conversation.tools)
        if strip_tool_descriptions
        else conversation.tools
    )
    if messages is conversation.messages and tools is conversation.tools:
        return conversation  # no option changed anything (frozen: nothing to copy)
    return replace(conversation, messages=messages, tools=tools)
