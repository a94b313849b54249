"""The Anthropic Messages format object (chat_gpt_proxy/formats/anthropic.py), one function at a time:
its usage, its stream meter over the fake Anthropic's own streams, its errors."""

from __future__ import annotations

import json

import pytest

from chat_gpt_proxy.formats.anthropic import ANTHROPIC_MESSAGES, anthropic_usage, error_type
from chat_gpt_proxy.formats.sse import parse_all
from chat_gpt_proxy.formats.usage import Usage

START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
    b'"role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,'
    b'"usage":{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,'
    b'"output_tokens":1}}}\n\n'
)
DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Hi"}}\n\n'
)
PING = b'event: ping\ndata: {"type": "ping"}\n\n'
MESSAGE_DELTA = (
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":42}}\n\n'
)
STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def meter_over(stream: bytes):
    meter = ANTHROPIC_MESSAGES.stream_meter()
    relayed = [meter.event(event) for event in parse_all(stream)]
    return meter, b"".join(event.raw for event in relayed)


def test_usage_counts_cache_writes_and_reads_as_input():
    found = anthropic_usage(
        {"input_tokens": 25, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000, "output_tokens": 7}
    )
    assert found == Usage(input_tokens=2125, output_tokens=7, cached_tokens=2000, cache_write_tokens=100)
    assert anthropic_usage({"input_tokens": 3, "output_tokens": 1}) == Usage(3, 1)
    assert anthropic_usage({"stop_reason": None}) is None and anthropic_usage("x") is None
    # A count left out is 0; the rest is kept.
    assert anthropic_usage({"input_tokens": 1000}) == Usage(1000, 0)
    assert anthropic_usage({"output_tokens": 1}) == Usage(0, 1)


def test_a_message_delta_that_repeats_only_the_output_keeps_the_input_it_had():
    before = Usage(input_tokens=2125, output_tokens=1, cached_tokens=2000, cache_write_tokens=100)
    assert anthropic_usage({"output_tokens": 42}, before) == Usage(2125, 42, 2000, 100)
    # Cumulative counts: each is the larger of what was reported before and now.
    assert anthropic_usage({"input_tokens": 30, "output_tokens": 9}, before) == Usage(2130, 9, 2000, 100)
    assert anthropic_usage({"input_tokens": 0, "output_tokens": 500}, before) == Usage(2125, 500, 2000, 100)
    assert anthropic_usage({"cache_read_input_tokens": 0, "output_tokens": 0}, before) == before


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"])
def test_the_meter_reads_a_stream_and_relays_it_unchanged(line_end):
    stream = (START + PING + DELTA * 3 + MESSAGE_DELTA + STOP).replace(b"\n", line_end)
    meter, relayed = meter_over(stream)
    assert relayed == stream
    assert meter.model == "claude-sonnet-4-5-20250929"
    assert meter.usage == Usage(2125, 42, 2000, 100) and meter.final
    assert meter.complete and not meter.failed and not meter.foreign


def test_a_stream_cut_before_message_delta_has_only_its_opening_usage():
    meter, _ = meter_over(START + DELTA)
    assert meter.usage == Usage(2125, 1, 2000, 100) and not meter.final and not meter.complete


def start_with(usage: dict) -> bytes:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": []}
    data = {"type": "message_start", "message": {**message, "usage": usage}}
    return b"event: message_start\ndata: " + json.dumps(data).encode() + b"\n\n"


def delta_with(usage: dict | None) -> bytes:
    data = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}
    if usage is not None:
        data["usage"] = usage
    return b"event: message_delta\ndata: " + json.dumps(data).encode() + b"\n\n"


def test_a_delta_that_writes_the_input_as_0_does_not_take_it_back():
    meter, _ = meter_over(start_with({"input_tokens": 1000, "output_tokens": 1}) + DELTA +
                          delta_with({"input_tokens": 0, "output_tokens": 500}) + STOP)  # fmt: skip
    assert meter.usage == Usage(1000, 500) and meter.final and not meter.ended_uncounted


def test_an_opening_usage_without_output_tokens_keeps_its_input():
    meter, _ = meter_over(start_with({"input_tokens": 1000}) + DELTA + delta_with({"output_tokens": 500}) + STOP)
    assert meter.usage == Usage(1000, 500) and meter.final


def test_a_delta_without_usage_leaves_a_partial_count_to_estimate_from():
    meter, _ = meter_over(start_with({"input_tokens": 1000, "output_tokens": 3}) + DELTA + delta_with(None) + STOP)
    assert meter.usage == Usage(1000, 3) and not meter.final and meter.complete and meter.ended_uncounted


def test_a_stream_that_never_reports_its_input_is_not_final():
    meter, _ = meter_over(start_with({"output_tokens": 1}) + DELTA + delta_with({"output_tokens": 50}) + STOP)
    assert meter.usage == Usage(0, 50) and not meter.final and meter.ended_uncounted


def test_an_error_event_fails_the_stream():
    error = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    meter, _ = meter_over(START + DELTA + error)
    assert meter.failed and not meter.complete


@pytest.mark.parametrize(
    "first",
    [
        b'data: {"object":"chat.completion.chunk","choices":[{"delta":{"content":"Hi"}}]}\n\n',
        b'event: response.created\ndata: {"type":"response.created"}\n\n',
    ],
)
def test_a_stream_in_another_format_is_foreign(first):
    meter, _ = meter_over(first + b"data: [DONE]\n\n")
    assert meter.foreign


def test_a_ping_or_a_comment_before_message_start_is_not_foreign():
    meter, _ = meter_over(b": hello\n\n" + PING + START)
    assert not meter.foreign and meter.model


def test_a_ping_or_a_comment_decides_nothing_before_an_openai_chunk():
    meter = ANTHROPIC_MESSAGES.stream_meter()
    for event in parse_all(b": hello\n\n" + PING):
        meter.event(event)
    assert not meter.settled and not meter.foreign
    meter, _ = meter_over(b": hello\n\n" + PING + b'data: {"object":"chat.completion.chunk","choices":[]}\n\n')
    assert meter.settled and meter.foreign


@pytest.mark.parametrize(
    "status, kind",
    [(400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
     (404, "not_found_error"), (405, "invalid_request_error"), (413, "request_too_large"),
     (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"), (503, "api_error"),
     (504, "timeout_error"), (529, "overloaded_error")],
)  # fmt: skip
def test_each_status_has_anthropics_error_type(status, kind):
    assert error_type(status) == kind
    assert ANTHROPIC_MESSAGES.error_body(status, "why") == {"type": "error", "error": {"type": kind, "message": "why"}}


def test_a_failure_mid_stream_is_an_error_event():
    event = ANTHROPIC_MESSAGES.error_event(502, {"message": "the upstream connection failed", "type": "x"})
    (parsed,) = parse_all(event)
    assert parsed.type == "error"
    assert json.loads(parsed.data) == {
        "type": "error",
        "error": {"type": "api_error", "message": "the upstream connection failed"},
    }


def test_what_is_anthropics_shape():
    own = ANTHROPIC_MESSAGES
    assert own.is_own_answer("messages", {"type": "message", "content": []})
    assert not own.is_own_answer("messages", {"object": "chat.completion", "choices": []})
    assert own.is_own_answer("messages/count_tokens", {"input_tokens": 3})
    assert own.is_own_answer("models", {"data": [], "has_more": False})
    assert own.is_own_answer("models/claude-x", {"type": "model", "id": "claude-x"})
    assert own.is_own_error({"type": "error", "error": {"type": "api_error", "message": "m"}})
    assert not own.is_own_error({"error": {"message": "m", "type": "server_error"}})
    assert not own.is_own_error(None)
