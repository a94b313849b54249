"""SSE events larger than MAX_PENDING_EVENT are relayed in parts, with nothing of ours between the parts.

An upstream on loopback writes raw SSE bytes as scripted (one event in two
parts with a pause longer than STREAM_KEEPALIVE); the client's stream is
parsed with httpx-sse, a real SSE parser.
"""

import asyncio
import dataclasses
import json

import httpx
import httpx_sse
import pytest
import tornado.httpserver
import tornado.web
from tornado.testing import bind_unused_port

from handlers.relay import MAX_PENDING_EVENT
from settings import Settings
from tests.conftest import ACCESS_TOKEN, AUTH, OPENAI_KEY

KEEPALIVE = 0.2


def chunk_event(content: str) -> bytes:
    obj = {
        "id": "chatcmpl-big",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


BIG_TEXT = "x" * (MAX_PENDING_EVENT + MAX_PENDING_EVENT // 2)
BIG_EVENT = chunk_event(BIG_TEXT)
# Cut inside the data line, past MAX_PENDING_EVENT so that the first part is relayed on its own.
CUT = MAX_PENDING_EVENT + 1000


class RawUpstream:
    """Answers every request with ``script``: bytes to write, pauses (seconds), or "drop"."""

    def __init__(self):
        self.script: list = []
        self.requests = 0

    async def start(self):
        upstream = self

        class Handler(tornado.web.RequestHandler):
            async def post(self, *_):
                upstream.requests += 1
                self.set_header("Content-Type", "text/event-stream")
                for step in upstream.script:
                    if step == "drop":
                        self.request.connection.stream.close()
                        return
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                        continue
                    self.write(step)
                    await self.flush()
                self.finish()

        self.server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/v1/(.*)", Handler)]))
        sock, port = bind_unused_port()
        self.server.add_sockets([sock])
        self.url = "http://127.0.0.1:%d/v1" % port


@pytest.fixture
def raw_upstream(io_loop):
    upstream = RawUpstream()
    io_loop.run_sync(upstream.start)
    yield upstream
    upstream.server.stop()
    io_loop.run_sync(upstream.server.close_all_connections)


@pytest.fixture
def config(raw_upstream):
    return dataclasses.replace(
        Settings(),
        access_tokens=(ACCESS_TOKEN,),
        openai_base_url=raw_upstream.url,
        port=0,
        host="127.0.0.1",
        stream_keepalive=KEEPALIVE,
    )


async def stream_through(base_url: str, path: str, body: dict, headers: dict) -> tuple[bytes, list]:
    """The raw bytes the client received, and the events an SSE parser reads from them."""
    raw = b""
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("POST", base_url + path, json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        async for data in response.aiter_raw():
            raw += data
    parsed = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=raw)
    return raw, list(httpx_sse.EventSource(parsed).iter_sse())


SURFACES = {
    "v1": ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [], "stream": True}),
    "chat_complete": ("/chat_complete", {"prompt": "x", "generate_params": {"stream": True}}),
}
HEADERS = {"v1": {"access-token": ACCESS_TOKEN, "Authorization": "Bearer " + OPENAI_KEY}, "chat_complete": AUTH}


@pytest.mark.parametrize("surface", list(SURFACES))
@pytest.mark.gen_test(timeout=30)
async def test_no_keepalive_between_the_parts_of_a_large_event(http_server, base_url, raw_upstream, surface):
    pause = KEEPALIVE * 5
    raw_upstream.script = [
        BIG_EVENT[:CUT],
        pause,
        BIG_EVENT[CUT:],
        # Silence after the event: keep-alive comments are back.
        pause,
        chunk_event("end"),
        b"data: [DONE]\n\n",
    ]
    raw, events = await stream_through(base_url, *SURFACES[surface], HEADERS[surface])
    datas = [event.data for event in events]
    assert datas[-1] == "[DONE]"
    contents = [json.loads(data)["choices"][0]["delta"]["content"] for data in datas[:-1]]
    assert contents == [BIG_TEXT, "end"]
    # Nothing but the upstream's bytes inside the event, and keep-alives only after it.
    start = raw.index(BIG_EVENT[:100])
    assert raw[start : start + len(BIG_EVENT)] == BIG_EVENT
    assert raw.count(b": keep-alive") >= 1 and raw.index(b": keep-alive") >= start + len(BIG_EVENT)


@pytest.mark.parametrize("pause", [0.0, KEEPALIVE * 3])
@pytest.mark.gen_test(timeout=30)
async def test_upstream_failing_inside_a_large_event_ends_it_before_the_error_event(
    http_server, base_url, raw_upstream, pause
):
    raw_upstream.script = [chunk_event("first"), BIG_EVENT[:CUT], pause, "drop"]
    raw, events = await stream_through(base_url, *SURFACES["v1"], HEADERS["v1"])
    datas = [event.data for event in events]
    assert json.loads(datas[0])["choices"][0]["delta"]["content"] == "first"
    # The cut event reaches the client as what it is, a truncated event, and
    # the parser is back in step for the proxy's error event and [DONE].
    assert BIG_EVENT[len(b"data: ") : CUT].decode() == datas[1]
    assert json.loads(datas[2])["error"]["code"] == "upstream_broken"
    assert datas[3:] == ["[DONE]"]
    assert b": keep-alive" not in raw


@pytest.mark.gen_test(timeout=30)
async def test_events_ending_in_lone_cr_are_relayed_as_they_arrive(http_server, base_url, raw_upstream):
    """SSE lines may end in a lone CR (WHATWG HTML, server-sent events): each event still goes out at once."""
    gap = 0.6
    events = [chunk_event("w%d" % i).replace(b"\n", b"\r") for i in range(3)]
    raw_upstream.script = [events[0], gap, events[1], gap, events[2], b"data: [DONE]\r\r"]
    arrivals: list[tuple[float, bytes]] = []
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("POST", base_url + "/v1/chat/completions", json=SURFACES["v1"][1], headers=HEADERS["v1"]) as r,
    ):
        async for data in r.aiter_raw():
            arrivals.append((asyncio.get_running_loop().time(), data))
    raw = b"".join(data for _, data in arrivals)
    assert raw.replace(b": keep-alive\n\n", b"") == b"".join(events) + b"data: [DONE]\r\r"
    # Each event arrived on its own, the gaps between them kept (generous margin).
    times = [next(t for t, data in arrivals if b'"w%d"' % i in data) for i in range(3)]
    assert times[1] - times[0] > gap * 0.5 and times[2] - times[1] > gap * 0.5
