"""What every API format object shares (chat_gpt_proxy/formats/openai.py, anthropic.py): reading a JSON
answer's top-level ``usage`` and ``model``, whole or as it streams by, and the stream meter's interface."""

from __future__ import annotations

import ijson

from .sse import Event
from .usage import Usage


def text(value) -> str | None:
    """A non-empty string as an answer writes a name (a model, an id), else None."""
    return value if isinstance(value, str) and value else None


class JsonUsageReader:
    """Reads a JSON answer's top-level ``usage`` and ``model`` as its bytes arrive, holding neither
    the answer nor anything but those two (ijson's C parser): an answer of any size is charged what it reports."""

    def __init__(self):
        self.events = ijson.sendable_list()
        self.parser = ijson.parse_coro(self.events)
        self.builder = None
        self.found: dict = {}
        self.broken = False

    def feed(self, chunk: bytes) -> None:
        if self.broken:
            return
        try:
            self.parser.send(chunk)
        except ijson.JSONError:
            self.broken = True
            return
        self._take()

    def _take(self) -> None:
        for prefix, kind, value in self.events:
            if self.builder is not None:
                self.builder.event(kind, value)
                if prefix == "usage" and kind in ("end_map", "end_array"):
                    self.found["usage"], self.builder = self.builder.value, None
            elif prefix == "usage":
                if kind in ("start_map", "start_array"):
                    self.builder = ijson.ObjectBuilder()
                    self.builder.event(kind, value)
                else:
                    self.found["usage"] = value
            elif prefix == "model" and kind == "string":
                self.found["model"] = value
        del self.events[:]

    def close(self) -> dict:
        """``{"usage": …, "model": …}`` as far as found (empty for a body that is not JSON)."""
        if not self.broken:
            try:
                self.parser.close()
                self._take()
            except ijson.JSONError:
                self.broken = True
        return {} if self.broken else self.found


class StreamMeter:
    """What one stream reported, recorded as its events pass: ``usage``, ``model`` (the one that ran),
    ``complete`` (it ended as a finished answer) and ``failed`` (an error event came)."""

    usage: Usage | None = None
    # Whether ``usage`` is the answer's final count (not a running or partial one).
    final = False
    model: str | None = None
    # The id of what the stream answers (a Responses API response), if it says.
    object_id: str | None = None
    complete = False
    failed = False
    # Whether the stream is not in the format at all (set from its first event, before any is relayed).
    foreign = False
    # Whether ``foreign`` is decided: until then the relay holds what came (comments, pings).
    settled = True

    def event(self, event: Event) -> Event | None:
        """The event to relay in place of ``event`` (itself, an edited copy, or None to drop it)."""
        raise NotImplementedError


class ApiFormat:
    """One API format: the relay, the cache and the meter call it and stay format-free.

    A format names the upstream kinds that speak it (``kinds``, UPSTREAMS_FILE), reads its ``usage``
    objects (``parse_usage``) and gives a meter for its streams (``stream_meter``); it words its
    errors (``error_body``, ``error_event``). Answers keep their ``usage`` and ``model`` at the top.
    """

    name = ""
    kinds: tuple[str, ...] = ()

    @staticmethod
    def parse_usage(found) -> Usage | None:
        raise NotImplementedError

    def usage_from_answer(self, answer) -> Usage | None:
        return self.parse_usage(answer.get("usage")) if isinstance(answer, dict) else None

    def model_from_answer(self, answer) -> str | None:
        return text(answer.get("model")) if isinstance(answer, dict) else None

    def answer_reader(self) -> JsonUsageReader:
        return JsonUsageReader()
