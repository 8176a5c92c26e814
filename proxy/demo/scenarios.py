"""The demo's conversations: tools with real JSON schemas, what the tools return, and a scripted
"model" that plans them like a model would (the fake upstream answers with it).

A first-time user sees these in the dashboard and in their first export, so they read like real
traffic: every tool call's arguments validate against the tool's schema, tool results agree with
the arguments, and final answers are sentences that use the results (not echoed JSON).

`scripted_model(body, number)` is a planner for `proxy.testing.fake_openai.create_fake_app`: it
recognises a demo conversation by its first user message and answers the request's step of it
(tool calls, or the final answer); any other conversation gets None (the fake's default plan).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DATE = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$", "description": "YYYY-MM-DD"}
AIRPORT = {"type": "string", "pattern": "^[A-Z]{3}$", "description": "IATA airport code"}


def _tool(
    name: str, description: str, properties: dict[str, Any], required: list[str]
) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
        },
    }


TOOLS: dict[str, dict[str, Any]] = {
    "search_flights": _tool(
        "search_flights",
        "Find direct flights between two airports on a date.",
        {"origin": AIRPORT, "destination": AIRPORT, "date": DATE},
        ["origin", "destination", "date"],
    ),
    "get_weather": _tool(
        "get_weather",
        "Daily weather forecast for a city.",
        {
            "city": {"type": "string", "description": "City name"},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        ["city"],
    ),
    "find_hotels": _tool(
        "find_hotels",
        "Hotels with free rooms in a city for the given nights.",
        {
            "city": {"type": "string"},
            "check_in": DATE,
            "nights": {"type": "integer", "minimum": 1, "maximum": 30},
            "amenities": {"type": "array", "items": {"type": "string"}},
            "max_price_eur": {"type": "number", "exclusiveMinimum": 0},
        },
        ["city", "check_in", "nights"],
    ),
    "lookup_order": _tool(
        "lookup_order",
        "Look up a customer order by its id.",
        {"order_id": {"type": "string", "pattern": "^[A-Z][0-9]{4}$"}},
        ["order_id"],
    ),
    "refund_order": _tool(
        "refund_order",
        "Refund an order in full.",
        {
            "order_id": {"type": "string", "pattern": "^[A-Z][0-9]{4}$"},
            "reason": {"type": "string", "enum": ["damaged", "late", "not_as_described", "other"]},
        },
        ["order_id", "reason"],
    ),
    "search_docs": _tool(
        "search_docs",
        "Search the product documentation; returns page paths and titles.",
        {
            "query": {"type": "string", "minLength": 2},
            "limit": {"type": "integer", "minimum": 1, "maximum": 10},
        },
        ["query"],
    ),
    "fetch_page": _tool(
        "fetch_page",
        "Fetch a documentation page (HTML).",
        {"path": {"type": "string", "pattern": "^/docs/"}},
        ["path"],
    ),
}

_FLIGHTS = {
    ("BER", "LIS"): {"flight": "TP 555", "departs": "07:40", "arrives": "10:15", "price_eur": 129},
    ("BER", "OPO"): {"flight": "FR 1312", "departs": "09:05", "arrives": "11:50", "price_eur": 84},
}
_WEATHER = {
    "Lisbon": {"summary": "sunny", "high_c": 19, "low_c": 11},
    "Porto": {"summary": "showers on Friday, then dry", "high_c": 16, "low_c": 9},
    "Oslo": {"summary": "light snow", "high_c": -1, "low_c": -6},
}
_HOTELS: dict[str, list[dict[str, Any]]] = {
    "Lisbon": [{"name": "Casa do Rio", "price_eur": 98, "rating": 4.6}],
    "Porto": [{"name": "Ribeira Guesthouse", "price_eur": 76, "rating": 4.4}],
    "Oslo": [
        {"name": "Fjord Lodge", "price_eur": 142, "rating": 4.5, "amenities": ["sauna"]},
        {"name": "Hotel Nord", "price_eur": 118, "rating": 4.1, "amenities": []},
    ],
}
_PAGES = {
    "/docs/keys#rotate": (
        "<h1>Rotating keys</h1><p>Create a new key, deploy it, revoke the old one.</p>"
        # Captured traffic is untrusted: this shows that the dashboard escapes what it shows.
        "<script>alert('tool results are shown as text')</script>"
    ),
    "/docs/service-accounts#keys": (
        "<h1>Service account keys</h1><p>A service account holds up to two keys at a time: "
        "add the new one, switch over, delete the old one.</p>"
    ),
}


def tool_output(name: str, args: dict[str, Any], retry: int = 0) -> str:
    """What the demo app's tool `name` returns for `args` (a JSON text or HTML), as the app
    sends it back in a `tool` message. retry: a second attempt after a timeout (noted)."""
    value: Any
    if name == "search_flights":
        found = _FLIGHTS.get((args.get("origin", ""), args.get("destination", "")))
        value = {"date": args.get("date"), "flights": [found] if found else []}
    elif name == "get_weather":
        value = {"city": args.get("city"), "days": args.get("days", 1)}
        value.update(_WEATHER.get(str(args.get("city")), {"summary": "unknown"}))
    elif name == "find_hotels":
        wanted = set(args.get("amenities") or [])
        value = {
            "city": args.get("city"),
            "check_in": args.get("check_in"),
            "nights": args.get("nights"),
            "hotels": [
                h
                for h in _HOTELS.get(str(args.get("city")), [])
                if wanted <= set(h.get("amenities", []))
            ],
        }
    elif name == "lookup_order":
        value = {
            "order_id": args.get("order_id"),
            "status": "delivered",
            "item": "electric kettle",
            "total_eur": 39.9,
        }
    elif name == "refund_order":
        value = {"refund_id": "R-88", "order_id": args.get("order_id"), "amount_eur": 39.9}
    elif name == "search_docs":
        query = str(args.get("query", "")).lower()
        hits = [{"path": "/docs/keys#rotate", "title": "Rotating API keys"}]
        if "service" in query:
            hits = [{"path": "/docs/service-accounts#keys", "title": "Service account keys"}]
        value = {"hits": hits}
    elif name == "fetch_page":
        return _PAGES.get(str(args.get("path")), "<p>Not found</p>")
    else:
        value = {"ok": True}
    if retry:
        value = {"attempt": retry + 1, "note": "the first attempt timed out", **value}
    return json.dumps(value)


Call = tuple[str, dict[str, Any]]


@dataclass
class Turn:
    """One user message and how the scripted model handles it: rounds of tool calls (parallel
    calls in one round), then the final answer."""

    user: str
    rounds: list[list[Call]]
    answer: str


@dataclass
class Conversation:
    """One scripted conversation: what the app sends and how it calls the proxy."""

    name: str
    system: str
    turns: list[Turn]
    tools: list[str]
    model: str = "gpt-4.1-mini"
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    fork: bool = False

    @property
    def users(self) -> list[str]:
        """The user messages, in order."""
        return [turn.user for turn in self.turns]


CONVERSATIONS = [
    Conversation(
        "trip-planner",
        "You are a travel agent. Use the tools; answer in two sentences.",
        [
            Turn(
                "Plan a weekend in Lisbon from Berlin: check flights and the weather in "
                "parallel, then suggest a hotel.",
                [
                    [
                        (
                            "search_flights",
                            {"origin": "BER", "destination": "LIS", "date": "2026-12-05"},
                        ),
                        ("get_weather", {"city": "Lisbon", "days": 2}),
                    ],
                    [
                        (
                            "find_hotels",
                            {
                                "city": "Lisbon",
                                "check_in": "2026-12-05",
                                "nights": 2,
                                "max_price_eur": 150,
                            },
                        )
                    ],
                ],
                "Take TAP flight TP 555 on Saturday 5 December (Berlin 07:40, Lisbon 10:15, "
                "€129); the weekend looks sunny at 11-19 °C. Casa do Rio has a room for both "
                "nights at €98 a night and is rated 4.6 - shall I book it?",
            )
        ],
        ["search_flights", "get_weather", "find_hotels"],
    ),
    Conversation(
        "support-refund (stream)",
        "You are a support agent for a kitchenware shop.",
        [
            Turn(
                "My order A1234 arrived broken. Please refund it.",
                [
                    [("lookup_order", {"order_id": "A1234"})],
                    [("refund_order", {"order_id": "A1234", "reason": "damaged"})],
                ],
                "I'm sorry your electric kettle arrived broken. I've refunded the full €39.90 "
                "for order A1234 (refund R-88); it reaches your card within 3-5 business days.",
            )
        ],
        ["lookup_order", "refund_order"],
        stream=True,
        headers={"x-fake-chunk-delay-ms": "15"},
    ),
    Conversation(
        "docs-helper (two user turns)",
        "You answer questions about the product from its documentation.",
        [
            Turn(
                "How do I rotate an API key?",
                [
                    [("search_docs", {"query": "rotate API key", "limit": 3})],
                    [("fetch_page", {"path": "/docs/keys#rotate"})],
                ],
                "Create a new key, deploy it everywhere the old one is used, and revoke the "
                "old key once nothing calls with it any more - that way nothing goes down in "
                "between.",
            ),
            Turn(
                "And for a service account?",
                [
                    [("search_docs", {"query": "service account key rotation", "limit": 3})],
                    [("fetch_page", {"path": "/docs/service-accounts#keys"})],
                ],
                "The same steps apply, on the service account's own Keys tab: add a second "
                "key, switch the service to it, then delete the old one.",
            ),
        ],
        ["search_docs", "fetch_page"],
        model="gpt-4.1",
    ),
    Conversation(
        "weather (retried step: a fork)",
        "You are a concise assistant.",
        [
            Turn(
                "What's the weather in Oslo this weekend, and is there a hotel with a sauna?",
                [
                    [("get_weather", {"city": "Oslo", "days": 2})],
                    [
                        (
                            "find_hotels",
                            {
                                "city": "Oslo",
                                "check_in": "2026-12-05",
                                "nights": 2,
                                "amenities": ["sauna"],
                            },
                        )
                    ],
                ],
                "Expect light snow in Oslo this weekend, between -6 and -1 °C. Fjord Lodge "
                "has a sauna and free rooms at €142 a night.",
            )
        ],
        ["get_weather", "find_hotels"],
        model="gpt-4o-mini",
        fork=True,
    ),
    Conversation(
        "trip-planner (teacher)",
        "You are a travel agent. Use the tools; answer in two sentences.",
        [
            Turn(
                "Plan three days in Porto: compare flights and weather in parallel first.",
                [
                    [
                        (
                            "search_flights",
                            {"origin": "BER", "destination": "OPO", "date": "2026-12-04"},
                        ),
                        ("get_weather", {"city": "Porto", "days": 3}),
                    ],
                    [("find_hotels", {"city": "Porto", "check_in": "2026-12-04", "nights": 3})],
                ],
                "Fly Ryanair FR 1312 on Friday 4 December (09:05, €84) and stay three nights "
                "at the Ribeira Guesthouse for €76 a night. Pack a rain jacket for Friday's "
                "showers; Saturday and Sunday look dry at up to 16 °C.",
            )
        ],
        ["search_flights", "get_weather", "find_hotels"],
        headers={"X-Understudy-Route": "teacher"},
    ),
    Conversation(
        "haiku (no tools)",
        "You are a poet.",
        [
            Turn(
                "Write a haiku about a proxy that remembers everything.",
                [],
                "Every word passes\nthrough a quiet, patient gate -\nnothing is forgotten.",
            )
        ],
        [],
    ),
    Conversation(
        "rate-limited",
        "You are a concise assistant.",
        [Turn("Summarise yesterday's orders.", [], "")],
        ["lookup_order"],
        model="fake-error-429",
    ),
]

_BY_FIRST_USER = {convo.turns[0].user: convo for convo in CONVERSATIONS}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def scripted_model(body: dict[str, Any], number: int) -> dict[str, Any] | None:
    """The demo's "model": the assistant message for a request of a demo conversation, or None
    for anything else. The conversation is found by its first user message; the turn by the
    number of user messages; the step by the assistant messages since the last user message."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        return None
    convo = _BY_FIRST_USER.get(_text(messages[users[0]].get("content")))
    if convo is None or len(users) > len(convo.turns):
        return None
    turn = convo.turns[len(users) - 1]
    step = sum(1 for m in messages[users[-1] + 1 :] if m.get("role") == "assistant")
    offered = {
        t.get("function", {}).get("name") for t in body.get("tools") or [] if isinstance(t, dict)
    }
    if step < len(turn.rounds) and body.get("tool_choice") != "none":
        calls = turn.rounds[step]
        if not all(name in offered for name, _ in calls):
            return None
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": f"call_{number}_{i}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args)},
                }
                for i, (name, args) in enumerate(calls)
            ],
            "refusal": None,
            "annotations": [],
        }
    return {"role": "assistant", "content": turn.answer, "refusal": None, "annotations": []}


Planner = Callable[[dict[str, Any], int], dict[str, Any] | None]
