"""JSON decoding that gives exactly what `json.loads` gives, faster.

`loads(text)` parses with orjson (about 3-5x faster than the standard library on recorded
bodies) and falls back to `json.loads` for the inputs orjson refuses but the standard library
accepts (NaN / Infinity literals, lone surrogate escapes), and sends texts with 19 digits in a row
straight to the standard library (orjson would read an integer beyond 64 bits as a float), so callers
see the same values and the same `ValueError` (a `json.JSONDecodeError`) for bad input. Pure: no
I/O.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson

__all__ = ["loads", "loads_checked"]

_LONG_NUMBER: Final = b"0" * 19
"""19 digits in a row (every digit mapped to 0 by `_DIGITS_AS_ZERO`): an integer orjson might
turn into a float (it keeps 64-bit integers only), so such texts (rare: also ids and digits inside
strings) go to the standard library."""
_DIGITS_AS_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")


def loads(text: str | bytes) -> Any:
    """The value of the JSON document `text`, as `json.loads(text)` returns it.

    Raises `json.JSONDecodeError` (a ValueError) when the standard library would, TypeError for
    a value that is neither str nor bytes.
    """
    return loads_checked(text)[0]


def loads_checked(text: str | bytes) -> tuple[Any, bool]:
    """`(loads(text), strict)`: strict is True when orjson read the text, so it is RFC 8259
    JSON and the value holds no NaN or infinity (False: the standard library read it, which
    also takes the `NaN` / `Infinity` literals and numbers beyond a float's range).

    Raises as `loads`.
    """
    if isinstance(text, str):
        try:
            data = text.encode()
        except UnicodeEncodeError:  # a lone surrogate, which orjson refuses
            return json.loads(text), False
    elif isinstance(text, bytes):
        data = text
    else:
        raise TypeError(f"the JSON object must be str or bytes, not {type(text).__name__}")
    # A translation and a substring search: several times cheaper than a regular expression.
    if _LONG_NUMBER in data.translate(_DIGITS_AS_ZERO):
        return json.loads(text), False
    try:
        return orjson.loads(data), True
    except orjson.JSONDecodeError:
        return json.loads(text), False
