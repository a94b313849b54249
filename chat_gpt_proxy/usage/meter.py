"""What one request is charged: its usage as OpenAI reports it, or an estimate when there is none.

Estimate (a client that left mid-stream, an upstream that ended without
usage): input tokens = the request body's bytes / 4, rounded up; output
tokens = the number of SSE data events relayed (OpenAI sends about one token
per chunk); each at least 1, so an estimate is never zero. The ledger marks
such a row ``estimated``.
"""

from __future__ import annotations

import dataclasses
import math

from .prices import Price


@dataclasses.dataclass(frozen=True)
class Charge:
    """One ledger row: never a prompt, an answer or a key."""

    at: float
    token: str
    route: str
    model: str | None
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    usd: float
    estimated: bool
    status: int
    request_id: str

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usage_counts(usage) -> tuple[int, int, int] | None:
    """(input, cached input, output) tokens of an OpenAI ``usage`` object: Chat Completions,
    Embeddings, the Responses API, audio transcriptions and realtime ``response.done``."""
    if not isinstance(usage, dict):
        return None
    input_tokens = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    output_tokens = _count(usage.get("completion_tokens", usage.get("output_tokens", 0)))
    if input_tokens is None or output_tokens is None:
        return None
    cached = 0
    for details in ("prompt_tokens_details", "input_tokens_details", "input_token_details"):
        found = usage.get(details)
        if isinstance(found, dict):
            cached = _count(found.get("cached_tokens")) or 0
            break
    return input_tokens, min(cached, input_tokens), output_tokens


def estimate(request_bytes: int, events: int) -> tuple[int, int, int]:
    return max(1, math.ceil(request_bytes / 4)), 0, max(1, events)


def cost(price: Price | None, counts: tuple[int, int, int]) -> float:
    """USD for ``counts``; 0 for a model without a price (only tokens without a money budget get there)."""
    return price.cost(*counts) if price is not None else 0.0
