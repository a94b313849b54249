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

These techniques and their pitfalls were measured on this machine: see
``shared/notes/tornado-upstream.md``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time

import pycurl
from tornado.curl_httpclient import CurlAsyncHTTPClient, CurlError
from tornado.httpclient import HTTPRequest
from tornado.httputil import HTTPHeaders
from tornado.ioloop import IOLoop

log = logging.getLogger("chat_gpt_proxy.upstream")

# Hop-by-hop headers (RFC 9110 section 7.6.1) and those libcurl computes
# itself: never copied between the two connections.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)

# Upstream response headers a client of the proxy may rely on (issue 2):
# OpenAI's request id for support tickets, and rate-limit information.
RELAYED_RESPONSE_HEADERS = ("x-request-id", "retry-after", "openai-processing-ms")
RELAYED_RESPONSE_PREFIXES = ("x-ratelimit-",)

FIELD_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
FIELD_VALUE_RE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")

USER_AGENT = "chat_gpt_proxy/1.0"

# Pause the transfer when this much is queued for a slow client and resume
# below the low mark: bounded memory per stream without stalling fast ones.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

# libcurl error codes (curl/curl.h) that mean something to a client.
CURLE_COULDNT_RESOLVE_HOST = 6
CURLE_COULDNT_CONNECT = 7
CURLE_WRITE_ERROR = 23
CURLE_OPERATION_TIMEDOUT = 28
CURLE_ABORTED_BY_CALLBACK = 42


class UpstreamError(Exception):
    """The upstream could not give a usable answer.

    ``kind`` is one of: ``connect`` (refused or unresolvable), ``timeout``
    (connect or total timeout), ``idle`` (stream went silent), ``broken``
    (connection failed mid-response), ``aborted`` (we aborted it: client left
    or shutdown). The message never contains request data or secrets.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

    def error_object(self) -> dict:
        """What the client is told, as a JSON error or as a stream's final event."""
        return {"message": self.message, "type": "upstream_error", "code": "upstream_" + self.kind}


def make_client(settings) -> CurlAsyncHTTPClient:
    """One client per IOLoop; ``max_clients`` is our own concurrency cap, so
    Tornado's hidden queue (which has no timeout in the curl client) is never used."""
    client = CurlAsyncHTTPClient(
        force_instance=True,
        max_clients=settings.max_concurrent_upstream,
        # Our WRITEFUNCTION replaces Tornado's, so this limit would not apply;
        # set it to the largest value anyway for clarity.
        max_body_size=1 << 62,
    )
    # libcurl sizes its idle-connection cache at 4x the transfers running at
    # that moment; Tornado removes each finished transfer, so after a burst
    # the cache shrinks and closes warm connections (each a new TLS handshake
    # with the real API). Keep up to one idle connection per allowed request.
    client._multi.setopt(pycurl.M_MAXCONNECTS, settings.max_concurrent_upstream)
    return client


class UpstreamPool:
    """The upstream client of this process and the handlers with a call in flight."""

    def __init__(self, config):
        self.config = config
        self.streams = 0
        self.handlers: set = set()
        self._client = None

    def client(self):
        # Created on first use so that it belongs to the running IOLoop.
        if self._client is None:
            self._client = make_client(self.config)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def relayed_headers(headers: HTTPHeaders) -> list[tuple[str, str]]:
    return [
        (name, value)
        for name, value in headers.get_all()
        if name.lower() in RELAYED_RESPONSE_HEADERS or name.lower().startswith(RELAYED_RESPONSE_PREFIXES)
    ]


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
        client: CurlAsyncHTTPClient,
        settings,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        *,
        stream: bool,
    ):
        self.settings = settings
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
        request = HTTPRequest(
            url,
            method=method,
            headers=headers,
            body=body,
            connect_timeout=settings.connect_timeout,
            # Streams have no total cap (issue 2): the idle timer bounds them.
            request_timeout=0 if stream else settings.request_timeout,
            follow_redirects=False,
            decompress_response=False,
            allow_nonstandard_methods=True,
            user_agent=USER_AGENT,
            prepare_curl_callback=self._prepare,
        )
        self._fetch = client.fetch(request, raise_error=False)
        self._fetch.add_done_callback(self._on_fetch_done)
        if stream:
            self._arm_idle_timer()

    # -- libcurl callbacks: run inside curl_multi_socket_action, so they only
    # record state and wake the reader; they never raise.

    def _prepare(self, curl: pycurl.Curl) -> None:
        self._curl = curl
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

    def _on_header_line(self, line: bytes) -> None:
        if line.startswith(b"HTTP/"):
            parts = line.split(b" ", 2)
            try:
                self._pending_status = int(parts[1])
            except (IndexError, ValueError):
                self._pending_status = 0
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
                name, value = name.strip(), value.strip()
                # A line that is no valid field (RFC 9110 5.1, 5.5; e.g. a
                # control character in the value) is dropped: relayed, it
                # would make Tornado refuse the whole response (a 500).
                if sep and FIELD_NAME_RE.fullmatch(name) and FIELD_VALUE_RE.fullmatch(value):
                    headers.add(name, value)
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
            return UpstreamError("idle", "the upstream sent nothing for %g s" % self.settings.stream_idle_timeout)
        if self.abort_reason is not None:
            return UpstreamError("aborted", "the request was aborted (%s)" % self.abort_reason)
        # Even with raise_error=False, connection failures and timeouts come
        # as an exception (CurlError 599), not as a response. Read the future
        # itself: its done-callbacks may not have run yet.
        error = self._fetch.exception() or self._fetch.result().error
        if not isinstance(error, CurlError):
            return None
        if error.errno in (CURLE_COULDNT_CONNECT, CURLE_COULDNT_RESOLVE_HOST):
            return UpstreamError("connect", "could not connect to the upstream")
        if error.errno == CURLE_OPERATION_TIMEDOUT:
            if self.status:
                return UpstreamError("timeout", "the upstream did not finish its answer in time")
            return UpstreamError("timeout", "the upstream did not answer in time")
        return UpstreamError("broken", "the upstream connection failed (curl error %d)" % error.errno)

    # -- the reader's side

    async def start(self) -> tuple[int, HTTPHeaders]:
        """Wait for the final status line and headers."""
        await self._headers_future
        if not self._headers_done:
            error = self._error()
            raise error or UpstreamError("broken", "the upstream closed without answering")
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
                raise UpstreamError("broken", "the upstream answer is larger than %d bytes" % limit)
            parts.append(chunk)
        return b"".join(parts)

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
