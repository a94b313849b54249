"""Server-Sent Events, parsed as the WHATWG HTML standard says (section 9.2.6, "Interpreting an event stream").

One parser for every stream the proxy relays, meters or caches: an event is
the lines up to a blank line; a line ends in CRLF, LF or a lone CR; a line
starting with ":" is a comment; ``field: value`` loses one space after the
colon; ``data`` lines join with LF. OpenAI's chat chunks (``data:`` only),
its Responses events (``event:`` then ``data:``) and Anthropic's Messages
events (the same) all read the same way here, whatever their line endings.

Each ``Event`` keeps the bytes it arrived as, so that a relayed stream is
byte for byte the upstream's unless the proxy edits an event on purpose; its
fields are parsed only when asked for.
"""

from __future__ import annotations

import re

# Line terminators are CRLF, LF or a lone CR. Two in a row, a blank line, always
# show one of these pairs: LF LF, LF CR (a CRLF's LF, then CR or CRLF) or CR CR;
# a CR LF alone is one terminator.
_BLANK_LINE_PAIRS = (b"\n\n", b"\n\r", b"\r\r")
# In decoded text (str.splitlines would also split on VT, FF, U+2028, ...).
_TEXT_LINE_END = re.compile(r"\r\n|\r|\n")


def _terminator_end(buffer: bytes, at: int) -> int:
    """Where the line terminator starting at ``at`` ends (a CR followed by LF is one)."""
    return at + 2 if buffer[at] == 13 and buffer[at + 1 : at + 2] == b"\n" else at + 1


def _event_end(buffer: bytes, start: int, crs: bool) -> int:
    """Index just past the first blank line at or after ``start`` (-1 if none yet)."""
    if not crs:  # the usual stream, LF only: one search
        found = buffer.find(b"\n\n", start)
        return found + 2 if found >= 0 else -1
    first = -1
    for pair in _BLANK_LINE_PAIRS:
        found = buffer.find(pair, start)
        if found >= 0 and (first < 0 or found < first):
            first = found
    return -1 if first < 0 else _terminator_end(buffer, first + 1)


class Event:
    """One event: ``raw`` (the bytes to relay, its blank line included) and its fields, parsed on first use."""

    __slots__ = ("_parsed", "_type", "_data", "_id", "_source", "raw", "complete", "ended")

    def __init__(self, raw: bytes, complete: bool = True, source: bytes | None = None):
        self.raw = raw
        # The whole event as received: ``raw`` lacks the part of an event too
        # large to hold that was relayed before it ended (``SseParser.take_pending``).
        self._source = raw if source is None else source
        # False when the fields cannot be trusted: the stream ended before the
        # event's blank line, or the event outgrew what the parser keeps.
        self.complete = complete
        # False for what a stream left when it ended before the event's blank
        # line: read for what it reports, but a browser would not dispatch it.
        self.ended = True
        self._parsed = False

    def _parse(self) -> None:
        self._parsed = True
        event_type, data, event_id = "", None, None
        for line in _TEXT_LINE_END.split(self._source.decode("utf-8", "replace")):
            if not line or line[0] == ":":
                continue
            name, colon, value = line.partition(":")
            if colon and value[:1] == " ":
                value = value[1:]
            if name == "data":
                data = value if data is None else data + "\n" + value
            elif name == "event":
                event_type = value
            elif name == "id" and "\0" not in value:
                event_id = value
        self._type, self._data, self._id = event_type, data, event_id

    @property
    def source(self) -> bytes:
        """The whole event as received (``raw`` may lack a part already relayed)."""
        return self._source

    @property
    def partly_relayed(self) -> bool:
        """Whether the beginning of this event went out before it ended (it can no longer be edited)."""
        return self.raw is not self._source

    @property
    def type(self) -> str:
        """The ``event:`` field ("" when absent; a browser would dispatch it as "message")."""
        if not self._parsed:
            self._parse()
        return self._type

    @property
    def data(self) -> str | None:
        """The ``data:`` lines joined with LF; None when the event has none (a comment, a blank line)."""
        if not self._parsed:
            self._parse()
        return self._data

    @property
    def id(self) -> str | None:
        if not self._parsed:
            self._parse()
        return self._id

    def with_data(self, data: str) -> Event:
        """This event with its data replaced: its other lines (``event``, ``id``, comments) kept in
        their order, the new data where the first data line was; lines end in LF."""
        lines, placed = [], False
        new = ["data: " + line for line in data.split("\n")]
        for line in _TEXT_LINE_END.split(self._source.decode("utf-8", "replace")):
            if not line:
                continue
            if line.partition(":")[0] == "data":
                if not placed:
                    lines.extend(new)
                    placed = True
                continue
            lines.append(line)
        if not placed:
            lines.extend(new)
        return Event(("\n".join(lines) + "\n\n").encode("utf-8"))

    def __repr__(self) -> str:
        return "Event(%r)" % self.raw


# The most of one unfinished event the parser holds for its fields (a Responses
# API ``response.completed`` repeats the whole answer); beyond it the event is
# relayed without being read.
MAX_PARSED_EVENT = 16 * 1024 * 1024


class SseParser:
    """Cuts a byte stream into whole events as it arrives: ``feed`` returns the events that ended.

    The reads of an event not yet ended are kept as they came and joined once
    it ends (or is handed out), and only new bytes are searched for its end:
    an event read in many small pieces costs time in proportion to its size.
    """

    __slots__ = ("parts", "size", "tail", "relayed", "truncated", "keep", "crs")

    def __init__(self, keep: int = MAX_PARSED_EVENT):
        self.keep = keep
        # The reads of the event not yet ended (of a ``truncated`` one, only its last bytes).
        self.parts: list[bytes] = []
        self.size = 0
        # Its last bytes: the blank line that ends it may straddle two reads.
        self.tail = b""
        # How many of its bytes were already handed out by ``take_pending``.
        self.relayed = 0
        self.truncated = False
        # Whether the stream has used CR at all (most streams end lines in LF only).
        self.crs = False

    def feed(self, data: bytes) -> list[Event]:
        if not data:
            return []
        if not self.crs and b"\r" in data:
            self.crs = True
        fresh = not self.parts
        if fresh:
            buffer, search = data, 0
        else:
            if _event_end(self.tail + data, 0, self.crs) < 0:
                # The event goes on: keep the read, copy nothing.
                self.parts.append(data)
                self.size += len(data)
                self.tail = (self.tail + data)[-3:]
                return []
            search = self.size - len(self.tail)
            self.parts.append(data)
            buffer = b"".join(self.parts)
        events = []
        start, size = 0, len(buffer)
        while start < size:
            if buffer[start] in (10, 13) and (start or fresh):
                end = _terminator_end(buffer, start)  # a blank line where an event starts: an empty event
            else:
                end = _event_end(buffer, search if search > start else start, self.crs)
                if end < 0:
                    break
            if start == 0 and (self.relayed or self.truncated):
                event = Event(buffer[self.relayed : end], not self.truncated, buffer[:end])
                self.relayed, self.truncated = 0, False
            else:
                event = Event(buffer[start:end])
            events.append(event)
            start = end
        rest = buffer[start:] if start else buffer
        self.parts = [rest] if rest else []
        self.size = len(rest)
        self.tail = rest[-3:]
        return events

    @property
    def pending(self) -> int:
        """Bytes of the event not yet ended and not yet handed out."""
        return self.size - self.relayed

    def take_pending(self) -> bytes:
        """The part of the unfinished event not handed out yet, to relay now (an event too large to
        hold back): the event later comes out of ``feed`` with only its remaining bytes as ``raw``."""
        whole = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        part = whole[self.relayed :]
        if len(whole) > self.keep:
            # Keep only what a blank line split across reads needs; the event will not be read.
            whole = whole[-4:]
            self.truncated = True
        self.parts, self.size, self.relayed, self.tail = [whole], len(whole), len(whole), whole[-3:]
        return part

    def finish(self) -> list[Event]:
        """What is left when the stream ends: an event cut off before its blank line, if any. Its
        fields are read (``complete``) when its last line ended and none of it was dropped."""
        whole = b"".join(self.parts)
        rest = whole[self.relayed :]
        lines_ended = whole[-1:] in (b"\n", b"\r")
        event = Event(rest, lines_ended and not self.truncated, whole) if rest else None
        if event is not None:
            event.ended = False
        self.parts, self.size, self.relayed, self.truncated, self.tail = [], 0, 0, False, b""
        return [event] if event is not None else []


def parse_all(data: bytes) -> list[Event]:
    """Every event of a whole stream, the unfinished last one included."""
    parser = SseParser()
    return parser.feed(data) + parser.finish()
