"""Relaying upstream answers: the part every proxying route shares.

``ProxyHandler`` opens an ``UpstreamCall`` under the concurrency cap and
relays its answer, either whole (JSON) or as a live Server-Sent-Events stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from tornado.ioloop import IOLoop

from chat_gpt_proxy import tornado_internals as internals
from chat_gpt_proxy.cache import Entry, cache_key, key_partition
from chat_gpt_proxy.formats.base import ApiFormat
from chat_gpt_proxy.formats.openai import OPENAI_JSON
from chat_gpt_proxy.formats.sse import SseParser, parse_all
from chat_gpt_proxy.request.strict_json import loads
from chat_gpt_proxy.upstream.call import UpstreamCall
from chat_gpt_proxy.upstream.errors import UpstreamError
from chat_gpt_proxy.upstream.headers import relayed_headers
from chat_gpt_proxy.upstream.pool import UpstreamPool
from chat_gpt_proxy.upstream.retry import MIN_ATTEMPT_SECONDS
from chat_gpt_proxy.upstream.routing import FAILOVER_STATUSES, KEY_REFUSED_STATUSES, failover_error

from .admission import take_upstream_slot
from .base import BaseHandler
from .errors import ApiError, mirrored_error

log = logging.getLogger("chat_gpt_proxy")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx buffers proxied responses unless told not to.
    "X-Accel-Buffering": "no",
}
SSE_KEEPALIVE = b": keep-alive\n\n"
# Events are relayed whole, so that keep-alive comments and a final error
# event never land inside one. An upstream that never ends an event cannot
# make us hold more than this: beyond it the event is relayed in parts, and
# nothing of ours is written until it ends.
MAX_PENDING_EVENT = 1024 * 1024
# Ends an event cut off by an upstream failure, whatever its last bytes
# ("\n" ends a partial line or follows a lone "\r"; the next blank line
# dispatches it), so that the client's parser reads our error event as the
# next event instead of appending it to the broken one.
SSE_END_EVENT = b"\n\n"
# Events (comments, pings) held before a stream's first event tells its format; past these
# it is relayed as it is.
MAX_HELD_EVENTS = 1000


def without_content(status: int, method: str) -> bool:
    """Whether an answer has no body: to HEAD, 1xx, 204 and 304 (RFC 9110 section 6.4.1),
    and 205, which must not have one (section 15.3.6)."""
    return method == "HEAD" or status < 200 or status in (204, 205, 304)


class ProxyHandler(BaseHandler):
    """A handler that calls the upstream and relays the answer."""

    @property
    def pool(self) -> UpstreamPool:
        return self.application.pool

    async def open_upstream(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict,
        body,
        *,
        stream: bool,
        model: str | None,
        key: str,
    ):
        """Start the upstream call on the first upstream that takes it; returns it once its headers arrived.

        ``path`` is the API path after ``/v1/``; ``body`` is bytes, or a
        function of the upstream giving them (None: this upstream cannot take
        the request, e.g. an alias on a body that is not JSON). The next
        upstream is tried only when the request provably did not reach a
        model or was refused without being processed, and nothing has been
        relayed yet (routing.py); the client gets the last one's answer.
        """
        take_upstream_slot(self, self.pool)
        router = self.application.router
        candidates = []
        for upstream in self.upstream_candidates(model, kinds=self.api_format.kinds):
            upstream_body = body(upstream) if callable(body) else body
            if callable(body) and upstream_body is None:
                continue  # it names the model otherwise, and this body cannot be rewritten
            candidates.append((upstream, upstream_body))
        if not candidates:
            raise ApiError(
                400,
                "The upstreams that serve %r call it by another name, and this request's body is not "
                "a JSON object whose model could be renamed." % (model or "")[:100],
                "invalid_request_error",
                "model_alias_needs_json",
            )
        for index, (upstream, upstream_body) in enumerate(candidates):
            last = index == len(candidates) - 1
            try:
                url = upstream.url(path, query, model)
            except ValueError as exc:
                raise ApiError(400, "The model %r is %s." % ((model or "")[:100], exc), code="invalid_model") from None
            if url is None:
                raise ApiError(400, "Invalid query string.", "invalid_request_error", "invalid_path")
            call_headers = {**headers, **upstream.auth_headers(self.upstream_key(upstream, key))}
            self.access.upstream = upstream.name
            self.access.upstream_model = upstream.upstream_model(model)
            # What this try says about the route is routing.route_fault's to judge, from whose key it carried.
            attempt = router.started(upstream, own_key=self.used_server_key, tenant=self.route_tenant(), model=model)
            try:
                try:
                    call = await self.call_one(
                        method, url, call_headers, upstream_body, stream, upstream, attempt.connected
                    )
                except UpstreamError as exc:
                    if self.client_left(exc) or exc.kind == "aborted":
                        raise self.upstream_failed(exc) from None
                    attempt.error(exc)
                    if last or not failover_error(exc):
                        raise self.upstream_failed(exc) from None
                    self.note_failover(upstream, exc.kind)
                    continue
                status = call.status
                attempt.answered(status, call.headers)
                failover = status in FAILOVER_STATUSES or (status in KEY_REFUSED_STATUSES and self.used_server_key)
                if failover and not last:
                    await call.discard()
                    self.note_failover(upstream, "status_%d" % status)
                    continue
                return call
            finally:
                attempt.end()
        raise AssertionError("unreachable: the last candidate always returns or raises")  # pragma: no cover

    async def call_one(
        self, method: str, url: str, headers: dict, body: bytes | None, stream: bool, upstream, on_connected=None
    ):
        """One upstream, with the retry policy of UPSTREAM_RETRIES / RETRY_ON_STATUS; raises ``UpstreamError``.
        ``on_connected``: called when a new connection to the upstream is up (the route works)."""
        pool = self.pool
        first = time.monotonic()
        attempt = 0
        timeout = None
        while True:
            call = self.upstream_call = self.access.call = UpstreamCall(
                pool.client(),
                self.config,
                method,
                url,
                headers,
                body,
                stream=stream,
                timeout=timeout,
                route=upstream,
                on_connected=on_connected,
            )
            try:
                await call.start()
            except UpstreamError as exc:
                attempt += 1
                wait = pool.retry.after_error(exc, attempt, time.monotonic() - first)
                if wait is None:
                    raise
                reason = exc.retry_reason
            else:
                if call.status < 400 or not pool.retry.statuses:
                    return call
                attempt += 1
                wait = pool.retry.after_status(call.status, call.headers, attempt, time.monotonic() - first)
                if wait is None:
                    return call
                reason = "status_%d" % call.status
                await call.discard()
            # Nothing has been sent to the client yet.
            self.note_retry(reason, attempt, wait)
            await asyncio.sleep(wait)
            stream_ = self.request.connection.stream
            if stream_ is None or stream_.closed():
                raise ApiError.from_upstream(UpstreamError("aborted", "the request was aborted (client_closed)"))
            timeout = pool.retry.budget - (time.monotonic() - first)
            if timeout < MIN_ATTEMPT_SECONDS:
                # The sleep overran the little time the policy left: a timeout,
                # not a 0 ms (unbounded, to libcurl) or negative one.
                raise UpstreamError("timeout", "the upstream did not answer in time")

    # The response cache (chat_gpt_proxy/cache.py): where this request's answer is kept, if it is.
    cache_slot: tuple[str, int] | None = None
    cache_events: list[bytes] | None = None
    cache_waiters: asyncio.Future | None = None
    cache_waiters_key = ""
    cache_bytes = 0

    def cache_ttl(self) -> int:
        """Seconds the token, CACHE_TTL or the request ask to keep the answer for (0: no cache);
        whether the request itself can be cached is ``cacheable``'s to say."""
        cache = self.application.cache
        return cache.ttl_for(self.token, self.request.headers) if cache is not None else 0

    async def use_cache(self, route: str, payload, caller_key: str, stream: bool, ttl: int) -> bool:
        """Answer from the cache if the answer is there (True); else remember where to keep
        the answer this request is about to fetch. Only for a request with a ``cache_ttl``."""
        cache = self.application.cache
        key = cache_key(route, key_partition(self.access.token, caller_key, self.used_server_key), payload)
        entry = await cache.get(key)
        if entry is None and key in cache.inflight:
            # The same request is being fetched: wait for its answer (coalescing).
            try:
                entry = await asyncio.wait_for(asyncio.shield(cache.inflight[key]), self.config.request_timeout)
            except (TimeoutError, asyncio.CancelledError):
                entry = None
        if entry is not None:
            await self.replay(entry, cache)
            return True
        self.set_header("x-proxy-cache", "miss")
        self.access.cache = "miss"
        cache.count("miss", self.access.token)
        self.cache_slot = (key, ttl)
        if stream:
            self.cache_events = []
        if key not in cache.inflight:
            self.cache_waiters = cache.inflight[key] = asyncio.get_running_loop().create_future()
            self.cache_waiters_key = key
        return False

    async def replay(self, entry: Entry, cache) -> None:
        """A cached answer, as the upstream's was relayed: JSON whole, a stream event by event as the client reads."""
        self.access.cache = "hit"
        self.access.model = entry.model or self.access.model
        usage = self.access.usage = entry.usage
        self.metered = False  # a hit costs nothing and is charged nothing
        price = self.application.spend.prices.price(entry.model)
        saved_usd = price.cost(usage) if price is not None and usage is not None else 0.0
        cache.count("hit", self.access.token, saved_usd, usage.tokens if usage is not None else 0)
        self.set_header("x-proxy-cache", "hit")
        self.set_header("Content-Type", entry.content_type)
        if entry.kind == "json":
            self.finish(entry.body)
            return
        for name, value in SSE_HEADERS.items():
            self.set_header(name, value)
        self.request.connection.stream.set_nodelay(True)
        if self.access.first_byte_at is None:
            self.access.first_byte_at = time.monotonic()
        # One event per write and flush, however the upstream had grouped them.
        for event in parse_all(b"".join(entry.events)):
            self.write(event.raw)
            if not await self.flush_or_abort():
                return
        self.finish()

    def collect_for_cache(self, events: list[bytes]) -> None:
        """Keep a copy of what was relayed, up to the largest entry the cache takes; beyond it, none."""
        self.cache_bytes += sum(len(event) for event in events)
        if self.cache_bytes > self.application.cache.max_entry:
            self.cache_events = None
            self.cache_slot = None
        else:
            self.cache_events.extend(events)

    def keep_in_cache(self, entry: Entry) -> None:
        """Keep this request's complete, successful answer for the requests that repeat it."""
        if self.cache_slot is None:
            return
        key, ttl = self.cache_slot
        self.cache_slot = None
        entry = dataclasses.replace(
            entry, model=self.access.ran_model or self.access.model, usage=self.access.usage, expires=time.time() + ttl
        )
        cache = self.application.cache
        task = asyncio.ensure_future(cache.put(key, entry))
        task.add_done_callback(lambda t: t.exception())
        self.release_cache_waiters(entry)

    def release_cache_waiters(self, entry: Entry | None) -> None:
        """Those waiting for this request's answer get it (or None: they fetch their own)."""
        waiters, self.cache_waiters = self.cache_waiters, None
        if waiters is None:
            return
        cache = self.application.cache
        if cache.inflight.get(self.cache_waiters_key) is waiters:
            del cache.inflight[self.cache_waiters_key]
        if not waiters.done():
            waiters.set_result(entry)

    def ask_stream_usage(self, payload: dict) -> None:
        """A metered chat stream is always counted: ask for its usage if the caller did
        not, and remember to remove what that adds (the format's stream meter does)."""
        options = payload.get("stream_options")
        if options is None or (isinstance(options, dict) and options.get("include_usage") is not True):
            payload["stream_options"] = {**(options or {}), "include_usage": True}
            self.usage_injected = True

    def note_retry(self, reason: str, attempt: int, wait: float) -> None:
        log.warning(
            "upstream retry request_id=%s reason=%s attempt=%d/%d wait_ms=%d",
            self.request_id,
            reason,
            attempt,
            self.pool.retry.retries,
            wait * 1000,
        )
        metrics = self.application.metrics
        if metrics is not None:
            metrics.upstream_retries.labels(reason).inc()

    def upstream_failed(self, exc: UpstreamError) -> ApiError:
        if not self.client_left(exc):  # already logged as the client's fault
            self.note_fault(exc.kind, exc.detail)
        return ApiError.from_upstream(exc)

    def client_left(self, exc: UpstreamError) -> bool:
        """Whether ``exc`` is our own abort because the client went away."""
        return exc.kind == "aborted" and self.upstream_call.abort_reason in ("client_closed", "client_stall")

    def on_finish(self) -> None:
        super().on_finish()
        self.pool.handlers.discard(self)
        # Whatever ended the handler, nobody reads the rest of the upstream's
        # answer now: a transfer left running would stay paused at the high
        # water mark for good, holding its slot and its connection.
        call = self.upstream_call
        if call is not None and call.abort_reason is None and call.finished_at is None:
            call.abort("unread")
        # An answer that was not kept (an error, an aborted stream): the waiters fetch their own.
        self.release_cache_waiters(None)

    def relay_headers(self, call: UpstreamCall) -> None:
        for name, value in relayed_headers(call.headers):
            self.set_header(name, value)

    async def read_json_answer(self, call: UpstreamCall):
        """The upstream's whole body parsed as JSON; ``ApiError`` 502 if it is not JSON."""
        try:
            body = await call.read_all(self.config.max_answer_bytes)
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
        if call.status == 401 and self.used_server_key:
            raise self.server_key_refused()
        raise mirrored_error(call.status, answer, call.headers)

    # The API format of this request's answer (chat_gpt_proxy/formats): where its usage and model are.
    api_format: ApiFormat = OPENAI_JSON

    async def relay_stream(self, call: UpstreamCall) -> None:
        """Relay an SSE answer event by event as it arrives; headers are sent with the first event.

        Every event goes through the format's stream meter, which records the
        usage and the model that ran and takes out what the proxy added to the
        stream; what it records stays recorded whoever ends the stream.
        """
        self.set_status(call.status)
        for name, value in SSE_HEADERS.items():
            self.set_header(name, value)
        self.relay_headers(call)
        # Tokens are small writes a few ms apart: without TCP_NODELAY, Nagle's
        # algorithm holds each one until the client ACKs the previous one,
        # which a delayed ACK can postpone by 40 ms or more (RFC 1122 4.2.3.2).
        self.request.connection.stream.set_nodelay(True)
        parser = SseParser()
        meter = self.stream_meter = self.api_format.stream_meter(self.usage_injected)
        # Events held until the meter knows the stream is in the client's format: a comment
        # or a ping first must not send the headers before a foreign answer is refused.
        held: list[bytes] = []
        keepalive = StreamWatch(self, self.config.stream_keepalive, self.config.client_stall_timeout)
        self.pool.streams += 1
        try:
            while True:
                try:
                    chunk = await call.read()
                except UpstreamError as exc:
                    if self.client_left(exc):
                        return
                    error = self.upstream_failed(exc)
                    ended = self.api_format.error_event(error.status_code, exc.error_object())
                    self.write(b"".join(held) + (SSE_END_EVENT if parser.relayed else b"") + ended)
                    await self.flush_or_abort()
                    return
                if chunk is None:
                    # An event the upstream never ended is relayed as it came (and read, if its lines ended).
                    rest = held + [relayed.raw for relayed in map(meter.event, parser.finish()) if relayed is not None]
                    if rest:
                        self.write(b"".join(rest))
                        if self.cache_events is not None:
                            self.collect_for_cache(rest)
                    if self.cache_events is not None and call.status == 200 and meter.complete and not meter.failed:
                        self.keep_in_cache(Entry("sse", SSE_HEADERS["Content-Type"], events=tuple(self.cache_events)))
                    return
                out = [relayed.raw for relayed in map(meter.event, parser.feed(chunk)) if relayed is not None]
                if meter.foreign and not internals.headers_written(self):
                    # Not the format the client speaks (an OpenAI-compatible server behind a
                    # Messages route): nothing is relayed, the client gets an error it can read.
                    call.abort("foreign")
                    self.note_fault("foreign_format")
                    raise ApiError(502, self.api_format.foreign_message, "upstream_error", "upstream_wrong_format")
                self.access.events += len(out)
                if held or not meter.settled:
                    held.extend(out)
                    out = held
                    if not meter.settled and parser.pending <= MAX_PENDING_EVENT and len(held) < MAX_HELD_EVENTS:
                        continue
                    held = []
                if parser.pending > MAX_PENDING_EVENT:
                    # An event too large to hold back: its part goes out now, and
                    # nothing of ours is written until it ends.
                    out.append(parser.take_pending())
                if not out:
                    continue
                if self.access.first_byte_at is None:
                    self.access.first_byte_at = time.monotonic()
                if self.cache_events is not None:
                    self.collect_for_cache(out)
                self.write(out[0] if len(out) == 1 else b"".join(out))
                keepalive.mid_event = parser.relayed > 0
                keepalive.touch()
                if not await self.flush_or_abort():
                    return
        finally:
            self.pool.streams -= 1
            keepalive.stop()
            self.access.ran_model = meter.model or self.access.ran_model
            if meter.usage is not None:
                self.access.usage = meter.usage

    stream_meter = None


class StreamWatch:
    """Timers of a long response: keep-alive comments and the stalled-client check.

    - After ``keepalive`` seconds without output, write an SSE comment so that
      intermediaries do not cut a silent stream. Only between whole
      events: never while ``mid_event`` (part of an event larger than
      MAX_PENDING_EVENT is out), where the comment's blank line would end the
      event early and leave the rest unparseable.
    - A client that stops reading but never closes would hold its upstream
      transfer (paused by backpressure) forever: after ``stall`` seconds with
      a flush pending, drop the client, which aborts the upstream.
    """

    def __init__(self, handler: BaseHandler, keepalive: float | None, stall: float):
        self.handler = handler
        self.keepalive = keepalive
        self.stall = stall
        self.last = time.monotonic()
        self.mid_event = False
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
            handler.drop_client()
            self.timer = None
            return
        if (
            self.keepalive is not None
            and now - self.last >= self.keepalive
            and handler.flush_started is None
            and not self.mid_event
        ):
            handler.write(SSE_KEEPALIVE)
            # Not awaited: the relay loop notices a closed client on its own.
            handler.flush().add_done_callback(lambda f: f.exception())
            self.last = now
        self._arm(now)

    def stop(self) -> None:
        if self.timer is not None:
            self.loop.remove_timeout(self.timer)
            self.timer = None
