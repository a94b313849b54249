"""Numbers for people: money, durations and sizes as answers, reports and messages show them.

Amounts that programs add up stay exact (``exact``: to the nano-dollar, the ledger's unit, without the
noise of adding floats); only what a person reads is rounded here: ``0.2074879999999997`` dollars is
``$0.21``, ``2128088`` seconds is ``24 days 15 h``, ``33554432`` bytes is ``32 MiB``. Rounding each row
before adding them would lose money: ten requests at $0.01485 are $0.15, not ten times $0.01.
"""

from __future__ import annotations

import decimal

CENT = decimal.Decimal("0.01")
# The ledger counts money in nano-dollars: no amount it holds is finer.
EXACT_DIGITS = 9


def exact(usd: float) -> float:
    """US dollars to the nano-dollar: what the ledger holds, without a float sum's tail
    (``0.14850000000000002`` is ``0.1485``). For amounts that are added up: JSON, CSV, headers."""
    return round(float(usd), EXACT_DIGITS) + 0.0  # + 0.0: never -0.0


def exact_text(usd: float) -> str:
    """``exact(usd)`` as a plain decimal number, never in e-notation: ``0.1485``, ``20``, ``0.0000135``."""
    text = f"{decimal.Decimal(repr(exact(usd))):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def money(usd: float) -> float:
    """US dollars rounded to the cent (half up); below a cent, where a short request's cost lives,
    to 6 significant digits, so that it is not shown as nothing."""
    if not usd:
        return 0.0
    exact = decimal.Decimal(repr(float(usd)))
    if abs(exact) >= CENT:
        return float(exact.quantize(CENT, rounding=decimal.ROUND_HALF_UP))
    return float("%.6g" % usd)


def plain(usd: float) -> str:
    """``money(usd)`` as a plain decimal number, never in e-notation: ``0.21``, ``20.0``, ``0.0000135``."""
    return f"{decimal.Decimal(repr(money(usd))):f}"


def dollars(usd: float) -> str:
    """``money(usd)`` written out for a message: ``$0.21``, ``$20.00``, ``$0.0000135``."""
    amount = money(usd)
    text = "%.2f" % amount if abs(amount) >= 0.01 or amount == 0 else plain(amount)
    return ("-$" + text[1:]) if text.startswith("-") else "$" + text


def count(number: int, singular: str, plural: str = "") -> str:
    """A number and its noun, singular or plural: ``1 request``, ``2 requests``, ``0 tokens``."""
    return "%d %s" % (number, singular if number == 1 else plural or singular + "s")


UNITS = (("day", 86400), ("h", 3600), ("min", 60), ("s", 1))


def duration(seconds: float) -> str:
    """Whole seconds (rounded up) in the largest unit and the next one, the rest dropped:
    ``45 s``, ``2 min 5 s``, ``3 h``, ``24 days 15 h``."""
    rest = max(0, -int(-seconds // 1))
    parts = []
    for name, unit in UNITS:
        count, rest = divmod(rest, unit)
        if count:
            parts.append("%d %s" % (count, name + "s" if name == "day" and count > 1 else name))
        if parts and (count == 0 or len(parts) == 2):
            break  # only adjacent units: "1 h 1 s" would read as a typo
    return " ".join(parts) or "0 s"


def size(count: int) -> str:
    """Bytes in the largest binary unit: ``512 bytes``, ``64 KiB``, ``32 MiB``; a limit that is no whole
    number of them is given exactly first: ``100000 bytes (97.7 KiB)``."""
    for name, unit in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= unit:
            if count % unit == 0:
                return "%d %s" % (count // unit, name)
            return "%d bytes (%.1f %s)" % (count, count / unit, name)
    return "%d byte%s" % (count, "" if count == 1 else "s")


def is_money(key: str, item) -> bool:
    return (key == "usd" or key.endswith("_usd")) and isinstance(item, int | float) and not isinstance(item, bool)


def money_fields(value):
    """A JSON-ready copy of ``value`` in which each amount (a key ``usd`` or ending in ``_usd``) is
    ``exact()``, for programs that add amounts up, and has a ``<key>_display`` beside it, ``dollars()``
    rounded for people: ``{"usd": 0.1485, "usd_display": "$0.15"}``."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if is_money(key, item):
                out[key] = exact(item)
                out[key + "_display"] = dollars(item)
            else:
                out[key] = money_fields(item)
        return out
    if isinstance(value, list):
        return [money_fields(item) for item in value]
    return value
