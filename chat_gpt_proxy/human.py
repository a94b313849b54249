"""Numbers for people: money, durations and sizes as answers, reports and messages show them.

The ledger keeps exact amounts; what a person reads is rounded here: ``0.2074879999999997`` dollars
is ``0.21``, ``2128088`` seconds is ``24 days 15 h``, ``33554432`` bytes is ``32 MiB``.
"""

from __future__ import annotations

import decimal

CENT = decimal.Decimal("0.01")


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


def money_fields(value):
    """A JSON-ready copy of ``value`` whose money (keys ``usd`` or ending in ``_usd``) is ``money()``-rounded."""
    if isinstance(value, dict):
        return {
            key: money(item)
            if isinstance(item, int | float) and (key == "usd" or key.endswith("_usd"))
            else money_fields(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [money_fields(item) for item in value]
    return value
