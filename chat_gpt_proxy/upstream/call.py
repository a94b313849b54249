"""The one place that talks to the upstream (OpenAI or any compatible server).

Both the JSON and the streaming paths of every route use ``UpstreamCall``. It
runs on Tornado's ``CurlAsyncHTTPClient`` because only libcurl keeps upstream
connections alive between requests (Tornado's simple client sends
``Connection: close``), and it replaces libcurl's header and write callbacks so
that it can:

- see the final status line and headers before relaying any body byte;
- pause the transfer when the client reads slower than the upstream writes
  (``WRITEFUNC_PAUSE``), bounding memory per request;
- abort the transfer at once when the client leaves, by toggling the pause
  state so libcurl calls the progress callback, which returns non-zero.

These techniques, their pitfalls and the measurements behind them are in
docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import logging
import re
import select
import socket
import time

import pycurl
from tornado.curl_httpclient import CurlAsyncHTTPClient, CurlError
from tornado.httpclient import HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders
from tornado.ioloop import IOLoop

from chat_gpt_proxy import human
from chat_gpt_proxy.tornado_internals import error_is_status
from chat_gpt_proxy.upstream.errors import UpstreamError, classify, upstream_address
from chat_gpt_proxy.upstream.headers import USER_AGENT

log = logging.getLogger("chat_gpt_proxy.upstream")

# RFC 9110 section 5.1 (token) and 5.5 (field-value: no control characters but HTAB).
FIELD_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

FORBIDDEN_VALUE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

STATUS_LINE_RE = re.compile(rb"HTTP/[0-9.]+ +([0-9]{3})(?:[ \t]|\r?\n|$)")

# Pause the transfer when this much is queued for a slow client and resume
# below the low mark: bounded memory per stream without stalling fast ones.
HIGH_WATER = 256 * 1024

LOW_WATER = 64 * 1024

# curl/curl.h CURLOPT_SUPPRESS_CONNECT_HEADERS (libcurl >= 7.54), which
# pycurl 7.49 does not name; pycurl passes long options through.
CURLOPT_SUPPRESS_CONNECT_HEADERS = 265

# Requests that change nothing (RFC 9110 section 9.2.2) and so may be sent
# again when their reused connection closed before answering, as Go's
# net/http does (Transport.shouldRetryRequest); nginx never resends a POST.
# (OPTIONS is answered by the proxy itself.)
REPLAYABLE_METHODS = frozenset({"GET", "HEAD"})


class UpstreamClient(CurlAsyncHTTPClient):
    """Tornado's libcurl client, lean on the hot path, plus what ``UpstreamCall`` needs to know.

    Tornado's ``fetch`` and three of its private methods are overridden (the seam is listed in
    chat_gpt_proxy/tornado_internals.py and checked by
    tests/test_tornado_internals.py). Profiled under load (bench/profile.py),
    Tornado's general versions cost over a tenth of the proxy's
    CPU per request, for features this client never uses:

    - ``fetch`` copies the headers into a new HTTPHeaders and wraps the
      request with defaults; ``_process_queue`` gives every transfer an
      HTTPHeaders, a BytesIO and clock readings for Tornado's own body and
      timings, and its ``_curl_setup_request`` sets some 35 options:
      redirects, authentication, decompression, a body read back through a
      Python callback, a header parser (``UpstreamCall._prepare`` replaces
      it anyway). The lean path (``_lean_setup``) sets what a proxied
      request needs and hands libcurl the body as POSTFIELDS, sent from
      memory; PUT, PATCH, DELETE and anything unusual take Tornado's path.
    - ``_finish`` reads eight timings and builds a response body nobody
      reads here: ``UpstreamCall`` has the status, headers and body already.
    - ``_set_timeout`` treats libcurl's -1 ("delete the timer",
      CURLMOPT_TIMERFUNCTION) as "fire now", which ran an extra
      ``socket_action`` pass for nothing, and replaces a timer that is
      already due with a new one, several times per request.
    """

    def initialize(self, *args, **kwargs) -> None:
        super().initialize(*args, **kwargs)
        # The sockets of the connections libcurl opened, by local address
        # (ip, port) -> fd (pycurl refuses getinfo() inside a callback), and
        # the address each fd was last seen with.
        self.sockets: dict[tuple[str, int], int] = {}
        self.socket_addresses: dict[int, tuple[str, int]] = {}

    def remember_socket(self, fd: int, address: tuple[str, int]) -> None:
        """``fd`` is now the connection from ``address``. The kernel hands out the number of a
        closed socket again, so the closed connection that had it goes: the map holds no more
        entries than the descriptors in use, where keying by address alone let it grow
        with every new connection until the ephemeral port range was covered (~28,000)."""
        previous = self.socket_addresses.get(fd)
        if previous is not None and self.sockets.get(previous) == fd:
            del self.sockets[previous]
        self.sockets[address] = fd
        self.socket_addresses[fd] = address

    def _set_timeout(self, msecs: int) -> None:
        loop = self.io_loop.asyncio_loop
        pending = self._timeout
        if msecs == 0 and pending is not None and pending.when() <= loop.time():
            return  # already due: libcurl asks for "now" several times per new transfer
        if pending is not None:
            pending.cancel()  # what IOLoop.remove_timeout does on asyncio
            self._timeout = None
        if msecs >= 0:
            # asyncio's timer itself: Tornado's add_timeout wraps it in a
            # partial and its own callback runner, for nothing here.
            self._timeout = loop.call_later(msecs / 1000.0, self._handle_timeout)

    def fetch(self, request, raise_error=True, **kwargs):
        # Tornado's fetch first copies the headers into a new HTTPHeaders
        # and wraps the request with the client's defaults (3 % of the CPU
        # per request under load). A lean request (UpstreamCall's: a dict of
        # headers made for this request alone, every option set) needs neither.
        if not (isinstance(request, HTTPRequest) and lean(request)) or raise_error or kwargs or self._closed:
            return super().fetch(request, raise_error=raise_error, **kwargs)
        future: asyncio.Future = asyncio.get_running_loop().create_future()

        def settle(response: HTTPResponse) -> None:
            # As Tornado's fetch with raise_error=False: a status is an answer, anything else fails.
            if future.cancelled():
                return
            if response.error is not None and not error_is_status(response):
                future.set_exception(response.error)
            else:
                future.set_result(response)

        self.fetch_impl(request, settle)
        return future

    def _process_queue(self) -> None:
        # Tornado's, without the HTTPHeaders, BytesIO and clock readings it
        # gives every transfer for its own body and timing (see _finish).
        while self._free_list and self._requests:
            curl = self._free_list.pop()
            request, callback, _queued_at = self._requests.popleft()
            curl.info = {"request": request, "callback": callback}
            try:
                if isinstance(request, HTTPRequest):
                    self._lean_setup(curl, request)
                else:  # Tornado's _RequestProxy: whatever lean() turned away
                    self._curl_setup_request(curl, request, io.BytesIO(), HTTPHeaders())
            except Exception as exc:
                # As Tornado does: a request that cannot be set up fails alone.
                curl.reset()
                curl.info = None
                self._free_list.append(curl)
                callback(HTTPResponse(request=request, code=599, error=exc))
            else:
                self._multi.add_handle(curl)

    def _lean_setup(self, curl: pycurl.Curl, request: HTTPRequest) -> None:
        method = request.method
        curl.setopt(pycurl.PROTOCOLS, HTTP_PROTOCOLS)
        curl.setopt(pycurl.REDIR_PROTOCOLS, HTTP_PROTOCOLS)
        curl.setopt(pycurl.URL, request.url)
        curl.setopt(pycurl.HTTPHEADER, header_lines(request.headers))
        curl.setopt(pycurl.CONNECTTIMEOUT_MS, int(1000 * request.connect_timeout))
        curl.setopt(pycurl.TIMEOUT_MS, int(1000 * request.request_timeout))
        curl.setopt(pycurl.USERAGENT, request.user_agent)
        # libcurl's defaults (curl.reset() restores them), set anyway:
        # certificate checks must not depend on a default.
        curl.setopt(pycurl.SSL_VERIFYPEER, 1)
        curl.setopt(pycurl.SSL_VERIFYHOST, 2)
        if request.ca_certs is not None:
            curl.setopt(pycurl.CAINFO, request.ca_certs)
        # No signals from libcurl: the loop shares the process with threads.
        curl.setopt(pycurl.NOSIGNAL, 1)
        if method == "POST":
            curl.setopt(pycurl.POST, 1)
            # Sent from memory: pycurl keeps the bytes alive and passes their
            # length (NUL bytes included); libcurl rewinds it by itself.
            curl.setopt(pycurl.POSTFIELDS, request.body or b"")
        elif method == "HEAD":
            curl.setopt(pycurl.NOBODY, 1)
        else:
            curl.setopt(pycurl.HTTPGET, 1)
        request.prepare_curl_callback(curl)

    def _finish(self, curl, curl_error=None, curl_message=None) -> None:
        # The last moment this transfer's libcurl state can be read: the
        # handle serves the next request right after.
        call = getattr(curl, "upstream_call", None)
        curl.upstream_call = None
        if curl_error and call is not None:
            call.past_proxy = past_proxy(curl)
        info = curl.info
        curl.info = None
        self._multi.remove_handle(curl)
        if curl_error:
            error = CurlError(curl_error, curl_message)
            code = error.code
        else:
            error = None
            code = curl.getinfo(pycurl.HTTP_CODE)
        try:
            # The outcome only: UpstreamCall's own callbacks (set in
            # _prepare for every transfer) have the status, headers and body.
            info["callback"](HTTPResponse(request=info["request"], code=code, headers=NO_HEADERS, error=error))
        except Exception:
            self.handle_callback_exception(info["callback"])
        curl.reset()
        self._free_list.append(curl)


def lean(request: HTTPRequest) -> bool:
    """Whether the lean set-up handles this request: POST with its body, GET and HEAD without,
    headers as a plain dict; anything else takes Tornado's own path."""
    method = request.method
    return (
        type(request.headers) is dict
        and (method == "POST" or (method in ("GET", "HEAD") and request.body is None))
        and request.prepare_curl_callback is not None
        # What _lean_setup does not set: a request that asks for any of it
        # takes Tornado's path rather than losing it silently.
        and request.follow_redirects is False
        and request.decompress_response is False
        and request.proxy_host is None
        and request.auth_username is None
        and request.client_cert is None
        and request.client_key is None
        and request.network_interface is None
        and request.allow_ipv6 is not False
        and request.streaming_callback is None
        and request.header_callback is None
    )


HTTP_PROTOCOLS = pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS

# The headers of the HTTPResponse the lean _finish builds: never filled.
NO_HEADERS = HTTPHeaders()


def header_lines(headers: dict[str, str]) -> list[bytes]:
    """The request's header lines for CURLOPT_HTTPHEADER, as Tornado's set-up builds them."""
    lines = []
    present = set()
    for name, value in headers.items():
        line = b"%s: %s" % (name.encode("ascii"), value.encode("latin-1"))
        # A line break inside a value would start a header of the sender's choosing.
        if b"\r" in line or b"\n" in line:
            raise ValueError("Illegal characters in header (CR or LF): %r" % line)
        lines.append(line)
        present.add(name.lower())
    # A name with no value stops libcurl from adding its own: 100-continue
    # would delay the body, and no-cache means nothing to the API.
    if "expect" not in present:
        lines.append(b"Expect: ")
    if "pragma" not in present:
        lines.append(b"Pragma: ")
    return lines


def past_proxy(curl: pycurl.Curl) -> bool:
    """Whether a failed transfer had got past the egress proxy to the upstream.

    Measured with libcurl 8.23 (tests/test_egress_failures.py): the CONNECT
    was answered 2xx (HTTP_CONNECTCODE, 0 without one), or TLS with the
    upstream had begun (SSL_VERIFYRESULT, 0 until then, 1 while it is under
    way); libcurl's error messages are the same either way.
    """
    return curl.getinfo(pycurl.HTTP_CONNECTCODE) // 100 == 2 or curl.getinfo(pycurl.SSL_VERIFYRESULT) != 0


def connected_socket(fds: list[int], local_ip: str, local_port: int) -> int:
    """Which of the sockets libcurl opened for a transfer is its connection (-1: none)."""
    if len(fds) == 1:
        return fds[0]
    # Several: addresses tried one after the other, or IPv6 and IPv4 raced
    # (happy eyeballs); the losers are closed, and their numbers may be reused.
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue  # closed
        try:
            name = sock.getsockname()
        except OSError:
            continue
        finally:
            sock.detach()  # libcurl's socket: never closed here
        if name[0] == local_ip and name[1] == local_port:
            return fd
    return -1


def readable(fd: int) -> bool:
    """Whether a socket has something to read now (data, end of file or an error), without reading it."""
    # One poll set for the process (poll(2) keeps no kernel state, unlike
    # epoll): asked once per reused connection, only from the event loop.
    _POLL.register(fd, select.POLLIN | select.POLLPRI)
    try:
        return bool(_POLL.poll(0))
    finally:
        _POLL.unregister(fd)


_POLL = select.poll()


class UpstreamCall:
    """One upstream HTTP exchange.

    Usage::

        call = UpstreamCall(client, settings, method, url, headers, body, stream=True)
        status, headers = await call.start()   # raises UpstreamError
        while (chunk := await call.read()) is not None:
            ...                                 # raises UpstreamError mid-body
        call.abort("client_closed")             # at any time, idempotent
    """

    def __init__(
        self,
        client: UpstreamClient,
        settings,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        *,
        stream: bool,
        timeout: float | None = None,
        route=None,
        on_connected=None,
    ):
        """``route``: the chosen upstream (routing.py), whose egress proxy and CA file apply;
        None: the settings' (OPENAI_BASE_URL's). ``on_connected``: called (on the loop) once a new
        connection to the upstream is up and the request is about to be sent on it."""
        self.settings = settings
        self.egress = settings.upstream_egress if route is None else route.egress
        self.ca_file = settings.upstream_ca_file if route is None else route.ca_file
        self.stream = stream
        self.status = 0
        self._header_lines: list[bytes] = []
        self._headers: HTTPHeaders | None = None
        self.started_at = time.monotonic()
        self.headers_at: float | None = None
        self.finished_at: float | None = None
        self.abort_reason: str | None = None
        self._loop = IOLoop.current()
        self._curl: pycurl.Curl | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._paused = False
        self._headers_done = False
        self._pending_status = 0
        self._wakeup: asyncio.Future | None = None
        self._headers_future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._idle_handle = None
        self._last_activity = self.started_at
        self.method = method
        # How many times libcurl was about to send the request (see _on_prereq).
        self._sends = 0
        self._new_sockets: list[int] = []
        self._client = client
        # Set by UpstreamClient._finish when the transfer failed.
        self.past_proxy = False
        self.resend_refused = False
        self.stale_connection = False
        self.on_connected = on_connected
        request = HTTPRequest(
            url,
            method=method,
            headers=headers,
            body=body,
            # ``timeout``: what is left of the request's time after retries.
            connect_timeout=min(settings.connect_timeout, timeout or settings.connect_timeout),
            # Streams have no total cap: the idle timer bounds them.
            request_timeout=0 if stream else (timeout or settings.request_timeout),
            # Verification is always on; this only replaces the trusted roots.
            ca_certs=self.ca_file or None,
            follow_redirects=False,
            decompress_response=False,
            allow_nonstandard_methods=True,
            user_agent=USER_AGENT,
            prepare_curl_callback=self._prepare,
        )
        self._fetch_url = url
        self._fetch = client.fetch(request, raise_error=False)
        self._fetch.add_done_callback(self._on_fetch_done)
        if stream:
            self._arm_idle_timer()

    # -- libcurl callbacks: run inside curl_multi_socket_action, so they only
    # record state and wake the reader; they never raise.

    def _prepare(self, curl: pycurl.Curl) -> None:
        self._curl = curl
        curl.upstream_call = self
        curl.setopt(pycurl.HEADERFUNCTION, self._on_header_line)
        curl.setopt(pycurl.WRITEFUNCTION, self._on_body)
        curl.setopt(pycurl.NOPROGRESS, 0)
        curl.setopt(pycurl.XFERINFOFUNCTION, self._on_progress)
        # HTTP/2 would multiplex every stream on one connection and an abort
        # would only reset a stream; HTTP/1.1 keeps aborts and pooling simple.
        curl.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        curl.setopt(pycurl.TCP_NODELAY, 1)
        # Tornado turns on libcurl's verbose trace when its logger is at DEBUG;
        # that trace holds the Authorization header, i.e. the caller's key.
        curl.setopt(pycurl.VERBOSE, 0)
        curl.setopt(pycurl.SOCKOPTFUNCTION, self._on_new_socket)
        curl.setopt(pycurl.PREREQFUNCTION, self._on_prereq)
        self._set_proxy(curl)

    def _set_proxy(self, curl: pycurl.Curl) -> None:
        # Tornado unsets PROXY when HTTPRequest has no proxy_host, and libcurl
        # then reads http(s)_proxy/ALL_PROXY/NO_PROXY by itself: always set it
        # so that the route chosen (and logged) at startup is the one used.
        proxy = self.egress
        if proxy is None:
            curl.setopt(pycurl.PROXY, "")  # "" = direct, whatever the environment says
            return
        curl.setopt(pycurl.PROXY, proxy.address)
        curl.setopt(pycurl.NOPROXY, "")  # NO_PROXY was applied at startup
        if proxy.username or proxy.password:
            curl.setopt(pycurl.PROXYUSERNAME, proxy.username)
            curl.setopt(pycurl.PROXYPASSWORD, proxy.password)
        # Always a CONNECT tunnel, also for a plain-http upstream: otherwise the
        # proxy's own error pages arrive as if the upstream sent them, and
        # tinyproxy closes a forwarding connection after every request
        # (measured), which would cost a new connection per request.
        curl.setopt(pycurl.HTTPPROXYTUNNEL, 1 if proxy.tunnels else 0)
        # The proxy's "200 Connection established" block would otherwise reach
        # _on_header_line as if it were the upstream's status and headers.
        curl.setopt(CURLOPT_SUPPRESS_CONNECT_HEADERS, 1)
        if proxy.scheme == "https" and self.ca_file:
            curl.setopt(pycurl.PROXY_CAINFO, self.ca_file)

    def _on_new_socket(self, fd: int, _purpose: int) -> int:
        self._new_sockets.append(fd)
        return 0  # CURL_SOCKOPT_OK

    def _on_prereq(self, _remote_ip, local_ip, _remote_port, local_port) -> int:
        # Called each time libcurl is about to send the request on a
        # connection, new or reused.
        self._sends += 1
        if self._sends > 1:
            # libcurl is resending on its own: the reused connection closed
            # after the request went out and before any answer byte, and
            # libcurl retries that on another connection (Curl_retry_request,
            # lib/multi.c; libcurl 8.23 has no option to turn it off). The
            # upstream may be processing the first copy: refuse, and let
            # open_upstream decide as for any failure after the request was sent.
            self.resend_refused = True
            return pycurl.PREREQFUNC_ABORT
        # pycurl refuses getinfo() inside a callback: the sockets libcurl
        # opened are known by their local address instead.
        if self._new_sockets:
            fd = connected_socket(self._new_sockets, local_ip, local_port)
            if fd >= 0:
                self._client.remember_socket(fd, (local_ip, local_port))
            if self.on_connected is not None:
                # libcurl calls this once the connection, its TLS handshake and any proxy
                # tunnel are up (CURLOPT_PREREQFUNCTION): the route works. Run outside
                # libcurl's callback, which must not raise.
                self._loop.add_callback(self.on_connected)
            return pycurl.PREREQFUNC_OK
        # A reused connection. libcurl checks pooled connections for a close
        # by the upstream (an idle timeout: uvicorn's is 5 s) at most once a
        # second (prune_dead_connections, lib/url.c), so it may hand us one
        # that is already closed. Anything to read on an idle connection (end
        # of file, a reset, stray bytes) means it is unusable; nothing of this
        # request was sent yet, so a retry on another connection is safe.
        fd = self._client.sockets.get((local_ip, local_port), -1)
        if fd >= 0 and readable(fd):
            self.stale_connection = True
            return pycurl.PREREQFUNC_ABORT
        return pycurl.PREREQFUNC_OK

    def _on_header_line(self, line: bytes) -> None:
        if line.startswith(b"HTTP/"):
            # Three ASCII digits (RFC 9112 section 4): int() would also take "2_00" or " 200".
            match = STATUS_LINE_RE.match(line)
            self._pending_status = int(match.group(1)) if match else 0
            self._header_lines = []
        elif line == b"\r\n" or line == b"\n":
            # A blank line ends a header block; 1xx blocks are followed by another.
            if self._pending_status >= 200 and not self._headers_done:
                self._headers_done = True
                self.status = self._pending_status
                self.headers_at = time.monotonic()
                if not self._headers_future.done():
                    self._headers_future.set_result(None)
        elif not self._headers_done:
            # Parsed only when someone looks (most requests need one or two).
            self._header_lines.append(line)

    @property
    def headers(self) -> HTTPHeaders:
        if self._headers is None or not self._headers_done:
            headers = HTTPHeaders()
            for line in self._header_lines:
                name, sep, value = line.decode("latin-1").partition(":")
                # A field that is not one (no colon, a name that is not a
                # token, control characters in the value) is dropped: relayed,
                # it could split our response; HTTPHeaders raises on it.
                if sep and FIELD_NAME_RE.fullmatch(name) and not FORBIDDEN_VALUE_RE.search(value.strip()):
                    headers.add(name, value.strip())
            if not self._headers_done:
                return headers
            self._headers = headers
        return self._headers

    def _on_body(self, data: bytes):
        if self.abort_reason is not None:
            return 0  # fails the transfer with CURLE_WRITE_ERROR
        if self._queued >= HIGH_WATER:
            # Not consumed: libcurl keeps these bytes and hands them back on resume.
            self._paused = True
            return pycurl.WRITEFUNC_PAUSE
        self._chunks.append(data)
        self._queued += len(data)
        self._arm_idle_timer()
        self._wake()
        return None

    def _on_progress(self, *_args) -> int:
        return 1 if self.abort_reason is not None else 0

    # -- completion

    def _on_fetch_done(self, future) -> None:
        # From here on the curl handle may already serve another request.
        self._curl = None
        if self.finished_at is None:
            self.finished_at = time.monotonic()
        future.exception()  # retrieved here so asyncio never reports it unhandled
        self._disarm_idle_timer()
        if not self._headers_future.done():
            self._headers_future.set_result(None)
        self._wake()

    def _error(self) -> UpstreamError | None:
        """The failure of a finished transfer, or None if it completed."""
        if self.abort_reason == "idle":
            return UpstreamError(
                "idle", "the upstream sent nothing for %s" % human.duration(self.settings.stream_idle_timeout)
            )
        if self.abort_reason is not None:
            return UpstreamError("aborted", "the request was aborted (%s)" % self.abort_reason)
        if self.stale_connection:
            return UpstreamError(
                "broken",
                "the upstream had closed the kept-alive connection",
                "reused_connection_closed",
                "reused connection found closed before sending",
            )
        if self.resend_refused:
            # Only a request that cannot change anything is sent again (by our
            # retry loop, logged and counted like every retry).
            idempotent = self.method in REPLAYABLE_METHODS
            return UpstreamError(
                "broken",
                "the upstream closed a kept-alive connection without answering"
                + ("" if idempotent else "; not retried, as the upstream may have processed the request"),
                "reused_connection_closed" if idempotent else None,
                "reused connection closed before any answer byte",
            )
        # Even with raise_error=False, connection failures and timeouts come
        # as an exception (CurlError 599), not as a response. Read the future
        # itself: its done-callbacks may not have run yet.
        error = self._fetch.exception() or self._fetch.result().error
        if not isinstance(error, CurlError):
            return None
        return classify(
            error.errno,
            error.message or "",
            self.status,
            self.egress,
            past_proxy=self.past_proxy,
            address=upstream_address(self._fetch_url),
        )

    # -- the reader's side

    async def start(self) -> tuple[int, HTTPHeaders]:
        """Wait for the final status line and headers."""
        await self._headers_future
        if not self._headers_done:
            error = self._error()
            raise error or UpstreamError("broken", "the upstream closed without answering")
        if self.status > 599:
            # Not an HTTP status (RFC 9110 section 15): relaying it would pass the breakage on.
            self.abort("invalid_status")
            raise UpstreamError("broken", "the upstream answered with the invalid status %d" % self.status)
        return self.status, self.headers

    async def read(self) -> bytes | None:
        """The next body chunk as it arrived, or None at the end of the body."""
        while not self._chunks:
            if self._fetch.done():
                if self.finished_at is None:  # the done-callback may not have run yet
                    self.finished_at = time.monotonic()
                error = self._error()
                if error is not None:
                    raise error
                return None
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        chunk = self._chunks.popleft()
        self._queued -= len(chunk)
        if self._paused and self._queued <= LOW_WATER:
            self._resume()
        return chunk

    async def read_all(self, limit: int) -> bytes:
        """The whole body (for JSON answers); over ``limit`` bytes is an error."""
        parts = []
        size = 0
        while (chunk := await self.read()) is not None:
            size += len(chunk)
            if size > limit:
                self.abort("too_large")
                raise UpstreamError("broken", "the upstream answer is larger than %s" % human.size(limit))
            parts.append(chunk)
        return b"".join(parts)

    async def discard(self) -> None:
        """Finish an answer nobody will see (before a retry): read a small one to keep the connection."""
        # Too large or broken: read_all has aborted it, nothing else to do.
        with contextlib.suppress(UpstreamError):
            await self.read_all(64 * 1024)

    def abort(self, reason: str) -> None:
        """Stop the transfer now; the upstream sees its connection closed."""
        if self.abort_reason is not None or self._fetch.done():
            return
        self.abort_reason = reason
        self._disarm_idle_timer()
        curl = self._curl
        if curl is None:
            return  # not started yet: _on_progress refuses it on connect
        # libcurl calls the progress callback only when it runs the handle;
        # a pause toggle makes it run now even if the connection is idle.
        try:
            curl.pause(pycurl.PAUSE_RECV)
            curl.pause(pycurl.PAUSE_CONT)
        except pycurl.error:
            pass  # the transfer already failed, _finish reports it

    def _resume(self) -> None:
        self._paused = False
        curl = self._curl
        if curl is None or self._fetch.done():
            return
        self._arm_idle_timer()
        # May call _on_body synchronously with the bytes held back; an error
        # here means the transfer failed while paused, and _finish reports it.
        with contextlib.suppress(pycurl.error):
            curl.pause(pycurl.PAUSE_CONT)

    def _wake(self) -> None:
        waiter, self._wakeup = self._wakeup, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm_idle_timer(self) -> None:
        # One timer per stream, re-armed lazily: a new timer per chunk would
        # cost more than the relay itself.
        self._last_activity = time.monotonic()
        if self.stream and self._idle_handle is None:
            self._idle_handle = self._loop.call_later(self.settings.stream_idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_handle = None
        if self._paused or self._fetch.done():
            return  # a paused transfer is the client's silence, not the upstream's
        silent = time.monotonic() - self._last_activity
        if silent >= self.settings.stream_idle_timeout:
            self.abort("idle")
        else:
            self._idle_handle = self._loop.call_later(self.settings.stream_idle_timeout - silent, self._idle_check)

    def _disarm_idle_timer(self) -> None:
        if self._idle_handle is not None:
            self._loop.remove_timeout(self._idle_handle)
            self._idle_handle = None
