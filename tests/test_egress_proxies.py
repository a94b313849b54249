"""Everything that works direct works through a real egress proxy.

Every test here runs against each real proxy server (tinyproxy without and
with BasicAuth, microsocks as socks5 without and as socks5h with
user/password) in front of the fake upstream over plain HTTP and over HTTPS
with a certificate from a throwaway CA given in UPSTREAM_CA_FILE. Each test
also checks that the traffic really went through the proxy server.
The direct-route versions of these tests are in test_streaming.py.
"""

import asyncio
import dataclasses
import json
import time
import uuid

import pytest

from chat_gpt_proxy.fake_openai.app import FakeOpenAI
from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.conftest import file_upload, open_raw
from tests.egress_servers import MicroSocks, TinyProxy, make_tls_files, tls_fake

STREAM = {"stream": True}
PROXIES = ["http", "http-auth", "socks5", "socks5h-auth"]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_tls_files(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(params=PROXIES)
def egress_server(request, tmp_path):
    kind = request.param
    if kind.startswith("http"):
        server = TinyProxy(str(tmp_path), auth=kind.endswith("auth"))
    else:
        server = MicroSocks(str(tmp_path), auth=kind.endswith("auth"))
    server.scheme = kind.split("-")[0]
    yield server
    server.stop()


@pytest.fixture(params=["http", "https"])
def fake_openai(request, io_loop, tls_files):
    if request.param == "https":
        fake = tls_fake(tls_files)
    else:
        fake = FakeOpenAI()
        fake.start()
    yield fake
    io_loop.run_sync(fake.stop)


@pytest.fixture
def config(config, egress_server, tls_files):
    return dataclasses.replace(config, upstream_proxy=egress_server.proxy(), upstream_ca_file=tls_files["ca.pem"])


def content_arrivals(streamed):
    arrivals = []
    for at, data in streamed.chunks:
        for piece in data.split(b"\n\n"):
            if b'"content":"' in piece and b'"content":""' not in piece:
                arrivals.append(at)
    return arrivals


@pytest.mark.gen_test(timeout=30)
async def test_json_and_live_stream(proxy, fake_openai, egress_server):
    response, body = await proxy.chat({"prompt": "Привет"})
    assert response.code == 200 and body["text"] == "Echo: Привет"
    assert fake_openai.received[0].headers["Authorization"].startswith("Bearer sk-")
    assert egress_server.connections() == 1

    gap = 0.3
    fake_openai.push(Behaviour(chunks=["one ", "two ", "three ", "four"], delay=gap))
    started = time.monotonic()
    streamed = await proxy.stream({"prompt": "x", "generate_params": STREAM})
    arrivals = content_arrivals(streamed)
    assert len(arrivals) == 4, streamed.chunks
    assert arrivals[0] - started < gap
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert all(g > gap / 2 for g in gaps), gaps


@pytest.mark.gen_test(timeout=30)
async def test_v1_multipart_upload_and_large_download(proxy, fake_openai, egress_server):
    boundary = uuid.uuid4().hex
    payload = b'{"a": 1}\n' * 1000
    body = file_upload(boundary, "data.jsonl", "application/jsonl", payload)
    response = await proxy.request(
        "/v1/files",
        body=body,
        headers={"Content-Type": "multipart/form-data; boundary=" + boundary, "Authorization": "Bearer sk-x"},
    )
    uploaded = json.loads(response.body)
    assert response.code == 200 and uploaded["bytes"] == len(payload) and uploaded["purpose"] == "batch"
    size = 12 * 1024 * 1024 + 7
    response = await proxy.request("/v1/files/file-abc/content?size=%d" % size, method="GET")
    assert response.code == 200 and len(response.body) == size
    assert egress_server.connections() >= 1


@pytest.mark.gen_test(timeout=60)
async def test_keep_alive_through_the_proxy(proxy, fake_openai, egress_server):
    """Steady state: at most one new connection to the proxy per 100 requests, JSON and SSE alike."""
    response, _ = await proxy.chat({"prompt": "warm-up"})
    assert response.code == 200
    for kind in ("json", "sse"):
        before = egress_server.connections()
        for i in range(100):
            if kind == "json":
                response, body = await proxy.chat({"prompt": "n%d" % i})
                assert response.code == 200 and body["text"] == "Echo: n%d" % i
            else:
                streamed = await proxy.stream({"prompt": "n%d" % i, "generate_params": STREAM})
                assert streamed.response.code == 200 and streamed.events()[-1] == "[DONE]"
        new = egress_server.connections() - before
        assert new <= 1, "%d new connections to the proxy for 100 %s requests" % (new, kind)
    assert fake_openai.connections <= 3


@pytest.mark.gen_test(timeout=20)
async def test_client_leaving_aborts_the_upstream_within_a_second(proxy, fake_openai, egress_server):
    fake_openai.push(Behaviour(chunks=["tok "] * 50, delay=0.2))
    head, reader, writer = await open_raw(proxy.base_url, {"prompt": "x", "generate_params": STREAM})
    assert head.startswith("HTTP/1.1 200")
    await reader.readuntil(b'"content":"tok "')
    closed_at = time.monotonic()
    writer.close()
    aborted_at = await fake_openai.wait_abort(timeout=5)
    assert aborted_at - closed_at < 1.0
    assert fake_openai.completed == 0
    response, _ = await proxy.chat({"prompt": "after"})
    assert response.code == 200


@pytest.mark.settings(stream_idle_timeout=0.5)
@pytest.mark.gen_test(timeout=20)
async def test_idle_upstream_times_out(proxy, fake_openai, egress_server):
    fake_openai.push(Behaviour(chunks=["a ", "b "], after=1, kind="stall"))
    started = time.monotonic()
    streamed = await proxy.stream({"prompt": "x", "generate_params": STREAM})
    events = streamed.events()
    assert json.loads(events[-2])["error"]["code"] == "upstream_idle" and events[-1] == "[DONE]"
    assert 0.4 < time.monotonic() - started < 5
    await fake_openai.wait_abort(timeout=2)


@pytest.mark.gen_test(timeout=60)
async def test_backpressure_bounds_what_is_read_upstream(proxy, fake_openai, egress_server):
    piece = "x" * 4000
    count = 15_000  # ~63 MB of events
    fake_openai.push(Behaviour(chunks=[piece] * count))
    head, reader, writer = await open_raw(proxy.base_url, {"prompt": "x", "generate_params": STREAM})
    assert head.startswith("HTTP/1.1 200")
    await asyncio.sleep(2.0)  # the client reads nothing meanwhile
    # Besides the proxy's own bounded queue, only socket buffers (now two
    # more of them, at the egress proxy) hold the rest of the answer.
    sent_while_stalled = fake_openai.bytes_sent
    assert sent_while_stalled < 30_000_000, sent_while_stalled
    writer.close()
    await fake_openai.wait_abort(timeout=3)


@pytest.mark.gen_test(timeout=20)
async def test_first_answer_through_a_new_tunnel_keeps_the_upstreams_status(proxy, fake_openai, egress_server):
    """An HTTP proxy's "200 Connection established" is not the upstream's answer."""
    fake_openai.push(Behaviour(kind="error", status=401, message="Incorrect API key provided"))
    response, body = await proxy.chat({"prompt": "x"})
    assert response.code == 401 and body["text"] == "Incorrect API key provided"
    streamed = await proxy.stream({"prompt": "a b", "generate_params": STREAM})
    assert streamed.response.headers["Content-Type"].startswith("text/event-stream")
    assert streamed.events()[-1] == "[DONE]"
