"""Several instances behind nginx: the example config's upstream settings, with Debian's nginx (issue 14).

deploy/nginx/chat_gpt_proxy.conf is run as it is, on loopback with a throwaway
certificate and one upstream ``server`` line per instance (tests/procs.py
``example_site``).
"""

import asyncio
import json

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.web
import tornado.websocket
from tornado.testing import bind_unused_port

from tests.conftest import AUTH
from tests.procs import Nginx, example_site, free_port


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
