"""Step comparison: a candidate's answer against the recorded (reference) answer of one step.

Pure functions, no I/O. A **step** is one recorded assistant answer; replayed teacher-forced, the
candidate sees exactly the recorded request (every message before that answer, its tools and
options) and answers once. The comparison says:

- **decision**: both made tool calls, or both gave a final answer (text, no tool calls);
- **tool names**: the names called, compared as a multiset (parallel calls in any order);
- **arguments, canonical**: each call's `arguments` JSON parsed and re-serialized (sorted keys,
  no whitespace, `5.0` == `5`), compared as a multiset of (name, canonical arguments);
- **arguments, typed**: the same after coercing both sides to the types the tool's declared JSON
  schema gives (`"5"` -> `5` for an `integer` property, `5` -> `"5"` for a `string` one), so an
  answer that differs only in a value's type is counted apart from one that differs in value;
- **invalid JSON**: candidate calls whose `arguments` is not a JSON object;
- **unknown tools**: candidate calls to a name the request did not declare.

Name and argument agreement are defined on the steps where the reference called tools (on a
final-answer step there is nothing to compare; the decision says whether the candidate called
anyway).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from proxy.core.canonical import response_message

TOOL_CALL = "tool_call"
FINAL = "final"

_INTEGER = re.compile(r"-?\d+")
_INVALID = "\x00invalid"  # never equal to a canonical JSON text


@dataclass(frozen=True)
class Call:
    """One tool call: `name` and `arguments` (the JSON text as the model wrote it)."""

    name: str
    arguments: str


@dataclass
class ToolTally:
    """One tool's counts in a step (or summed over steps).

    reference: calls the reference made to it. candidate: calls the candidate made to it.
    name_matches: calls matched by name (min of the two counts). argument_matches /
    typed_matches: calls matched by name and canonical / schema-typed arguments (multiset).
    """

    reference: int = 0
    candidate: int = 0
    name_matches: int = 0
    argument_matches: int = 0
    typed_matches: int = 0

    def add(self, other: ToolTally) -> None:
        """Add `other`'s counts to these."""
        self.reference += other.reference
        self.candidate += other.candidate
        self.name_matches += other.name_matches
        self.argument_matches += other.argument_matches
        self.typed_matches += other.typed_matches


@dataclass
class StepComparison:
    """How a candidate's answer compares with the reference on one step.

    reference_decision / candidate_decision: 'tool_call' or 'final'. decision_agree: they are the
    same. names_agree / arguments_agree / typed_agree: None when the reference made no tool call,
    else whether the multisets of names / (name, canonical arguments) / (name, typed arguments)
    are equal. invalid_json / unknown_tools: candidate calls with non-object `arguments` / to
    undeclared names. per_tool: tool name -> `ToolTally` for every tool either side called.
    """

    reference_decision: str
    candidate_decision: str
    decision_agree: bool
    names_agree: bool | None
    arguments_agree: bool | None
    typed_agree: bool | None
    invalid_json: int = 0
    unknown_tools: int = 0
    per_tool: dict[str, ToolTally] = field(default_factory=dict)

    @property
    def agrees(self) -> bool:
        """The candidate agreed in decision and, on tool-call steps, in names and arguments."""
        return self.decision_agree and self.arguments_agree is not False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (per_tool as plain dicts)."""
        data = asdict(self)
        data["agrees"] = self.agrees
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepComparison:
        """The inverse of `as_dict` (extra keys ignored)."""
        return cls(
            reference_decision=data["reference_decision"],
            candidate_decision=data["candidate_decision"],
            decision_agree=bool(data["decision_agree"]),
            names_agree=data.get("names_agree"),
            arguments_agree=data.get("arguments_agree"),
            typed_agree=data.get("typed_agree"),
            invalid_json=int(data.get("invalid_json") or 0),
            unknown_tools=int(data.get("unknown_tools") or 0),
            per_tool={k: ToolTally(**v) for k, v in (data.get("per_tool") or {}).items()},
        )


def calls_of(message: dict[str, Any] | None) -> list[Call]:
    """The tool calls of an assistant message: `tool_calls` of type function, or a legacy
    `function_call`; names and arguments as strings (an object `arguments` is dumped)."""
    if not isinstance(message, dict):
        return []
    raw: list[Any] = []
    if isinstance(message.get("tool_calls"), list):
        raw = [c.get("function") for c in message["tool_calls"] if isinstance(c, dict)]
    elif isinstance(message.get("function_call"), dict):
        raw = [message["function_call"]]
    calls: list[Call] = []
    for function in raw:
        if not isinstance(function, dict):
            continue
        name = function.get("name")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False) if arguments is not None else ""
        calls.append(Call(name if isinstance(name, str) else "", arguments))
    return calls


def tool_schemas(request: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Declared tools of a chat request: name -> parameters JSON schema (`{}` when none).

    Reads `tools` (type function) and legacy `functions`.
    """
    raw = request.get("tools")
    if not isinstance(raw, list) or not raw:
        functions = request.get("functions")
        raw = (
            [{"type": "function", "function": f} for f in functions]
            if isinstance(functions, list)
            else []
        )
    schemas: dict[str, dict[str, Any]] = {}
    for tool in raw:
        if not isinstance(tool, dict) or (tool.get("type") or "function") != "function":
            continue
        function = tool.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            params = function.get("parameters")
            schemas[function["name"]] = params if isinstance(params, dict) else {}
    return schemas


def parse_arguments(arguments: str) -> dict[str, Any] | None:
    """`arguments` as a JSON object, or None when it is not valid JSON or not an object."""
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _normalize(value: Any) -> Any:
    """JSON numbers by value (an integral float becomes an int); containers recursively."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """One text per JSON value: sorted keys, no whitespace, non-ASCII kept, `5.0` written `5`."""
    return json.dumps(_normalize(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _matches_type(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "null":
        return value is None
    return False


def _coerce_scalar(value: Any, kind: str) -> Any:
    """`value` turned into `kind` when it is a scalar that spells one; else unchanged."""
    if kind == "integer":
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            return int(value.strip())
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind == "number":
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                return value
            return int(number) if number.is_integer() and abs(number) < 2**53 else number
    elif kind == "boolean":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
    elif kind == "string":
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return canonical_json(value)
    elif kind == "null" and value == "null":
        return None
    return value


def coerce(value: Any, schema: Any, depth: int = 0) -> Any:
    """`value` with every scalar turned into the type its JSON schema declares, where it spells
    one (`"5"` for an integer is 5, `5` for a string is `"5"`, `"true"` for a boolean is True).

    Follows `properties`, `additionalProperties`, `items`, `anyOf`/`oneOf` (the first branch that
    takes the value) and type lists; anything the schema does not type is left as it is.
    """
    if not isinstance(schema, dict) or depth > 32:
        return value
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            for branch in branches:
                coerced = coerce(value, branch, depth + 1)
                kinds = _kinds(branch)
                if not kinds or any(_matches_type(coerced, k) for k in kinds):
                    return coerced
            return value
    kinds = _kinds(schema)
    if kinds and not any(_matches_type(value, k) for k in kinds):
        for kind in kinds:
            coerced = _coerce_scalar(value, kind)
            if _matches_type(coerced, kind):
                value = coerced
                break
    if isinstance(value, dict):
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        extra = schema.get("additionalProperties")
        return {k: coerce(v, props.get(k, extra), depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [coerce(v, schema.get("items"), depth + 1) for v in value]
    return value


def _kinds(schema: dict[str, Any]) -> list[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    return []


def _keys(calls: list[Call], schemas: dict[str, dict[str, Any]]) -> tuple[Counter[Any], ...]:
    """(names, (name, canonical args), (name, typed args)) multisets of `calls`."""
    names: Counter[str] = Counter()
    canonical: Counter[tuple[str, str]] = Counter()
    typed: Counter[tuple[str, str]] = Counter()
    for i, call in enumerate(calls):
        names[call.name] += 1
        parsed = parse_arguments(call.arguments)
        if parsed is None:  # never equal to anything, not even another invalid text
            canonical[(call.name, f"{_INVALID}{i}")] += 1
            typed[(call.name, f"{_INVALID}{i}")] += 1
            continue
        canonical[(call.name, canonical_json(parsed))] += 1
        typed[(call.name, canonical_json(coerce(parsed, schemas.get(call.name))))] += 1
    return names, canonical, typed


def decision_of(message: dict[str, Any] | None) -> str:
    """'tool_call' when the assistant message calls a tool, else 'final'."""
    return TOOL_CALL if calls_of(message) else FINAL


def compare_messages(
    reference: dict[str, Any] | None,
    candidate: dict[str, Any] | None,
    request: dict[str, Any],
) -> StepComparison:
    """Compare two assistant messages answering `request` (the recorded chat request: its tools
    give the names that exist and the argument schemas). See `StepComparison`."""
    schemas = tool_schemas(request)
    ref_calls, cand_calls = calls_of(reference), calls_of(candidate)
    ref_names, ref_canon, ref_typed = _keys(ref_calls, schemas)
    cand_names, cand_canon, cand_typed = _keys(cand_calls, schemas)
    per_tool: dict[str, ToolTally] = {}
    for name in sorted(set(ref_names) | set(cand_names)):
        per_tool[name] = ToolTally(
            reference=ref_names[name],
            candidate=cand_names[name],
            name_matches=min(ref_names[name], cand_names[name]),
            argument_matches=sum(
                min(n, cand_canon[key]) for key, n in ref_canon.items() if key[0] == name
            ),
            typed_matches=sum(
                min(n, cand_typed[key]) for key, n in ref_typed.items() if key[0] == name
            ),
        )
    ref_decision, cand_decision = decision_of(reference), decision_of(candidate)
    called = ref_decision == TOOL_CALL
    return StepComparison(
        reference_decision=ref_decision,
        candidate_decision=cand_decision,
        decision_agree=ref_decision == cand_decision,
        names_agree=ref_names == cand_names if called else None,
        arguments_agree=ref_canon == cand_canon if called else None,
        typed_agree=ref_typed == cand_typed if called else None,
        invalid_json=sum(1 for c in cand_calls if parse_arguments(c.arguments) is None),
        unknown_tools=sum(1 for c in cand_calls if c.name not in schemas),
        per_tool=per_tool,
    )


def compare_responses(
    reference: Any, candidate: Any, request: dict[str, Any]
) -> StepComparison | None:
    """`compare_messages` on two `chat.completion` dicts; None when the candidate's has no
    assistant message (the caller counts it as an error)."""
    candidate_message = response_message(candidate)
    if candidate_message is None:
        return None
    return compare_messages(response_message(reference), candidate_message, request)
