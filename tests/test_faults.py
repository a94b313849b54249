"""Fault injection: every upstream and client fault ends one request cleanly, and only that one.

Run alone with ``pytest -m faults``. Each fault is checked on both sides
(what the client got, what the upstream saw) and in the log (one warning
line with the request id and the kind of fault, never a traceback).
"""

import asyncio
import json
import logging
import os
import re
import time

import pytest

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.conftest import AUTH, open_raw

pytestmark = pytest.mark.faults
STREAM = {"stream": True}


def fault_lines(caplog):
    """Warning-or-worse records of the proxy; asserts none carries a traceback."""
    records = [r for r in caplog.records if r.name.startswith("chat_gpt_proxy") and r.levelno >= logging.WARNING]
    for record in records:
        assert record.exc_info is None and "Traceback" not in record.getMessage(), record.getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "no ERROR for an expected fault"
    return [r.getMessage() for r in records]


def assert_one_fault_line(caplog, kind):
    lines = fault_lines(caplog)
    assert len(lines) == 1, lines
    assert "request_id=" in lines[0] and ("kind=%s" % kind) in lines[0], lines[0]


@pytest.mark.parametrize(
    "behaviour,status,code,kind",
    [
        (Behaviour(kind="reset_headers"), 502, "upstream_broken", "broken"),
        (Behaviour(kind="reset_body"), 502, "upstream_broken", "broken"),
        (Behaviour(kind="drop", reset=False), 502, "upstream_broken", "broken"),
        (
            Behaviour(kind="garbage", body="{not json", content_type="application/json"),
            502,
            "upstream_invalid_json",
            "invalid_json",
        ),
        (Behaviour(kind="garbage", status=200), 502, "upstream_invalid_json", "invalid_json"),
        (
            Behaviour(kind="garbage", body='{"a": NaN}', content_type="application/json"),
            502,
            "upstream_invalid_json",
            "invalid_json",
        ),
    ],
)
@pytest.mark.gen_test
async def test_broken_upstream_answers(proxy, fake_openai, caplog, behaviour, status, code, kind):
    fake_openai.push(behaviour)
    response, body = await proxy.chat({"prompt": "x"})
    assert response.code == status and body["error"]["code"] == code
    assert_one_fault_line(caplog, kind)
    response, body = await proxy.chat({"prompt": "after the fault"})
    assert response.code == 200 and body["text"] == "Echo: after the fault"


# Without retries (tests/test_egress_retries.py covers them): one attempt, one line.
@pytest.mark.settings(openai_base_url="http://127.0.0.1:9/v1", upstream_retries=0)
@pytest.mark.gen_test
async def test_upstream_refuses_connections(proxy, caplog):
    response, body = await proxy.chat({"prompt": "x"})
    assert response.code == 502 and body["error"]["code"] == "upstream_connect"
    assert_one_fault_line(caplog, "connect")


@pytest.mark.settings(request_timeout=0.5)
@pytest.mark.gen_test
async def test_upstream_hangs_before_headers(proxy, fake_openai, caplog):
    fake_openai.push(Behaviour(kind="hang"))
    started = time.monotonic()
    response, body = await proxy.chat({"prompt": "x"})
    assert response.code == 504 and 0.4 < time.monotonic() - started < 5
    await fake_openai.wait_abort(timeout=3)
    assert_one_fault_line(caplog, "timeout")


@pytest.mark.parametrize("status", [429, 500, 503])
@pytest.mark.parametrize("retry_after", [None, "17"])
@pytest.mark.gen_test
async def test_upstream_error_statuses_with_and_without_retry_after(proxy, fake_openai, status, retry_after):
    headers = {"Retry-After": retry_after} if retry_after else {}
    fake_openai.push(Behaviour(kind="error", status=status, message="upstream %d" % status, headers=headers))
    response, body = await proxy.chat({"prompt": "x"})
    assert response.code == status and body["text"] == "upstream %d" % status
    assert response.headers.get("Retry-After") == retry_after


@pytest.mark.parametrize(
    "behaviour,kind",
    [
        (Behaviour(kind="drop", chunks=["a ", "b ", "c "], after=2), "broken"),
        (Behaviour(kind="drop", chunks=["a ", "b ", "c "], after=2, reset=True), "broken"),
    ],
)
@pytest.mark.gen_test
async def test_stream_faults_end_with_error_event(proxy, fake_openai, caplog, behaviour, kind):
    fake_openai.push(behaviour)
    streamed = await proxy.stream({"prompt": "x", "generate_params": STREAM})
    events = streamed.events()
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "upstream_" + kind
    assert_one_fault_line(caplog, kind)


@pytest.mark.settings(stream_idle_timeout=0.5)
@pytest.mark.gen_test
async def test_stream_hangs_mid_way(proxy, fake_openai, caplog):
    fake_openai.push(Behaviour(kind="stall", chunks=["a ", "b "], after=1))
    streamed = await proxy.stream({"prompt": "x", "generate_params": STREAM})
    assert json.loads(streamed.events()[-2])["error"]["code"] == "upstream_idle"
    await fake_openai.wait_abort(timeout=3)
    assert_one_fault_line(caplog, "idle")


@pytest.mark.gen_test(timeout=20)
async def test_client_leaving_before_the_answer_is_one_warning(proxy, fake_openai, caplog):
    fake_openai.push(Behaviour(kind="hang"))
    host, port = proxy.base_url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"prompt": "x"}'
    head = (
        "POST /chat_complete HTTP/1.1\r\nHost: x\r\naccess-token: %s\r\nopenai-token: %s\r\nContent-Length: %d\r\n\r\n"
    )
    writer.write((head % (AUTH["access-token"], AUTH["openai-token"], len(body))).encode() + body)
    while not fake_openai.received:
        await asyncio.sleep(0.01)
    writer.close()  # before any answer
    await fake_openai.wait_abort(timeout=3)
    await asyncio.sleep(0.1)
    assert_one_fault_line(caplog, "client_closed")


@pytest.mark.gen_test(timeout=20)
async def test_client_disconnect_mid_stream_is_one_warning(proxy, fake_openai, caplog):
    fake_openai.push(Behaviour(chunks=["tok "] * 50, delay=0.1))
    head, reader, writer = await open_raw(proxy.base_url, {"prompt": "x", "generate_params": STREAM})
    await reader.readuntil(b'"content":"tok "')
    writer.close()
    await fake_openai.wait_abort(timeout=3)
    await asyncio.sleep(0.1)
    assert_one_fault_line(caplog, "client_closed")


@pytest.mark.settings(body_timeout=0.5)
@pytest.mark.gen_test
async def test_slow_body_is_cut_off(proxy, fake_openai):
    host, port = proxy.base_url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        "POST /chat_complete HTTP/1.1\r\nHost: x\r\naccess-token: %s\r\nopenai-token: %s\r\nContent-Length: 100\r\n\r\n"
    )
    writer.write((head % (AUTH["access-token"], AUTH["openai-token"])).encode() + b'{"prompt": ')
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 5)  # the server closes the connection
    assert time.monotonic() - started < 4
    assert data == b"" or b" 400 " in data.split(b"\r\n")[0]
    writer.close()
    assert fake_openai.received == []
    response, _ = await proxy.chat({"prompt": "next"})
    assert response.code == 200


@pytest.mark.settings(body_timeout=0.5)
@pytest.mark.gen_test
async def test_a_whole_body_once_does_not_lift_the_body_timeout_for_the_next_request(proxy, fake_openai):
    """A body that arrives with its headers is read without a timer (a profiled saving); the next request
    on the same kept-alive connection is timed again."""
    host, port = proxy.base_url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = "POST /chat_complete HTTP/1.1\r\nHost: x\r\naccess-token: %s\r\nopenai-token: %s\r\n"
    head += "Content-Length: %d\r\n\r\n"
    body = b'{"prompt": "whole"}'
    writer.write((head % (AUTH["access-token"], AUTH["openai-token"], len(body))).encode() + body)
    status = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
    assert b" 200 " in status
    length = int(re.search(rb"(?i)content-length: (\d+)", await reader.readuntil(b"\r\n\r\n")).group(1))
    await reader.readexactly(length)
    writer.write((head % (AUTH["access-token"], AUTH["openai-token"], 100)).encode() + b'{"prompt": ')
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 5)
    assert time.monotonic() - started < 4
    assert data == b"" or b" 400 " in data.split(b"\r\n")[0]
    writer.close()
    assert len(fake_openai.received) == 1


@pytest.mark.settings(client_idle_timeout=0.5)
@pytest.mark.gen_test
async def test_slow_headers_are_cut_off(proxy):
    host, port = proxy.base_url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /chat_complete HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert time.monotonic() - started < 4
    writer.close()


@pytest.mark.gen_test
async def test_oversized_headers_close_only_that_connection(proxy, fake_openai):
    host, port = proxy.base_url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /chat_complete HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    response, _ = await proxy.chat({"prompt": "next"})
    assert response.code == 200


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.gen_test(timeout=30)
async def test_client_that_stops_reading_keeps_memory_bounded(proxy, fake_openai):
    fake_openai.push(Behaviour(chunks=["y" * 4000] * 15_000))  # ~63 MB of events
    before = rss_bytes()
    head, reader, writer = await open_raw(proxy.base_url, {"prompt": "x", "generate_params": STREAM})
    await asyncio.sleep(2.0)
    grown = rss_bytes() - before
    # Proxy, fake upstream and client share this process: all of them together
    # hold less than half of the answer.
    assert grown < 30_000_000, grown
    assert fake_openai.bytes_sent < 30_000_000
    writer.close()
    await fake_openai.wait_abort(timeout=3)


@pytest.mark.settings(client_stall_timeout=1.0)
@pytest.mark.gen_test(timeout=30)
async def test_client_that_stops_reading_and_never_closes_is_dropped(proxy, fake_openai, caplog):
    fake_openai.push(Behaviour(chunks=["z" * 4000] * 15_000))
    head, reader, writer = await open_raw(proxy.base_url, {"prompt": "x", "generate_params": STREAM})
    started = time.monotonic()
    aborted_at = await fake_openai.wait_abort(timeout=10)
    assert 0.9 < aborted_at - started < 6
    await asyncio.sleep(0.1)
    writer.close()
    assert_one_fault_line(caplog, "client_stall")


@pytest.mark.gen_test(timeout=60)
async def test_faults_do_not_touch_other_clients(proxy, fake_openai):
    fake_openai.by_model.update(
        {
            "fault-reset": Behaviour(kind="drop", chunks=["a "] * 5, after=2, reset=True, delay=0.05),
            "fault-drop": Behaviour(kind="drop", chunks=["a "] * 5, after=3, delay=0.05),
            "fault-headers": Behaviour(kind="reset_headers"),
            "fault-body": Behaviour(kind="reset_body"),
            "fault-garbage": Behaviour(kind="garbage"),
            "fault-429": Behaviour(kind="error", status=429, headers={"Retry-After": "1"}),
            "fault-500": Behaviour(kind="error", status=500),
        }
    )
    healthy_stream = Behaviour(chunks=["h%d " % i for i in range(10)], delay=0.05)
    fake_openai.by_model["healthy-stream"] = healthy_stream

    async def healthy_json(i):
        response, body = await proxy.chat({"prompt": "ok %d" % i})
        assert response.code == 200 and body["text"] == "Echo: ok %d" % i

    async def healthy_sse(i):
        streamed = await proxy.stream(
            {"prompt": "s", "generate_params": {"stream": True, "model_name": "healthy-stream"}}
        )
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in streamed.events()[:-1])
        assert text == "".join(healthy_stream.chunks)

    async def fault(model, stream):
        body = {"prompt": "f", "generate_params": {"model_name": model, "stream": stream}}
        if stream:
            await proxy.stream(body)
        else:
            await proxy.chat(body)

    tasks = [healthy_json(i) for i in range(15)] + [healthy_sse(i) for i in range(15)]
    for round_ in range(2):
        for model in fake_openai.by_model:
            if model.startswith("fault-"):
                tasks.append(fault(model, stream=bool(round_)))
    raw = []
    for _ in range(3):  # clients that leave mid-stream
        raw.append(
            await open_raw(
                proxy.base_url, {"prompt": "x", "generate_params": {"stream": True, "model_name": "healthy-stream"}}
            )
        )
    for _, _, writer in raw:
        writer.close()
    await asyncio.gather(*tasks)
    response, _ = await proxy.chat({"prompt": "last"})
    assert response.code == 200


@pytest.mark.gen_test(timeout=60)
async def test_clients_that_reset_mid_answer_never_leave_an_upstream_transfer_running(proxy, fake_openai, app):
    """A client that resets after a flush had succeeded was
    seen only by the stream check after it, the relay loop returned without aborting, and the
    transfer stayed paused upstream for good; enough of them filled MAX_CONCURRENT_UPSTREAM."""
    import socket
    import struct

    host, port = proxy.base_url.rsplit("//", 1)[1].split(":")
    head = "GET /v1/files/file-abc/content?size=60000000 HTTP/1.1\r\nHost: x\r\naccess-token: %s\r\n"
    head += "Authorization: Bearer %s\r\nConnection: close\r\n\r\n"
    request = (head % (AUTH["access-token"], AUTH["openai-token"])).encode()
    clients = 0

    async def read_some_then_reset(target: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        got = 0
        while got < target:
            data = await reader.read(65536)
            if not data:
                break
            got += len(data)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    for round_ in range(12):
        targets = [300_000 + 250_000 * ((round_ * 4 + i) % 11) for i in range(4)]
        clients += len(targets)
        await asyncio.gather(*(read_some_then_reset(t) for t in targets))
    deadline = time.monotonic() + 10
    while (len(fake_openai.aborts) < clients or app.pool.handlers) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert (len(fake_openai.aborts), len(app.pool.handlers)) == (clients, 0)
