"""Routing: does a new trajectory go to the student (the model asked for) or the teacher?

Pure functions. A decision is made only for a trajectory's first request; every later request of
it keeps that route (stitching finds it), so a teacher never hands a half-done plan to the student.
Precedence: the `X-Understudy-Route` header, then the first matching rule, then `teacher_rate`.
Rates are decided from the first request's message hash, so replaying a conversation routes it
the same way.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.config import RoutingRule, Settings

ROUTE_HEADER = "x-understudy-route"
ROUTES = ("student", "teacher", "shadow")


class RouteHeaderError(ValueError):
    """The `X-Understudy-Route` header names no known route (the caller answers 400)."""


@dataclass(frozen=True)
class RouteDecision:
    """route: 'student' or 'teacher'. shadow: also ask the teacher, record, never return.
    reason: which input decided ('header', 'rule N', 'rate', 'default', 'no teacher')."""

    route: str
    shadow: bool
    reason: str


def sample_point(request_hash: str, salt: str = "") -> float:
    """A number in [0, 1) derived from the first request's hash: the deterministic coin."""
    digest = hashlib.sha256((salt + request_hash).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def rule_matches(rule: RoutingRule, body: Mapping[str, Any]) -> bool:
    """Whether every condition `rule` gives holds for the request `body`."""
    if rule.model is not None and not fnmatch.fnmatchcase(str(body.get("model", "")), rule.model):
        return False
    if rule.has_tools is not None and bool(body.get("tools")) != rule.has_tools:
        return False
    if rule.metadata:
        metadata = body.get("metadata")
        if not isinstance(metadata, Mapping):
            return False
        if any(metadata.get(k) is None or str(metadata[k]) != v for k, v in rule.metadata.items()):
            return False
    return True


def _decision(route: str, reason: str) -> RouteDecision:
    if route == "shadow":
        return RouteDecision("student", True, reason)
    return RouteDecision(route, False, reason)


def check_route_header(header: str | None) -> None:
    """Raise RouteHeaderError unless `header` (an `X-Understudy-Route` value) is absent or one
    of ROUTES (any case, surrounding spaces ignored)."""
    if header is not None and header.strip().lower() not in ROUTES:
        raise RouteHeaderError(f"{ROUTE_HEADER} must be one of {', '.join(ROUTES)}")


def decide_route(
    body: Mapping[str, Any], header: str | None, request_hash: str, settings: Settings
) -> RouteDecision:
    """The route of a new trajectory from its first request.

    header: the `X-Understudy-Route` value (teacher|student|shadow), or None. Without a teacher
    configured every trajectory is 'student'. Raises RouteHeaderError for an unknown header value.
    """
    check_route_header(header)
    if settings.teacher_model is None:
        return RouteDecision("student", False, "no teacher")
    if header is not None:
        return _decision(header.strip().lower(), "header")
    for number, rule in enumerate(settings.routing_rules, start=1):
        if rule_matches(rule, body) and sample_point(request_hash, f"rule{number}") < rule.rate:
            return _decision(rule.route, f"rule {number}")
    if settings.teacher_rate > 0 and sample_point(request_hash) < settings.teacher_rate:
        return RouteDecision("teacher", False, "rate")
    return RouteDecision("student", False, "default")
