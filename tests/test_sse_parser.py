"""The one SSE parser every stream path shares (chat_gpt_proxy/formats/sse.py), against the WHATWG rules.

A reference parser written straight from the standard's steps reads whole
streams; ours reads the same bytes cut anywhere, and must find the same
events, lose no byte, and leave nothing out of ``raw``.
"""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from chat_gpt_proxy.formats.sse import SseParser, parse_all


def reference_events(stream: bytes) -> list[tuple[str, str, str | None]]:
    """WHATWG HTML 9.2.6, "Interpreting an event stream": the events a browser would dispatch."""
    text = stream.decode("utf-8", "replace")
    lines = re.split(r"\r\n|\r|\n", text)
    # The last piece has no terminator: an unfinished line, never dispatched.
    lines = lines[:-1]
    events, event_type, data, last_id = [], "", "", None
    for line in lines:
        if line == "":
            if data:
                events.append((event_type, data[:-1], last_id))
            event_type, data = "", ""
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            event_type = value
        elif name == "data":
            data += value + "\n"
        elif name == "id" and "\0" not in value:
            last_id = value
    return events


def ours(stream: bytes, cuts: list[int]) -> tuple[list, bytes]:
    parser = SseParser()
    found = []
    start = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        found += parser.feed(stream[start:cut])
        start = cut
    found += parser.finish()
    raw = b"".join(event.raw for event in found)
    return found, raw


line_text = st.text(alphabet=st.sampled_from('ab :é\0{}"data event id'), max_size=12)
field_line = st.one_of(
    st.builds(lambda v: "data:" + v, line_text),
    st.builds(lambda v: "data: " + v, line_text),
    st.builds(lambda v: "event: " + v, line_text),
    st.builds(lambda v: "id: " + v, line_text),
    st.builds(lambda v: ": " + v, line_text),
    line_text,
    st.just(""),
)
terminator = st.sampled_from(["\n", "\r\n", "\r"])
streams = st.lists(st.tuples(field_line, terminator), max_size=30).map(
    lambda pairs: "".join(line + end for line, end in pairs).encode()
)


@settings(max_examples=400, deadline=None)
@given(streams, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_events_are_those_of_the_standard_wherever_the_stream_is_cut(stream, cuts):
    cuts = [c for c in cuts if c <= len(stream)]
    found, raw = ours(stream, cuts)
    assert raw == stream  # nothing lost, nothing added
    dispatched = [(e.type, e.data, e.id) for e in found if e.ended and e.complete and e.data is not None]
    expected = reference_events(stream)
    # Ours reads each event's id on its own; the standard's last event id carries over.
    assert [(t, d) for t, d, _ in dispatched] == [(t, d) for t, d, _ in expected]


def test_openai_and_responses_framings():
    stream = (
        b'data: {"a":1}\n\n'
        b"event: response.completed\r\ndata: {\r\ndata: }\r\n\r\n"
        b": keep-alive\n\n"
        b"id: 7\rdata: x\r\r"
        b"data: [DONE]\n\n"
    )
    events = parse_all(stream)
    assert [(e.type, e.data, e.id) for e in events] == [
        ("", '{"a":1}', None),
        ("response.completed", "{\n}", None),
        ("", None, None),
        ("", "x", "7"),
        ("", "[DONE]", None),
    ]


def test_an_event_too_large_to_hold_is_handed_out_in_parts_and_still_read_whole():
    parser = SseParser()
    assert parser.feed(b"event: big\ndata: " + b"x" * 100) == []
    first = parser.take_pending()
    (event,) = parser.feed(b"y\n\ndata: next\n\n")[:1]
    assert first + event.raw == b"event: big\ndata: " + b"x" * 100 + b"y\n\n"
    assert event.partly_relayed and event.complete and event.data == "x" * 100 + "y"


def test_beyond_what_the_parser_keeps_an_event_is_relayed_unread():
    parser = SseParser(keep=50)
    parser.feed(b"data: " + b"x" * 100)
    part = parser.take_pending()
    event, after = parser.feed(b"tail\n\ndata: ok\n\n")
    assert part + event.raw == b"data: " + b"x" * 100 + b"tail\n\n"
    assert not event.complete
    assert after.complete and after.data == "ok" and not after.partly_relayed


def test_a_stream_cut_mid_event_leaves_an_incomplete_event():
    parser = SseParser()
    assert [e.data for e in parser.feed(b"data: 1\n\ndata: 2")] == ["1"]
    (rest,) = parser.finish()
    assert rest.raw == b"data: 2" and not rest.complete and not rest.ended
    # An event whose last line ended, but not with a blank line: read, though never dispatched.
    parser.feed(b"data: 3\n")
    (rest,) = parser.finish()
    assert rest.complete and not rest.ended and rest.data == "3"


def test_an_event_read_a_byte_at_a_time_costs_time_in_proportion_to_its_size():
    """Each read of an unfinished event is kept, not joined to what came before (no quadratic copying)."""
    parser = SseParser()
    event = b"data: " + b"x" * 200_000 + b"\n\n"
    found = []
    for i in range(0, len(event), 7):
        found += parser.feed(event[i : i + 7])
        # Kept as reads until the event ends: never one growing buffer.
        assert found or len(parser.parts) == i // 7 + 1
    assert [e.raw for e in found] == [event]
