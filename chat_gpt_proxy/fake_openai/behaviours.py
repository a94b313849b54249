"""What the fake does with a request (``Behaviour``, ``RealtimeBehaviour``) and what it saw (``Received``,
``RecentRequests``, ``RealtimeRecord``)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
from urllib.parse import parse_qs


@dataclasses.dataclass
class Behaviour:
    """What the fake does with one request.

    kind: ``echo`` (the default answer), ``error`` (``status`` + OpenAI error
    object), ``hang`` (never answers), ``garbage`` (``status`` with ``body``
    as ``content_type``), ``drop`` (after ``after`` chunks, close the
    connection; ``reset`` sends a TCP RST instead of a FIN), ``stall``
    (after ``after`` chunks, go silent forever), ``reset_headers`` (half a
    header block, then RST), ``reset_body`` (headers promising a JSON body,
    half of it, then RST), ``raw`` (the bytes of ``raw``, Latin-1 text so
    that any byte fits in JSON, written as they are, then the connection
    closed: any status line, 1xx answers before the final one, headers
    and framing, even invalid ones; also answers ``ANY /v1/raw/<anything>``).
    ``chunks`` replaces the streamed pieces of text, ``delay`` is the pause
    before each chunk after the first, ``first_delay`` the pause before the
    headers. ``usage`` replaces the counts the answer reports (merged into
    its usage object: ``{"completion_tokens": 5009}``), ``answer_model`` the
    model it says ran (a dated snapshot, say).
    """

    kind: str = "echo"
    status: int = 200
    chunks: list[str] | None = None
    delay: float = 0.0
    first_delay: float = 0.0
    after: int = 0
    reset: bool = False
    message: str = "Fake error"
    error_type: str = "invalid_request_error"
    error_code: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: str = "<html><body>Bad gateway</body></html>"
    content_type: str = "text/html"
    raw: str = ""
    usage: dict | None = None
    answer_model: str | None = None


class Headers(dict):
    """A request's headers, named as Tornado spells them (``Api-Key``), looked up whatever the case:
    ``"authorization" in headers`` is true when an ``Authorization`` header arrived."""

    @staticmethod
    def spelled(name: str) -> str:
        return "-".join(word.capitalize() for word in name.split("-"))

    def __init__(self, headers=()):
        super().__init__((self.spelled(name), value) for name, value in dict(headers).items())

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(self.spelled(name))

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and super().__contains__(self.spelled(name))

    def get(self, name: str, default=None):
        return super().get(self.spelled(name), default)


@dataclasses.dataclass
class Received:
    method: str
    path: str
    headers: Headers
    # The first MAX_KEPT_BODY bytes of the body; ``size`` is its real length.
    body: bytes
    size: int = 0
    # The query string as it arrived (without the ``?``): Azure's ``api-version`` is there.
    query: str = ""

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def query_arguments(self) -> dict[str, list[str]]:
        """The query's arguments, decoded: ``{"api-version": ["2024-10-21"]}``."""
        return parse_qs(self.query, keep_blank_values=True)


class RecentRequests:
    """What the fake received, bounded (the demo ran for days on it).

    Only the last ``keep`` requests are kept, each body cut at ``max_body``
    bytes. It reads like the list of every request received so far: ``len``
    is the total count and indexes count from the first request, so a test
    can note ``len()`` and slice from there; an index of a request no longer
    kept raises IndexError rather than answering with another one.
    """

    def __init__(self, keep: int, max_body: int):
        self.keep = keep
        self.max_body = max_body
        self._kept: collections.deque[Received] = collections.deque(maxlen=keep)
        self._total = 0

    def add(self, method: str, path: str, headers: dict[str, str], body: bytes, query: str = "") -> None:
        self._kept.append(Received(method, path, Headers(headers), body[: self.max_body], len(body), query))
        self._total += 1

    @property
    def dropped(self) -> int:
        return self._total - len(self._kept)

    def __len__(self) -> int:
        return self._total

    def __iter__(self):
        return iter(list(self._kept))

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self._total)
            return [self[i] for i in range(start, stop, step)]
        if index < 0:
            index += self._total
        if not 0 <= index < self._total:
            raise IndexError("no request %d" % index)
        if index < self.dropped:
            raise IndexError("request %d is no longer kept (only the last %d are)" % (index, self.keep))
        return self._kept[index - self.dropped]

    def __eq__(self, other) -> bool:
        if isinstance(other, RecentRequests):
            other = list(other) if other.dropped == 0 else None
        return self.dropped == 0 and isinstance(other, list) and list(self._kept) == other

    def __repr__(self) -> str:
        return "RecentRequests(total=%d, kept=%r)" % (self._total, list(self._kept))


# How much of what it received the fake keeps: enough for any test, a few
# MiB at most in a demo that runs for days.
KEPT_REQUESTS = 200

MAX_KEPT_BODY = 64 * 1024


@dataclasses.dataclass
class RealtimeBehaviour:
    """What the fake's realtime WebSocket does with one session.

    kind: ``normal`` (``session.created``, then answers each ``response.create``
    with ``response.created``, ``response.output_text.delta`` per piece of
    ``chunks``, ``audio_deltas`` ``response.output_audio.delta`` events and
    ``response.done`` with usage; echoes binary messages), ``refuse`` (answers
    the handshake with ``status`` and an OpenAI error object), ``close`` (after
    ``after`` received messages, closes with ``code`` and ``reason``), ``drop``
    (after ``after`` received messages, closes TCP without a close frame),
    ``stall`` (after ``after`` received messages, stops reading, and so
    answers no ping), ``flood`` (sends ``size``-byte text messages as fast as
    the connection takes them), ``hang`` (answers the handshake only after
    ``delay`` seconds).
    ``delay`` is the pause before each delta.
    """

    kind: str = "normal"
    status: int = 401
    message: str = "Fake refusal"
    error_code: str | None = None
    code: int = 1000
    reason: str = ""
    after: int = 0
    delay: float = 0.0
    chunks: list[str] | None = None
    audio_deltas: int = 2
    size: int = 64 * 1024


@dataclasses.dataclass
class RealtimeRecord:
    """One realtime session as the fake saw it."""

    path: str
    query: str
    headers: Headers
    subprotocols: list[str]
    received: list[tuple[float, str | bytes]] = dataclasses.field(default_factory=list)
    sent_messages: int = 0
    sent_bytes: int = 0
    close_code: int | None = None
    close_reason: str | None = None
    closed_at: float | None = None
    closed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def wait_closed(self, timeout: float) -> float:
        """Wait until the session's connection closed; returns when (monotonic)."""
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.closed_at
