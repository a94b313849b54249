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

from chat_gpt_proxy.formats.usage import Usage
from chat_gpt_proxy.toml_file import read_toml

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prices.toml")
FIELDS = ("input", "cached_input", "cache_write", "output", "max_output")
# Fields that may be left out: cached and cache-written input then cost the
# input price, and an unknown output cap is not used (chat_gpt_proxy/usage/meter.py).
OPTIONAL_FIELDS = ("cached_input", "cache_write", "max_output")
# Dated snapshots: OpenAI's gpt-4o-mini-2024-07-18, o1-2024-12-17, gpt-4-0613, gpt-3.5-turbo-0125;
# Anthropic's claude-sonnet-4-5-20250929.
DATED_RE = re.compile(r"^(.+?)-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")
MAX_PRICE = 1_000_000.0  # USD per 1M tokens: far above any real price, catches a slip of units


class PricesFileError(ValueError):
    """A prices file that cannot be used; the message is one line naming the file and the entry."""


@dataclasses.dataclass(frozen=True)
class Price:
    """US dollars per 1M tokens."""

    input: float
    output: float
    cached_input: float | None = None  # None: cached tokens cost the input price
    cache_write: float | None = None  # None: tokens written to a prompt cache cost the input price
    # The model's documented output cap in tokens (what a caller who left early may have run up).
    max_output: int | None = None

    def cost(self, usage: Usage) -> float:
        """USD for a usage; its cached and cache-written tokens are part of its input tokens."""
        cached = min(usage.cached_tokens, usage.input_tokens)
        written = min(usage.cache_write_tokens, usage.input_tokens - cached)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        write_rate = self.input if self.cache_write is None else self.cache_write
        return (
            (usage.input_tokens - cached - written) * self.input
            + cached * cached_rate
            + written * write_rate
            + usage.output_tokens * self.output
        ) / 1e6


def parse_prices(path: str) -> dict[str, Price]:
    data = read_toml(path, PricesFileError)
    prices = {}
    for model, table in data.items():
        where = "%s: model %r: " % (path, model[:100])
        if not isinstance(table, dict):
            raise PricesFileError(
                where + "write each model as [name] with input, output and optional %s" % ", ".join(OPTIONAL_FIELDS)
            )
        unknown = sorted(set(table) - set(FIELDS))
        if unknown:
            raise PricesFileError(where + "unknown field %r (known: %s)" % (unknown[0][:64], ", ".join(FIELDS)))
        values = {}
        for field in FIELDS:
            value = table.get(field)
            if value is None:
                if field not in OPTIONAL_FIELDS:
                    raise PricesFileError(where + "%s is missing (USD per 1M tokens)" % field)
                continue
            if field == "max_output":
                if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 100_000_000:
                    raise PricesFileError(where + "max_output must be a whole number of tokens, 1 or more")
                values[field] = value
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
        found = self.listed(model)
        return self.default if found is None else found

    def listed(self, model: str) -> Price | None:
        """The price the table gives ``model`` itself, or its dated family (an own entry first); no default."""
        found = self._cache.get(model, False)
        if found is not False:
            return found
        found = self.prices.get(model)
        if found is None:
            dated = DATED_RE.match(model)
            if dated:
                found = self.prices.get(dated.group(1))
        if len(self._cache) < 10_000:  # model names come from callers: bound what is remembered
            self._cache[model] = found
        return found
