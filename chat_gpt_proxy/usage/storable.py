"""What a ledger row may hold: text every database stores, and money as an exact integer.

Strings in a row come from callers (the model, a request id) and from the
upstream's answer. Any of them may be text no database takes: a lone
surrogate is valid JSON (``"x\\ud800"``) but not UTF-8, so SQLite's driver
raises ``UnicodeEncodeError``; PostgreSQL refuses a NUL in ``text``; and a
caller could send a model name of megabytes, held in memory by every queued
row. ``storable_text`` makes each storable: surrogates (lone ones, and the
surrogate-escaped bytes of invalid UTF-8) become U+FFFD, NUL is removed,
other C0 and C1 control characters (ESC, BEL, CR, LF, DEL, U+0080-U+009F)
become U+FFFD, since a model name never needs one and a terminal would run
them (the CLI report prints rows), and the text is cut at ``TEXT_CAP`` characters.

Money is kept in nano-dollars, an integer: sums are exact in every
database and in Redis, where float dollars drift (0.1 + 0.2). A nano-dollar
per token is a thousandth of a dollar per 1M tokens, the finest step of
OpenAI's price list, so a row's cost is exact, not rounded to a coarser unit.
"""

from __future__ import annotations

import re

TEXT_CAP = 256
NANOS_PER_USD = 1_000_000_000
_SURROGATES = re.compile("[\ud800-\udfff]")
# NUL is removed (the stored name stays what a reader would type); every other control is replaced.
_CONTROLS = re.compile("[\x01-\x1f\x7f-\x9f]")


def storable_text(value: str | None) -> str | None:
    """``value`` as text every ledger database stores; None stays None."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value)
    if value.isascii() and value.isprintable():
        return value[:TEXT_CAP]
    value = value[: TEXT_CAP * 2].replace("\x00", "")
    value = _CONTROLS.sub("\ufffd", _SURROGATES.sub("\ufffd", value))
    return value[:TEXT_CAP]


def to_nanos(usd: float) -> int:
    return round(usd * NANOS_PER_USD)


def to_usd(nanos: int) -> float:
    return nanos / NANOS_PER_USD
