"""Relaying upstream answers: the part every proxying route shares.

``ProxyHandler`` opens an ``UpstreamCall`` under the concurrency cap and
relays its answer, either whole (JSON) or as a live Server-Sent-Events stream.
"""

from __future__ import annotations

import json
import logging
import time

from tornado.ioloop import IOLoop

from chat_gpt_proxy.upstream import UpstreamCall, UpstreamError, UpstreamPool, relayed_headers

from .base import ApiError, BaseHandler, dumps, loads

log = logging.getLogger("chat_gpt_proxy")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx buffers proxied responses unless told not to.
    "X-Accel-Buffering": "no",
}
SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"
# Events are relayed whole, so that keep-alive comments and a final error
# event never land inside one. An upstream that never ends an event cannot
# make us hold more than this.
MAX_PENDING_EVENT = 1024 * 1024


def last_event_end(data: bytes) -> int:
    """Index just past the last complete SSE event in ``data`` (0 if none)."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def error_event(exc: UpstreamError) -> bytes:
    return b"data: " + dumps({"error": exc.error_object()}) + b"\n\n" + SSE_DONE


class ProxyHandler(BaseHandler):
    """A handler that calls the upstream and relays the answer."""

    @property
    def pool(self) -> UpstreamPool:
        return self.settings["pool"]

    async def open_upstream(self, method: str, url: str, headers: dict, body: bytes | None, *, stream: bool):
        """Start the upstream call; returns it once the upstream's headers arrived."""
        pool = self.pool
        if len(pool.handlers) >= self.config.max_concurrent_upstream:
            # Never queue silently (issue 2): the caller can retry elsewhere or later.
            raise ApiError(
                503,
                "The proxy is at its limit of concurrent upstream requests; retry shortly.",
                "server_error",
                "proxy_overloaded",
                headers={"Retry-After": "1"},
            )
        pool.handlers.add(self)
        try:
            self.upstream_call = UpstreamCall(pool.client(), self.config, method, url, headers, body, stream=stream)
            await self.upstream_call.start()
        except UpstreamError as exc:
            raise self.upstream_failed(exc) from None
        return self.upstream_call

    def upstream_failed(self, exc: UpstreamError) -> ApiError:
        if not self.client_left(exc):  # already logged as the client's fault
            self.note_fault(exc.kind)
        return ApiError.from_upstream(exc)

    def client_left(self, exc: UpstreamError) -> bool:
        """Whether ``exc`` is our own abort because the client went away."""
        return exc.kind == "aborted" and self.upstream_call.abort_reason in ("client_closed", "client_stall")

    def note_fault(self, kind: str) -> None:
        """An expected upstream fault: one warning line, never a traceback (issue 6)."""
        self.upstream_failure = kind
        log.warning("upstream fault request_id=%s kind=%s", self.request_id, kind)

    def on_finish(self) -> None:
        super().on_finish()
        self.pool.handlers.discard(self)

    def relay_headers(self, call: UpstreamCall) -> None:
        for name, value in relayed_headers(call.headers):
            self.set_header(name, value)

    async def read_json_answer(self, call: UpstreamCall):
        """The upstream's whole body parsed as JSON; ``ApiError`` 502 if it is not JSON."""
        try:
            body = await call.read_all(self.config.max_body_bytes)
        except UpstreamError as exc:
            raise self.upstream_failed(exc) from None
        try:
            return loads(body)
        except (ValueError, RecursionError):
            self.note_fault("invalid_json")
            raise ApiError(
                502,
                "The upstream answered %d with a body that is not JSON." % call.status,
                "upstream_error",
                "upstream_invalid_json",
            ) from None

    def raise_upstream_error(self, call: UpstreamCall, answer) -> None:
        """Mirror an upstream error status with its error object (issue 2)."""
        error = answer.get("error") if isinstance(answer, dict) else None
        if not isinstance(error, dict):
            error = {
                "message": "The upstream answered with status %d." % call.status,
                "type": "upstream_error",
                "code": None,
                "param": None,
            }
        message = error.get("message")
        if not isinstance(message, str) or not message:
            message = "The upstream answered with status %d." % call.status
        raise ApiError(call.status, message, headers=dict(relayed_headers(call.headers)), upstream_error=error)

    async def relay_stream(self, call: UpstreamCall) -> None:
        """Relay an SSE answer as it arrives; headers are sent with the first event."""
        self.set_status(call.status)
        for name, value in SSE_HEADERS.items():
            self.set_header(name, value)
        self.relay_headers(call)
        # Tokens are small writes a few ms apart: without TCP_NODELAY, Nagle's
        # algorithm holds each one until the client ACKs the previous one,
        # which a delayed ACK can postpone by 40 ms or more (RFC 1122 4.2.3.2).
        self.request.connection.stream.set_nodelay(True)
        pending = b""
        keepalive = StreamWatch(self, self.config.stream_keepalive, self.config.client_stall_timeout)
        self.pool.streams += 1
        try:
            while True:
                try:
                    chunk = await call.read()
                except UpstreamError as exc:
                    if self.client_left(exc):
                        return
                    self.upstream_failed(exc)
                    self.write(error_event(exc))
                    await self.flush_or_abort()
                    return
                if chunk is None:
                    if pending:
                        self.write(pending)
                    return
                pending += chunk
                end = last_event_end(pending) if len(pending) <= MAX_PENDING_EVENT else len(pending)
                if end:
                    events = pending[:end] if end < len(pending) else pending
                    pending = pending[end:]
                    if self.first_byte_at is None:
                        self.first_byte_at = time.monotonic()
                    if b'"usage":{' in events:
                        self.note_stream_usage(events)
                    self.write(events)
                    keepalive.touch()
                    if not await self.flush_or_abort():
                        return
        finally:
            self.pool.streams -= 1
            keepalive.stop()

    def note_stream_usage(self, events: bytes) -> None:
        """Keep the usage the upstream reports in a stream's last chunk (for logs and metrics)."""
        for event in events.split(b"\n\n"):
            if event.startswith(b"data: {") and b'"usage":{' in event:
                try:
                    usage = json.loads(event[6:]).get("usage")
                except (ValueError, AttributeError):
                    continue
                if isinstance(usage, dict):
                    self.usage = usage


class StreamWatch:
    """Timers of a long response: keep-alive comments and the stalled-client check.

    - After ``keepalive`` seconds without output, write an SSE comment so that
      intermediaries do not cut a silent stream (issue 2). Only between whole
      events, which is where the relay loop always leaves the output.
    - A client that stops reading but never closes would hold its upstream
      transfer (paused by backpressure) forever: after ``stall`` seconds with
      a flush pending, drop the client, which aborts the upstream (issue 6).
    """

    def __init__(self, handler: BaseHandler, keepalive: float | None, stall: float):
        self.handler = handler
        self.keepalive = keepalive
        self.stall = stall
        self.last = time.monotonic()
        self.loop = IOLoop.current()
        self.timer = None
        self._arm(self.last)

    def touch(self) -> None:
        self.last = time.monotonic()

    def _arm(self, now: float) -> None:
        delay = self.stall / 4
        if self.keepalive is not None:
            delay = min(delay, max(0.0, self.last + self.keepalive - now))
        self.timer = self.loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        now = time.monotonic()
        handler = self.handler
        if handler.flush_started is not None and now - handler.flush_started >= self.stall:
            log.warning("client stalled request_id=%s kind=client_stall seconds=%g", handler.request_id, self.stall)
            if handler.upstream_call is not None:
                handler.upstream_call.abort("client_stall")
            handler.request.connection.close()
            self.timer = None
            return
        if self.keepalive is not None and now - self.last >= self.keepalive and handler.flush_started is None:
            handler.write(SSE_KEEPALIVE)
            # Not awaited: the relay loop notices a closed client on its own.
            handler.flush().add_done_callback(lambda f: f.exception())
            self.last = now
        self._arm(now)

    def stop(self) -> None:
        if self.timer is not None:
            self.loop.remove_timeout(self.timer)
            self.timer = None
