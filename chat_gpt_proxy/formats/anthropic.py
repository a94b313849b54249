"""Anthropic's Messages API format: where its usage and the model that ran are, its stream's events, its
error shape, and which answers are not in this format at all.

- A JSON answer is a ``message`` (``POST /v1/messages``) with a top-level
  ``usage`` and ``model``; ``count_tokens`` and the model list report no usage.
- A stream is named events (``event: message_start`` + ``data: {...}``):
  ``message_start`` carries the model and the usage so far (all the input,
  ``output_tokens`` at 1 or so), each ``message_delta`` the usage to that
  point (cumulative: ``output_tokens`` always, the input counts when the
  upstream repeats them), ``message_stop`` ends a finished answer, ``error``
  a failed one; ``ping`` keeps it alive and is relayed like any event.
- Anthropic's ``input_tokens`` are only the input read neither from nor into
  the prompt cache; ``cache_creation_input_tokens`` (written to it) and
  ``cache_read_input_tokens`` (read from it) come beside them. A ``Usage``
  counts all three as input.
- Errors: ``{"type":"error","error":{"type","message"}}``, the type named by
  the status (Anthropic's "Errors" page); in a stream, an ``error`` event.
"""

from __future__ import annotations

import json

from chat_gpt_proxy.request.strict_json import dumps

from .base import ApiFormat, StreamMeter, text
from .sse import Event
from .usage import Usage, count

# The error type of each status, as Anthropic names them.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# The first event of a Messages stream (pings and comments may come before it, and decide nothing).
OPENING_EVENTS = frozenset(("message_start", "error"))


def error_type(status: int) -> str:
    """The Anthropic error type for ``status``: invalid_request_error for any other 4xx, api_error for 5xx."""
    return ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


# The counts of a Messages ``usage`` object: uncached input, cache writes, cache reads, output.
USAGE_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")


def anthropic_usage(found, before: Usage | None = None) -> Usage | None:
    """A Messages API ``usage`` object as a ``Usage``; None if it holds no count at all.

    A count it leaves out is 0 (the rest is kept, not discarded). With ``before`` (what
    ``message_start`` or an earlier ``message_delta`` reported), each count is the larger of the two:
    the counts are cumulative, so a delta that repeats only ``output_tokens``, or writes the input
    as 0, never takes back input already reported.
    """
    if not isinstance(found, dict):
        return None
    counts = [count(found.get(field)) for field in USAGE_FIELDS]
    if before is None and all(value is None for value in counts):
        return None
    fresh, written, read, output = (value or 0 for value in counts)
    if before is not None:
        uncached = before.input_tokens - before.cached_tokens - before.cache_write_tokens
        fresh = max(fresh, uncached)
        written = max(written, before.cache_write_tokens)
        read = max(read, before.cached_tokens)
        output = max(output, before.output_tokens)
    return Usage(fresh + written + read, output, read, written)


def reports(found, field: str) -> bool:
    """Whether a ``usage`` object reports ``field`` (a count, 0 included)."""
    return isinstance(found, dict) and count(found.get(field)) is not None


class MessagesStreamMeter(StreamMeter):
    """A Messages stream: the model and input from ``message_start``, the usage so far from each
    ``message_delta``, ``complete`` at ``message_stop``, ``failed`` at an ``error`` event, and
    ``foreign`` when the stream does not open as a Messages stream does (an OpenAI-compatible
    server answering in its own shape)."""

    def __init__(self):
        self.opened = False
        # Whether an input count and the final output count were reported: without either the
        # usage is a partial one, and the charge an estimate (chat_gpt_proxy/usage/meter.py).
        self.input_reported = False
        self.output_reported = False

    @property
    def settled(self) -> bool:
        return self.opened

    @property
    def ended_uncounted(self) -> bool:
        """The stream ended as a finished answer (message_stop) without its final counts: the
        output missing is estimated by the caller's cap, as for a caller who left."""
        return self.complete and not self.final

    def event(self, event: Event) -> Event | None:
        raw = event.raw
        # Only events that can be message_start, _delta, _stop or error are parsed (the deltas
        # are nearly all of a stream): their name is in their bytes, in the
        # event line or in the data's "type".
        if self.opened and b"message_" not in raw and b"error" not in raw:
            return event
        data = event.data
        if data is None or not event.complete:
            return event
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):
            parsed = None
        kind = event.type or (parsed.get("type") if isinstance(parsed, dict) else None)
        if not self.opened and kind != "ping":
            self.opened = True
            # A Messages stream opens with message_start, or an error.
            self.foreign = kind not in OPENING_EVENTS
        if kind == "message_stop":
            self.complete = True
        elif kind == "error":
            self.failed = True
        elif kind == "message_start" and isinstance(parsed, dict) and isinstance(parsed.get("message"), dict):
            message = parsed["message"]
            self.model = text(message.get("model")) or self.model
            found = message.get("usage")
            self.usage = anthropic_usage(found, self.usage) or self.usage
            self.input_reported = self.input_reported or reports(found, "input_tokens")
        elif kind == "message_delta" and isinstance(parsed, dict):
            found = parsed.get("usage")
            usage = anthropic_usage(found, self.usage)
            if usage is not None:
                self.usage = usage
                self.input_reported = self.input_reported or reports(found, "input_tokens")
                # Cumulative: the last message_delta's output_tokens is the answer's final count.
                self.output_reported = self.output_reported or reports(found, "output_tokens")
                self.final = self.input_reported and self.output_reported
        return event


class AnthropicMessages(ApiFormat):
    """The Messages API: ``POST /v1/messages`` (JSON or a stream), ``count_tokens``, the model list."""

    name = "anthropic"
    kinds = ("anthropic",)
    parse_usage = staticmethod(anthropic_usage)

    def stream_meter(self, strip_usage: bool = False) -> MessagesStreamMeter:
        return MessagesStreamMeter()

    # What a client is told when an upstream answers a Messages request in another shape.
    foreign_message = (
        "The upstream answered in a shape that is not Anthropic's Messages API: check that the upstream "
        'of kind = "anthropic" serves it at its base_url.'
    )

    def error_body(self, status: int, message: str, error_type_: str | None = None, code: str | None = None) -> dict:
        """An error as Anthropic writes it; the type follows the status (the proxy's own
        ``error_type_`` and ``code`` are OpenAI's words, which Anthropic's clients do not know)."""
        return {"type": "error", "error": {"type": error_type(status), "message": message}}

    def error_event(self, status: int, error: dict) -> bytes:
        """A stream's last event when the upstream fails mid-answer (``error``: the proxy's error
        object): Anthropic's ``error`` event, which its SDKs raise."""
        return b"event: error\ndata: " + dumps(self.error_body(status, error["message"])) + b"\n\n"

    @staticmethod
    def is_own_error(answer) -> bool:
        """Whether an error answer is in Anthropic's shape already (relayed as it is)."""
        error = answer.get("error") if isinstance(answer, dict) else None
        return (
            isinstance(error, dict)
            and answer.get("type") == "error"
            and isinstance(error.get("type"), str)
            and isinstance(error.get("message"), str)
        )

    @staticmethod
    def is_own_answer(path: str, answer) -> bool:
        """Whether a successful JSON answer to ``path`` (after ``/v1/``) is in this format."""
        if not isinstance(answer, dict):
            return False
        if path == "messages":
            return answer.get("type") == "message" and isinstance(answer.get("content"), list)
        if path == "messages/count_tokens":
            return count(answer.get("input_tokens")) is not None
        if path == "models":
            return isinstance(answer.get("data"), list)
        return answer.get("type") == "model"


ANTHROPIC_MESSAGES = AnthropicMessages()
