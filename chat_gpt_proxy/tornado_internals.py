"""The one seam to Tornado's private attributes, for the pinned Tornado (6.6.1, requirements.txt).

Each is something Tornado's public API does not say and the proxy must know
or change (docs/architecture.md lists why). tests/test_tornado_internals.py
checks every one on the installed Tornado and fails loudly when an upgrade
moves one; two subclasses override private methods as well, named here:
``UpstreamClient._process_queue``, ``_finish`` and ``_set_timeout``
(chat_gpt_proxy/upstream/call.py: they use ``_requests``, ``_free_list``,
``_multi``, ``_timeout`` and ``_curl_setup_request`` as Tornado's client
does), and ``ClientProtocol._handle_message`` (handlers/realtime.py).
"""

from __future__ import annotations

TORNADO_VERSION = "6.6.1"


def close_after_response(request, close: bool = True) -> None:
    """Whether the client's connection closes once this response is sent (HTTP1Connection)."""
    request.connection._disconnect_on_finish = close


def body_arriving(request) -> bool:
    """Whether a streamed request body is still arriving (False for a WebSocket upgrade, which has none)."""
    future = getattr(request, "_body_future", None)
    return future is not None and not future.done()


def body_buffered(request) -> bool:
    """Whether a request's whole body (by Content-Length) was read with its headers (IOStream's buffer)."""
    length = request.headers.get("Content-Length", "")
    # isdigit() alone takes "²" and other Unicode digits, which int() refuses.
    if not (length.isascii() and length.isdigit()) or "Transfer-Encoding" in request.headers:
        return False  # none, chunked, or invalid: Tornado decides
    return request.connection.stream._read_buffer_size >= int(length)


def no_body_timeout(request) -> None:
    """No BODY_TIMEOUT for this request: its body is read from memory (HTTP1Connection, one per request)."""
    request.connection.set_body_timeout(None)


def headers_written(handler) -> bool:
    """Whether the handler's status line and headers have gone out."""
    return handler._headers_written


def finished(handler) -> bool:
    """Whether ``finish()`` has run."""
    return handler._finished


def response_headers(handler):
    """The headers the handler is about to send (an ``HTTPHeaders``)."""
    return handler._headers


def reason(handler) -> str:
    """The reason phrase of the handler's status."""
    return handler._reason


def stop_keep_alive(server) -> None:
    """Every request read from now on is answered with ``Connection: close`` (HTTPServer)."""
    server.conn_params.no_keep_alive = True


def error_is_status(response) -> bool:
    """Whether an HTTPResponse's error only says its status was not 2xx (fetch's raise_error=False)."""
    return response._error_is_response_code


def curl_multi(client):
    """The ``pycurl.CurlMulti`` of a ``CurlAsyncHTTPClient``."""
    return client._multi


def closing_by_server(protocol) -> bool:
    """Whether a WebSocket's server side sent its close frame (Tornado's ping timeout does)."""
    return protocol.server_terminated


def closed_by_client(protocol) -> bool:
    """Whether the client's close frame has arrived."""
    return protocol.client_terminated
