"""Several instances behind nginx: the example config's upstream settings, with Debian's nginx.

deploy/nginx/chat_gpt_proxy.conf is run as it is, on loopback with a throwaway
certificate and one upstream ``server`` line per instance (tests/procs.py
``example_site``).
"""

import asyncio
import json
import re
import signal
import time

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.web
import tornado.websocket
from tornado.testing import bind_unused_port

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.conftest import ACCESS_TOKEN, AUTH
from tests.procs import Nginx, ServerProcess, example_site, free_port


@pytest.fixture
def start_nginx(tmp_path, certificate):
    started = []

    def start(upstream_ports, level="warn", edit=lambda site: site):
        port = free_port()
        site = edit(example_site(port, upstream_ports, certificate))
        nginx = Nginx(site, tmp_path / ("nginx%d" % len(started)), port, level)
        nginx.url = "https://127.0.0.1:%d" % port
        started.append(nginx)
        return nginx

    yield start
    for nginx in started:
        nginx.stop()


async def fetch(url, certificate, path="/chat_complete", body=None, **kwargs):
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    try:
        return await client.fetch(
            url + path,
            method="POST" if body is not None else "GET",
            body=json.dumps(body) if body is not None else None,
            headers=AUTH,
            ca_certs=certificate[0],
            raise_error=False,
            request_timeout=30,
            **kwargs,
        )
    finally:
        client.close()


class Echo(tornado.websocket.WebSocketHandler):
    def on_message(self, message):
        self.write_message("echo: " + message)


class Plain(tornado.web.RequestHandler):
    def get(self):
        self.application.settings["seen"].append(
            (id(self.request.connection.stream), self.request.headers.get("Connection"))
        )
        self.write({"ok": True})


@pytest.fixture
def instance_stub(io_loop):
    """A stand-in instance on the test's loop: a WebSocket echo (the coming /v1/realtime) and a plain GET."""
    seen = []
    app = tornado.web.Application([(r"/v1/realtime", Echo), (r"/plain", Plain)], seen=seen)
    sock, port = bind_unused_port()
    server = tornado.httpserver.HTTPServer(app)
    server.add_socket(sock)
    yield port, seen
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=10)


@pytest.mark.slow
@pytest.mark.gen_test(timeout=30)
async def test_websocket_upgrades_pass_and_plain_requests_keep_the_upstream_connection(
    start_nginx, instance_stub, certificate
):
    port, seen = instance_stub
    nginx = start_nginx([port])
    for _ in range(5):
        response = await fetch(nginx.url, certificate, "/plain")
        assert response.code == 200
    # Five requests, five client connections, one kept-alive connection upstream
    # with no Connection header (HTTP/1.1 keep-alive).
    assert len(seen) == 5 and len({conn for conn, _ in seen}) == 1, seen
    assert {header for _, header in seen} == {None}

    request = tornado.httpclient.HTTPRequest(
        nginx.url.replace("https", "wss") + "/v1/realtime", ca_certs=certificate[0], request_timeout=10
    )
    ws = await tornado.websocket.websocket_connect(request)
    try:
        for word in ("привет", "again"):
            await ws.write_message(word)
            assert await asyncio.wait_for(ws.read_message(), 10) == "echo: " + word
    finally:
        ws.close()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=30)
async def test_a_request_that_never_reached_an_instance_goes_to_another(
    start_nginx, proxy, http_port, fake_openai, certificate
):
    dead = [free_port(), free_port()]  # nothing listens there: connection refused
    nginx = start_nginx([dead[0], http_port, dead[1]])
    for i in range(9):
        body = {"prompt": "n%d" % i}
        if i % 3 == 2:
            body["generate_params"] = {"stream": True}
        response = await fetch(nginx.url, certificate, body=body)
        assert response.code == 200, response.body
        assert b"n%d" % i in response.body
    assert len(fake_openai.received) == 9
    assert "Connection refused" in nginx.error_log()


async def black_hole(received: list):
    """An instance that takes a request and dies before answering it."""

    async def handle(reader, writer):
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.slow
@pytest.mark.parametrize("request_buffering", ["off", "on"])
@pytest.mark.gen_test(timeout=30)
async def test_a_post_that_reached_an_instance_is_not_sent_again(
    start_nginx, proxy, http_port, fake_openai, certificate, request_buffering
):
    """That instance may have passed it to OpenAI already: a second copy would be a second generation.

    With the example's ``proxy_request_buffering off`` nginx cannot resend any
    request it began to send; with it turned on, the absence of
    ``non_idempotent`` in ``proxy_next_upstream`` still keeps a POST from going twice.
    """

    def buffering(site):
        assert "proxy_request_buffering off;" in site
        return site.replace("proxy_request_buffering off;", "proxy_request_buffering %s;" % request_buffering)

    reached = []
    hole = await black_hole(reached)
    try:
        nginx = start_nginx([hole.sockets[0].getsockname()[1], http_port], edit=buffering)
        statuses = []
        for i in range(4):
            response = await fetch(nginx.url, certificate, body={"prompt": "once %d" % i})
            statuses.append(response.code)
            if response.code == 502:
                # nginx's own error, in the proxy's JSON shape.
                assert response.headers["Content-Type"] == "application/json"
                assert json.loads(response.body)["error"]["code"] == "no_instance"
    finally:
        hole.close()
    assert len(reached) == 1 and reached[0].startswith(b"POST /chat_complete ")
    # The one that reached the black hole failed; the instance that works saw
    # each of the others exactly once, and never the failed one.
    assert sorted(statuses) == [200, 200, 200, 502], statuses
    assert len(fake_openai.received) == 3


@pytest.mark.slow
@pytest.mark.gen_test(timeout=30)
async def test_an_idempotent_get_that_reached_a_dying_instance_goes_to_another(
    start_nginx, proxy, http_port, fake_openai, certificate
):
    """The other side of the rule above: a GET (nothing billed, nothing to resend) is re-sent once."""
    reached = []
    hole = await black_hole(reached)
    try:
        nginx = start_nginx([hole.sockets[0].getsockname()[1], http_port])
        statuses = [(await fetch(nginx.url, certificate, path="/v1/models")).code for _ in range(4)]
    finally:
        hole.close()
    assert statuses == [200, 200, 200, 200]
    assert len(reached) == 1 and reached[0].startswith(b"GET /v1/models ")
    assert [r.path for r in fake_openai.received] == ["/v1/models"] * 4


STREAM_WORDS = ["w%d " % i for i in range(8)]


async def one_request(client, url, certificate, n):
    """JSON and streamed requests in turn; returns (kind, ok, detail) with every check made."""
    stream = n % 2 == 1
    body = {"prompt": "req %d" % n}
    if stream:
        body["generate_params"] = {"stream": True, "model_name": "slow-stream"}
    chunks = []
    try:
        response = await client.fetch(
            url + "/chat_complete",
            method="POST",
            body=json.dumps(body),
            headers=AUTH,
            ca_certs=certificate[0],
            raise_error=False,
            request_timeout=30,
            streaming_callback=chunks.append if stream else None,
        )
    except Exception as exc:  # every outcome is counted, none may escape
        return ("stream" if stream else "json"), False, repr(exc)
    if not stream:
        ok = response.code == 200 and json.loads(response.body).get("text") == "Echo: req %d" % n
        return "json", ok, "%d %r" % (response.code, response.body[:300])
    text = b"".join(chunks).decode()
    ok = (
        response.code == 200
        and text.endswith("data: [DONE]\n\n")
        and '"error"' not in text
        and all('"content":"%s"' % w in text for w in STREAM_WORDS)
    )
    return "stream", ok, "%d %r" % (response.code, text[-300:])


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_rolling_restart_of_three_instances_behind_nginx_loses_nothing(
    start_nginx, fake_openai, certificate, tmp_path
):
    """Under continuous JSON and streaming load through nginx, each of three
    instances gets SIGTERM in turn and is replaced on its port; every request must succeed."""
    fake_openai.by_model["slow-stream"] = Behaviour(chunks=STREAM_WORDS, delay=0.1)
    env = {"ACCESS_TOKEN": ACCESS_TOKEN, "OPENAI_BASE_URL": fake_openai.url, "SHUTDOWN_GRACE": "15"}
    servers = []

    async def start(port=None, generation=0):
        server = ServerProcess(
            {**env, **({"PORT": str(port)} if port else {})},
            str(tmp_path / ("proxy%d-%d.log" % (len(servers), generation))),
        )
        servers.append(server)
        await server.wait_ready()
        return server

    try:
        instances = [await start() for _ in range(3)]
        nginx = start_nginx([s.port for s in instances])
        fail_timeout = float(re.search(r"fail_timeout=(\d+)s", nginx.site).group(1))
        outcomes = []
        # When each stream now in flight began (by request number).
        streaming: dict[int, float] = {}
        stop = False
        deadline = time.monotonic() + 90

        async def worker(w):
            client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
            try:
                n = w
                while not stop and time.monotonic() < deadline and n < 20000:
                    started = time.monotonic()
                    if n % 2 == 1:
                        streaming[n] = started
                    kind, ok, detail = await one_request(client, nginx.url, certificate, n)
                    streaming.pop(n, None)
                    outcomes.append((kind, ok, started, time.monotonic(), detail))
                    n += 6
                    await asyncio.sleep(0.02)
            finally:
                client.close()

        async def completed(count, timeout=30):
            target = len(outcomes) + count
            limit = time.monotonic() + timeout
            while len(outcomes) < target:
                assert time.monotonic() < limit, "the load stalled"
                await asyncio.sleep(0.05)

        workers = [asyncio.ensure_future(worker(w)) for w in range(6)]
        await completed(30)
        signalled = []
        for i, old in enumerate(list(instances)):
            # Signal only while a stream is well under way (it lasts about 0.8 s),
            # so that each restart really cuts across one; on a loaded machine
            # the workers may all be between requests at any given instant.
            limit = time.monotonic() + 20
            while not any(time.monotonic() - t > 0.2 for t in streaming.values()):
                assert time.monotonic() < limit, "no stream in flight to restart across"
                await asyncio.sleep(0.01)
            signalled.append(time.monotonic())
            old.signal(signal.SIGTERM)
            assert await old.wait_exit(30) == 0, old.output()
            instances[i] = new = await start(old.port, generation=1)
            # As docs/deploy.md says: the next restart waits until nginx has put the
            # replacement back into rotation: fail_timeout after its last failure,
            # counted by nginx in whole seconds (so up to a second more).
            await asyncio.sleep(fail_timeout + 2)
            await completed(20)
            assert "path=/chat_complete" in new.output(), "nginx sent nothing to the replacement"
        stop = True
        await asyncio.gather(*workers)
    finally:
        for server in servers:
            server.stop()

    failures = [o for o in outcomes if not o[1]]
    assert not failures, "%d of %d requests failed: %s\nnginx: %s" % (
        len(failures),
        len(outcomes),
        failures[:5],
        nginx.error_log()[-3000:],
    )
    streams = [o for o in outcomes if o[0] == "stream"]
    assert len(outcomes) >= 100 and len(streams) >= 40
    # Streams were running through each restart, and each old instance had work in flight when told to stop.
    for at in signalled:
        assert any(start < at < end for _, _, start, end, _ in streams)
    in_flight = [
        int(re.search(r"shutdown: no new connections; (\d+) requests? in flight", s.output()).group(1))
        for s in servers[:3]
    ]
    assert sum(in_flight) > 0, in_flight
