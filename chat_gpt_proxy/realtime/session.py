"""The Realtime API relay: a client WebSocket and an upstream WebSocket, messages both ways.

The client side is Tornado's ``WebSocketHandler`` (handlers/realtime.py). The
upstream side is the ``websockets`` library's asyncio client (the one the
official ``openai`` SDK uses), because Tornado's ``websocket_connect`` cannot go
through an egress proxy. ``connect_upstream`` takes the egress proxy
(UPSTREAM_PROXY or the environment's) and UPSTREAM_CA_FILE; the
tunnel through the proxy (http, https, socks5, socks5h) is opened by
chat_gpt_proxy/upstream/tunnel.py and handed to websockets.

``RealtimeSession`` relays one session:

- text and binary messages, in order, unchanged, each awaited before the next
  is read from the same side: Tornado reads the client's next frame only once
  ``from_client`` returned, and the pump reads the upstream's next message only
  once the client's socket took the previous one (``websockets`` then stops
  reading the upstream's socket after ``UPSTREAM_QUEUE`` frames). Memory per
  session is therefore bounded by a few messages, whoever reads slowly;
- a side whose write stays pending for ``CLIENT_STALL_TIMEOUT`` is dropped, and
  the other side closed with 1011;
- either side's close is mirrored on the other (code and reason) at once;
  codes that may not be sent (RFC 6455 section 7.4.1: 1005 "no status", 1006
  "abnormal") become 1000 and 1011;
- ``STREAM_IDLE_TIMEOUT`` without a message either way closes both sides with
  1001, as does ``abort("shutdown")`` (server.py's graceful drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

from tornado.ioloop import IOLoop
from tornado.websocket import WebSocketClosedError
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.protocol import State

from chat_gpt_proxy.request.model import inspect_event

log = logging.getLogger("chat_gpt_proxy")

UPSTREAM_TO_CLIENT = "upstream_to_client"

CLIENT_TO_UPSTREAM = "client_to_upstream"


# Close codes an endpoint may send (RFC 6455 section 7.4, IANA registry).
def _sendable(code: int) -> bool:
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def mirrored_close(code: int | None, reason: str) -> tuple[int, str]:
    """The close to send on one leg for a close seen on the other (``None``: no close frame at all)."""
    if code is None:  # 1006: the connection ended without a close frame
        return 1011, "peer connection lost"
    if code == 1005:  # a close frame without a code
        return 1000, ""
    if not _sendable(code):
        return 1011, reason
    return code, reason


def _size(message: str | bytes) -> int:
    # isascii() is O(1) on CPython strings; audio deltas are ASCII base64.
    if isinstance(message, bytes) or message.isascii():
        return len(message)
    return len(message.encode("utf-8"))


class RealtimeSession:
    """One relayed session between ``client`` (the Tornado handler) and ``upstream``.

    The client object offers ``write_message(message, binary)`` (a future),
    ``close(code, reason)``, ``drop()`` (close its TCP connection at once) and
    ``client_closing()`` (Tornado is closing it: ping timeout). ``on_end(session)``
    runs once, when both sides are closed.
    """

    def __init__(self, client, upstream: ClientConnection, config, metrics, on_end, allowed_models=()):
        self.client = client
        # ALLOWED_MODELS or the token's allowed_models: every model a client
        # event names is checked against it; empty: nothing is read.
        self.allowed_models = allowed_models
        self.upstream = upstream
        self.config = config
        self.metrics = metrics
        self.on_end = on_end
        self.started_at = time.monotonic()
        self.last_activity = self.started_at
        self.messages = {CLIENT_TO_UPSTREAM: 0, UPSTREAM_TO_CLIENT: 0}
        self.bytes = {CLIENT_TO_UPSTREAM: 0, UPSTREAM_TO_CLIENT: 0}
        self.usage = {"input_tokens": 0, "output_tokens": 0}
        self.usage_seen = False
        self.cached_tokens = 0
        # Responses created and not done yet, and the messages relayed since the last one was created.
        self.responses_open = 0
        self.in_flight_messages = 0
        # When the pending write to each side began (None: none pending).
        self.writing_since: float | None = None
        self.sending_since: float | None = None
        # Who ended the session first and with which code: "client",
        # "upstream" or "proxy" (and why, in ``end_reason``).
        self.closed_by: str | None = None
        self.close_code: int | None = None
        self.end_reason: str | None = None
        self.client_done = False
        self.upstream_done = False
        self.finished = False
        self._tasks: set[asyncio.Task] = set()
        self._timer = None
        self._loop = IOLoop.current()
        if metrics is not None:
            self._count = {
                d: (metrics.realtime_messages.labels(d), metrics.realtime_bytes.labels(d)) for d in self.bytes
            }

    def start(self) -> None:
        self._spawn(self._pump())
        self._spawn(self._watch_upstream())
        self._arm()

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        # A bug: say where, never what (the message could hold a key or a prompt).
        log.error("realtime relay error type=%s", type(task.exception()).__name__)
        self.end("error", 1011, "proxy error", drop_upstream=True)

    def _note(self, direction: str, message: str | bytes) -> None:
        size = _size(message)
        self.messages[direction] += 1
        self.bytes[direction] += size
        self.last_activity = time.monotonic()
        if self.metrics is not None:
            messages, nbytes = self._count[direction]
            messages.inc()
            nbytes.inc(size)

    # -- client to upstream

    async def from_client(self, message: str | bytes) -> None:
        """One message from the client; returns once the upstream's socket took it (backpressure)."""
        if self.closed_by is not None:
            return
        if self.allowed_models and await self._refused(message):
            return
        self._note(CLIENT_TO_UPSTREAM, message)
        self.sending_since = time.monotonic()
        try:
            await self.upstream.send(message)
        except ConnectionClosed:
            pass  # the pump sees the upstream's close and ends the session
        finally:
            self.sending_since = None

    async def _refused(self, message: str | bytes) -> bool:
        """With an allow-list, an event naming a model outside it (or naming one unclearly) is not
        relayed: the client gets an error event, and the session ends with 1008 (policy violation)."""
        found = inspect_event(message)
        refused = [m for m in found.models if m not in self.allowed_models]
        if found.problem is None and not refused:
            return False
        if found.problem is not None:
            code = "model_undetermined"
            text = (
                "ALLOWED_MODELS (or the token's allowed_models) is in force and this event's model cannot be "
                "determined: %s." % found.problem
            )
        else:
            code = "model_not_allowed"
            text = "Model %r is not allowed on this proxy." % refused[0][:100]
        event = {
            "type": "error",
            "event_id": "event_proxy_" + uuid.uuid4().hex[:16],
            "error": {"type": "invalid_request_error", "code": code, "message": text, "param": None},
        }
        with contextlib.suppress(WebSocketClosedError):
            await self.client.write_message(json.dumps(event))
        self.end(code, 1008, code.replace("_", " "))
        return True

    # -- upstream to client

    async def _pump(self) -> None:
        try:
            while True:
                message = await self.upstream.recv()
                if self.closed_by is not None:
                    continue  # the client is being closed: read on so the upstream's close gets through
                self._note(UPSTREAM_TO_CLIENT, message)
                if isinstance(message, str) and ("response.done" in message or "response.created" in message):
                    self._note_usage(message)
                elif self.responses_open:
                    self.in_flight_messages += 1
                self.writing_since = time.monotonic()
                try:
                    await self.client.write_message(message, binary=isinstance(message, bytes))
                except WebSocketClosedError:
                    pass  # the client is gone: its on_close closes the upstream
                finally:
                    self.writing_since = None
        except ConnectionClosed as exc:
            self._upstream_closed(exc)

    def _note_usage(self, message: str) -> None:
        """Sum the token usage of ``response.done`` events (for the access log and metrics), and
        count the responses under way (a client that leaves during one is charged an estimate of it)."""
        try:
            event = json.loads(message)
            kind = event.get("type")
            if kind == "response.created":
                self.responses_open += 1
                self.in_flight_messages = 0
                return
            usage = event["response"]["usage"] if kind == "response.done" else None
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        if kind == "response.done" and self.responses_open:
            self.responses_open -= 1
        if not isinstance(usage, dict):
            return
        for kind in self.usage:
            if isinstance(usage.get(kind), int):
                self.usage[kind] += usage[kind]
                self.usage_seen = True
        details = usage.get("input_token_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            self.cached_tokens += details["cached_tokens"]

    def usage_object(self) -> dict | None:
        """The session's summed usage in the shape of one ``response.done`` usage (None: none seen)."""
        if not self.usage_seen:
            return None
        return {**self.usage, "input_token_details": {"cached_tokens": self.cached_tokens}}

    def _upstream_closed(self, exc: ConnectionClosed) -> None:
        if self.closed_by is not None:
            return
        if exc.rcvd is not None and (exc.sent is None or exc.rcvd_then_sent):
            code, reason = exc.rcvd.code, exc.rcvd.reason
        elif exc.sent is not None:
            # websockets closed it: a message over WS_MAX_MESSAGE_BYTES (1009),
            # a protocol error (1002), a keepalive ping timeout (1011).
            code, reason = exc.sent.code, exc.sent.reason
        else:
            code, reason = None, ""
        self.closed_by, self.close_code = "upstream", 1006 if code is None else code
        self.client.close(*mirrored_close(code, reason))

    async def _watch_upstream(self) -> None:
        await self.upstream.wait_closed()
        self.upstream_done = True
        self._maybe_finish()

    # -- the client's side closed (Tornado's on_close)

    def client_closed(self, code: int | None, reason: str, by: str = "client") -> None:
        """The client's connection ended; ``code`` None if it ended without a close frame."""
        self.client_done = True
        if self.closed_by is None:
            self.closed_by, self.close_code = by, 1006 if code is None else code
            self._spawn(self._close_upstream(*mirrored_close(code, reason)))
        self._maybe_finish()

    async def _close_upstream(self, code: int, reason: str) -> None:
        try:
            await self.upstream.close(code, reason)
        except (ConnectionClosed, OSError, WebSocketException):
            self.upstream.transport.abort()

    # -- the proxy ends the session

    def end(self, reason: str, code: int, text: str, *, drop_client=False, drop_upstream=False) -> None:
        """Close both sides with ``code``; ``drop_*``: close that side's TCP connection without a handshake."""
        if self.closed_by is not None:
            return
        self.closed_by, self.close_code, self.end_reason = "proxy", code, reason
        if drop_client:
            self.client.drop()
        else:
            self.client.close(code, text)
        if drop_upstream:
            self.upstream.transport.abort()
        else:
            self._spawn(self._close_upstream(code, text))

    def abort(self, reason: str) -> None:
        """server.py's drain calls this after SHUTDOWN_GRACE (as on an HTTP upstream call)."""
        self.end(reason, 1001, "server shutting down")

    def _arm(self) -> None:
        config = self.config
        period = max(0.05, min(1.0, config.client_stall_timeout / 4, config.stream_idle_timeout / 4))
        self._timer = self._loop.call_later(period, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.finished:
            return
        if self.closed_by is None:
            now = time.monotonic()
            stall = self.config.client_stall_timeout
            if self.writing_since is not None and now - self.writing_since >= stall:
                log.warning("client stalled kind=client_stall seconds=%g", stall)
                self.end("client_stall", 1011, "client stalled", drop_client=True)
            elif self.sending_since is not None and now - self.sending_since >= stall:
                log.warning("upstream stalled kind=upstream_stall seconds=%g", stall)
                self.end("upstream_stall", 1011, "upstream stalled", drop_upstream=True)
            elif self.client.client_closing():
                # Tornado's ping timed out: the client vanished without a close
                # frame. Tornado waits 5 s more for one; the upstream need not.
                self.closed_by, self.close_code, self.end_reason = "proxy", 1006, "client_lost"
                self._spawn(self._close_upstream(*mirrored_close(None, "")))
            elif self.upstream.state is State.CLOSING and self.upstream.protocol.close_sent is not None:
                # websockets is closing the upstream itself (no pong to its
                # ping, an oversized message) and waits CLOSE_TIMEOUT for the
                # upstream's answer: the client need not wait with it.
                sent = self.upstream.protocol.close_sent
                self.closed_by, self.close_code, self.end_reason = "proxy", sent.code, "upstream_lost"
                self.client.close(*mirrored_close(sent.code, sent.reason))
            elif (
                self.writing_since is None
                and self.sending_since is None
                and now - self.last_activity >= self.config.stream_idle_timeout
            ):
                self.end("idle", 1001, "idle timeout")
        self._arm()

    def _maybe_finish(self) -> None:
        if self.finished or not (self.client_done and self.upstream_done):
            return
        self.finished = True
        if self._timer is not None:
            self._loop.remove_timeout(self._timer)
            self._timer = None
        if self.metrics is not None:
            self.metrics.realtime_closes.labels(self.closed_by or "client", close_code_label(self.close_code)).inc()
        self.on_end(self)


def close_code_label(code: int | None) -> str:
    """The ``code`` label of proxy_realtime_closes_total, bounded: the protocol's own
    codes (1000-2999) as they are, application codes (3000-4999, chosen by a
    client) by range, so a client cannot add series at will."""
    if code is None:
        return "none"
    if code < 3000:
        return str(code)
    return "%dxxx" % (code // 1000)
