"""The one JSON reader and writer of the proxy: strict in, UTF-8 out.

Request bodies (handlers/base.py), the /v1 allow-list check
(request/model.py) and DEFAULT_GENERATE_PARAMS (settings.py) are read the
same way, so what one accepts the others accept too.
"""

from __future__ import annotations

import json
import math


def dumps(obj) -> bytes:
    """JSON as UTF-8 without ``\\u`` escapes: many users write in Russian."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (valid in JSON as "\\ud800", not in UTF-8): keep it escaped.
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")


def _reject_constant(name: str):
    raise ValueError("%s is not valid JSON" % name)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def loads(data: bytes | str, object_pairs_hook=None):
    """Strict JSON: NaN, Infinity and numbers that overflow a double are errors, as in RFC 8259."""
    return json.loads(
        data, parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=object_pairs_hook
    )
