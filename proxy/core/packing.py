"""Packed texts: JSON texts stored as small zstd frames against a built-in dictionary (pure, no I/O).

Most of an exchange row's bytes are boilerplate every answer repeats: the `chat.completion`
envelope (pretty-printed as the API sends it), `usage` with its token details, the request's
options. zstd primed with a dictionary of those shapes stores a 1.2 KB answer in about 150 bytes,
and gives back exactly the text that went in (byte for byte, whitespace included).

Form of a packed value: `bytes`, one version byte (`PACKED_V1`, the dictionary it was packed
against) then a magicless zstd frame that records its content size; or `PACKED_HEX` then the
bytes a lowercase hex text (a hash) spells; or `PACKED_REFS` then an exchange's request
references (`request_refs_json`: offsets and 16-byte part hashes, `pack_refs`). A `str` is a text
that was not packed. `pack_text` packs only when that is smaller; `unpack_text` is the one way back and
accepts either form. `DICTIONARY_V1` must never change: packed rows name it by its version byte
(a new dictionary takes a new version byte, and the old one stays for reading).
"""

from __future__ import annotations

import re
import threading
from typing import Any, Final

import orjson
import zstandard

PACKED_HEX: Final = 0
"""The version byte of a lowercase hex text (a hash) stored as the bytes it spells: half the size."""

PACKED_V1: Final = 1
"""The version byte of texts packed against `DICTIONARY_V1`."""

PACKED_REFS: Final = 2
"""The version byte of request references in binary (`pack_refs`, migration 009)."""

PACK_LEVEL: Final = 9
"""zstd level: texts are short; higher levels find little more and cost more time."""

MIN_PACK_CHARS: Final = 48
"""Texts shorter than this stay as they are (a frame has a few bytes of overhead)."""

MIN_HEX_CHARS: Final = 32
"""Lowercase hex texts from this length on (hashes) are stored as their bytes (`PACKED_HEX`)."""

_HEX: Final = re.compile(r"(?:[0-9a-f]{2})+")

# Raw-content dictionary: texts shaped like what rows hold (nothing from any benchmark's data).
# zstd finds matches anywhere in it, closer ones (near the end) cost fewer bits: the most common
# shapes come last. Never edit: packed rows depend on every byte (see the module docstring).
DICTIONARY_V1: Final = (
    '{"error": {"message": "The server had an error while processing your request.", '
    '"type": "server_error", "param": null, "code": null}}'
    '{"error":{"message":"Rate limit reached","type":"requests","param":null,'
    '"code":"rate_limit_exceeded"}}'
    '{"x-understudy-trajectory": "", "x-understudy-route": "teacher"}'
    '{"input":null,"model":"gpt-4.1","instructions":"","tools":null,"store":true,"stream":false,'
    '"previous_response_id":null,"reasoning":{"effort":"medium","summary":"auto"},'
    '"text":{"format":{"type":"text"}},"tool_choice":"auto","parallel_tool_calls":true}'
    '{"id": "resp_", "object": "response", "created_at": 1750000000, "status": "completed", '
    '"background": false, "error": null, "incomplete_details": null, "instructions": null, '
    '"max_output_tokens": null, "model": "gpt-4.1-2025-04-14", "output": [{"id": "fc_", '
    '"type": "function_call", "status": "completed", "arguments": "{}", "call_id": "call_", '
    '"name": ""}, {"id": "msg_", "type": "message", "status": "completed", "content": '
    '[{"type": "output_text", "annotations": [], "logprobs": [], "text": ""}], "role": '
    '"assistant"}], "parallel_tool_calls": true, "previous_response_id": null, "reasoning": '
    '{"effort": null, "summary": null}, "service_tier": "default", "store": true, '
    '"temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"}, '
    '"tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled", "usage": '
    '{"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0, '
    '"output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}, "user": null, '
    '"metadata": {}}'
    '{"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0, '
    '"output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}'
    '{"id": "chatcmpl-", "object": "chat.completion", "created": 1750000000, "model": '
    '"gpt-4o-mini-2024-07-18", "choices": [{"index": 0, "message": {"role": "assistant", '
    '"content": "", "tool_calls": [{"id": "call_", "type": "function", "function": {"name": '
    '"", "arguments": "{}"}}], "refusal": null, "annotations": []}, "logprobs": null, '
    '"finish_reason": "stop"}], "usage": {"prompt_tokens": 0, "completion_tokens": 0, '
    '"total_tokens": 0, "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0}, '
    '"completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, '
    '"accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}, "service_tier": '
    '"default", "system_fingerprint": "fp_"}'
    '[{"type":"function","function":{"name":"","description":"","parameters":{"type":"object",'
    '"properties":{"":{"type":"string","description":""},"":{"type":"integer","minimum":1},'
    '"":{"type":"array","items":{"type":"string"}},"":{"type":"boolean","default":false},'
    '"":{"type":"string","enum":[""]}},"required":[""],"additionalProperties":false},'
    '"strict":true}}]'
    '{"type":"function_call","call_id":"call_","name":"","arguments":"{}"}'
    '{"type":"function_call_output","call_id":"call_","output":""}'
    '{"role":"user","content":[{"type":"input_text","text":""}]}'
    '{"role":"user","content":[{"type":"text","text":""},{"type":"image_url","image_url":'
    '{"url":"data:image/png;base64,"}}]}'
    '{"role":"system","content":"You are a helpful assistant."}'
    '{"role":"assistant","content":null,"tool_calls":[{"id":"call_","type":"function",'
    '"function":{"name":"","arguments":"{}"}}]}'
    '{"content":null,"refusal":null,"role":"assistant","annotations":[],"tool_calls":[{"id":'
    '"call_","function":{"arguments":"{\\"\\":\\"\\"}","name":""},"type":"function"}]}'
    '{"role":"assistant","content":""}'
    '{"role":"user","content":""}'
    '{"role":"tool","tool_call_id":"call_","content":"{\\"\\": \\"\\"}"}'
    '{"messages":null,"model":"gpt-4o-mini","temperature":0,"max_tokens":1024,'
    '"response_format":{"type":"json_object"},"stream":true,"stream_options":'
    '{"include_usage":true},"tools":null,"tool_choice":"auto","parallel_tool_calls":true}'
    '{"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "prompt_tokens_details": '
    '{"cached_tokens": 0, "audio_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": '
    '0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}'
    "{\n"
    '  "id": "chatcmpl-",\n'
    '  "object": "chat.completion",\n'
    '  "created": 1750000000,\n'
    '  "model": "gpt-4.1-mini-2025-04-14",\n'
    '  "choices": [\n'
    "    {\n"
    '      "index": 0,\n'
    '      "message": {\n'
    '        "role": "assistant",\n'
    '        "content": null,\n'
    '        "tool_calls": [\n'
    "          {\n"
    '            "id": "call_",\n'
    '            "type": "function",\n'
    '            "function": {\n'
    '              "name": "",\n'
    '              "arguments": "{\\"\\":\\"\\"}"\n'
    "            }\n"
    "          }\n"
    "        ],\n"
    '        "refusal": null,\n'
    '        "annotations": []\n'
    "      },\n"
    '      "logprobs": null,\n'
    '      "finish_reason": "tool_calls"\n'
    "    }\n"
    "  ],\n"
    '  "usage": {\n'
    '    "prompt_tokens": 0,\n'
    '    "completion_tokens": 0,\n'
    '    "total_tokens": 0,\n'
    '    "prompt_tokens_details": {\n'
    '      "cached_tokens": 0,\n'
    '      "audio_tokens": 0\n'
    "    },\n"
    '    "completion_tokens_details": {\n'
    '      "reasoning_tokens": 0,\n'
    '      "audio_tokens": 0,\n'
    '      "accepted_prediction_tokens": 0,\n'
    '      "rejected_prediction_tokens": 0\n'
    "    }\n"
    "  },\n"
    '  "service_tier": "default",\n'
    '  "system_fingerprint": "fp_"\n'
    "}\n"
    '{"at":12,"items":["","",""],"tools_at":75,"tools":""}'
)

_DICTIONARIES: Final = {PACKED_V1: DICTIONARY_V1.encode("utf-8")}


class _Codecs(threading.local):
    """Per-thread compressor and decompressors (zstandard objects are not thread-safe)."""

    def __init__(self) -> None:
        data = zstandard.ZstdCompressionDict(
            _DICTIONARIES[PACKED_V1], dict_type=zstandard.DICT_TYPE_RAWCONTENT
        )
        self.compressor = zstandard.ZstdCompressor(
            level=PACK_LEVEL,
            dict_data=data,
            write_checksum=False,
            write_content_size=True,
            write_dict_id=False,
        )
        self.decompressors: dict[int, zstandard.ZstdDecompressor] = {}

    def decompressor(self, version: int) -> zstandard.ZstdDecompressor:
        found = self.decompressors.get(version)
        if found is None:
            raw = _DICTIONARIES.get(version)
            if raw is None:
                raise ValueError(f"packed text of unknown version {version}")
            data = zstandard.ZstdCompressionDict(raw, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            found = self.decompressors[version] = zstandard.ZstdDecompressor(
                dict_data=data, format=zstandard.FORMAT_ZSTD1_MAGICLESS
            )
        return found


_codecs = _Codecs()
_V1: Final = bytes((PACKED_V1,))
_MAGIC_LENGTH: Final = 4  # the zstd frame magic number, left out of a packed value


def pack_text(text: str) -> str | bytes:
    """`text` packed (bytes, see the module docstring) when that is smaller than its UTF-8
    bytes, else `text` itself. A text that UTF-8 cannot carry (a lone surrogate) stays as is.
    Hashes and request references take their binary forms (`PACKED_HEX`, `pack_refs`)."""
    if len(text) >= MIN_HEX_CHARS and _HEX.fullmatch(text):
        return bytes((PACKED_HEX,)) + bytes.fromhex(text)
    if text.startswith(_REFS_START):
        refs = pack_refs(text)
        if refs is not None:
            return refs
    if len(text) < MIN_PACK_CHARS:
        return text
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        return text
    frame = _codecs.compressor.compress(raw)
    packed = bytes((PACKED_V1,)) + frame[_MAGIC_LENGTH:]
    return packed if len(packed) < len(raw) else text


_HAS_ITEMS: Final = 1
_HAS_TOOLS: Final = 2
_REFS_START: Final = ('{"at":', '{"tools_at":')
_HASH_HEX: Final = re.compile(r"[0-9a-f]{32}")
_KEY: Final = re.compile(rb".{16}", re.DOTALL)
"""Each 16 bytes of a run of hashes (`findall` splits the run at C speed)."""


def _varint(number: int) -> bytes:
    out = bytearray()
    while number > 0x7F:
        out.append(number & 0x7F | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _read_varint(value: bytes, at: int) -> tuple[int, int]:
    number = value[at]
    if number < 0x80:  # offsets and counts under 128: one byte, the usual case
        return number, at + 1
    number = shift = 0
    while True:
        byte = value[at]
        number |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return number, at
        shift += 7


def pack_refs(text: str) -> bytes | None:
    """Request references (`{"at":N,"items":["<32 hex>",...],"tools_at":N,"tools":"<32 hex>"}`,
    compact, either part optional: `request_refs_json` as `proxy.storage.bodies` writes it) as
    bytes: `PACKED_REFS`, a flags byte, varint offsets and count, each hash as its 16 bytes (a
    60-step conversation's row: ~60 bytes, ~95 zstd-packed). None when `text` is not exactly that
    shape (`unpack_refs` would not give it back byte for byte): it is then packed as any text."""
    if not text.startswith(_REFS_START):
        return None
    try:
        refs = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(refs, dict):
        return None
    flags = 0
    out = bytearray((PACKED_REFS, 0))
    try:
        if "items" in refs:
            flags |= _HAS_ITEMS
            hashes = refs["items"]
            out += _varint(refs["at"]) + _varint(len(hashes))
            for item_hash in hashes:
                if not _HASH_HEX.fullmatch(item_hash):
                    return None
                out += bytes.fromhex(item_hash)
        if "tools" in refs:
            flags |= _HAS_TOOLS
            if not _HASH_HEX.fullmatch(refs["tools"]):
                return None
            out += _varint(refs["tools_at"]) + bytes.fromhex(refs["tools"])
    except (KeyError, TypeError, ValueError):  # a key missing, a value of another type
        return None
    out[1] = flags
    packed = bytes(out)
    return packed if flags and unpack_refs(packed) == text else None


def unpack_refs(value: bytes) -> str:
    """The exact text `pack_refs` packed. Raises ValueError for bytes that are not its form."""
    return orjson.dumps(refs_of_packed(value)).decode()  # compact, keys in order: that text


def refs_of_packed(value: bytes, *, hex_keys: bool = True) -> dict[str, Any]:
    """The references `pack_refs` packed, as the dict their text parses to (`{"at", "items",
    "tools_at", "tools"}`, either part optional), without making the text. hex_keys=False: each
    hash as its 16 bytes instead of its hex text (the key `blobs.hash` has on SQLite since 009,
    `stored_key`), no text made for it either. Raises ValueError for bytes that are not its
    form."""
    refs: dict[str, Any] = {}
    size = len(value)
    try:
        flags = value[1]
        at = 2
        if flags & _HAS_ITEMS:
            offset = value[2]  # offsets and counts under 128 take one byte: the usual case
            at = 3
            if offset >= 0x80:
                offset, at = _read_varint(value, 2)
            count = value[at]
            at += 1
            if count >= 0x80:
                count, at = _read_varint(value, at - 1)
            end = at + 16 * count
            if end > size:
                raise ValueError("truncated request references")
            refs["at"] = offset
            if not count:
                refs["items"] = []
            elif hex_keys:  # one hex text with a comma between hashes (C speed), split
                refs["items"] = value[at:end].hex(",", 16).split(",")
            else:
                refs["items"] = _KEY.findall(value, at, end)
            at = end
        if flags & _HAS_TOOLS:
            offset = value[at]
            at += 1
            if offset >= 0x80:
                offset, at = _read_varint(value, at - 1)
            if at + 16 > size:
                raise ValueError("truncated request references")
            refs["tools_at"] = offset
            refs["tools"] = value[at : at + 16].hex() if hex_keys else value[at : at + 16]
            at += 16
    except IndexError as exc:
        raise ValueError("truncated request references") from exc
    if at != size or not flags or flags & ~(_HAS_ITEMS | _HAS_TOOLS):
        raise ValueError("damaged request references")
    return refs


def unpack_text(value: str | bytes | None) -> str | None:
    """The text of a stored value: `pack_text`'s bytes unpacked, a str or None as they are.

    Raises ValueError for bytes that are not a packed text (unknown version, damaged frame).
    """
    if value.__class__ is bytes and value[:1] == _V1:  # the common case first, in few steps
        decompressor = _codecs.decompressors.get(PACKED_V1) or _codecs.decompressor(PACKED_V1)
        try:
            return decompressor.decompress(value[1:]).decode("utf-8")
        except (zstandard.ZstdError, UnicodeDecodeError) as exc:
            raise ValueError(f"damaged packed text: {exc}") from exc
    if value is None or isinstance(value, str):
        return value
    if not value:
        raise ValueError("empty packed text")
    version = value[0]
    if version == PACKED_HEX:
        return bytes(value[1:]).hex()
    if version == PACKED_REFS:
        return unpack_refs(bytes(value))
    decompressor = _codecs.decompressors.get(version) or _codecs.decompressor(version)
    try:
        return decompressor.decompress(value[1:]).decode("utf-8")
    except (zstandard.ZstdError, UnicodeDecodeError) as exc:
        raise ValueError(f"damaged packed text: {exc}") from exc


STORED_TEXT_FUNCTION: Final = "understudy_text"
"""The SQL function registered on every SQLite connection (`proxy.storage.engine`) that gives
the text of a stored value, packed or not (`sqlite_stored_text`)."""


def sqlite_stored_text(value: object) -> object:
    """`STORED_TEXT_FUNCTION` in Python: the text of a packed value (bytes), any other value as
    it is; a value that cannot be unpacked reads as NULL (a search then skips it)."""
    if isinstance(value, bytes):
        try:
            return unpack_text(value)
        except ValueError:
            return None
    return value


KEY_FUNCTION: Final = "understudy_key"
"""The SQL function registered on every SQLite connection (`proxy.storage.engine`) that gives the
stored form of a hash key (`stored_key`): migration 009's conversion, and lookups by hashes bound
as one JSON array (`proxy.storage.bodies`)."""


def stored_key(value: object) -> object:
    """A hash key as SQLite stores it since migration 009 (`exchanges.state_hash`,
    `choice_states.state_hash`, `blobs.hash`): a lowercase hex text of at least `MIN_HEX_CHARS`
    characters (a BLAKE2b or SHA-256 digest) as the bytes it spells, half the size; any other
    value as it is (a key of another shape stays text, and is found as text)."""
    if isinstance(value, str) and len(value) >= MIN_HEX_CHARS:
        try:
            key = bytes.fromhex(value)
        except ValueError:
            return value
        if key.hex() == value:  # lowercase, no spaces: the text comes back exactly
            return key
    return value


def key_text(value: object) -> object:
    """The hex text of a key `stored_key` turned into bytes; any other value as it is."""
    if type(value) is bytes:  # what the driver returns: the quick test first
        return value.hex()
    if isinstance(value, bytearray | memoryview):
        return bytes(value).hex()
    return value


def register_sqlite_functions(dbapi_connection: Any) -> None:
    """Register the SQL functions our statements use on a SQLite DB-API connection: every engine
    connection gets them (`proxy.storage.engine`), and so does a reader with the standard
    library's sqlite3 (`proxy.storage.rebuild.SqliteRows`, a test reading the file)."""
    # Packed texts (migration 008) read in SQL: the dashboard search.
    dbapi_connection.create_function(
        STORED_TEXT_FUNCTION, 1, sqlite_stored_text, deterministic=True
    )
    # Hash keys as their bytes (migration 009): its conversion, and keys bound as a JSON array.
    dbapi_connection.create_function(KEY_FUNCTION, 1, stored_key, deterministic=True)
