"""What one request is charged: its usage as the upstream reports it, or an estimate when there is none.

The usage is the upstream's own (``chat_gpt_proxy/formats``: a JSON answer's
``usage``, a stream's usage event), priced by the model that ran. When no
usage came back (a client that left, an upstream that ended without one),
the row is an estimate, marked ``estimated`` in the ledger:

- input tokens: what the upstream had reported of the input (a stream's
  first event may carry it), else the request body's bytes / 4, rounded up;
- output tokens, when a stream ended as a finished answer without its final
  count (an Anthropic stream whose message_delta holds no usage): as for a
  caller who left, below;
- output tokens, when the caller left before the answer ended: what the
  upstream had reported of the output, plus what it could have generated
  since, which for a reasoning model is mostly hidden and never relayed.
  That is the caller's own cap (``max_completion_tokens``,
  ``max_output_tokens``, ``max_tokens``, times ``n``) if it set one, else the
  model's documented cap (``max_output`` in the price table), else (a model
  without one) the number of events relayed;
- output tokens, when the answer ended without usage: the number of events
  relayed (OpenAI sends about one token per chunk), or more if the upstream
  had reported more;
each at least 1, so that an estimate is never zero.
"""

from __future__ import annotations

import dataclasses
import math

from chat_gpt_proxy.formats.usage import Usage, count
from chat_gpt_proxy.request.strict_json import loads

from .prices import Price
from .storable import storable_text, to_nanos

# Where the OpenAI and Anthropic APIs take the caller's cap on output tokens.
OUTPUT_CAP_FIELDS = ("max_completion_tokens", "max_output_tokens", "max_tokens")


@dataclasses.dataclass(frozen=True)
class Charge:
    """One ledger row: never a prompt, an answer or a key.

    Made storable here, the one place rows are made: its text as every
    database takes it, its money also as exact integer nano-dollars
    (``nanos``, what the ledger, the budgets and Redis add up).
    """

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
    # For the admin page's Requests tab (REQUEST_COLUMNS in ledger.py): the upstream that
    # answered, the time to the whole answer and to its first streamed byte, the response
    # cache's "hit" or "miss".
    upstream: str | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    cache: str | None = None
    # The upstream's own id of the request (its x-request-id), what a user's SDK reports.
    upstream_request_id: str | None = None
    nanos: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("token", "route", "model", "request_id", "upstream_request_id"):
            value = getattr(self, name)
            stored = storable_text(value)
            if stored is not value:
                object.__setattr__(self, name, stored)
        object.__setattr__(self, "nanos", to_nanos(self.usd))

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def output_cap(request_body: bytes | dict | None) -> int | None:
    """The output cap the request set itself, if any (a JSON body's first field of OUTPUT_CAP_FIELDS),
    times its number of choices ``n``."""
    payload = request_body
    if isinstance(request_body, bytes | bytearray):
        try:
            payload = loads(request_body)
        except (ValueError, RecursionError):
            return None
    if not isinstance(payload, dict):
        return None
    choices = count(payload.get("n")) or 1
    for field in OUTPUT_CAP_FIELDS:
        cap = count(payload.get(field))
        if cap:
            return cap * choices
    return None


def estimate(
    request_bytes: int,
    events: int,
    *,
    partial: Usage | None = None,
    left_early: bool = False,
    cap: int | None = None,
    price: Price | None = None,
) -> Usage:
    """An estimate of what a request without reported usage used (the rules are in this module's docstring)."""
    # An input of 0 was never reported: every request has some input.
    reported_input = partial.input_tokens if partial is not None else 0
    input_tokens = reported_input or math.ceil(request_bytes / 4)
    reported = partial.output_tokens if partial is not None else 0
    output_tokens = max(events, reported)
    if left_early:
        ceiling = cap or (price.max_output if price is not None else None)
        output_tokens = max(output_tokens, reported + (ceiling or events))
    cached = partial.cached_tokens if partial is not None else 0
    written = partial.cache_write_tokens if partial is not None else 0
    return Usage(max(1, input_tokens), max(1, output_tokens), cached, written)


def cost(price: Price | None, usage: Usage) -> float:
    """USD for ``usage``; 0 for a model without a price (only tokens without a money budget get there)."""
    return price.cost(usage) if price is not None else 0.0
