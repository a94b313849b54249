"""POST /chat_complete with stream=true: a live SSE relay.

The same live-stream, abort and backpressure properties through each real
egress proxy are in test_egress_proxies.py, kept apart on purpose: their
bounds differ (two more socket buffers sit at the proxy), and the abort and
backpressure tests here are the reference the performance work must leave
unchanged.
"""

import asyncio
import json
import time

import pytest

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.conftest import open_raw

STREAM = {"stream": True}


def contents(events):
    out = []
    for event in events:
        if event == "[DONE]" or event.startswith(":"):
            continue
        for choice in json.loads(event).get("choices", []):
            out.append(choice["delta"].get("content") or "")
    return "".join(out)


@pytest.mark.gen_test
async def test_stream_headers_and_exact_events(proxy, fake_openai):
    streamed = await proxy.stream({"prompt": "Раз два три", "generate_params": STREAM})
    response = streamed.response
    assert response.code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in response.headers
    assert response.headers["x-request-id"].startswith("req_fake_")
    events = streamed.events()
    assert events[-1] == "[DONE]"
    assert contents(events) == "Echo: Раз два три "
    first = json.loads(events[0])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert fake_openai.received[0].json["stream"] is True
    assert fake_openai.received[0].headers["Accept"] == "text/event-stream"


@pytest.mark.gen_test(timeout=20)
async def test_chunks_arrive_as_the_upstream_sends_them(proxy, fake_openai):
    gap = 0.4
    fake_openai.push(Behaviour(chunks=["one ", "two ", "three ", "four"], delay=gap))
    started = time.monotonic()
    streamed = await proxy.stream({"prompt": "x", "generate_params": STREAM})
    arrivals = []
    for at, data in streamed.chunks:
        for piece in data.split(b"\n\n"):
            if b'"content":"' in piece and b'"content":""' not in piece:
                arrivals.append(at)
    assert len(arrivals) == 4, streamed.chunks
    # The first token is relayed at once, not after the whole answer.
    assert arrivals[0] - started < gap
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert all(g > gap / 2 for g in gaps), gaps
    assert contents(streamed.events()) == "one two three four"


@pytest.mark.gen_test
async def test_upstream_that_ignores_stream_gets_a_json_answer(proxy, fake_openai):
    answer = {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "not streamed"}}],
    }
    fake_openai.push(Behaviour(kind="garbage", body=json.dumps(answer), content_type="application/json"))
    streamed = await proxy.stream({"prompt": "x", "generate_params": STREAM})
    assert streamed.response.code == 200
    assert streamed.response.headers["Content-Type"] == "application/json; charset=utf-8"
    body = json.loads(streamed.body)
    assert body["text"] == "not streamed" and body["status"] == "ok"


@pytest.mark.gen_test
async def test_include_usage_chunk_is_relayed(proxy, fake_openai):
    streamed = await proxy.stream(
        {"prompt": "a b", "generate_params": {"stream": True, "stream_options": {"include_usage": True}}}
    )
    last = json.loads(streamed.events()[-2])
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0


@pytest.mark.gen_test(timeout=20)
async def test_client_disconnect_aborts_upstream_within_a_second(proxy, fake_openai):
    fake_openai.push(Behaviour(chunks=["tok "] * 50, delay=0.2))
    head, reader, writer = await open_raw(proxy.base_url, {"prompt": "x", "generate_params": STREAM})
    assert head.startswith("HTTP/1.1 200")
    await reader.readuntil(b'"content":"tok "')
    closed_at = time.monotonic()
    writer.close()
    aborted_at = await fake_openai.wait_abort(timeout=5)
    assert aborted_at - closed_at < 1.0
    assert fake_openai.completed == 0
    # The proxy is fine afterwards.
    response, _ = await proxy.chat({"prompt": "after"})
    assert response.code == 200


@pytest.mark.parametrize("reset", [False, True])
@pytest.mark.gen_test
async def test_upstream_dying_mid_stream_ends_with_error_event_and_done(proxy, fake_openai, reset):
    fake_openai.push(Behaviour(chunks=["a ", "b ", "c "], after=2, kind="drop", reset=reset))
    streamed = await proxy.stream({"prompt": "x", "generate_params": STREAM})
    assert streamed.response.code == 200
    events = streamed.events()
    assert contents(events[:-2]) == "a b ", streamed.body
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "upstream_broken" and error["message"] and error["type"] == "upstream_error"


@pytest.mark.settings(stream_idle_timeout=0.5)
@pytest.mark.gen_test
async def test_silent_upstream_mid_stream_times_out_with_error_event(proxy, fake_openai):
    fake_openai.push(Behaviour(chunks=["a ", "b "], after=1, kind="stall"))
    started = time.monotonic()
    streamed = await proxy.stream({"prompt": "x", "generate_params": STREAM})
    events = streamed.events()
    assert json.loads(events[-2])["error"]["code"] == "upstream_idle" and events[-1] == "[DONE]"
    assert 0.4 < time.monotonic() - started < 5
    await fake_openai.wait_abort(timeout=2)


@pytest.mark.settings(stream_keepalive=0.2)
@pytest.mark.gen_test
async def test_keepalive_comments_during_silence(proxy, fake_openai):
    fake_openai.push(Behaviour(chunks=["a ", "b "], delay=0.9))
    streamed = await proxy.stream({"prompt": "x", "generate_params": STREAM})
    body = streamed.body.decode()
    assert body.count(": keep-alive\n\n") >= 2
    # Comments sit between whole events, never inside one.
    events = [e for e in body.split("\n\n") if e]
    assert all(e == ": keep-alive" or e.startswith("data: ") for e in events), events
    assert contents(streamed.events()) == "a b "


@pytest.mark.gen_test(timeout=60)
async def test_slow_reader_backpressure_bounds_what_is_read_upstream(proxy, fake_openai):
    piece = "x" * 4000
    count = 10_000  # ~42 MB of events
    fake_openai.push(Behaviour(chunks=[piece] * count))
    head, reader, writer = await open_raw(proxy.base_url, {"prompt": "x", "generate_params": STREAM})
    assert head.startswith("HTTP/1.1 200")
    await asyncio.sleep(2.0)  # the client reads nothing meanwhile
    sent_while_stalled = fake_openai.bytes_sent
    assert sent_while_stalled < 25_000_000, sent_while_stalled
    received = 0
    tokens = 0
    deadline = time.monotonic() + 40
    tail = b""
    while time.monotonic() < deadline:
        data = await reader.read(1 << 20)
        if not data:
            break
        received += len(data)
        tokens += (tail + data).count(piece.encode()) - tail.count(piece.encode())
        tail = data[-8000:]
        if b"data: [DONE]" in tail:
            break
    writer.close()
    assert tokens == count
    assert fake_openai.completed == 1
