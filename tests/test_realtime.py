"""/v1/realtime: the Realtime API WebSocket relayed to the fake upstream.

Clients: the official openai SDK's realtime client (sync and async), and a raw
``websockets`` client for binary frames, close codes and oversized messages;
tests/test_realtime_browser.py drives Chromium.
"""

import asyncio
import base64
import contextlib
import io
import json
import os
import time

import openai
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chat_gpt_proxy.fake_openai.behaviours import RealtimeBehaviour
from server import drain
from tests.conftest import ACCESS_TOKEN, OPENAI_KEY
from tests.test_readme import localize, snippet

HEADERS = {"access-token": ACCESS_TOKEN, "Authorization": "Bearer " + OPENAI_KEY}


async def until(condition, timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.fixture(autouse=True)
def _sessions_end(proxy, app, io_loop):
    """Every session a test opened has ended on both sides before the servers stop."""
    yield
    pool = app.pool

    async def ended():
        return await until(lambda: not pool.handlers, 5)

    assert io_loop.run_sync(ended), "a realtime session outlived its test"


def ws_url(base_url: str, query: str = "?model=gpt-realtime") -> str:
    return "ws" + base_url[len("http") :] + "/v1/realtime" + query


def connect(base_url, query="?model=gpt-realtime", headers=HEADERS, **kwargs):
    return websockets.connect(ws_url(base_url, query), additional_headers=headers, open_timeout=10, **kwargs)


async def refusal(base_url, **kwargs):
    """Open a session that must be refused; returns (status, parsed body, headers)."""
    with pytest.raises(InvalidStatus) as info:
        await connect(base_url, **kwargs)
    response = info.value.response
    return response.status_code, json.loads(bytes(response.body)), response.headers


def user_message(text: str) -> dict:
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
    }


def sdk(base_url, cls=openai.AsyncOpenAI):
    return cls(base_url=base_url + "/v1", api_key=OPENAI_KEY, default_headers={"access-token": ACCESS_TOKEN})


EXPECTED_TYPES = [
    "response.created",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_audio.delta",
    "response.output_audio.delta",
    "response.done",
]


def check_incremental(arrivals: list[float], gap: float) -> None:
    """Deltas the fake sent ``gap`` s apart arrived apart, not all at once at the end."""
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert min(gaps) > gap / 2, gaps


@pytest.mark.gen_test(timeout=20)
async def test_async_sdk_session_events_in_order_and_live(proxy, fake_openai, base_url):
    fake_openai.push_realtime(RealtimeBehaviour(delay=0.2))
    client = sdk(base_url)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        first = await connection.recv()
        assert first.type == "session.created" and first.session.model == "gpt-realtime"
        await connection.send(user_message("Привет, realtime"))
        await connection.send({"type": "response.create"})
        events, arrivals = [], []
        async for event in connection:
            events.append(event)
            arrivals.append(time.monotonic())
            if event.type == "response.done":
                break
        seen = await fake_openai.wait_realtime_session()
        closed_by_client = time.monotonic()
    assert [e.type for e in events] == EXPECTED_TYPES
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Echo: Привет, realtime "
    assert events[-1].response.usage.output_tokens == 5
    check_incremental(arrivals[1:-1], 0.2)
    # The upstream saw the client's close at once, with its code.
    closed_at = await seen.wait_closed(timeout=1)
    assert closed_at - closed_by_client < 1 and seen.close_code == 1000
    assert seen.query == "model=gpt-realtime"
    assert seen.headers["Authorization"] == "Bearer " + OPENAI_KEY
    names = {name.lower() for name in seen.headers}
    assert "access-token" not in names and "openai-beta" not in names
    assert [json.loads(m)["type"] for _, m in seen.received] == ["conversation.item.create", "response.create"]
    await client.close()


@pytest.mark.gen_test(timeout=20)
async def test_sync_sdk_session(proxy, fake_openai, base_url):
    def run():
        with sdk(base_url, openai.OpenAI) as client, client.realtime.connect(model="gpt-realtime") as connection:
            types = [connection.recv().type]
            connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            types.append(connection.recv().type)
            connection.send(user_message("hi"))
            connection.response.create()
            for event in connection:
                types.append(event.type)
                if event.type == "response.done":
                    return types, event.response.usage.total_tokens

    types, total_tokens = await proxy.in_thread(run)
    assert types == ["session.created", "session.updated", *EXPECTED_TYPES[:2], *EXPECTED_TYPES[3:]]
    assert total_tokens == 7 + 4
    seen = await fake_openai.wait_realtime_session()
    await seen.wait_closed(timeout=1)


@pytest.mark.gen_test(timeout=20)
async def test_text_and_binary_both_ways_unchanged(proxy, fake_openai, base_url):
    text = json.dumps({"type": "custom", "text": "Ünïcödé ✓ \u0000 \\n"}, ensure_ascii=False)
    blob = bytes(range(256)) * 4096  # 1 MiB, every byte value
    big_text = json.dumps(
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(os.urandom(3 << 20)).decode()}
    )
    async with connect(base_url) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(text)
        await ws.send(blob)
        assert await ws.recv() == blob  # the fake echoes binary messages
        await ws.send(big_text)
        await ws.send(b"")
        assert await ws.recv() == b""
    seen = await fake_openai.wait_realtime_session()
    await seen.wait_closed(timeout=2)
    assert [m for _, m in seen.received] == [text, blob, big_text, b""]


@pytest.mark.gen_test(timeout=20)
async def test_client_close_code_and_reason_reach_the_upstream_within_a_second(proxy, fake_openai, base_url):
    async with connect(base_url) as ws:
        await ws.recv()
        seen = await fake_openai.wait_realtime_session()
        closing = time.monotonic()
        await ws.close(4001, "user hung up")
    closed_at = await seen.wait_closed(timeout=1)
    assert closed_at - closing < 1
    assert (seen.close_code, seen.close_reason) == (4001, "user hung up")


@pytest.mark.gen_test(timeout=20)
async def test_upstream_close_code_and_reason_reach_the_client(proxy, fake_openai, base_url):
    fake_openai.push_realtime(RealtimeBehaviour(kind="close", code=4002, reason="session expired", after=1))
    async with connect(base_url) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "response.create"}))
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 1)
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4002, "session expired")


@pytest.mark.gen_test(timeout=20)
async def test_upstream_lost_without_close_frame_is_1011_at_the_client(proxy, fake_openai, base_url):
    fake_openai.push_realtime(RealtimeBehaviour(kind="drop", after=1))
    async with connect(base_url) as ws:
        await ws.recv()
        await ws.send("{}")
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 1)
    # 1006 may not be sent (RFC 6455 section 7.4.1): the proxy says 1011.
    assert info.value.rcvd.code == 1011


@pytest.mark.gen_test(timeout=20)
async def test_client_lost_without_close_frame_is_1011_upstream(proxy, fake_openai, base_url):
    ws = await connect(base_url)
    await ws.recv()
    seen = await fake_openai.wait_realtime_session()
    ws.transport.abort()  # TCP closed, no close frame
    await seen.wait_closed(timeout=1)
    assert seen.close_code == 1011


async def raw_upgrade(base_url: str, query: str = "?model=gpt-realtime"):
    """A WebSocket handshake by hand, then a client that neither reads nor answers pings."""
    host, port = base_url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(os.urandom(16)).decode()
    head = [
        "GET /v1/realtime%s HTTP/1.1" % query,
        "Host: %s:%s" % (host, port),
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: " + key,
        "Sec-WebSocket-Version: 13",
        *("%s: %s" % item for item in HEADERS.items()),
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    status = await reader.readuntil(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 101"), status
    return reader, writer


@pytest.mark.gen_test(timeout=20)
async def test_close_frame_without_code_is_1000_upstream(proxy, fake_openai, base_url):
    reader, writer = await raw_upgrade(base_url)
    try:
        seen = await fake_openai.wait_realtime_session()
        writer.write(b"\x88\x80" + os.urandom(4))  # a masked close frame, no code (1005 at the proxy)
        await seen.wait_closed(timeout=1)
    finally:
        writer.close()
    assert seen.close_code == 1000


@pytest.mark.settings(ws_ping_interval=0.3)
@pytest.mark.gen_test(timeout=20)
async def test_vanished_client_detected_by_ping_closes_the_upstream(proxy, fake_openai, base_url):
    reader, writer = await raw_upgrade(base_url)
    try:
        seen = await fake_openai.wait_realtime_session()
        started = time.monotonic()
        # Ping after 0.3 s, no pong by 0.6 s: the upstream is closed soon after.
        await seen.wait_closed(timeout=3)
        assert seen.close_code == 1011
        assert seen.closed_at - started < 2.5
    finally:
        writer.close()


@pytest.mark.settings(ws_max_message_bytes=64 * 1024)
@pytest.mark.gen_test(timeout=20)
async def test_oversized_client_message_closes_1009(proxy, fake_openai, base_url):
    async with connect(base_url) as ws:
        await ws.recv()
        await ws.send("x" * (64 * 1024))  # at the limit: relayed
        await ws.send("x" * (64 * 1024 + 1))
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 2)
    assert info.value.rcvd.code == 1009
    seen = await fake_openai.wait_realtime_session()
    await seen.wait_closed(timeout=1)
    assert seen.close_code == 1009
    assert [len(m) for _, m in seen.received] == [64 * 1024]


@pytest.mark.settings(ws_max_message_bytes=64 * 1024)
@pytest.mark.gen_test(timeout=20)
async def test_oversized_upstream_message_closes_1009(proxy, fake_openai, base_url):
    fake_openai.push_realtime(RealtimeBehaviour(kind="flood", size=100 * 1024))
    async with connect(base_url) as ws:
        await ws.recv()
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 2)
    assert info.value.rcvd.code == 1009


@pytest.mark.settings(client_stall_timeout=2)
@pytest.mark.gen_test(timeout=30)
async def test_client_that_stops_reading_holds_the_upstream_back_and_is_dropped(proxy, fake_openai, base_url, app):
    fake_openai.push_realtime(RealtimeBehaviour(kind="flood", size=64 * 1024))
    reader, writer = await raw_upgrade(base_url)
    try:
        seen = await fake_openai.wait_realtime_session()
        await asyncio.sleep(1)
        sent_at_1s = seen.sent_bytes
        await asyncio.sleep(0.8)
        sent_at_2s = seen.sent_bytes
        # Backpressure: once the socket buffers on the way are full, the fake
        # can send nothing more; without it, it would send hundreds of MB.
        assert sent_at_2s < 64 * 1024 * 1024, sent_at_2s
        assert sent_at_2s - sent_at_1s <= 2 * 1024 * 1024, (sent_at_1s, sent_at_2s)
        # After CLIENT_STALL_TIMEOUT the client is dropped and the upstream closed.
        await seen.wait_closed(timeout=3)
        assert seen.close_code == 1011 and seen.close_reason == "client stalled"
    finally:
        writer.close()
    assert await until(lambda: not app.pool.handlers, 2)
    print("flood: the fake sent %d bytes in 1 s, %d in 1.8 s" % (sent_at_1s, sent_at_2s))


@pytest.mark.settings(client_stall_timeout=1)
@pytest.mark.gen_test(timeout=30)
async def test_upstream_that_stops_reading_is_dropped(proxy, fake_openai, base_url):
    fake_openai.push_realtime(RealtimeBehaviour(kind="stall"))
    chunk = "y" * (1 << 20)
    async with connect(base_url) as ws:
        await ws.recv()
        with pytest.raises(ConnectionClosed) as info:
            for _ in range(200):  # more than every socket buffer on the way holds
                await asyncio.wait_for(ws.send(chunk), 5)
            await asyncio.wait_for(ws.recv(), 5)
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1011, "upstream stalled")


@pytest.mark.settings(stream_idle_timeout=0.5)
@pytest.mark.gen_test(timeout=20)
async def test_idle_session_closed_on_both_sides(proxy, fake_openai, base_url):
    async with connect(base_url) as ws:
        await ws.recv()
        await asyncio.sleep(0.3)
        await ws.send("{}")  # activity postpones the timeout
        sent = time.monotonic()
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 3)
        assert time.monotonic() - sent >= 0.45
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "idle timeout")
    seen = await fake_openai.wait_realtime_session()
    await seen.wait_closed(timeout=1)
    assert seen.close_code == 1001


@pytest.mark.settings(allowed_models=("gpt-realtime",))
@pytest.mark.gen_test(timeout=20)
async def test_refusals_before_the_upgrade(proxy, fake_openai, base_url):
    status, body, _ = await refusal(base_url, headers={"access-token": "wrong", "Authorization": "Bearer sk-x"})
    assert status == 403 and body["error"]["code"] == "invalid_access_token"
    status, body, _ = await refusal(base_url, headers={"access-token": ACCESS_TOKEN})
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    status, body, _ = await refusal(base_url, query="?model=gpt-4o-realtime-expensive")
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    # Under an allow-list the model must be named once, plainly: the upstream would choose otherwise.
    for query in ("", "?Model=gpt-4o-realtime-expensive", "?model=gpt-realtime&model=gpt-4o-realtime-expensive"):
        status, body, _ = await refusal(base_url, query=query)
        assert status == 400 and body["error"]["code"] == "model_undetermined", query
    assert fake_openai.realtime_sessions == []
    # The upstream's refusal: same status, same body, its request id.
    for code in (401, 403, 404, 429):
        fake_openai.push_realtime(RealtimeBehaviour(kind="refuse", status=code, message="no (%d)" % code))
        status, body, headers = await refusal(base_url)
        assert status == code and body["error"]["message"] == "no (%d)" % code
        assert headers["x-request-id"].startswith("req_fake_")
    async with connect(base_url) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"


@pytest.mark.gen_test(timeout=20)
async def test_upgrade_without_connection_upgrade_is_refused_before_the_upstream(proxy, fake_openai):
    """RFC 6455 section 4.1: a handshake needs "Connection: Upgrade"; without it, a JSON 400 and no upstream session."""
    headers = {
        **HEADERS,
        "Upgrade": "websocket",
        "Connection": "keep-alive",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }
    response = await proxy.request("/v1/realtime?model=gpt-realtime", method="GET", headers=headers, auth=False)
    assert response.code == 400 and json.loads(response.body)["error"]["code"] == "websocket_required"
    assert fake_openai.realtime_sessions == []


@pytest.mark.settings(connect_timeout=0.5)
@pytest.mark.gen_test(timeout=20)
async def test_slow_upstream_handshake_is_504(proxy, fake_openai, base_url):
    fake_openai.push_realtime(RealtimeBehaviour(kind="hang", delay=2))
    status, body, _ = await refusal(base_url)
    assert status == 504 and body["error"]["code"] == "upstream_timeout"


@pytest.mark.gen_test(timeout=20)
async def test_client_leaving_during_the_upstream_handshake_closes_the_upstream(
    proxy, fake_openai, base_url, app, caplog
):
    """The handshake upstream is abandoned at once: its slot is free, and the line says 499, not 504."""
    fake_openai.push_realtime(RealtimeBehaviour(kind="hang", delay=1.5))
    host, port = base_url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = "GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    head += "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n" % base64.b64encode(os.urandom(16)).decode()
    head += "".join("%s: %s\r\n" % item for item in HEADERS.items()) + "\r\n"
    writer.write(head.encode())
    await asyncio.sleep(0.1)
    writer.close()  # before the upstream answered
    left = time.monotonic()
    assert await until(lambda: not app.pool.handlers, 1)
    assert time.monotonic() - left < 1  # not when the upstream's handshake would have ended
    line = next(r.getMessage() for r in caplog.records if r.name == "chat_gpt_proxy.access")
    assert "status=499" in line and "end=client_closed" in line, line
    assert not any("upstream fault" in r.getMessage() for r in caplog.records)
    await asyncio.sleep(1.7)  # past the upstream's delay: its connection was gone, no session opened
    assert fake_openai.realtime_sessions == []


@pytest.mark.gen_test(timeout=20)
async def test_unreachable_upstream_is_502(proxy, fake_openai, base_url, app):
    await fake_openai.stop()
    status, body, _ = await refusal(base_url)
    assert status == 502 and body["error"]["code"] == "upstream_connect"
    message = body["error"]["message"]
    assert message.startswith("could not connect to the upstream 127.0.0.1:%d: " % fake_openai.port), message
    assert "the server on this machine is not answering" in message and "make demo" not in message
    assert app.pool.handlers == set()


@pytest.mark.settings(ws_ping_interval=0.3)
@pytest.mark.gen_test(timeout=20)
async def test_upstream_that_answers_no_ping_ends_the_session(proxy, fake_openai, base_url):
    fake_openai.push_realtime(RealtimeBehaviour(kind="stall"))
    async with connect(base_url) as ws:  # this client answers the proxy's pings
        await ws.recv()
        await ws.send("{}")
        with pytest.raises(ConnectionClosed) as info:
            # Ping after 0.3 s, no pong by 0.6 s: the client hears of it at once.
            await asyncio.wait_for(ws.recv(), 3)
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1011, "keepalive ping timeout")


@pytest.mark.gen_test(timeout=20)
async def test_readme_python_snippet(proxy, fake_openai, base_url):
    language, code = snippet("python-realtime")
    assert language == "python"
    out = io.StringIO()

    def run():
        with contextlib.redirect_stdout(out):
            exec(compile(localize(code, base_url), "python-realtime", "exec"), {})

    await proxy.in_thread(run)
    assert out.getvalue().strip() == "Echo: Привет!"


@pytest.mark.gen_test(timeout=20)
async def test_plain_get_is_a_json_error(proxy):
    response = await proxy.request("/v1/realtime?model=gpt-realtime", method="GET")
    assert response.code == 400
    assert json.loads(response.body)["error"]["code"] == "websocket_required"


@pytest.mark.settings(rate_limit_per_token=1)
@pytest.mark.gen_test(timeout=20)
async def test_rate_limit_refuses_the_upgrade(proxy, fake_openai, base_url):
    async with connect(base_url) as ws:
        await ws.recv()
    status, body, headers = await refusal(base_url)
    assert status == 429 and body["error"]["code"] == "proxy_rate_limited" and int(headers["Retry-After"]) >= 1


@pytest.mark.settings(max_concurrent_upstream=1)
@pytest.mark.gen_test(timeout=20)
async def test_sessions_count_in_the_concurrency_cap(proxy, fake_openai, base_url):
    async with connect(base_url) as ws:
        await ws.recv()
        status, body, headers = await refusal(base_url)
        assert status == 503 and body["error"]["code"] == "proxy_overloaded" and headers["Retry-After"] == "1"
        # Shared with HTTP requests.
        response = await proxy.request("/v1/models", method="GET")
        assert response.code == 503
    seen = await fake_openai.wait_realtime_session()
    await seen.wait_closed(timeout=1)
    for _ in range(50):  # the slot is freed once both sides closed
        response = await proxy.request("/v1/models", method="GET")
        if response.code == 200:
            break
        await asyncio.sleep(0.05)
    assert response.code == 200


@pytest.mark.gen_test(timeout=20)
async def test_subprotocol_tokens_and_selection(proxy, fake_openai, base_url):
    protocols = ["realtime", "access-token." + ACCESS_TOKEN, "openai-insecure-api-key." + OPENAI_KEY]
    async with websockets.connect(ws_url(base_url), subprotocols=[*protocols, "openai-beta.realtime-v1"]) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(await ws.recv())["type"] == "session.created"
        assert ACCESS_TOKEN not in str(ws.response.headers) and OPENAI_KEY not in str(ws.response.headers)
    seen = await fake_openai.wait_realtime_session()
    assert seen.headers["Authorization"] == "Bearer " + OPENAI_KEY
    assert seen.subprotocols == ["realtime", "openai-beta.realtime-v1"]  # the tokens stay at the proxy
    # Not offered, not selected: the tokens alone authenticate.
    async with websockets.connect(ws_url(base_url), subprotocols=protocols[1:]) as ws:
        assert ws.subprotocol is None
        assert json.loads(await ws.recv())["type"] == "session.created"
    assert fake_openai.realtime_sessions[-1].subprotocols == []
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(ws_url(base_url), subprotocols=["realtime", "access-token.wrong", protocols[2]])
    assert info.value.response.status_code == 403
    # The key may also come in the openai-token header.
    async with connect(base_url, headers={"access-token": ACCESS_TOKEN, "openai-token": OPENAI_KEY}) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
    assert fake_openai.realtime_sessions[-1].headers["Authorization"] == "Bearer " + OPENAI_KEY


@pytest.mark.gen_test(timeout=20)
async def test_forwarded_headers_only_when_sent(proxy, fake_openai, base_url):
    extra = {"OpenAI-Organization": "org-1", "OpenAI-Project": "proj-1", "OpenAI-Beta": "realtime=v1", "X-Other": "no"}
    async with connect(base_url, headers={**HEADERS, **extra}) as ws:
        await ws.recv()
    seen = await fake_openai.wait_realtime_session()
    assert seen.headers["Openai-Organization"] == "org-1" and seen.headers["Openai-Project"] == "proj-1"
    assert seen.headers["Openai-Beta"] == "realtime=v1"
    assert "X-Other" not in seen.headers


@pytest.mark.gen_test(timeout=20)
async def test_session_metrics_and_one_access_line(proxy, fake_openai, base_url, caplog):
    async with connect(base_url) as ws:
        await ws.recv()
        await ws.send(json.dumps(user_message("count me")))
        await ws.send(json.dumps({"type": "response.create"}))
        while json.loads(await ws.recv())["type"] != "response.done":
            pass
        response = await proxy.request("/metrics", method="GET", auth=False)
        assert b"proxy_realtime_open_sessions 1.0" in response.body
        await ws.close(4000, "bye")
    seen = await fake_openai.wait_realtime_session()
    await seen.wait_closed(timeout=1)
    for _ in range(50):
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.name == "chat_gpt_proxy.access" and "status=101" in r.getMessage()
        ]
        if lines:
            break
        await asyncio.sleep(0.02)
    assert len(lines) == 1
    line = lines[0]
    for part in (
        "path=/v1/realtime",
        "model=gpt-realtime",
        "prompt_tokens=7",
        "completion_tokens=5",
        "messages_in=2",
        "messages_out=8",
        "closed_by=client",
        "close_code=4000",
    ):
        assert part in line, line
    metrics = (await proxy.request("/metrics", method="GET", auth=False)).body.decode()
    for part in (
        "proxy_realtime_open_sessions 0.0",
        'proxy_realtime_messages_total{direction="client_to_upstream"} 2.0',
        'proxy_realtime_messages_total{direction="upstream_to_client"} 8.0',
        'proxy_realtime_closes_total{by="client",code="4xxx"} 1.0',
        'proxy_requests_total{route="realtime",status="101",token="-"} 1.0',
        'proxy_tokens_total{kind="completion",model="gpt-realtime",token="-"} 5.0',
    ):
        assert part in metrics, part
    assert 'proxy_realtime_bytes_total{direction="upstream_to_client"}' in metrics


@pytest.mark.gen_test(timeout=20)
async def test_graceful_shutdown_closes_sessions_with_1001(proxy, fake_openai, base_url, app, caplog):
    async with connect(base_url) as ws:
        await ws.recv()
        started = time.monotonic()
        await drain(app, 0.3)
        assert time.monotonic() - started >= 0.3  # sessions get the grace period first
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 2)
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "server shutting down")
    seen = await fake_openai.wait_realtime_session()
    await seen.wait_closed(timeout=1)
    assert seen.close_code == 1001
    assert await until(lambda: not app.pool.handlers, 2)
    line = next(r.getMessage() for r in caplog.records if "status=101" in r.getMessage())
    assert "closed_by=proxy close_code=1001 proxy_reason=shutdown" in line


@pytest.mark.gen_test(timeout=20)
async def test_a_second_signal_still_ends_sessions_with_their_line(proxy, fake_openai, base_url, app, caplog):
    """The second signal ends the drain at once, yet each session ends properly (1001, its line, its slot)."""
    now = asyncio.Event()
    now.set()
    async with connect(base_url) as ws:
        await ws.recv()
        started = time.monotonic()
        await drain(app, 60, now)
        assert time.monotonic() - started < 1.5
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 2)
    assert info.value.rcvd.code == 1001
    assert not app.pool.handlers
    line = next(r.getMessage() for r in caplog.records if "status=101" in r.getMessage())
    assert "proxy_reason=shutdown" in line


@pytest.mark.gen_test(timeout=20)
async def test_a_session_opened_while_draining_gets_a_valid_handshake(proxy, fake_openai, base_url, app, http_server):
    """During SHUTDOWN_DELAY the instance still serves: an upgrade then must not get "Connection: close"."""
    app.draining = True
    http_server.conn_params.no_keep_alive = True  # what the shutdown sets (server.py)
    async with connect(base_url) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "response.create"}))
        assert json.loads(await ws.recv())["type"] == "response.created"


@pytest.mark.gen_test(timeout=20)
async def test_realtime_http_routes_pass_through(proxy, fake_openai, base_url):
    client = sdk(base_url)
    secret = await client.realtime.client_secrets.create(session={"type": "realtime", "model": "gpt-realtime"})
    assert secret.value.startswith("ek_fake_")
    answer = await client.realtime.calls.create(sdp="v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n")
    assert answer.content.startswith(b"v=0\r\no=- fake-answer rtc_")
    assert b"a=offer:v=0" in answer.content
    answer = await client.realtime.calls.create(sdp="v=0\r\n", session={"type": "realtime", "model": "gpt-realtime"})
    assert answer.response.status_code == 201
    paths = [(r.path, r.headers["Content-Type"].split(";")[0]) for r in fake_openai.received]
    assert paths == [
        ("/v1/realtime/client_secrets", "application/json"),
        ("/v1/realtime/calls", "application/sdp"),
        ("/v1/realtime/calls", "multipart/form-data"),
    ]
    await client.close()


@pytest.mark.settings(allowed_models=("gpt-realtime", "gpt-4o-mini-transcribe"))
@pytest.mark.parametrize(
    "event, code",
    [
        ({"type": "session.update", "session": {"type": "realtime", "model": "gpt-4o-realtime-expensive"}}, None),
        (
            {
                "type": "session.update",
                "session": {"type": "realtime", "audio": {"input": {"transcription": {"model": "whisper-1"}}}},
            },
            None,
        ),
        ({"type": "response.create", "response": {"model": "gpt-4o-realtime-expensive"}}, None),
        ('{"type": "session.update", "session": {"mod\\u0065l": "gpt-4o-realtime-expensive"}}', None),
        ('{"type": "session.update", "session": {"model": "gpt-realtime", "model": "x"}}', "model_undetermined"),
        ('{"type": "session.update", "session": {"model": "gpt-realtime"}, "n": NaN}', "model_undetermined"),
        (b'{"type": "session.update", "session": {"model": "gpt-4o-realtime-expensive"}}', "model_undetermined"),
        # What a lenient parser might still read: fail closed.
        (
            '{"type": "session.update", "session": {"model": "gpt-4o"}, "x": %s}' % ("[" * 1500 + "]" * 1500),
            "model_undetermined",
        ),
        ('{"type": "session.update", "session": {"model": "gpt-4o", "n": 1%s}}' % ("0" * 5000), "model_undetermined"),
        ('{"type": "session.update", "session": {"model": "gpt-4o"}} x', "model_undetermined"),
        ('{"type": "session.update", "session": {"model": "gpt-4o",}}', "model_undetermined"),
        ('{"type": "session.update", "session": {"MODEL": "gpt-4o"}}', None),
        (b'\xff{"type": "session.update", "session": {"model": "gpt-4o"}}', "model_undetermined"),
        (
            '{"type": "conversation.item.create", "model": "gpt-realtime", "x": "%s"}' % ("a" * 1100000),
            "model_undetermined",
        ),
        ('{"type": "x", "\\u006dodel": "gpt-realtime", "x": "%s"}' % ("a" * 1100000), "model_undetermined"),
    ],
)
@pytest.mark.gen_test(timeout=20)
async def test_a_client_event_naming_a_model_outside_the_allow_list_ends_the_session(
    proxy, fake_openai, base_url, event, code
):
    """The ?model= check alone let session.update switch models (or name a transcription model)."""
    allowed = {"type": "session.update", "session": {"type": "realtime", "model": "gpt-realtime"}}
    async with connect(base_url) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        # Allowed models, and events that name none (an audio append), are relayed.
        await ws.send(json.dumps(allowed))
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA" * 1000}))
        await ws.send(event if isinstance(event, str | bytes) else json.dumps(event))
        error = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if error["type"] == "session.updated":  # the fake's answer to the allowed update
            error = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert error["type"] == "error" and error["error"]["code"] == (code or "model_not_allowed")
        assert "allowed" in error["error"]["message"] or "ALLOWED_MODELS" in error["error"]["message"]
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
    assert info.value.rcvd.code == 1008
    seen = await fake_openai.wait_realtime_session()
    await seen.wait_closed(timeout=5)
    relayed = [message for _, message in seen.received]
    assert [json.loads(m)["type"] for m in relayed] == ["session.update", "input_audio_buffer.append"]
    assert json.loads(relayed[0]) == allowed


@pytest.mark.settings(allowed_models=("gpt-realtime",))
@pytest.mark.gen_test(timeout=20)
async def test_events_that_only_mention_a_model_are_relayed_under_an_allow_list(proxy, fake_openai, base_url):
    """Large audio whose base64 holds "MoDeL" by chance, long text about models, Russian text
    escaped as \\u (as json.dumps writes it), metadata naming a model: none is refused."""
    events = [
        {"type": "input_audio_buffer.append", "audio": "QUFB" * 300000 + "MoDeL" + "QUFB" * 10},
        {"type": "conversation.item.create", "item": {"content": [{"type": "input_text", "text": "model " * 300000}]}},
        {"type": "conversation.item.create", "item": {"content": [{"type": "input_text", "text": "Привет, модель"}]}},
        {"type": "response.create", "response": {"metadata": {"model": "tesla"}}},
    ]
    async with connect(base_url) as ws:
        await ws.recv()
        for event in events:
            await ws.send(json.dumps(event))
        seen = await fake_openai.wait_realtime_session()
        assert await until(lambda: len(seen.received) == len(events), 10)
    assert [json.loads(m)["type"] for _, m in seen.received] == [e["type"] for e in events]


@pytest.mark.settings(allowed_models=("gpt-realtime",))
@pytest.mark.gen_test(timeout=20)
async def test_the_handshake_counts_model_brackets_as_a_model(proxy, fake_openai, base_url):
    status, body, _ = await refusal(base_url, query="?model=gpt-realtime&model%5B%5D=gpt-4o-realtime-expensive")
    assert status == 400 and body["error"]["code"] == "model_undetermined"
    assert fake_openai.realtime_sessions == []


@pytest.mark.gen_test(timeout=20)
async def test_without_an_allow_list_client_events_are_relayed_unread(proxy, fake_openai, base_url):
    event = '{"type": "session.update", "session": {"model": "a", "model": "b"}}'
    async with connect(base_url) as ws:
        await ws.recv()
        await ws.send(event)
        seen = await fake_openai.wait_realtime_session()
        assert await until(lambda: len(seen.received) == 1, 5)
    assert seen.received[0][1] == event


@pytest.mark.parametrize("status", [200, 201, 302])
@pytest.mark.gen_test(timeout=20)
async def test_an_upstream_answering_the_upgrade_without_101_is_a_502_of_ours(proxy, fake_openai, base_url, status):
    """A 200 with JSON reached the client as HTTP 200, as if the upgrade had worked."""
    fake_openai.push_realtime(RealtimeBehaviour(kind="refuse", status=status, message="not a websocket"))
    status_seen, body, _ = await refusal(base_url)
    assert status_seen == 502 and body["error"]["code"] == "upstream_broken"
    assert "instead of 101" in body["error"]["message"]
