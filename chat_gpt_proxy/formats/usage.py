"""``Usage``: the tokens one request used, whatever API format reported them."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one answer. ``input_tokens`` counts every input token, those read from
    (``cached_tokens``) and written to (``cache_write_tokens``) a prompt cache included;
    ``output_tokens`` counts hidden reasoning (``reasoning_tokens``) too."""

    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, found) -> Usage | None:
        """The inverse of ``as_dict`` (a cache entry's usage), None for anything else."""
        if not isinstance(found, dict):
            return None
        try:
            usage = cls(**{f.name: found[f.name] for f in dataclasses.fields(cls) if f.name in found})
        except TypeError:
            return None
        return usage if all(count(getattr(usage, f.name)) is not None for f in dataclasses.fields(cls)) else None


# The largest count believed: every integer up to it is exact as a float, which prices and metrics use;
# a JSON number may be any integer, and one beyond a float overflows where it is priced or counted.
COUNT_MAX = 2**53


def count(value) -> int | None:
    """A token count as an upstream writes it: an integer (not a bool) from 0 to ``COUNT_MAX``, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= COUNT_MAX else None
