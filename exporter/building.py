"""Sample building for an export: stored rows -> rendered, token-counted JSON lines.

`SampleBuilder.build(rows)` is what each export worker runs (a thread, or one of `--workers`
processes): decode the stored texts, build the sample (`exporter.samples`, or
`formats.dpo.build_pair`), render it in the chosen format, write its JSON line and count its
tokens. It holds no export state (duplicates, limits and the split are `SampleCollector`'s, in
`exporter.api`), and this module imports neither the storage's engine nor SQLAlchemy, so a
worker process starts in a fraction of a second.

Lines are byte for byte what `json.dumps(record, ensure_ascii=False, separators=(",", ":"))`
writes (`json_bytes`, `json_line`); the records of `formats.FLOAT_FREE_FORMATS` hold no float,
so orjson's line needs no look for one, and a cached tool list goes into it as written once (an
`orjson.Fragment`). What repeats across samples is done once per distinct value:
a request's tool list is normalized, written and counted once per distinct list (`ToolsCache`),
and parsed once per stored part when the rows come from `exporter.direct` (`DEFERRED_TOOLS`), a
system prompt counted once (`exporter.tokens.TokenCounter`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

from exporter.formats import FLOAT_FREE_FORMATS, RENDERERS
from exporter.formats.dpo import build_pair
from exporter.formats.hf_dpo import render_pair
from exporter.messages import normalize_tools
from exporter.options import ExportOptions
from exporter.samples import (
    Conversation,
    Rejected,
    apply_options,
    build_conversation,
    without_tool_descriptions,
)
from exporter.tokens import TokenCounter, encoding_name
from proxy.core.fastjson import loads, loads_checked
from proxy.storage.rebuild import DEFERRED_TOOLS

__all__ = [
    "BUILD_KEYS",
    "INVALID_TEXT",
    "Built",
    "SampleBuilder",
    "ToolsCache",
    "json_bytes",
    "json_line",
    "line_key",
    "slim_row",
]

# Every digit mapped to 0: orjson's output may hold a float where a digit is followed by a
# point or an exponent (its text can differ from Python's: 1e-05 vs 0.00001). A translation and
# a search for a literal-led pattern are several times cheaper than searching `[0-9][.eE]`.
_DIGITS_AS_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")
_ZERO_THEN_POINT: Final = re.compile(rb"0[.eE]")


def _may_hold_float(data: bytes) -> bool:
    """Whether orjson's output `data` has a digit followed by `.`, `e` or `E` (a float, or
    such text inside a string: then the standard library writes the line, as for a float)."""
    return _ZERO_THEN_POINT.search(data.translate(_DIGITS_AS_ZERO)) is not None


def json_line(record: Any, fast: bool = True) -> str:
    """Compact JSON of `record`, byte for byte what `json.dumps(record, ensure_ascii=False,
    separators=(",", ":"))` writes.

    fast: try orjson first (several times cheaper); pass False when the record may hold NaN or
    an infinity. Those are written as null (strict JSON; stored by proxies older than the 400 on
    NaN). orjson's output is kept only when it holds no float at all (strings, integers,
    booleans and null are written identically by both); anything else, and what orjson refuses
    (lone surrogates, integers beyond 64 bits, non-string keys), goes to the standard library."""
    data = _orjson_line(record) if fast else None
    return data.decode() if data is not None else _stdlib_line(record)


def json_bytes(record: Any, fast: bool = True, floats: bool = True) -> bytes:
    """`json_line(record, fast)` encoded as UTF-8 (what the export writes), without decoding
    orjson's output. Raises UnicodeEncodeError for a text holding a lone surrogate.

    floats: False when `record` cannot hold a float (a `FLOAT_FREE_FORMATS` record: every value
    a string, a boolean, a small integer or null), so orjson's output is kept without looking
    for one."""
    data = _orjson_line(record, floats) if fast else None
    return data if data is not None else _stdlib_line(record).encode()


def _orjson_line(record: Any, floats: bool = True) -> bytes | None:
    """orjson's compact JSON of `record` when it is what the standard library writes too
    (floats: as `json_bytes`)."""
    try:
        data = orjson.dumps(record)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return None
    return None if floats and _may_hold_float(data) else data


def _stdlib_line(record: Any) -> str:
    try:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN or an infinity stored by an older version: not JSON, so null
        return json.dumps(_finite(record), ensure_ascii=False, separators=(",", ":"))


def _finite(value: Any) -> Any:
    """`value` with every NaN and infinity replaced by None (what the dashboard shows too):
    a training file must be strict JSON (RFC 8259), whatever an older proxy stored."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def line_key(line: str | bytes) -> int:
    """The duplicate check's key of a JSON line (text or its UTF-8 bytes): the first 64 bits of
    its SHA-256 hash, as an int (SHA-256 runs on the CPU's SHA instructions where there are:
    faster than BLAKE2b on a 3 KB line)."""
    data = line if isinstance(line, bytes) else line.encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def _line_with_tools(
    record: dict[str, Any],
    tools: list[dict[str, Any]],
    fast: bool = True,
    cached: _Tools | None = None,
    floats: bool = True,
) -> tuple[bytes, str | None]:
    """(JSON line of `record` as UTF-8 bytes, compact JSON of `tools`), dumping the tools at
    most once.

    When the record holds `tools` itself at the top level (openai, hf, axolotl), its line is
    the rest of the record followed by `"tools":` and the tools' JSON (`cached`'s when the
    caller has it already), which the token count reuses. fast: as `json_line`; floats: as
    `json_bytes` (for the record without its tools).
    """
    if not tools:
        return json_bytes(record, fast, floats), None
    if cached is not None and cached.tools_bytes is not None:
        tools_bytes, tools_json = cached.tools_bytes, cached.tools_json
    else:
        tools_bytes = json_bytes(tools, fast)
        tools_json = tools_bytes.decode()
    if record.get("tools") is not tools:  # a tool list inside the record may hold floats
        return json_bytes(record, fast, floats or isinstance(record.get("tools"), list)), tools_json
    rest = {k: v for k, v in record.items() if k != "tools"}
    if not floats and cached is not None and cached.fragment is not None:
        # one orjson pass writes the cached tools' JSON in place (no float to look for after)
        try:
            return orjson.dumps({**rest, "tools": cached.fragment}), tools_json
        except TypeError:  # what orjson refuses: the standard library writes the rest
            pass
    rest_bytes = json_bytes(rest, fast, floats)
    return b"".join((rest_bytes[:-1], b',"tools":', tools_bytes, b"}")), tools_json


@dataclass(frozen=True)
class _Tools:
    """One distinct tool list in training form: `tools` (`messages.normalize_tools`, descriptions
    stripped when the options say so), their compact JSON (None when empty), and that JSON as
    an `orjson.Fragment` (written as is inside a record)."""

    tools: list[dict[str, Any]]
    tools_json: str | None
    tools_bytes: bytes | None
    fragment: orjson.Fragment | None = None


class ToolsCache:
    """Normalized tool lists by the JSON of the request's raw list (at most `capacity`; the whole
    cache is dropped when full). Agents send the same few tool lists with every call, so the
    list is checked, normalized, stripped and written once per distinct list, not per sample.
    The cached lists are shared between samples and never mutated."""

    def __init__(self, strip_descriptions: bool, capacity: int = 256) -> None:
        self.strip_descriptions = strip_descriptions
        self.capacity = capacity
        self._entries: dict[bytes, _Tools] = {}

    def get(self, request: dict[str, Any], stored_as: str | None = None) -> _Tools | None:
        """The entry of `request`'s tools (`tools`, or legacy `functions`), or None when it
        cannot be cached (the caller then normalizes as usual, raising what that raises).

        stored_as: the hash of the stored part `request["tools"]` was parsed from (the same
        hash, the same list): it keys the entry instead of the list's JSON."""
        raw = request.get("tools")
        legacy = not raw and isinstance(request.get("functions"), list)
        if stored_as is not None and raw and not legacy:
            key = b"part:" + stored_as.encode()
        else:
            try:
                key = orjson.dumps(request["functions"] if legacy else raw)
            except TypeError:  # beyond orjson (integers past 64 bits): not cached
                return None
            if legacy:
                key = b"functions:" + key
        entry = self._entries.get(key)
        if entry is None:
            try:
                normalized = normalize_tools(request)
            except Rejected:
                return None
            tools = without_tool_descriptions(normalized) if self.strip_descriptions else normalized
            data = json_bytes(tools) if tools else None
            entry = (
                _Tools(tools, data.decode(), data, orjson.Fragment(data))
                if data is not None
                else _Tools(tools, None, None)
            )
            if len(self._entries) >= self.capacity:
                self._entries.clear()
            self._entries[key] = entry
        return entry


INVALID_TEXT: Final = "invalid_text"
"""The drop reason of a sample holding a text that UTF-8 cannot encode (a lone surrogate)."""

Built = tuple[str, str, bytes, int, int, str | None, int] | tuple[str, str, str]
"""One row's outcome: `("ok", exchange_id, line, total_tokens, trained_tokens, cut, key)` (line:
the JSON line as UTF-8 bytes, without its newline)
(cut: why the leaf's own answer was left out, see `Conversation.cut`, or None; key: `line_key`
of the line) or `("drop", exchange_id, reason)`."""


class SampleBuilder:
    """Turns rows into rendered, token-counted samples (one per process; no export state).

    Rows are `proxy.storage.reading.leaves_query` / `shadow_query` rows (request bodies whole),
    as `exporter.reader.read_batches` yields them. Raises TokenizerError when the tokenizer
    cannot load."""

    def __init__(self, options: ExportOptions) -> None:
        options.check()
        self.options = options
        self.counter = TokenCounter(encoding_name(options.model_for_tokens))
        self._render = RENDERERS.get(options.format)
        self._floats = options.format not in FLOAT_FREE_FORMATS
        self._preference = options.preference
        # whether `apply_options` can change a conversation whose tools come from the cache
        self._reshapes = (
            options.train_on != "all" or options.system_prompt is not None or options.drop_system
        )
        self._tools = ToolsCache(options.strip_tool_descriptions)
        self._parsed_tools: dict[str, tuple[Any, bool]] = {}

    def _stored_tools(self, part_hash: str, text: str) -> tuple[Any, bool]:
        """`loads_checked(text)` of a stored tool list, once per part (at most 256 kept).
        Raises ValueError as `loads_checked`."""
        found = self._parsed_tools.get(part_hash)
        if found is None:
            found = loads_checked(text)
            if len(self._parsed_tools) >= 256:
                self._parsed_tools.clear()
            self._parsed_tools[part_hash] = found
        return found

    def build(self, rows: list[dict[str, Any]]) -> list[Built]:
        """The outcome of each row, in row order (see `Built`)."""
        out: list[Built] = []
        for row in rows:
            try:
                line, messages, tools_json, cut = self._sample(row)
            except Rejected as exc:
                out.append(("drop", row["id"], exc.reason))
                continue
            except UnicodeEncodeError:
                # A text holds a lone surrogate escape (`\ud83d`: half an emoji, cut by a client):
                # JSON carries it, a UTF-8 training file cannot, and no trainer's tokenizer reads
                # it. The exchange stays stored as it came.
                out.append(("drop", row["id"], INVALID_TEXT))
                continue
            tokens = self.counter.count(messages, tools_json=tools_json)
            out.append(("ok", row["id"], line, tokens.total, tokens.trained, cut, line_key(line)))
        return out

    def _sample(
        self, row: dict[str, Any]
    ) -> tuple[bytes, list[dict[str, Any]], str | None, str | None]:
        """(line, messages to count, compact JSON of the tools or None, cut) for one row.

        Raises Rejected."""
        options = self.options
        if row.get("rejected"):  # a Responses row with no faithful chat form (exporter.reader)
            raise Rejected(*row["rejected"])
        # fast: every stored text is strict JSON (no NaN or infinity in the values), so lines
        # may be written by orjson (`json_line`).
        stored_tools = row.get(DEFERRED_TOOLS)
        try:
            request, fast = loads_checked(row["request_json"])
            if stored_tools is not None and isinstance(request, dict):
                # the tool list left out of the text (`SqliteRows(defer_tools=True)`): parsed
                # once per stored part, shared by the rows (never mutated)
                request["tools"], strict = self._stored_tools(*stored_tools)
                fast = fast and strict
            response = shadow = None
            if row.get("response_json"):
                response, strict = loads_checked(row["response_json"])
                fast = fast and strict
            if row.get("shadow_response_json"):
                shadow, strict = loads_checked(row["shadow_response_json"])
                fast = fast and strict
            tags = loads(row["trajectory_tags_json"]) if row.get("trajectory_tags_json") else []
        except (ValueError, TypeError):
            raise Rejected("unreadable", "stored JSON does not decode") from None
        if not isinstance(request, dict):
            raise Rejected("unreadable", "the request is not a JSON object")
        if options.tags and not (isinstance(tags, list) and all(t in tags for t in options.tags)):
            raise Rejected("missing_tag", "the trajectory lacks a --tag")
        if self._preference:
            record = build_pair(
                request,
                response,
                shadow,
                system_prompt=options.system_prompt,
                drop_system=options.drop_system,
                strip_tool_descriptions=options.strip_tool_descriptions,
            )
            data = record["input"]
            calls = sum(
                len(m.get("tool_calls") or ())
                for m in [*data["messages"], record["preferred_output"][0]]
            )
            if calls < options.min_tool_calls:
                raise Rejected("below_min_tool_calls", f"{calls} tool calls")
            tools = data.get("tools")
            return (
                json_bytes(render_pair(record) if options.format == "hf-dpo" else record, fast),
                [*data["messages"], *record["preferred_output"]],
                json_line(tools, fast) if tools else None,
                None,
            )
        # A stored NaN (fast False) takes the uncached path, as every row did before the cache.
        cached = (
            self._tools.get(request, stored_tools[0] if stored_tools is not None else None)
            if fast
            else None
        )
        conversation: Conversation = build_conversation(
            request,
            response,
            require_final_answer=not options.include_incomplete,
            outcome=row.get("outcome") or "ok",
            tools=cached.tools if cached is not None else None,
        )
        if options.min_tool_calls > 0 and conversation.tool_call_count < options.min_tool_calls:
            raise Rejected("below_min_tool_calls", f"{conversation.tool_call_count} tool calls")
        if self._reshapes or (options.strip_tool_descriptions and cached is None):
            conversation = apply_options(
                conversation,
                train_on=options.train_on,
                system_prompt=options.system_prompt,
                drop_system=options.drop_system,
                strip_tool_descriptions=options.strip_tool_descriptions and cached is None,
            )
        assert self._render is not None
        line, tools_json = _line_with_tools(
            self._render(conversation), conversation.tools, fast, cached, self._floats
        )
        return line, conversation.messages, tools_json, conversation.cut


BUILD_KEYS: Final = (
    "id",
    "rejected",
    "request_json",
    DEFERRED_TOOLS,
    "response_json",
    "shadow_response_json",
    "trajectory_tags_json",
    "outcome",
)
"""The row keys `SampleBuilder.build` reads."""


def slim_row(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with only the keys `SampleBuilder.build` reads (what a worker process is sent)."""
    return {key: row[key] for key in BUILD_KEYS if key in row}


_worker_builder: SampleBuilder | None = None


def init_worker(options: ExportOptions) -> None:
    """Process-pool initializer: this process's `SampleBuilder`."""
    global _worker_builder
    _worker_builder = SampleBuilder(options)
    gc.freeze()  # the tokenizer's tables live as long as the process: no collector pass scans them


def worker_ready() -> None:
    """A no-op task: submitting one per worker starts the pool's processes (and their
    `init_worker`) at once."""


def build_in_worker(rows: list[dict[str, Any]]) -> list[Built]:
    """`SampleBuilder.build` in a pool process set up by `init_worker`."""
    assert _worker_builder is not None
    return _worker_builder.build(rows)
