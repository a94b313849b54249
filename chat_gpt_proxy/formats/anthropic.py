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

from .openai import JsonUsageReader, StreamMeter
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
# The first event of a Messages stream, or what may come before it.
OPENING_EVENTS = frozenset(("message_start", "ping", "error"))


def error_type(status: int) -> str:
    """The Anthropic error type for ``status``: invalid_request_error for any other 4xx, api_error for 5xx."""
    return ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def anthropic_usage(found, before: Usage | None = None) -> Usage | None:
    """A Messages API ``usage`` object as a ``Usage``; a field it leaves out (a ``message_delta``
    that repeats only ``output_tokens``) keeps its value in ``before``."""
    if not isinstance(found, dict):
        return None
    earlier = before or Usage(0, 0)
    fresh = count(found.get("input_tokens"))
    written = count(found.get("cache_creation_input_tokens"))
    read = count(found.get("cache_read_input_tokens"))
    output = count(found.get("output_tokens"))
    if before is None and (fresh is None or output is None):
        return None
    uncached = earlier.input_tokens - earlier.cached_tokens - earlier.cache_write_tokens
    fresh = uncached if fresh is None else fresh
    written = earlier.cache_write_tokens if written is None else written
    read = earlier.cached_tokens if read is None else read
    output = earlier.output_tokens if output is None else output
    return Usage(fresh + written + read, output, read, written)


def _string(value) -> str | None:
    return value if isinstance(value, str) and value else None


class MessagesStreamMeter(StreamMeter):
    """A Messages stream: the model and input from ``message_start``, the usage so far from each
    ``message_delta``, ``complete`` at ``message_stop``, ``failed`` at an ``error`` event, and
    ``foreign`` when the stream does not open as a Messages stream does (an OpenAI-compatible
    server answering in its own shape)."""

    def __init__(self):
        self.opened = False

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
        if not self.opened:
            self.opened = True
            # A Messages stream opens with message_start (a ping or an error may come first).
            self.foreign = kind not in OPENING_EVENTS
        if kind == "message_stop":
            self.complete = True
        elif kind == "error":
            self.failed = True
        elif kind == "message_start" and isinstance(parsed, dict) and isinstance(parsed.get("message"), dict):
            message = parsed["message"]
            self.model = _string(message.get("model")) or self.model
            self.usage = anthropic_usage(message.get("usage")) or self.usage
        elif kind == "message_delta" and isinstance(parsed, dict):
            usage = anthropic_usage(parsed.get("usage"), self.usage)
            if usage is not None:
                # Cumulative: the last message_delta holds the answer's final count.
                self.usage, self.final = usage, True
        return event


class AnthropicMessages:
    """The Messages API: ``POST /v1/messages`` (JSON or a stream), ``count_tokens``, the model list."""

    name = "anthropic"
    # The upstream kinds that speak it (UPSTREAMS_FILE).
    kinds = ("anthropic",)

    def usage_from_answer(self, answer) -> Usage | None:
        return anthropic_usage(answer.get("usage")) if isinstance(answer, dict) else None

    def model_from_answer(self, answer) -> str | None:
        return _string(answer.get("model")) if isinstance(answer, dict) else None

    def answer_reader(self) -> JsonUsageReader:
        return JsonUsageReader()

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
