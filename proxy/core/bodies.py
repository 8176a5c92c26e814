"""Request bodies as content-addressed parts: split one for storage, splice it back (pure, no I/O).

Every step of an agent loop re-sends the whole conversation, so a request body is mostly items
stored before. `split_request` cuts a body into:
- its **items**: each element of the kind's array field (`messages` for chat, `input` for the
  Responses API) as its JSON text, exactly as sent, and its **tool list** (`tools`) as one JSON
  text; each is stored once, keyed by `blob_hash` of that text;
- its **options**: the body's JSON text with that array and the tool list replaced by `null` in
  place (same keys, same order), plus the character offsets of those two `null`s, so
  `splice_request` rebuilds the body by string splicing, without parsing anything.

The rebuilt text is JSON-equal to the sent body (`json.loads` of both are equal: same keys in the
same order, same values); it differs at most in the whitespace between the array's elements. A body that is not a JSON object, an
array field that is not a list (`input` as a string) and a `tools` that is not a list stay in the
options as they are.

References grow linearly with the conversation: `chain_digest` folds item hashes one by one, so a
writer that remembers `(field, count, digest)` of a parent exchange can tell in O(1) memory that
the child's items start with the parent's, and store only the new ones (`refs_for`). So does the
work: the writer also remembers the SHA-256 of the parent's array text, and a child whose array
starts with that very text is split from there on (`split_request`'s `base`), not re-parsed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from json.scanner import make_scanner
from typing import Any, Final, cast

ARRAY_FIELDS: Final = {"chat": "messages", "responses": "input"}
"""The request array field of each exchange kind (unknown kinds: `messages`)."""

_NULL: Final = "null"


def blob_hash(text: str) -> str:
    """The key of a stored part: BLAKE2b-128 of its UTF-8 JSON text, 32 hex characters."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def chain_digest(previous: str, item_hash: str) -> str:
    """The rolling digest over item hashes: `digest_i = H(digest_{i-1}, hash_i)` ('' before any)."""
    return hashlib.blake2b((previous + item_hash).encode("ascii"), digest_size=16).hexdigest()


def compact_json(value: Any) -> str:
    """`value` as compact JSON text, UTF-8 safe (control characters, NUL included, are escaped).

    Non-ASCII characters are kept as they are (smaller); a string holding a lone surrogate, which
    no UTF-8 driver accepts, is written with ASCII escapes instead (`\\udc80`), which decode to
    the same string.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(value, separators=(",", ":"))
    return text


@dataclass
class SplitRequest:
    """A request body cut into parts (see the module docstring).

    options_json: the body text with the array and tools replaced by `null` (or the whole text
    when nothing was cut). items_at / tools_at: offsets of those `null`s in options_json (None:
    not cut). item_hashes: the hash of each item, in order. tools_hash: the tool list's hash.
    blobs: hash -> JSON text of every part. array_field: the array field cut (None: no list there).
    digest: `chain_digest` over all item hashes. base: the `Remembered` exchange whose items this
    array starts with, byte for byte, when `split_request` was given it and they matched: then
    `item_hashes`, `digests` and `blobs` hold only the items after them (the base's are stored).
    prefix_digest / prefix_chars: SHA-256 and length of the array's text from `[` to the end of
    its last item (None / 0 without items), what `Remembered` keeps for the next step.
    """

    options_json: str
    array_field: str | None = None
    items_at: int | None = None
    tools_at: int | None = None
    item_hashes: list[str] = dataclass_field(default_factory=list)
    tools_hash: str | None = None
    blobs: dict[str, str] = dataclass_field(default_factory=dict)
    digests: list[str] = dataclass_field(default_factory=list)
    base: Remembered | None = None
    prefix_digest: bytes | None = None
    prefix_chars: int = 0

    @property
    def digest(self) -> str:
        """`chain_digest` over every item hash ('' for no items)."""
        if self.digests:
            return self.digests[-1]
        return self.base.digest if self.base is not None else ""

    @property
    def count(self) -> int:
        """How many items the array holds (the base's, not hashed again, included)."""
        return len(self.item_hashes) + (self.base.count if self.base is not None else 0)


def split_request(
    request_json: str,
    kind: str | None = None,
    base: Remembered | None = None,
    tool_lists: ToolLists | None = None,
) -> SplitRequest:
    """Cut `request_json` (the stored body text) into options and parts for an exchange of `kind`
    ('chat' | 'responses'; None or unknown: chat). Never raises: text that is not a JSON object
    comes back whole as the options.

    base: a recent exchange (its parent) whose items this one's likely start with. When the
    array's text starts with the base's items text byte for byte (`Remembered.prefix_chars`
    characters of the same SHA-256), those items are not parsed or hashed again (`SplitRequest.base`):
    an agent's step costs its new items, not its whole history. Otherwise it is split whole.
    tool_lists: recent tool list texts (`ToolLists`); a `tools` value that is one of them is
    neither parsed nor hashed again, and one that is not is added.

    Items and the tool list are the exact spans of `request_json` (one pass of the C JSON
    scanner, nothing re-encoded), so options and parts are byte-for-byte what was sent; only the
    whitespace between array elements is lost. A text that no UTF-8 driver could store (a raw
    lone surrogate) is re-encoded with escapes instead.
    """
    array_field = ARRAY_FIELDS.get(kind or "chat", "messages")
    if not request_json.isascii():
        try:
            request_json.encode("utf-8")
        except UnicodeEncodeError:
            return _split_parsed(request_json, array_field)
    try:
        return _split_spans(request_json, array_field, base, tool_lists)
    except (ValueError, StopIteration, RecursionError):
        return SplitRequest(request_json)


_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")
# The C scanner json.loads uses: (value, end) of the JSON value at an index (StopIteration if none).
_scan: Callable[[str, int], tuple[Any, int]] = make_scanner(cast(Any, json.JSONDecoder()))


def _skip(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    return match.end() if match else index


def _split_spans(
    text: str,
    array_field: str,
    base: Remembered | None = None,
    tool_lists: ToolLists | None = None,
) -> SplitRequest:
    """`split_request` on the text itself; raises ValueError/StopIteration when it is not one
    JSON object (or names the array field or `tools` twice: then the body is kept whole)."""
    index = _skip(text, 0)
    if text[index : index + 1] != "{":
        return SplitRequest(text)
    index = _skip(text, index + 1)
    out = SplitRequest("")
    cuts: list[tuple[int, int, str]] = []  # (start, end, what) spans replaced by null, in order
    seen: set[str] = set()
    if text[index : index + 1] != "}":
        while True:
            if text[index : index + 1] != '"':
                raise ValueError("expected a key")
            key, index = _scan(text, index)
            index = _skip(text, index)
            if text[index : index + 1] != ":":
                raise ValueError("expected a colon")
            start = index = _skip(text, index + 1)
            if key in (array_field, "tools"):
                if key in seen:
                    raise ValueError("key given twice")
                seen.add(key)
            if key == array_field and text[index : index + 1] == "[":
                same = base is not None and base.field == array_field
                index = _cut_items(text, index, out, base if same else None)
                out.array_field = array_field
                cuts.append((start, index, "items"))
            elif key == "tools" and text[start] == "[":
                known = tool_lists.find(text, start) if tool_lists is not None else None
                if known is not None:  # the same text as a recent request's: not parsed again
                    tools, out.tools_hash = known
                    index = start + len(tools)
                else:
                    _, index = _scan(text, index)
                    tools = text[start:index]
                    out.tools_hash = blob_hash(tools)
                    if tool_lists is not None:
                        tool_lists.add(tools, out.tools_hash)
                out.blobs[out.tools_hash] = tools
                cuts.append((start, index, "tools"))
            else:
                _, index = _scan(text, index)
            index = _skip(text, index)
            separator = text[index : index + 1]
            if separator == ",":
                index = _skip(text, index + 1)
                continue
            if separator == "}":
                index += 1
                break
            raise ValueError("expected , or }")
    else:
        index += 1
    if _skip(text, index) != len(text):
        raise ValueError("text after the object")
    if not cuts:
        return SplitRequest(text)
    parts: list[str] = []
    position = length = 0
    for start, end, what in cuts:
        parts.append(text[position:start])
        length += start - position
        if what == "items":
            out.items_at = length
        else:
            out.tools_at = length
        parts.append(_NULL)
        length += len(_NULL)
        position = end
    parts.append(text[position:])
    out.options_json = "".join(parts)
    return out


def _cut_items(text: str, index: int, out: SplitRequest, base: Remembered | None = None) -> int:
    """Record each element of the array starting at `text[index]` ('['); return its end. With a
    `base` whose items text this array starts with, only the elements after them (`_after_base`).
    Sets `out.prefix_digest` / `out.prefix_chars` (the array's text from `[` to its last item's
    end) for the next step's `base`."""
    array_start = index
    resumed = _after_base(text, index, base) if base is not None else None
    if resumed is not None and base is not None:
        out.base = base
        prefix, hashed_to, index = resumed  # index: the `,` or `]` after the base's items
        digest = base.digest
        end_of_items: int | None = hashed_to
        more = text[index] == ","
        index = _skip(text, index + 1) if more else index
    else:
        prefix, hashed_to, digest, end_of_items = hashlib.sha256(), index, "", None
        index = _skip(text, index + 1)
        more = text[index : index + 1] != "]"
    while more:
        start = index
        _, index = _scan(text, index)
        item = text[start:index]
        item_hash = blob_hash(item)
        out.blobs[item_hash] = item
        out.item_hashes.append(item_hash)
        digest = chain_digest(digest, item_hash)
        out.digests.append(digest)
        end_of_items = index
        index = _skip(text, index)
        separator = text[index : index + 1]
        if separator == ",":
            index = _skip(text, index + 1)
        elif separator == "]":
            more = False
        else:
            raise ValueError("expected , or ]")
    if end_of_items is not None:
        prefix.update(_utf8(text[hashed_to:end_of_items]))
        out.prefix_digest = prefix.digest()
        out.prefix_chars = end_of_items - array_start
    return index + 1


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _after_base(text: str, index: int, base: Remembered) -> tuple[Any, int, int] | None:
    """When the array at `text[index]` ('[') starts with `base`'s items text (the same SHA-256
    over its `prefix_chars` characters, then `,` or `]` after optional whitespace): (the running
    SHA-256 over that text, where that text ends, the index of the `,` or `]`). Else None."""
    if base.prefix_digest is None:
        return None
    end = index + base.prefix_chars
    prefix = hashlib.sha256(_utf8(text[index:end]))
    if prefix.digest() != base.prefix_digest:
        return None
    after = _skip(text, end)
    if text[after : after + 1] not in (",", "]"):
        return None  # e.g. a number item that goes on: not an item boundary here
    return prefix, end, after


def _split_parsed(request_json: str, array_field: str) -> SplitRequest:
    """`split_request` by parsing and re-encoding (escapes what UTF-8 cannot carry)."""
    try:
        body = json.loads(request_json)
    except (ValueError, RecursionError):
        return SplitRequest(request_json)
    if not isinstance(body, dict):
        return SplitRequest(request_json)
    cut_items = isinstance(body.get(array_field), list)
    cut_tools = isinstance(body.get("tools"), list)
    if not cut_items and not cut_tools:
        return SplitRequest(request_json)
    try:
        return _split(body, array_field if cut_items else None, cut_tools)
    except (ValueError, RecursionError):  # a value json cannot write back: keep the body whole
        return SplitRequest(request_json)


def _split(body: dict[str, Any], array_field: str | None, cut_tools: bool) -> SplitRequest:
    out = SplitRequest("")
    members: list[str] = []
    length = 1  # the opening brace
    for key, value in body.items():
        name = compact_json(key) + ":"
        if key == array_field:
            out.array_field = array_field
            out.items_at = length + (len(members) > 0) + len(name)
            digest = ""
            for item in value:
                text = compact_json(item)
                item_hash = blob_hash(text)
                out.blobs[item_hash] = text
                out.item_hashes.append(item_hash)
                digest = chain_digest(digest, item_hash)
                out.digests.append(digest)
            member = name + _NULL
        elif key == "tools" and cut_tools:
            out.tools_at = length + (len(members) > 0) + len(name)
            text = compact_json(value)
            out.tools_hash = blob_hash(text)
            out.blobs[out.tools_hash] = text
            member = name + _NULL
        else:
            member = name + compact_json(value)
        length += (len(members) > 0) + len(member)
        members.append(member)
    out.options_json = "{" + ",".join(members) + "}"
    return out


@dataclass(frozen=True)
class Remembered:
    """What a writer keeps of a recent exchange to see whether a child continues its items:
    which array, how many items, their `chain_digest`, and the SHA-256 and length in characters
    of the array's text up to the end of its last item (`split_request`'s `base`; None: not
    known, the child is split whole)."""

    field: str
    count: int
    digest: str
    prefix_digest: bytes | None = None
    prefix_chars: int = 0


class RecentItems:
    """An LRU map exchange id -> `Remembered` (at most `capacity` entries, ~200 bytes each)."""

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, Remembered] = OrderedDict()

    def get(self, exchange_id: str | None) -> Remembered | None:
        """The entry of `exchange_id` (and mark it recent), or None."""
        if exchange_id is None:
            return None
        entry = self._entries.get(exchange_id)
        if entry is not None:
            self._entries.move_to_end(exchange_id)
        return entry

    def put(self, exchange_id: str, entry: Remembered) -> None:
        """Remember `entry`, dropping the least recent beyond capacity."""
        self._entries[exchange_id] = entry
        self._entries.move_to_end(exchange_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class ToolLists:
    """The most recent distinct tool list texts and their `blob_hash` (at most `capacity`, each
    at most `max_chars` characters): most requests of an app send one of a few tool lists, so a
    writer finds the `tools` value by comparing text (`find`) instead of parsing and hashing it.
    """

    def __init__(self, capacity: int = 16, max_chars: int = 256 * 1024) -> None:
        self.capacity = capacity
        self.max_chars = max_chars
        self._hashes: OrderedDict[str, str] = OrderedDict()

    def find(self, text: str, start: int) -> tuple[str, str] | None:
        """(tool list text, its hash) of a known list that `text` holds at `start`, or None.
        A JSON array ends at its own `]`, so the value there is exactly that list."""
        for tools in reversed(self._hashes):
            if text.startswith(tools, start):
                self._hashes.move_to_end(tools)
                return tools, self._hashes[tools]
        return None

    def add(self, tools: str, tools_hash: str) -> None:
        """Remember `tools` (a JSON array's text) and its hash, the oldest forgotten beyond
        capacity."""
        if len(tools) <= self.max_chars:
            self._hashes[tools] = tools_hash
            self._hashes.move_to_end(tools)
            while len(self._hashes) > self.capacity:
                self._hashes.popitem(last=False)


def remembered(split: SplitRequest) -> Remembered | None:
    """The `RecentItems` entry for an exchange split as `split` (None when it has no item list)."""
    if split.array_field is None:
        return None
    return Remembered(
        split.array_field, split.count, split.digest, split.prefix_digest, split.prefix_chars
    )


def refs_for(split: SplitRequest, parent: Remembered | None) -> tuple[bool, dict[str, Any]]:
    """`(uses_base, refs)`: the references to store for `split`.

    uses_base: the items start with `parent`'s (same field, digest equal at the parent's count,
    at least one item; or `split` was made against `parent` as its base and matched), so
    `refs["items"]` holds only the items after them. refs: `{"at",
    "items"}` when the array was cut, `{"tools_at", "tools"}` when the tool list was; `{}` when
    nothing was cut (the options are the whole body).
    """
    refs: dict[str, Any] = {}
    uses_base = False
    if split.array_field is not None and split.items_at is not None:
        items = split.item_hashes
        if split.base is not None:  # split after its base's items (they were a prefix)
            uses_base = True
        elif (
            parent is not None
            and parent.field == split.array_field
            and 0 < parent.count <= len(items)
            and split.digests[parent.count - 1] == parent.digest
        ):
            uses_base = True
            items = items[parent.count :]
        refs["at"] = split.items_at
        refs["items"] = items
    if split.tools_hash is not None:
        refs["tools_at"] = split.tools_at
        refs["tools"] = split.tools_hash
    return uses_base, refs


def splice_request(
    options_json: str,
    refs: dict[str, Any],
    item_texts: Sequence[str] | None,
    tools_text: str | None,
) -> str:
    """The whole body text: `options_json` with the array (`item_texts` joined into a JSON list)
    and the tool list (`tools_text`) put back at the offsets `refs` names. With neither cut, the
    options text itself. Raises ValueError when a part that `refs` names is missing."""
    splices: list[tuple[int, str]] = []
    if "at" in refs:
        if item_texts is None:
            raise ValueError("request items missing")
        splices.append((int(refs["at"]), "[" + ",".join(item_texts) + "]"))
    if "tools_at" in refs:
        if tools_text is None:
            raise ValueError("request tool list missing")
        splices.append((int(refs["tools_at"]), tools_text))
    if not splices:
        return options_json
    splices.sort()
    parts: list[str] = []
    position = 0
    for offset, text in splices:
        if options_json[offset : offset + len(_NULL)] != _NULL:
            raise ValueError("request options do not match their references")
        parts.append(options_json[position:offset])
        parts.append(text)
        position = offset + len(_NULL)
    parts.append(options_json[position:])
    return "".join(parts)
