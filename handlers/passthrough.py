"""/v1/*: the OpenAI API itself, passed through, so any OpenAI client only changes base_url.

Bodies go upstream byte for byte and answers come back with their status,
headers (less hop-by-hop ones) and body unchanged. Errors of the proxy itself
use OpenAI's error shape, so SDKs raise their usual exception classes.
"""

from __future__ import annotations

import contextlib
import json

from chat_gpt_proxy import tornado_internals as internals
from chat_gpt_proxy.cache import Entry, cacheable
from chat_gpt_proxy.formats.openai import for_path
from chat_gpt_proxy.request.body import parse_content_length
from chat_gpt_proxy.request.model import MODEL_FREE_PATH_RE, SESSION_MODEL_PATH_RE, inspect_request
from chat_gpt_proxy.request.strict_json import dumps, loads
from chat_gpt_proxy.upstream.errors import UpstreamError
from chat_gpt_proxy.upstream.headers import HOP_BY_HOP_HEADERS
from chat_gpt_proxy.upstream.urls import join_url, normalised_path
from chat_gpt_proxy.usage.deferred import FINISHED, KINDS, deferred_kind

from .admission import check_model_allowed
from .errors import ApiError
from .openai_style import OpenAIStyle
from .relay import ProxyHandler, StreamWatch, without_content

# Request headers an OpenAI client may need upstream. Everything
# else stays here, above all the proxy's own access-token.
FORWARDED_REQUEST_HEADERS = (
    "Content-Type",
    "Accept",
    "OpenAI-Organization",
    "OpenAI-Project",
    "OpenAI-Beta",
    "Idempotency-Key",
)


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

# The answers the response cache may keep (chat_gpt_proxy/cache.py): one
# request, one deterministic-enough answer.
CACHED_PATHS = frozenset(("chat/completions", "responses", "embeddings"))

# JSON answers up to this size are parsed whole for their usage (a chat
# completion is a few KiB); a larger one is read by an incremental parser
# that holds nothing but the usage (chat_gpt_proxy/formats/openai.py).
USAGE_PARSE_LIMIT = 256 * 1024


class OpenAIHandler(OpenAIStyle, ProxyHandler):
    """ANY /v1/<path>: forward the request to OPENAI_BASE_URL/<path> and relay the answer."""

    route_name = "v1"
    public_methods = ()  # GET /v1/models is an API call too

    def requested_model_and_stream(self) -> tuple[str | None, bool]:
        """The ``model`` and ``stream`` of the body (which is forwarded as it is), checked against ALLOWED_MODELS.

        With an allow-list, a request whose model cannot be determined with
        certainty is refused: forwarding it would let the upstream
        read a model we did not check.
        """
        if self.request.method not in ("POST", "PUT", "PATCH"):
            return None, False  # no body goes upstream
        found = inspect_request(
            self.request.headers.get_list("Content-Type"),
            # The base handler has already decoded a gzip or deflate body (or
            # refused any other coding with 415): what is read here is what goes upstream.
            None,
            self.body,
            self.request.query,
        )
        self.access.model = found.model
        allowed = self.allowed_models()
        if allowed:
            if found.problem is not None:
                raise self.model_undetermined(found.problem)
            for model in found.models:
                check_model_allowed(allowed, model)
            # Fail closed: an endpoint that may run a model picks
            # one itself when the body does not name it where the endpoint
            # reads it (images, moderations, a stored prompt, a batch's file,
            # an assistant's run); a nested or query "model" does not count.
            # Realtime secrets and calls run the session's model, whatever else the body says.
            named = found.session_model if SESSION_MODEL_PATH_RE.match(self.v1_path) else found.named
            if named is None and not MODEL_FREE_PATH_RE.match(self.v1_path):
                raise self.model_undetermined(
                    "the body names no model, and /v1/%s is not an endpoint that runs none" % self.v1_path[:100]
                )
        return found.model, found.stream

    def model_undetermined(self, problem: str) -> ApiError:
        return ApiError(
            400,
            "ALLOWED_MODELS (or the token's allowed_models) is in force and the model of this request "
            "cannot be determined: %s. "
            'Send a JSON object with one string "model" as application/json '
            "(or one model field in multipart/form-data)." % problem,
            "invalid_request_error",
            "model_undetermined",
        )

    async def forward(self) -> None:
        # One normalised path for the allow-list check and the upstream.
        self.v1_path = normalised_path(self.request.path[len("/v1/") :])
        self.api_format = for_path(self.v1_path or "")
        url = None if self.v1_path is None else join_url(self.config.openai_base_url, self.v1_path, self.request.query)
        if url is None:
            raise ApiError(400, "Invalid path.", "invalid_request_error", "invalid_path")
        key = self.openai_key()
        headers = {}
        for name in FORWARDED_REQUEST_HEADERS:
            value = self.request.headers.get(name)
            if value is not None:
                headers[name] = value
        model, stream = self.requested_model_and_stream()
        method = self.request.method
        self.runs_model = method in ("POST", "PUT", "PATCH") and not MODEL_FREE_PATH_RE.match(self.v1_path)
        self.deferred = deferred_kind(method, self.v1_path, self.responses_body() if method == "POST" else None)
        if self.deferred is not None:
            self.check_deferred()
            # A streamed background response is charged as a stream (charge_spend).
            self.charge_later = not (self.deferred == "background" and stream)
        pending = self.check_budget(
            model, method in ("POST", "PUT", "PATCH") and not MODEL_FREE_PATH_RE.match(self.v1_path)
        )
        if pending is not None:
            await pending  # budget counters in Redis
        body = self.body if method in ("POST", "PUT", "PATCH") else None
        ttl = self.cache_ttl() if method == "POST" and self.v1_path in CACHED_PATHS else 0
        if ttl:  # the body is parsed only for a request that asks for the cache
            try:
                payload = loads(body)
            except (ValueError, RecursionError):
                payload = None
            # The query and the headers that reach the upstream are part of the request too.
            route = "\n".join(
                ["v1/" + self.v1_path, self.request.query, *("%s: %s" % item for item in sorted(headers.items()))]
            )
            if cacheable(payload, "v1/" + self.v1_path) and await self.use_cache(route, payload, key, stream, ttl):
                return
        if stream and self.metered and self.v1_path == "chat/completions":
            body = self.with_stream_usage(body)

        def body_for(upstream) -> bytes | None:
            # An upstream may call the model by another name (an alias, Azure's deployment name).
            alias = upstream.upstream_model(model)
            if alias == model:
                return body
            try:
                payload = loads(body)
            except (ValueError, RecursionError):
                return None
            return dumps({**payload, "model": alias}) if isinstance(payload, dict) else None

        call = await self.open_upstream(
            method,
            self.v1_path,
            self.request.query,
            headers,
            body_for if body is not None else None,
            stream=stream,
            model=model,
            key=key,
        )
        if call.status == 401 and self.used_server_key:
            await call.discard()
            raise self.server_key_refused()
        self.set_status(call.status)
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
        if without_content(call.status, method):
            await self.relay_no_body(call)
        elif call.headers.get("Content-Type", "").startswith("text/event-stream"):
            await self.relay_stream(call)
        else:
            await self.relay_body(call)

    def with_stream_usage(self, body: bytes) -> bytes:
        """The body with ``stream_options.include_usage`` added if the caller left it out.

        The one case where /v1 does not forward the body byte for byte: a
        metered stream is always counted, and the caller still receives the
        stream it asked for (handlers/relay.py removes the usage chunk).
        """
        try:
            payload = loads(body)
        except (ValueError, RecursionError):
            return body  # the upstream answers it with its own error
        if not isinstance(payload, dict):
            return body
        self.ask_stream_usage(payload)
        return dumps(payload) if self.usage_injected else body

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
        if self.cache_slot is not None and call.status == 200 and "json" in content_type:
            self.keep_in_cache(Entry("json", content_type, body=body))

    def reads_usage(self, call) -> bool:
        """Whether the answer is one that reports usage: a successful JSON answer."""
        return 200 <= call.status < 300 and "json" in call.headers.get("Content-Type", "")

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
        if not self.metered:
            return
        spend = self.application.spend
        if self.deferred in ("background", "batch") and isinstance(answer, dict) and isinstance(answer.get("id"), str):
            if answer.get("status") in FINISHED:
                self.charge_later = False  # it finished at once: charged now, with the usage it reports
            else:
                # Its usage comes when it is retrieved finished (chat_gpt_proxy/usage/deferred.py).
                spend.deferred.started(answer["id"], self.access.token, self.access.model)
        elif self.request.method == "GET":
            finished = spend.deferred.finished(self.v1_path, answer)
            if finished is not None:
                self.charge_deferred(*finished, answer)

    deferred: str | None = None

    def responses_body(self):
        """The body of a Responses API request, parsed (whether it runs in the background); None elsewhere."""
        if self.v1_path != "responses":
            return None
        try:
            return loads(self.body)
        except (ValueError, RecursionError):
            return None

    def check_deferred(self) -> None:
        """A token with a budget starts work that runs after the request only if its entry allows it."""
        entry = self.token
        if entry is None or not entry.policy.budget or entry.policy.deferred:
            return
        self.access.limited = "deferred"
        raise ApiError(
            403,
            KINDS[self.deferred]
            + " are not allowed for an access token with a budget: their usage is not known when the request "
            "ends. The proxy's operator can allow them for this token (deferred = true).",
            "permission_denied",
            "deferred_not_allowed",
        )

    def charge_spend(self, model_call: bool = True) -> None:
        meter = self.stream_meter
        if (
            self.deferred == "background"
            and self.metered
            and not self.charged
            and meter is not None
            and not meter.final
            and meter.object_id is not None
        ):
            # Its client left before its usage came: it runs on upstream, and is charged when retrieved.
            self.application.spend.deferred.started(meter.object_id, self.access.token, self.access.model)
            self.charge_later = True
        super().charge_spend(model_call)

    def charge_deferred(self, entry, kind: str, answer: dict) -> None:
        """Charge a finished background response or batch to the token that started it."""
        found = self.api_format
        self.application.spend.charge(
            token=entry.token,
            route=self.access.route,
            model=entry.model,
            usage=found.usage_from_answer(answer),
            status=200,
            request_id=self.access.request_id,
            request_bytes=0,
            events=0,
            # A finished one without usage (failed before it ran, cancelled): nothing to estimate from.
            model_call=False,
            ran_model=found.model_from_answer(answer),
        )

    async def _relay_chunks(self, call) -> None:
        # OpenAI sends its JSON answers chunked (no Content-Length): a copy of
        # a small one is kept while it is relayed, for its usage and the
        # cache; a larger one goes through the incremental usage reader.
        copy: list[bytes] | None = [] if "json" in call.headers.get("Content-Type", "") else None
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

    get = post = put = patch = delete = forward


routes = [(r"/v1/.*", OpenAIHandler)]
