"""Pure shaping of stored rows for the API and the pages: summaries, exchanges, branches.

No I/O. Every captured value stays data here; the templates escape it when they show it.
The chat turns of the trajectory page are built in `proxy.dashboard.turns`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.core import responses as responses_core
from proxy.core.canonical import response_message as answer_message
from proxy.dashboard.pricing import cost_usd
from proxy.storage.browse import TrajectoryDetails

MAX_PRETTY_CHARS = 200_000
"""Raw JSON shown on a page is cut at this many characters (the API returns it whole)."""


def parse_json(text: str | None) -> Any:
    """`text` decoded as JSON, or None when it is empty or not JSON. NaN and Infinity (not JSON,
    but stored by older versions) become None, so every answer built from it is strict JSON."""
    if not text:
        return None
    try:
        return json.loads(text, parse_constant=lambda _: None)
    except ValueError:
        return None


def pretty_json(value: Any, limit: int = MAX_PRETTY_CHARS) -> str:
    """Indented JSON (non-ASCII kept), cut to `limit` characters with a marker."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    if len(text) > limit:
        return text[:limit] + f"\n... ({len(text) - limit:,} more characters)"
    return text


def tags_of(row: Mapping[str, Any]) -> list[str]:
    """The curation tags of a trajectory row (`tags_json`), [] when none or unreadable."""
    tags = parse_json(row.get("tags_json"))
    return [str(tag) for tag in tags] if isinstance(tags, list) else []


def summary(row: Mapping[str, Any], details: TrajectoryDetails | None = None) -> dict[str, Any]:
    """A trajectory as the list and `GET /api/trajectories` show it.

    Keys: the `trajectories` columns (tags decoded into `tags`), `total_tokens`, `status` ('ok' or
    'error'), and from `details`: `models` (distinct names), `model_usage`, `cost_usd` (None when
    no price is known), `duration_ms`, `first_user_text`.
    """
    out: dict[str, Any] = {k: v for k, v in row.items() if k != "tags_json"}
    out["object"] = "trajectory"
    if "shadow" in out:
        out["shadow"] = bool(out["shadow"])
    out["tags"] = tags_of(row)
    out["total_tokens"] = int(row.get("prompt_tokens") or 0) + int(
        row.get("completion_tokens") or 0
    )
    out["status"] = "error" if row.get("error_count") else "ok"
    if details is not None:
        names: list[str] = []
        for usage in details.models:
            for key in ("model_requested", "model_answered"):
                name = usage.get(key)
                if name and name not in names:
                    names.append(name)
        out["models"] = names
        out["model_usage"] = details.models
        out["cost_usd"] = cost_usd(details.models)
        out["duration_ms"] = details.duration_ms
        out["first_user_text"] = details.first_user_text
    return out


def exchange_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """One exchange for the API: its columns with the `*_json` ones decoded (key without `_json`).

    `request_json` becomes `request`, `response_json` `response`, `error_json` `error`, and so on;
    a stored body that is not JSON is kept as its text.
    """
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key.endswith("_json"):
            decoded = parse_json(value)
            out[key.removesuffix("_json")] = decoded if decoded is not None else value
        else:
            out[key] = value
    out["stream"] = bool(out.get("stream"))
    return out


def messages_of(exchange: Mapping[str, Any]) -> list[Any]:
    """The request messages of an exchange (decoded by `exchange_view`), [] when unreadable.
    A Responses exchange shows its rebuilt conversation (`responses_view`)."""
    if isinstance(exchange.get("display_messages"), list):
        return list(exchange["display_messages"])
    request = exchange.get("request")
    messages = request.get("messages") if isinstance(request, dict) else None
    return list(messages) if isinstance(messages, list) else []


def response_message(exchange: Mapping[str, Any]) -> dict[str, Any] | None:
    """The assistant message of an exchange's answer (first choice), or None."""
    if exchange.get("kind") == "responses":
        answer = exchange.get("display_answer")
        return answer if isinstance(answer, dict) else None
    return answer_message(exchange.get("response"))


def responses_view(exchanges: Sequence[dict[str, Any]]) -> None:
    """Give each Responses exchange of a trajectory (decoded by `exchange_view`) its conversation
    as chat-shaped messages for display: `display_messages` (instructions, the history a
    `previous_response_id` names rebuilt from the trajectory, the input) and `display_answer`
    (the output as one assistant message; reasoning summaries shown, encrypted content shown as
    such), plus `truncated` when a named parent was not recorded here."""
    recorded: dict[str, dict[str, Any]] = {
        e["id"]: {
            "request": e.get("request") if isinstance(e.get("request"), dict) else {},
            "response": e.get("response"),
            "parent_id": e.get("parent_id"),
            "conversation_context": e.get("conversation_context"),
        }
        for e in exchanges
    }
    for e in exchanges:
        if e.get("kind") != "responses":
            continue
        body: dict[str, Any] = recorded[e["id"]]["request"]
        context, truncated = responses_core.rebuild_context(recorded, e["id"])
        known = responses_core.items_by_id([*context, *responses_core.input_items(body)])
        own, _ = responses_core.resolve_references(responses_core.input_items(body), known)
        items = responses_core.conversation_items({**body, "input": own}, context)
        e["display_messages"] = responses_core.display_messages(items)
        answer = responses_core.display_messages(responses_core.output_items(e.get("response")))
        e["display_answer"] = (
            answer[-1] if answer and answer[-1].get("role") == "assistant" else None
        )
        e["truncated"] = truncated


def _chain(leaf_id: str, by_id: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Exchange ids from the root to `leaf_id`, following `parent_id`."""
    chain: list[str] = []
    seen: set[str] = set()
    current: str | None = leaf_id
    while current is not None and current in by_id and current not in seen:
        seen.add(current)
        chain.append(current)
        current = by_id[current].get("parent_id")
    chain.reverse()
    return chain


def _same_request(exchange: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes two exchanges the same call: parent, and request hash (else request body)."""
    request_hash = exchange.get("request_hash")
    if request_hash:
        return (exchange.get("parent_id"), exchange.get("kind"), request_hash)
    body = exchange.get("request") or exchange.get("request_json")
    return (exchange.get("parent_id"), exchange.get("kind"), json.dumps(body, sort_keys=True))


def retries(exchanges: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Failed attempts the app retried: exchange id -> id of the next attempt.

    An exchange is a retried attempt when it failed (outcome not `ok`: an upstream error, a broken
    stream, a client that went away), nothing continues it, and a later exchange of the trajectory
    sent the same request (same parent and request hash). Such an attempt is not a branch: the
    dashboard lists it among the exchanges (marked `retried_by`), never as a fork, as the
    exporter never writes a failed leaf."""
    by_id = {e["id"]: e for e in exchanges}
    has_child = {e.get("parent_id") for e in exchanges if e.get("parent_id") in by_id}
    ordered = sorted(exchanges, key=lambda e: (e.get("started_utc") or "", e["id"]))
    out: dict[str, str] = {}
    later: dict[tuple[Any, ...], str] = {}
    for e in reversed(ordered):
        key = _same_request(e)
        if e.get("outcome") != "ok" and e["id"] not in has_child and key in later:
            out[e["id"]] = later[key]
        later[key] = e["id"]
    return out


def branches(exchanges: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The trajectory's leaves as branches, the latest first; retried failed attempts
    (`retries`) are not leaves.

    Each: `leaf_id`, `number` (1 = latest), `steps` (exchanges on its path), `chain` (exchange
    ids root to leaf), `fork_step` (the first step where it differs from branch 1; None for
    branch 1, 0 when it shares no exchange with it), `fork_exchange_id` (the last shared
    exchange), `outcome` and `started_utc` of its leaf.
    """
    by_id = {e["id"]: e for e in exchanges}
    has_child = {e.get("parent_id") for e in exchanges if e.get("parent_id") in by_id}
    retried = retries(exchanges)
    leaves = [e for e in exchanges if e["id"] not in has_child and e["id"] not in retried]
    leaves.sort(key=lambda e: (e.get("started_utc") or "", e["id"]), reverse=True)
    out: list[dict[str, Any]] = []
    main: list[str] = []
    for number, leaf in enumerate(leaves, start=1):
        chain = _chain(leaf["id"], by_id)
        entry: dict[str, Any] = {
            "leaf_id": leaf["id"],
            "number": number,
            "steps": len(chain),
            "chain": chain,
            "fork_step": None,
            "fork_exchange_id": None,
            "outcome": leaf.get("outcome"),
            "started_utc": leaf.get("started_utc"),
        }
        if number == 1:
            main = chain
        else:
            shared = [eid for eid in chain if eid in set(main)]
            if shared:
                entry["fork_exchange_id"] = shared[-1]
                entry["fork_step"] = int(by_id[shared[-1]].get("step") or 0) + 1
            else:
                entry["fork_step"] = 0
        out.append(entry)
    return out


def trajectory_payload(
    row: Mapping[str, Any], exchange_rows: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """A trajectory as `GET /api/trajectories/{id}` returns it and its page renders it.

    The summary keys, plus `exchanges` (see `exchange_view`; a retried failed attempt carries
    `retried_by`, the id of the next attempt: see `retries`), `branches` (see `branches`), and
    `conversation`: the latest leaf's request messages followed by its answer message.
    """
    exchanges = [exchange_view(e) for e in exchange_rows]
    responses_view(exchanges)
    usage: dict[tuple[Any, Any], dict[str, Any]] = {}
    for e in exchanges:
        key = (e.get("model_requested"), e.get("model_answered"))
        entry = usage.setdefault(
            key,
            {
                "model_requested": key[0],
                "model_answered": key[1],
                "exchanges": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
            },
        )
        entry["exchanges"] += 1
        entry["prompt_tokens"] += int(e.get("prompt_tokens") or 0)
        entry["completion_tokens"] += int(e.get("completion_tokens") or 0)
    details = TrajectoryDetails(models=list(usage.values()))
    payload = summary(row, details)
    payload["duration_ms"] = sum(float(e.get("duration_ms") or 0) for e in exchanges) or None
    first = min(
        exchanges, key=lambda e: (e.get("step") or 0, e.get("started_utc") or ""), default=None
    )
    payload["first_user_text"] = _first_user(first)
    for retried_id, retry_id in retries(exchanges).items():
        next(e for e in exchanges if e["id"] == retried_id)["retried_by"] = retry_id
    payload["exchanges"] = exchanges
    payload["branches"] = branches(exchanges)
    leaf = next(
        (
            e
            for e in exchanges
            if payload["branches"] and e["id"] == payload["branches"][0]["leaf_id"]
        ),
        None,
    )
    payload["conversation"] = conversation(leaf) if leaf else []
    return payload


def _first_user(exchange: Mapping[str, Any] | None) -> str | None:
    if exchange is None:
        return None
    for message in messages_of(exchange):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(
                    str(part.get("text", "")) for part in content if isinstance(part, dict)
                )
            text = " ".join(str(content or "").split())
            return text[:199] + "\u2026" if len(text) > 200 else text
    return None


def conversation(leaf: Mapping[str, Any]) -> list[Any]:
    """The whole conversation at a leaf: its request messages, then its answer message if any."""
    messages = messages_of(leaf)
    answer = response_message(leaf)
    return [*messages, answer] if answer is not None else messages
