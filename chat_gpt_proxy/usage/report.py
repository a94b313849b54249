"""The spend report: the ledger grouped by UTC day, token and model, as CSV or a text table.

Shared by ``GET /admin/usage?format=csv`` and ``python -m chat_gpt_proxy.usage``.
"""

from __future__ import annotations

import csv
import io

from chat_gpt_proxy.human import dollars, exact_text

COLUMNS = ("day", "token", "model", "requests", "input_tokens", "cached_tokens", "output_tokens", "usd", "estimated")
# A spreadsheet runs a cell that starts with one of these as a formula (CSV
# injection, OWASP); model names come from callers.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    # A lone "-" (the unnamed tokens' name) or "+" is no formula.
    return "'" + value if len(value) > 1 and value.startswith(FORMULA_START) else value


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for row in rows:
        # Exact dollars (a spreadsheet adds them up: rounded rows would not sum to the spend), never in
        # e-notation, which some spreadsheets read as text.
        writer.writerow([exact_text(row[c]) if c == "usd" else csv_cell(row[c]) for c in COLUMNS])
    return out.getvalue()


def shown(text: str) -> str:
    """``text`` safe to print on a terminal: a control or format character (ESC, CR, a bidi override), which
    would clear the screen or forge a line, is written as its escape. Rows stored by an older release may
    still hold them."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def to_table(rows: list[dict]) -> str:
    """A plain-text table with totals per token, for a terminal."""
    lines = [
        "%-10s  %-20s  %-28s  %8s  %12s  %12s  %12s" % ("day", "token", "model", "requests", "input", "output", "usd")
    ]
    totals: dict[str, float] = {}
    for row in rows:
        lines.append(
            "%-10s  %-20s  %-28s  %8d  %12d  %12d  %12s%s"
            % (
                row["day"],
                shown(row["token"][:20]),
                shown((row["model"] or "-")[:28]),
                row["requests"],
                row["input_tokens"],
                row["output_tokens"],
                dollars(row["usd"]),
                "  (%d estimated)" % row["estimated"] if row["estimated"] else "",
            )
        )
        totals[row["token"]] = totals.get(row["token"], 0.0) + row["usd"]
    lines.append("")
    lines.extend("total %-20s  %12s" % (shown(token[:20]), dollars(usd)) for token, usd in sorted(totals.items()))
    return "\n".join(lines) + "\n"
