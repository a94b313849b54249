"""Every Tornado private attribute the proxy relies on (chat_gpt_proxy/tornado_internals.py) is where it was.

Run against the installed Tornado: an upgrade that moves one fails here, by
name, rather than somewhere deep in a stream or a shutdown.
"""

import asyncio
import inspect
import pathlib
import re

import pycurl
import pytest
import tornado
import tornado.httpclient
import tornado.httpserver
import tornado.web
from tornado.curl_httpclient import CurlAsyncHTTPClient
from tornado.httputil import HTTPHeaders
from tornado.platform.asyncio import BaseAsyncIOLoop
from tornado.testing import bind_unused_port
from tornado.websocket import WebSocketProtocol13

from chat_gpt_proxy import tornado_internals as internals

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_seam_is_tied_to_the_pinned_tornado():
    pinned = re.search(r"^tornado==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert internals.TORNADO_VERSION == pinned == tornado.version, (
        "Tornado %s is installed and %s pinned: check every attribute in chat_gpt_proxy/tornado_internals.py "
        "against the new release, then update TORNADO_VERSION" % (tornado.version, pinned)
    )


@pytest.mark.gen_test
async def test_request_and_handler_internals_on_a_real_request():
    seen = {}

    @tornado.web.stream_request_body
    class Probe(tornado.web.RequestHandler):
        def prepare(self):
            seen["arriving_in_prepare"] = internals.body_arriving(self.request)

        def data_received(self, chunk):
            pass

        async def post(self):
            seen["arriving_after_body"] = internals.body_arriving(self.request)
            seen["written_before"] = internals.headers_written(self)
            seen["headers"] = internals.response_headers(self)
            seen["reason"] = internals.reason(self)
            self.write("x")
            await self.flush()
            seen["written_after"] = internals.headers_written(self)
            seen["finished_before"] = internals.finished(self)
            seen["had_disconnect_flag"] = hasattr(self.request.connection, "_disconnect_on_finish")
            internals.close_after_response(self.request)
            self.finish()
            seen["finished_after"] = internals.finished(self)

    sock, port = bind_unused_port()
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/", Probe)]))
    server.add_sockets([sock])
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    try:
        response = await client.fetch("http://127.0.0.1:%d/" % port, method="POST", body=b"abc")
        assert hasattr(server, "conn_params") and hasattr(server.conn_params, "no_keep_alive")
        internals.stop_keep_alive(server)
        assert server.conn_params.no_keep_alive is True
    finally:
        client.close()
        server.stop()
        await server.close_all_connections()
    assert response.code == 200 and response.headers.get("Connection") == "close"
    assert seen["arriving_in_prepare"] is True and seen["arriving_after_body"] is False
    assert seen["written_before"] is False and seen["written_after"] is True
    assert isinstance(seen["headers"], HTTPHeaders) and seen["reason"] == "OK"
    assert seen["finished_before"] is False and seen["finished_after"] is True
    assert seen["had_disconnect_flag"]


@pytest.mark.gen_test
async def test_whether_the_body_came_with_the_headers_on_a_real_connection():
    seen = []

    class Recording(tornado.web.Application):
        def find_handler(self, request, **kwargs):
            seen.append(internals.body_buffered(request))
            if seen[-1]:
                internals.no_body_timeout(request)
                seen.append(request.connection._body_timeout)
            return super().find_handler(request, **kwargs)

    class Echo(tornado.web.RequestHandler):
        def post(self):
            self.write(self.request.body)

    sock, port = bind_unused_port()
    server = tornado.httpserver.HTTPServer(Recording([(r"/", Echo)]), body_timeout=5)
    server.add_sockets([sock])
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n"
    try:
        for parts, answer in (
            ([head + b"abcdef"], b"abcdef"),  # all at once
            ([head + b"abc", b"def"], b"abcdef"),  # half, then the rest
            ([b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"], b"abc"),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for part in parts:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.2)
            assert (await asyncio.wait_for(reader.read(4096), 5)).endswith(answer)
            writer.close()
    finally:
        server.stop()
        await server.close_all_connections()
    assert seen == [True, None, False, False]


def test_the_curl_client_internals():
    client = CurlAsyncHTTPClient(force_instance=True)
    try:
        assert isinstance(internals.curl_multi(client), pycurl.CurlMulti)
    finally:
        client.close()
    # chat_gpt_proxy/upstream/call.py overrides these: the transfer's state is
    # read before the handle is reused, and the hot path is set up lean.
    assert list(inspect.signature(CurlAsyncHTTPClient._finish).parameters) == [
        "self",
        "curl",
        "curl_error",
        "curl_message",
    ]
    assert list(inspect.signature(CurlAsyncHTTPClient._curl_setup_request).parameters) == [
        "self",
        "curl",
        "request",
        "buffer",
        "headers",
    ]
    assert list(inspect.signature(CurlAsyncHTTPClient._set_timeout).parameters) == ["self", "msecs"]
    assert list(inspect.signature(CurlAsyncHTTPClient._process_queue).parameters) == ["self"]
    # What the overrides share with the rest of Tornado's client: the queue
    # fetch_impl fills, the free handles, the multi handle, the pending timer.
    impl = inspect.getsource(CurlAsyncHTTPClient.fetch_impl)
    assert "self._requests.append((request, callback, self.io_loop.time()))" in impl
    assert "self._process_queue()" in impl
    queue = inspect.getsource(CurlAsyncHTTPClient._process_queue)
    assert "self._free_list.pop()" in queue and "self._requests.popleft()" in queue
    assert "self._multi.add_handle(curl)" in queue
    finish = inspect.getsource(CurlAsyncHTTPClient._finish)
    assert "self._free_list.append(curl)" in finish and "curl.reset()" in finish
    assert "_process_queue" in inspect.getsource(CurlAsyncHTTPClient._finish_pending_requests)
    # fetch(raise_error=False): a status is an answer, which the lean fetch tells apart the same way.
    fetch = inspect.getsource(tornado.httpclient.AsyncHTTPClient.fetch)
    assert "if raise_error or not response._error_is_response_code:" in fetch
    request = tornado.httpclient.HTTPRequest("http://127.0.0.1/")
    assert internals.error_is_status(tornado.httpclient.HTTPResponse(request, 404))
    assert not internals.error_is_status(tornado.httpclient.HTTPResponse(request, 599, error=OSError()))
    assert "self._timeout = None" in inspect.getsource(CurlAsyncHTTPClient._handle_timeout)
    # The lean _set_timeout keeps an asyncio TimerHandle there, which close() removes as any timeout.
    assert "timeout.cancel()" in inspect.getsource(BaseAsyncIOLoop.remove_timeout)


def test_the_websocket_protocol_internals():
    # handlers/realtime.py's ClientProtocol overrides it to note close frames.
    assert list(inspect.signature(WebSocketProtocol13._handle_message).parameters) == ["self", "opcode", "data"]
    source = inspect.getsource(tornado.websocket.WebSocketProtocol.__init__)
    assert "self.server_terminated = False" in source and "self.client_terminated = False" in source


def test_the_lean_upstream_path_takes_only_what_it_sets_up():
    """A request asking for an option the lean libcurl set-up does not set takes Tornado's path
    instead of losing it."""
    from tornado.httpclient import HTTPRequest

    from chat_gpt_proxy.upstream.call import lean

    def request(**extra):
        options = dict(method="POST", headers={}, body=b"{}", follow_redirects=False, decompress_response=False)
        return HTTPRequest("http://127.0.0.1/", prepare_curl_callback=print, **{**options, **extra})

    assert lean(request())
    for extra in (
        {"follow_redirects": True},
        {"decompress_response": True},
        {"client_cert": "c.pem"},
        {"proxy_host": "127.0.0.1", "proxy_port": 3128},
        {"auth_username": "u", "auth_password": "p"},
        {"allow_ipv6": False},
        {"network_interface": "lo"},
        {"method": "PUT"},
        {"method": "GET"},
        {"headers": HTTPHeaders()},
    ):
        assert not lean(request(**extra)), extra
    assert lean(request(method="GET", body=None))
