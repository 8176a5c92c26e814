"""Shared by the open-trainer tests: a database of varied tool-use trajectories and shadow pairs,
the real chat templates of `shared/chat-templates/` rendered the way transformers renders them,
and a check that every call, its arguments and every result appear in order in the text."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from proxy.storage import new_id
from tests.support.exporter import ROOT, completion, record, write_records

TEMPLATES_DIR = Path(
    os.environ.get("UNDERSTUDY_CHAT_TEMPLATES", ROOT.parent / "shared" / "chat-templates")
)
TEMPLATES = {
    "qwen2.5": "qwen2.5_instruct.jinja",
    "hermes": "tool_chat_template_hermes.jinja",
    "llama3.1": "tool_chat_template_llama3.1_json.jinja",
    "mistral": "tool_chat_template_mistral_parallel.jinja",
}

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "search_orders",
            "description": "Find a customer's orders.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                "required": ["query"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "refund_order",
            "description": "Refund one order.",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}, "reason": {"type": "string"}},
                "required": ["order_id"],
            },
        },
    },
]
SYSTEM = {"role": "system", "content": "You are a support agent. Use tools."}


def _call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def _assistant_calls(*calls: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": list(calls)}


def _result(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def conversations(i: int) -> list[tuple[list[dict[str, Any]], str, bool]]:
    """Variant `i` of five conversation shapes: (request messages, final answer, with tools)."""
    n = 1000 + i
    one = [
        SYSTEM,
        {"role": "user", "content": f"Where is order {n}?"},
        _assistant_calls(_call(f"call_a{i}", "search_orders", {"query": f"order {n}"})),
        _result(f"call_a{i}", f'{{"order": {n}, "status": "shipped"}}'),
    ]
    parallel = [
        SYSTEM,
        {"role": "user", "content": f"Refund orders {n} and {n + 1}, then list my orders."},
        _assistant_calls(
            _call(f"p1_{i}", "refund_order", {"order_id": str(n), "reason": "late"}),
            _call(f"p2_{i}", "refund_order", {"order_id": str(n + 1)}),
        ),
        _result(f"p1_{i}", f"refunded {n}"),
        _result(f"p2_{i}", f"refunded {n + 1}"),
        _assistant_calls(_call(f"p3_{i}", "search_orders", {"query": "mine", "limit": i + 2})),
        _result(f"p3_{i}", f"orders: {n}, {n + 1}"),
    ]
    two_turns = [
        SYSTEM,
        {"role": "user", "content": f"Find order {n}."},
        _assistant_calls(_call(f"t1_{i}", "search_orders", {"query": f"#{n}"})),
        _result(f"t1_{i}", f"#{n}: delayed"),
        {"role": "assistant", "content": f"Order {n} is delayed."},
        {"role": "user", "content": "Refund it, please."},
        _assistant_calls(_call(f"t2_{i}", "refund_order", {"order_id": str(n)})),
        _result(f"t2_{i}", "done"),
    ]
    quoted = [
        {"role": "user", "content": f'Search "café {n}" — quotes and accents'},
        _assistant_calls(_call(f"q1_{i}", "search_orders", {"query": f'café "{n}"\nline 2'})),
        _result(f"q1_{i}", f'Found: "café {n}"\n\tno refund'),
    ]
    plain = [SYSTEM, {"role": "user", "content": f"Say hello to customer {n}."}]
    return [
        (one, f"Order {n} has shipped.", True),
        (parallel, f"Refunded {n} and {n + 1}; you have 2 orders.", True),
        (two_turns, f"Order {n} is refunded.", True),
        (quoted, f'The café order "{n}" has no refund.', True),
        (plain, f"Hello, customer {n}!", False),
    ]


async def build_db(path: Path, variants: int = 3) -> None:
    """`variants` x five trajectories (see `conversations`), plus two shadow pairs per variant: a
    teacher that calls a tool where the student answered, after a tool result in the input."""
    items: list[Any] = []
    minute = 0
    for i in range(variants):
        for messages, final, with_tools in conversations(i):
            minute += 1
            request: dict[str, Any] = {"model": "gpt-4.1-mini", "messages": messages}
            if with_tools:
                request["tools"] = TOOLS
            items.append(
                record(
                    new_id(),
                    request,
                    completion({"role": "assistant", "content": final}),
                    started_utc=f"2026-11-20T10:{minute:02d}:00.000+00:00",
                )
            )
        history = conversations(i)[0][0]
        for j, (question, student, teacher) in enumerate(
            (
                (
                    history,
                    f"I think order {1000 + i} shipped.",
                    _assistant_calls(_call("s1", "refund_order", {"order_id": str(1000 + i)})),
                ),
                (
                    [SYSTEM, {"role": "user", "content": f"Status of order {2000 + i}?"}],
                    "No idea.",
                    _assistant_calls(_call("s2", "search_orders", {"query": str(2000 + i)})),
                ),
            )
        ):
            minute += 1
            items.append(
                record(
                    new_id(),
                    {"model": "gpt-4.1-mini", "tools": TOOLS, "messages": question},
                    completion({"role": "assistant", "content": student}),
                    started_utc=f"2026-11-20T10:{minute:02d}:00.000+00:00",
                    shadow_model="o3",
                    shadow_response_json=json.dumps(completion(teacher, "o3")),
                )
            )
            del j
    await write_records(path, items)


# -- rendering as transformers does -----------------------------------------------------------


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def template_environment() -> ImmutableSandboxedEnvironment:
    """A jinja environment like transformers' chat-template one: trim_blocks, lstrip_blocks,
    loop controls, `tojson` with transformers' defaults, `raise_exception`, `strftime_now`."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: "26 Jul 2024"
    return env


def render(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    """`messages` + `tools` through a template file, as TRL calls it (`tools or None`)."""
    text = (TEMPLATES_DIR / TEMPLATES[template]).read_text(encoding="utf-8")
    return (
        template_environment()
        .from_string(text)
        .render(
            messages=messages,
            tools=tools or None,
            bos_token="<s>",
            eos_token="</s>",
            add_generation_prompt=False,
        )
    )


def _forms(text: str) -> tuple[str, ...]:
    """A text as a template may print it: as is, trimmed, or JSON-escaped inside a string."""
    escaped = json.dumps(text, ensure_ascii=False)[1:-1]
    return (text, text.strip(), escaped, json.dumps(text.strip(), ensure_ascii=False)[1:-1])


Piece = tuple[tuple[str, ...], str | None]
"""(forms a text may be printed in, a name that must be printed next to it or None)."""


def pieces(messages: list[dict[str, Any]], template: str) -> Iterator[Piece]:
    """What must appear, in order: user texts, each call's arguments with its name beside them
    (templates print the name before or after), for Mistral the call's id, each result (for
    Mistral with its call id), assistant texts."""
    for message in messages:
        role = message["role"]
        if role == "user":
            yield _forms(message["content"]), None
        elif role == "assistant":
            for call in message.get("tool_calls") or ():
                function = call["function"]
                arguments = json.dumps(function["arguments"], ensure_ascii=False)
                yield (arguments,), function["name"]
                if template == "mistral":
                    yield (f'"id": "{call["id"]}"',), None
            if message.get("content"):
                yield _forms(message["content"]), None
        elif role == "tool":
            yield _forms(message["content"]), None
            if template == "mistral":
                yield (f'"call_id": "{message["tool_call_id"]}"',), None


NAME_WINDOW = 40
"""Most characters between a call's arguments and its name (`"name": "f", "arguments": {...}`
or `{"arguments": {...}, "name": "f"}`)."""


def missing_in_order(text: str, messages: list[dict[str, Any]], template: str) -> list[str]:
    """Pieces (see `pieces`) that are not found in `text` after the previous one; [] when all are."""
    position = 0
    missing = []
    for forms, name in pieces(messages, template):
        found = [(text.find(f, position), f) for f in forms if f and text.find(f, position) >= 0]
        if not found:
            missing.append(forms[0])
            continue
        index, form = min(found)
        if name is not None:
            around = text[max(0, index - NAME_WINDOW - len(name)) : index + len(form) + NAME_WINDOW]
            if f'"{name}"' not in around and f": {name}" not in around:
                missing.append(f"name {name} beside {form}")
        position = index + len(form)
    return missing


def has_parallel_calls(messages: list[dict[str, Any]]) -> bool:
    return any(len(m.get("tool_calls") or ()) > 1 for m in messages)
