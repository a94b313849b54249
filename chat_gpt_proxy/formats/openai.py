"""OpenAI's API formats: where each keeps its usage and the model that ran, in JSON and in stream events,
and what the proxy adds to a stream and must take out again.

- ``OPENAI_JSON``: every JSON answer with a top-level ``usage`` and ``model``
  (chat completions, Responses, embeddings, audio, a finished batch).
- ``OPENAI_CHAT``: Chat Completions streams, ``data: {chunk}`` events ending
  in ``data: [DONE]``. With ``stream_options.include_usage`` every chunk
  carries ``"usage": null`` and one last chunk has no choices and the usage;
  chunks may carry more after it (OpenAI's ``obfuscation``).
- ``OPENAI_RESPONSES``: Responses API streams, ``event: response.…`` events
  whose usage is in ``response.usage`` of ``response.completed``,
  ``response.incomplete`` or ``response.failed``.
"""

from __future__ import annotations

import json

from chat_gpt_proxy.request.strict_json import dumps
from chat_gpt_proxy.upstream.routing import OPENAI_KINDS

from .base import ApiFormat, StreamMeter, text
from .sse import Event
from .usage import Usage, count

SSE_DONE = b"data: [DONE]\n\n"
# Error shapes, as OpenAI writes them.
ERROR_EVENT_TYPES = frozenset(("error", "response.failed"))
RESPONSES_FINAL_EVENTS = frozenset(("response.completed", "response.incomplete", "response.failed"))


def openai_usage(found) -> Usage | None:
    """An OpenAI ``usage`` object (Chat Completions, Responses, Embeddings, audio, batches, realtime)."""
    if not isinstance(found, dict):
        return None
    input_tokens = count(found.get("prompt_tokens", found.get("input_tokens")))
    output_tokens = count(found.get("completion_tokens", found.get("output_tokens", 0)))
    if input_tokens is None or output_tokens is None:
        return None
    cached = reasoning = 0
    for name in ("prompt_tokens_details", "input_tokens_details", "input_token_details"):
        details = found.get(name)
        if isinstance(details, dict):
            cached = count(details.get("cached_tokens")) or 0
            break
    for name in ("completion_tokens_details", "output_tokens_details"):
        details = found.get(name)
        if isinstance(details, dict):
            reasoning = count(details.get("reasoning_tokens")) or 0
            break
    return Usage(input_tokens, output_tokens, min(cached, input_tokens), 0, min(reasoning, output_tokens))


# How JSON writers space and escape: OpenAI's compact form first, then Python's json.dumps defaults.
JSON_STYLES = (
    {"separators": (",", ":"), "ensure_ascii": False},
    {"separators": (",", ":"), "ensure_ascii": True},
    {"separators": (", ", ": "), "ensure_ascii": False},
    {"separators": (", ", ": "), "ensure_ascii": True},
)


def style_of(obj, data: str) -> dict:
    """The ``json.dumps`` arguments that write ``obj`` exactly as ``data`` is written (compact when none
    does), so that an edited event differs from the upstream's only by what was taken out."""
    for style in JSON_STYLES:
        if json.dumps(obj, **style) == data:
            return style
    return JSON_STYLES[0]


class OpenAIJson(ApiFormat):
    """JSON answers (and the stream-free routes): top-level ``usage`` and ``model``."""

    name = "openai"
    kinds = OPENAI_KINDS
    parse_usage = staticmethod(openai_usage)

    def stream_meter(self, strip_usage: bool = False):
        return ChatStreamMeter(strip_usage)

    def error_body(self, status: int, message: str, error_type: str, code: str | None) -> dict:
        return {"error": {"message": message, "type": error_type, "param": None, "code": code}}

    def error_event(self, status: int, error: dict) -> bytes:
        """A stream's last event when the upstream fails mid-answer (``error``: the proxy's error
        object): the error as a chunk, then ``[DONE]``, so that the SDKs raise it and stop."""
        return b"data: " + dumps({"error": error}) + b"\n\n" + SSE_DONE


class ChatStreamMeter(StreamMeter):
    """A Chat Completions stream. ``strip_usage``: the proxy asked for the usage the caller did not,
    and takes out what that added (each chunk's ``usage`` key, the last chunk): the caller gets the
    stream it asked for."""

    def __init__(self, strip_usage: bool):
        self.strip_usage = strip_usage

    def event(self, event: Event) -> Event | None:
        source = event.source
        # Only events that can hold what is looked for are parsed (chunks are
        # most of a stream's CPU): a key spelled with \u escapes is not looked for.
        if b"usage" not in source and b"error" not in source and b"[DONE]" not in source and self.model is not None:
            return event
        data = event.data
        if data is None or not event.complete:
            return event
        if data == "[DONE]":
            self.complete = True
            return event
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            return event
        if not isinstance(chunk, dict):
            return event
        if "error" in chunk:
            self.failed = True
        self.model = text(chunk.get("model")) or self.model
        if "usage" not in chunk:
            return event
        found = chunk["usage"]
        usage = openai_usage(found)
        if usage is not None:
            # OpenAI reports a chat stream's usage once, in its last chunk.
            self.usage, self.final = usage, True
        if not self.strip_usage or event.partly_relayed:
            return event  # asked for by the caller, or partly relayed already
        if usage is not None and chunk.get("choices") == []:
            return None  # the chunk that only the proxy asked for
        style = style_of(chunk, data)
        del chunk["usage"]
        return event.with_data(dumps_like(chunk, style))


def dumps_like(obj, style: dict) -> str:
    """``obj`` in ``style``; escaped to ASCII where UTF-8 cannot hold it (a lone surrogate escape)."""
    text = json.dumps(obj, **style)
    if not style["ensure_ascii"]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(obj, separators=style["separators"], ensure_ascii=True)
    return text


class ResponsesStreamMeter(StreamMeter):
    """A Responses API stream: usage and model in the final ``response`` object."""

    def event(self, event: Event) -> Event | None:
        source = event.source
        if b"usage" not in source and b"error" not in source and b"model" not in source:
            return event
        data = event.data
        if data is None or not event.complete:
            return event
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):
            return event
        if not isinstance(parsed, dict):
            return event
        kind = event.type or parsed.get("type")
        response = parsed.get("response")
        if isinstance(response, dict):
            self.model = text(response.get("model")) or self.model
            self.object_id = text(response.get("id")) or self.object_id
            if kind in RESPONSES_FINAL_EVENTS:
                usage = openai_usage(response.get("usage"))
                if usage is not None:
                    self.usage, self.final = usage, True
                self.complete = kind == "response.completed"
        if kind in ERROR_EVENT_TYPES:
            self.failed = True
        return event


class OpenAIChat(OpenAIJson):
    name = "openai_chat"


class OpenAIResponses(OpenAIJson):
    name = "openai_responses"

    def stream_meter(self, strip_usage: bool = False):
        return ResponsesStreamMeter()


OPENAI_JSON = OpenAIJson()
OPENAI_CHAT = OpenAIChat()
OPENAI_RESPONSES = OpenAIResponses()


def for_path(path: str) -> OpenAIJson:
    """The format of a /v1 path (after ``/v1/``)."""
    if path == "responses":
        return OPENAI_RESPONSES
    if path == "chat/completions":
        return OPENAI_CHAT
    return OPENAI_JSON
