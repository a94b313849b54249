"""Forwarding a request as it came and relaying the answer as it came: what the API surfaces that pass
requests through share (/v1/* for OpenAI's API, /v1/messages for Anthropic's).

The request goes upstream with the headers the surface names and its body
byte for byte (a model's alias aside); the answer comes back with its
status, its headers (less hop-by-hop ones, cookies and CORS) and its body:
small ones whole, streams event by event through the format's meter
(handlers/relay.py), large ones chunk by chunk, never held whole.
"""

from __future__ import annotations

import contextlib
import json

from chat_gpt_proxy import tornado_internals as internals
from chat_gpt_proxy.cache import Entry, cacheable
from chat_gpt_proxy.request.body import parse_content_length
from chat_gpt_proxy.request.strict_json import dumps, loads
from chat_gpt_proxy.upstream.errors import UpstreamError
from chat_gpt_proxy.upstream.headers import HOP_BY_HOP_HEADERS, is_json, is_sse

from .relay import ProxyHandler, StreamWatch, without_content

# Response headers never relayed: hop-by-hop ones, and cookies the upstream
# sets for its own domain.
# x-proxy-request-id is ours alone (handlers/base.py).
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP_HEADERS | {
    "set-cookie",
    "set-cookie2",
    "content-encoding",
    "server",
    "date",
    "x-proxy-request-id",
}


# Answers up to this size are relayed whole, with their Content-Length.
SMALL_BODY = 1024 * 1024


# JSON answers up to this size are parsed whole for their usage (a chat
# completion is a few KiB); a larger one is read by an incremental parser
# that holds nothing but the usage (chat_gpt_proxy/formats/openai.py).
USAGE_PARSE_LIMIT = 256 * 1024


class ForwardingHandler(ProxyHandler):
    """A route that forwards the request as it came and relays the answer as it came."""

    def forwarded_headers(self, names: tuple[str, ...]) -> dict[str, str]:
        """The request's headers of ``names`` that go upstream; nothing else does, above all no
        credential of the caller's (the proxy's token, a key: the upstream's auth is added per upstream)."""
        headers = {}
        for name in names:
            value = self.request.headers.get(name)
            if value is not None:
                headers[name] = value
        return headers

    async def answered_from_cache(self, path: str, headers: dict, body: bytes, key: str, stream: bool) -> bool:
        """Answer from the response cache if this request asks for it and its answer is there (True);
        ``path``: after ``/v1/``; ``headers``: those that go upstream, part of the request too."""
        ttl = self.cache_ttl()
        if not ttl:
            return False
        # The body is parsed only for a request that asks for the cache.
        try:
            payload = loads(body)
        except (ValueError, RecursionError):
            return False
        route = "\n".join(["v1/" + path, self.request.query, *("%s: %s" % item for item in sorted(headers.items()))])
        return cacheable(payload, "v1/" + path) and await self.use_cache(route, payload, key, stream, ttl)

    @staticmethod
    def body_for(model: str | None, body: bytes):
        """The body for each upstream: as it came, or with ``model`` renamed where the upstream calls
        it otherwise (an alias, Azure's deployment name); None where a body that is not a JSON
        object cannot be renamed."""

        def for_upstream(upstream) -> bytes | None:
            alias = upstream.upstream_model(model)
            if alias == model:
                return body
            try:
                payload = loads(body)
            except (ValueError, RecursionError):
                return None
            return dumps({**payload, "model": alias}) if isinstance(payload, dict) else None

        return for_upstream

    async def relay_answer(self, call) -> None:
        """The upstream's answer, as it came: status, headers, then its body by its kind."""
        if call.status == 401 and self.used_server_key:
            await call.discard()
            raise self.server_key_refused()
        self.set_status(call.status)
        self.copy_answer_headers(call)
        if without_content(call.status, self.request.method):
            await self.relay_no_body(call)
        elif is_sse(call.headers):
            await self.relay_stream(call)
        else:
            await self.relay_body(call)

    def copy_answer_headers(self, call) -> None:
        seen = set()
        for name, value in call.headers.get_all():
            lowered = name.lower()
            # CORS is this proxy's own policy (CORS_ALLOW_ORIGINS): the
            # upstream's Access-Control-* headers never reach a browser.
            if lowered in DROPPED_RESPONSE_HEADERS or lowered.startswith("access-control-"):
                continue
            # The first value replaces ours (Content-Type, x-request-id); repeats add.
            (self.add_header if lowered in seen else self.set_header)(name, value)
            seen.add(lowered)

    def upstream_length(self, call) -> int | None:
        """The upstream's Content-Length, parsed strictly (None when absent or invalid)."""
        try:
            return parse_content_length(call.headers.get("Content-Length"))
        except ValueError:
            return None

    async def relay_no_body(self, call) -> None:
        """An answer that has no body (HEAD, 204, 205, 304, ...): Tornado refuses to send one."""
        # Whatever an upstream sent anyway is read and dropped, bounded.
        with contextlib.suppress(UpstreamError):
            await call.read_all(SMALL_BODY)
        if call.status == 205:
            self.set_header("Content-Length", 0)
        elif self.request.method == "HEAD" and call.status not in (204, 304):
            # What GET would answer; Tornado would count the empty body instead.
            length = self.upstream_length(call)
            if length is not None:
                self.set_header("Content-Length", length)
        self.finish()

    async def relay_body(self, call) -> None:
        """Relay a non-SSE answer: small ones whole, large ones chunk by chunk, never held whole."""
        length = self.upstream_length(call)
        if length is not None and length <= SMALL_BODY:
            try:
                body = await call.read_all(SMALL_BODY)
            except UpstreamError as exc:
                raise self.upstream_failed(exc) from None
            self.note_usage(call, body)
            self.keep_json_answer(call, body)
            self.finish(body)
            return
        watch = StreamWatch(self, None, self.config.client_stall_timeout)
        try:
            await self._relay_chunks(call)
        finally:
            watch.stop()

    def keep_json_answer(self, call, body: bytes) -> None:
        """A whole successful JSON answer, for the response cache (if this request uses it)."""
        content_type = call.headers.get("Content-Type", "")
        if self.cache_slot is not None and call.status == 200 and is_json(call.headers):
            self.keep_in_cache(Entry("json", content_type, body=body))

    def reads_usage(self, call) -> bool:
        """Whether the answer is one that reports usage: a successful JSON answer."""
        return 200 <= call.status < 300 and is_json(call.headers)

    def note_usage(self, call, body: bytes) -> None:
        """Keep the usage and the model of a whole JSON answer, as /chat_complete does."""
        if not self.reads_usage(call):
            return
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            return
        self.note_answer(answer)

    def note_answer(self, answer) -> None:
        found = self.api_format
        self.access.usage = found.usage_from_answer(answer)
        self.access.ran_model = found.model_from_answer(answer)

    async def _relay_chunks(self, call) -> None:
        # OpenAI sends its JSON answers chunked (no Content-Length): a copy of
        # a small one is kept while it is relayed, for its usage and the
        # cache; a larger one goes through the incremental usage reader.
        copy: list[bytes] | None = [] if is_json(call.headers) else None
        reader = None
        copied = 0
        while True:
            try:
                chunk = await call.read()
            except UpstreamError as exc:
                if not internals.headers_written(self):
                    raise self.upstream_failed(exc) from None
                self.upstream_failed(exc)
                # The status is out: only closing the connection tells the
                # client that the body is incomplete.
                self.request.connection.close()
                return
            if chunk is None:
                if copy is not None:
                    whole = b"".join(copy)
                    self.note_usage(call, whole)
                    self.keep_json_answer(call, whole)
                elif reader is not None:
                    self.note_answer(reader.close())
                return
            if copy is not None:
                copied += len(chunk)
                copy.append(chunk)
                if copied > USAGE_PARSE_LIMIT:
                    if self.reads_usage(call):
                        reader = self.api_format.answer_reader()
                        for part in copy:
                            reader.feed(part)
                    copy = None
            elif reader is not None:
                reader.feed(chunk)
            self.write(chunk)
            if not await self.flush_or_abort():
                return
