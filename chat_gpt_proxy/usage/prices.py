"""Model prices: the table shipped in prices.toml, overridden and extended by PRICES_FILE.

A model without a price is never free: ``PriceTable.price`` returns None for
it, and a token with a money budget is refused (403 ``model_not_priced``)
unless the operator gives an explicit ``[default]`` price in PRICES_FILE.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from chat_gpt_proxy.toml_file import read_toml

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prices.toml")
FIELDS = ("input", "cached_input", "output")
# OpenAI's dated snapshots: gpt-4o-mini-2024-07-18, o1-2024-12-17, gpt-4-0613, gpt-3.5-turbo-0125.
DATED_RE = re.compile(r"^(.+?)-(?:\d{4}-\d{2}-\d{2}|\d{4})$")
MAX_PRICE = 1_000_000.0  # USD per 1M tokens: far above any real price, catches a slip of units


class PricesFileError(ValueError):
    """A prices file that cannot be used; the message is one line naming the file and the entry."""


@dataclasses.dataclass(frozen=True)
class Price:
    """US dollars per 1M tokens."""

    input: float
    output: float
    cached_input: float | None = None  # None: cached tokens cost the input price

    def cost(self, input_tokens: int, cached_tokens: int, output_tokens: int) -> float:
        """USD for a usage; ``cached_tokens`` are part of ``input_tokens``, as OpenAI reports them."""
        cached = min(cached_tokens, input_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        return ((input_tokens - cached) * self.input + cached * cached_rate + output_tokens * self.output) / 1e6


def parse_prices(path: str) -> dict[str, Price]:
    data = read_toml(path, PricesFileError)
    prices = {}
    for model, table in data.items():
        where = "%s: model %r: " % (path, model[:100])
        if not isinstance(table, dict):
            raise PricesFileError(where + "write each model as [name] with input, cached_input and output")
        unknown = sorted(set(table) - set(FIELDS))
        if unknown:
            raise PricesFileError(where + "unknown field %r (known: %s)" % (unknown[0][:64], ", ".join(FIELDS)))
        values = {}
        for field in FIELDS:
            value = table.get(field)
            if value is None:
                if field != "cached_input":
                    raise PricesFileError(where + "%s is missing (USD per 1M tokens)" % field)
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not 0 <= value <= MAX_PRICE
            ):
                raise PricesFileError(where + "%s must be a number of USD per 1M tokens, 0 or more" % field)
            values[field] = float(value)
        prices[model] = Price(**values)
    return prices


class PriceTable:
    """The shipped prices, with PRICES_FILE's entries over them (a ``default`` entry prices the rest)."""

    def __init__(self, prices_file: str = ""):
        self.prices = parse_prices(SHIPPED)
        if prices_file:
            self.prices.update(parse_prices(prices_file))
        self.default = self.prices.pop("default", None)
        self._cache: dict[str, Price | None] = {}

    def price(self, model: str | None) -> Price | None:
        """The price of ``model``, its dated family's, the operator's default, or None (not priced)."""
        if model is None:
            return self.default
        found = self._cache.get(model, False)
        if found is not False:
            return found
        found = self.prices.get(model)
        if found is None:
            dated = DATED_RE.match(model)
            if dated:
                found = self.prices.get(dated.group(1))
        if found is None:
            found = self.default
        if len(self._cache) < 10_000:  # model names come from callers: bound what is remembered
            self._cache[model] = found
        return found
