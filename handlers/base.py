"""The base handler: authentication, JSON bodies, JSON errors, request ids.

Every route handler derives from ``BaseHandler`` so that no response, however
malformed the request, is an HTML error page, a 500 or a traceback.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
import uuid

from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError
from tornado.web import HTTPError, RequestHandler, stream_request_body

from chat_gpt_proxy.access.tokens import UNAVAILABLE
from chat_gpt_proxy.request.body import (
    SUPPORTED_ENCODINGS,
    BodyNotDecodable,
    BodyTooLarge,
    RequestBody,
    UnsupportedEncoding,
    content_coding,
)
from chat_gpt_proxy.request.strict_json import dumps, loads
from chat_gpt_proxy.upstream.errors import UpstreamError

log = logging.getLogger("chat_gpt_proxy")

# An API key goes into a header line: anything but visible ASCII could
# smuggle extra upstream headers (CR/LF) or break the request.
API_KEY_RE = re.compile(r"^[\x21-\x7e]{1,512}$")

# A caller-supplied request id is kept only if it cannot smuggle anything
# into logs or headers.
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# Content-Length is 1*DIGIT, ASCII digits only (RFC 9110 section 8.6):
# str.isdigit() also accepts "\xb2" or Arabic-Indic digits, which int() then
# refuses (issue 10). Identical repeated values ("5, 5") are allowed, as Tornado does.
CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,19}")


def parse_content_length(value: str | None) -> int | None:
    """A Content-Length header's value; None if absent; ValueError if it is not one."""
    if value is None:
        return None
    values = {item.strip() for item in value.split(",")}
    if len(values) != 1:
        raise ValueError("several Content-Length values")
    (single,) = values
    if not CONTENT_LENGTH_RE.fullmatch(single):
        raise ValueError("not a Content-Length")
    return int(single)


# Bodies are limited by data_received (MAX_BODY_BYTES, counted after decoding).
UNLIMITED_BODY = 1 << 62

# What each upstream failure means to a client (issue 2: 502 for an
# unreachable or broken upstream, 504 for a slow one; issue 11: 502 for the
# egress proxy's faults and an untrusted upstream certificate).
UPSTREAM_ERROR_STATUS = {
    "connect": 502,
    "broken": 502,
    "timeout": 504,
    "idle": 504,
    "aborted": 503,
    "tls": 502,
    "proxy_unreachable": 502,
    "proxy_auth": 502,
    "proxy_failed": 502,
    "proxy_tls": 502,
}


class ApiError(HTTPError):
    """An error answered as JSON: ``status``, a human message, OpenAI-style type and code."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
        upstream_error: dict | None = None,
    ):
        super().__init__(status, reason=None)
        self.message = message
        self.type = type_
        self.code = code
        self.headers = headers or {}
        self.upstream_error = upstream_error

    @classmethod
    def from_upstream(cls, exc: UpstreamError) -> ApiError:
        error = exc.error_object()
        return cls(UPSTREAM_ERROR_STATUS.get(exc.kind, 502), exc.message, error["type"], error["code"])


def check_model_allowed(allowed_models: tuple[str, ...], model: str | None) -> None:
    """ALLOWED_MODELS (issue 4), or a token's own list (issue 13): keep a shared proxy on cheap models."""
    if allowed_models and model is not None and model not in allowed_models:
        raise ApiError(
            403, "Model %r is not allowed on this proxy." % model[:100], "permission_denied", "model_not_allowed"
        )


class ApiMixin:
    """What every API surface shares, HTTP and WebSocket alike: request ids,
    the access token (and its rate limit), the caller's OpenAI key, JSON errors.

    Mixed into ``BaseHandler`` (HTTP routes) and into the realtime WebSocket
    handler, which must refuse an upgrade exactly as /v1/* refuses a request.
    """

    # Routes that are public (health, usage page, metrics) set this to False.
    requires_access_token = True
    # The route label in metrics.
    route_name = "other"

    # The access token's entry (chat_gpt_proxy/access/tokens.py), whether the request
    # counts against its max_concurrent, and the limit that refused it, if any.
    token = None
    token_admitted = ""
    limited: str | None = None
    # Whether this request goes upstream with the server-held key (issue 13).
    used_server_key = False
    # Set by the access log (chat_gpt_proxy/observability.py): one line per request.
    access_logged = False

    def server_key_refused(self) -> ApiError:
        """The upstream refused the server's own key: the operator's problem, not the caller's.

        OpenAI's 401 shows the refused key's first and last characters; a
        caller of a shared key never sees them (issue 13: the key appears in
        no error body).
        """
        log.warning("server key refused by the upstream request_id=%s (check OPENAI_API_KEY)", self.request_id)
        return ApiError(
            502,
            "The upstream refused this proxy's own OpenAI key; tell the proxy's operator.",
            "upstream_error",
            "server_key_refused",
        )

    @property
    def request_id(self) -> str:
        """The proxy's own id, always new: a caller's id could collide with, or pose as,
        another request's in the logs (issue 22); it is kept as ``client_request_id``."""
        if not hasattr(self, "_request_id"):
            self._request_id = uuid.uuid4().hex
        return self._request_id

    @property
    def client_request_id(self) -> str | None:
        """The caller's own ``x-request-id``, if well formed, for the access line."""
        given = self.request.headers.get("x-request-id", "")
        return given if REQUEST_ID_RE.fullmatch(given) else None

    def set_default_headers(self) -> None:
        # x-proxy-request-id: always this proxy's id (the access log's
        # request_id). x-request-id: the same, until an upstream answer
        # replaces it with OpenAI's id, which the SDKs read from that header
        # (issue 10, point 12).
        self.set_header("x-request-id", self.request_id)
        self.set_header("x-proxy-request-id", self.request_id)
        self.set_header("X-Content-Type-Options", "nosniff")

    def allowed_methods(self) -> list[str]:
        """The methods this route implements, for Allow (RFC 9110 section 10.2.1) and CORS."""
        methods = [
            method
            for method in self.SUPPORTED_METHODS
            if getattr(type(self), method.lower(), None) is not getattr(RequestHandler, method.lower(), None)
        ]
        if "GET" not in methods and "HEAD" in methods:
            methods.remove("HEAD")
        return methods

    # -- authentication

    def presented_access_token(self) -> str:
        return self.request.headers.get("access-token", "")

    def check_access_token(self):
        """Find and admit the presented token; an awaitable only when shared limits need a Redis round trip."""
        tokens = self.settings["tokens"]
        entry = tokens.lookup(self.presented_access_token())
        if entry is None:
            raise ApiError(403, "Missing or wrong access-token header.", "permission_denied", "invalid_access_token")
        # Names the caller in the access log and metrics (issue 13); "-" for ACCESS_TOKEN's.
        self.token = entry
        if entry.policy.disabled:
            raise ApiError(403, "This access token is disabled.", "permission_denied", "access_token_disabled")
        return self.admit_token(tokens, entry)

    def admit_token(self, tokens, entry):
        """Apply the token's limits; 429 with Retry-After when one is reached.

        With REDIS_URL, a token with limits is admitted by Redis (one round
        trip, chat_gpt_proxy/access/shared_limits.py): the awaitable returned does
        it. Everything else stays synchronous, as without Redis.
        """
        shared = self.settings.get("shared_limits")
        policy = entry.policy
        if shared is None or not (policy.rate_limit_per_minute or policy.max_concurrent):
            self.admitted(tokens.admit(entry), "local")
            return None
        return self.admit_shared(shared, tokens, entry)

    async def admit_shared(self, shared, tokens, entry) -> None:
        verdict = await shared.admit(entry)
        if verdict is not UNAVAILABLE:
            self.admitted(verdict, "shared" if entry.policy.max_concurrent else "")
        elif shared.closed_mode:
            # REDIS_FAILURE_MODE=closed: no request of a limited token passes unchecked (issue 14).
            raise ApiError(
                503,
                "The shared limits of this access token cannot be checked right now; retry shortly.",
                "server_error",
                "limits_unavailable",
                headers={"Retry-After": "1"},
            )
        else:
            self.admitted(tokens.admit(entry), "local")
        if getattr(self, "client_gone", False):
            # The client left while Redis answered: on_connection_close found nothing to release yet.
            self.release_token()

    def admitted(self, refusal, counted_by: str) -> None:
        if refusal is not None:
            self.limited = refusal.limit
            code = "proxy_rate_limited" if refusal.limit == "rate_limit_per_minute" else "proxy_concurrency_limited"
            raise ApiError(
                429, refusal.message, "rate_limit_exceeded", code, headers={"Retry-After": str(refusal.retry_after)}
            )
        # Where the request is counted, to uncount it there: "local", "shared" or "" (nowhere).
        self.token_admitted = counted_by

    def release_token(self) -> None:
        """The request no longer counts against its token's max_concurrent; safe to call twice."""
        counted_by, self.token_admitted = self.token_admitted, ""
        if counted_by == "local":
            self.settings["tokens"].release(self.token)
        elif counted_by == "shared":
            self.settings["shared_limits"].release(self.token)

    def on_finish(self) -> None:
        self.release_token()

    def allowed_models(self) -> tuple[str, ...]:
        """ALLOWED_MODELS, or the caller's token's own allowed_models (issue 13)."""
        return self.token.policy.allowed_models if self.token is not None else self.config.allowed_models

    # How this surface names the key and its errors; /v1/* overrides them.
    missing_key_message = "Missing openai-token header: send your OpenAI API key in it."
    key_error_codes = ("missing_openai_token", "invalid_openai_token")

    def presented_key(self) -> str:
        return self.request.headers.get("openai-token", "").strip()

    def openai_key(self) -> str:
        """The caller's OpenAI key, for this one request; 401 if missing or malformed.

        A caller who sends none may use the server's key if its token allows
        it (use_server_key, issue 13); a key the caller sends always wins.
        """
        key = self.presented_key()
        missing, malformed = self.key_error_codes
        if not key and self.token is not None and self.token.policy.use_server_key:
            self.used_server_key = True
            return self.config.openai_api_key
        if not key:
            raise ApiError(401, self.missing_key_message, "authentication_error", missing)
        if not API_KEY_RE.match(key):
            raise ApiError(401, "The OpenAI key is malformed.", "authentication_error", malformed)
        return key

    def note_fault(self, kind: str, detail: str = "") -> None:
        """An expected upstream fault: one warning line, never a traceback (issue 6)."""
        self.upstream_failure = kind
        log.warning("upstream fault request_id=%s kind=%s%s", self.request_id, kind, " " + detail if detail else "")

    # -- errors

    def error_body(self, status: int, message: str, error: dict) -> dict:
        """The shape of an error on this route; /v1/* overrides it with OpenAI's shape."""
        return {"status": "error", "text": message, "error": error}

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            message, error = exc.message, exc.upstream_error
            if error is None:
                error = {"message": exc.message, "type": exc.type, "code": exc.code, "param": None}
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, HTTPError) and status_code < 500:
            message = exc.log_message or self._reason
            error = {"message": message, "type": "invalid_request_error", "code": None, "param": None}
        else:
            # An unexpected exception: Tornado has already logged it; never show it.
            message = "Internal error in the proxy."
            error = {"message": message, "type": "server_error", "code": None, "param": None}
        if status_code == 405:
            message = "Method %s is not allowed here." % self.request.method
            error.update(message=message, code="method_not_allowed")
            # RFC 9110 section 15.5.6: a 405 names the methods that are allowed.
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        # The upstream answered (e.g. with a body we could not use): its id
        # is what OpenAI's support can look up.
        call = getattr(self, "upstream_call", None)
        upstream_headers = getattr(call, "headers", None)
        upstream_id = upstream_headers.get("x-request-id") if upstream_headers is not None else None
        if upstream_id:
            self.set_header("x-request-id", upstream_id)
        # Only a streamed-body (HTTP) request has a body future; a WebSocket upgrade has none.
        body_future = getattr(self.request, "_body_future", None)
        if body_future is not None and not body_future.done():
            # Answered before the request was read to its end: Tornado closes
            # the connection after this answer; say so (RFC 9112 section 9.6).
            self.set_header("Connection", "close")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps(self.error_body(status_code, message, error)))

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, HTTPError):
            return  # expected outcomes, recorded in the access log
        # A bug. Log where it happened, but not the exception's message or the
        # request: either could hold a key or a prompt.
        log.error(
            "unexpected error request_id=%s type=%s",
            self.request_id,
            typ.__name__,
            extra={"traceback_text": "".join(traceback.format_tb(tb))},
        )


@stream_request_body
class BaseHandler(ApiMixin, RequestHandler):
    """Auth, body parsing (size-limited while it arrives), JSON errors."""

    # Methods that need no token on routes that otherwise do (the usage page
    # at GET /chat_complete); /v1/* has none: every call there is an API call.
    public_methods: tuple[str, ...] = ("GET", "HEAD", "OPTIONS")

    def initialize(self) -> None:
        self.config = self.settings["config"]
        self._body = RequestBody(self.config.max_body_bytes)
        self._body_refused = False
        self._decoded_body: bytes | None = None
        self.started = time.monotonic()
        self.upstream_call = None
        # What the access log reports (handlers/observability.py).
        self.model: str | None = None
        self.usage: dict | None = None
        self.bytes_out = 0
        self.first_byte_at: float | None = None
        self.upstream_failure: str | None = None
        # When the pending flush to the client began (None: none pending).
        self.flush_started: float | None = None
        self.pending_flush = None
        # The client closed its connection before the response was complete,
        # and whether our status line had been written by then (issue 10:
        # if not, the access log and metrics say 499, not the unsent status).
        self.client_gone = False
        self.left_before_headers = False
        # For the drain on shutdown (server.py): answered yet?
        self.answered = False
        requests = self.settings.get("requests")
        if requests is not None:
            requests.add(self)

    def in_progress(self) -> bool:
        """Read and not answered yet, with its client still connected."""
        stream = self.request.connection.stream
        return not self.answered and stream is not None and not stream.closed()

    def on_finish(self) -> None:
        self.answered = True
        super().on_finish()

    def write(self, chunk) -> None:
        if isinstance(chunk, bytes):
            self.bytes_out += len(chunk)
        super().write(chunk)

    def flush(self, include_footers: bool = False):
        if self.settings.get("draining"):
            # Shutting down: this connection ends with this response (Tornado
            # then sends Connection: close), so a keep-alive client sends its
            # next request to another instance (issue 10).
            self.request.connection._disconnect_on_finish = True
        # Every answer, errors and streams included, gets its CORS headers
        # here, with the headers it is about to send (issue 10).
        if not self._headers_written and not self._is_preflight():
            cors = self.settings["cors"]
            for name, value in cors.response_headers(self.request.headers.get("Origin"), self._headers):
                self.add_header(name, value)
        return super().flush(include_footers)

    # -- methods

    def head(self, *args, **kwargs):
        """HEAD answers as GET does (RFC 9110 section 9.3.2): Tornado's flush() sends no body for HEAD,
        and finish() has already set the Content-Length of the body GET would send."""
        if "GET" not in self.allowed_methods():
            raise HTTPError(405)
        return self.get(*args, **kwargs)

    def _is_preflight(self) -> bool:
        return self.request.method == "OPTIONS" and "Access-Control-Request-Method" in self.request.headers

    def options(self, *args, **kwargs) -> None:
        """OPTIONS: the route's methods (RFC 9110 section 9.3.7); a CORS preflight gets its
        Access-Control-* headers here when its origin is allowed. Never needs the access token."""
        methods = self.allowed_methods()
        self.set_status(204)
        self.set_header("Allow", ", ".join(methods))
        if self._is_preflight():
            cors = self.settings["cors"]
            for name, value in cors.preflight_headers(
                self.request.headers.get("Origin"),
                self.request.headers.get("Access-Control-Request-Headers", ""),
                [m for m in methods if m != "OPTIONS"],
            ):
                self.add_header(name, value)
        self.finish()

    def prepare(self):
        method = self.request.method
        if self.requires_access_token and method not in self.public_methods and method != "OPTIONS":
            pending = self.check_access_token()
            if pending is not None:
                # Shared limits: Tornado awaits this before reading the body.
                return self.prepare_after(pending)
        self.prepare_body()
        return None

    async def prepare_after(self, pending) -> None:
        await pending
        self.prepare_body()

    def prepare_body(self) -> None:
        try:
            declared = parse_content_length(self.request.headers.get("Content-Length"))
        except ValueError:
            raise ApiError(
                400, "The Content-Length header is not a number of bytes.", code="invalid_content_length"
            ) from None
        if declared is not None and declared > self.config.max_body_bytes:
            raise self.too_large()
        try:
            coding = content_coding(self.request.headers.get("Content-Encoding"))
        except UnsupportedEncoding:
            raise ApiError(
                415,
                "Content-Encoding %r is not supported: send the body uncompressed, or as %s."
                % (self.request.headers.get("Content-Encoding", "")[:40], SUPPORTED_ENCODINGS),
                code="unsupported_content_encoding",
                headers={"Accept-Encoding": SUPPORTED_ENCODINGS},
            ) from None
        self._body = RequestBody(self.config.max_body_bytes, coding)
        # data_received enforces MAX_BODY_BYTES itself and answers the JSON 413;
        # Tornado's own limit would answer a chunked body with a bare 400 first (issue 10).
        self.request.connection.set_max_body_size(UNLIMITED_BODY)

    # -- the request body, read as it arrives so that an oversized one is refused early

    def data_received(self, chunk: bytes) -> None:
        if self._body_refused:
            return
        try:
            self._body.feed(chunk)
        except BodyTooLarge:
            self.refuse_body(self.too_large())
        except BodyNotDecodable:
            self.refuse_body(self.not_decodable())

    def refuse_body(self, error: ApiError) -> None:
        """Answer ``error`` while the body is still arriving.

        An exception raised here would reach Tornado's HTTP layer, which logs
        a traceback and drops the connection without an answer. Tornado
        closes the connection after this answer, since the rest of the body
        is never read.
        """
        self._body_refused = True
        self.send_error(error.status_code, exc_info=(type(error), error, None))

    @property
    def body(self) -> bytes:
        """The whole request body, decoded if it came compressed."""
        if self._decoded_body is None:
            try:
                self._decoded_body = self._body.finish()
            except BodyNotDecodable:
                raise self.not_decodable() from None
        return self._decoded_body

    def too_large(self) -> ApiError:
        return ApiError(
            413,
            "Request body is larger than %d bytes%s."
            % (
                self.config.max_body_bytes,
                " once decompressed" if self.request.headers.get("Content-Encoding") else "",
            ),
            code="request_too_large",
        )

    def not_decodable(self) -> ApiError:
        return ApiError(
            400,
            "The request body is not valid %s data (Content-Encoding)." % self.request.headers.get("Content-Encoding"),
            code="invalid_content_encoding",
        )

    def json_body(self) -> dict:
        try:
            parsed = loads(self.body)
        except (ValueError, RecursionError):
            raise ApiError(
                400, "The request body is not valid JSON: send a JSON object.", code="invalid_json"
            ) from None
        if not isinstance(parsed, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
        return parsed

    # -- disconnects

    def on_connection_close(self) -> None:
        body_future = getattr(self.request, "_body_future", None)
        if body_future is not None and not body_future.done() and not self._finished:
            # The client left while sending its body: Tornado then ends the
            # request without a word; the access log still gets its line (499).
            IOLoop.current().add_callback(self._log_abandoned)
        # Fails a pending request body, so that the handler does not wait for it forever.
        super().on_connection_close()
        if not self.client_gone:
            self.client_gone = True
            self.left_before_headers = not self._headers_written
        self.release_token()
        # The client left: stop paying for tokens nobody will read (issue 2).
        call = self.upstream_call
        if call is not None and call.abort_reason is None and call.finished_at is None:
            log.warning("client left request_id=%s kind=client_closed", self.request_id)
            call.abort("client_closed")

    def _log_abandoned(self) -> None:
        if not self._finished and not self.access_logged:
            self.application.log_request(self)

    async def flush_or_abort(self) -> bool:
        """Flush to the client; False (and the upstream aborted) if the client is gone."""
        self.flush_started = time.monotonic()
        self.pending_flush = self.flush()
        try:
            await self.pending_flush
        except StreamClosedError:
            self.on_connection_close()
            return False
        finally:
            self.flush_started = self.pending_flush = None
        return self.request.connection.stream is not None and not self.request.connection.stream.closed()

    def drop_client(self) -> None:
        """Close the client's connection now, even with a flush pending."""
        self.request.connection.close()
        # HTTP1Connection.close() forgets the future of a pending write, which
        # then never resolves: fail it, or the relay loop waits forever and
        # its handler stays in flight (seen with a stalled client, issue 10).
        flush = self.pending_flush
        if flush is not None and not flush.done():
            flush.set_exception(StreamClosedError())
