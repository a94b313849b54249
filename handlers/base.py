"""The base of every HTTP handler: request ids, bodies (size-limited, decoded as they arrive), HEAD and
OPTIONS, CORS headers, disconnects; admission and JSON errors come from admission.py and errors.py.

Every route handler derives from ``BaseHandler`` so that no response, however
malformed the request, is an HTML error page, a 500 or a traceback.
"""

from __future__ import annotations

import logging
import time
import uuid

from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError
from tornado.web import HTTPError, RequestHandler, stream_request_body

from chat_gpt_proxy import human
from chat_gpt_proxy import tornado_internals as internals
from chat_gpt_proxy.observability import AccessRecord
from chat_gpt_proxy.request.body import (
    SUPPORTED_ENCODINGS,
    BodyNotDecodable,
    BodyTooLarge,
    RequestBody,
    UnsupportedEncoding,
    content_coding,
    parse_content_length,
)
from chat_gpt_proxy.request.strict_json import loads

from .admission import Admission
from .errors import ApiError, JsonErrors

log = logging.getLogger("chat_gpt_proxy")


# Bodies are limited by data_received (MAX_BODY_BYTES, counted after decoding).
UNLIMITED_BODY = 1 << 62


class ApiMixin(Admission, JsonErrors):
    """What every API surface shares, HTTP and WebSocket alike: request ids,
    admission (the access token, its limits, the key) and JSON errors.

    Mixed into ``BaseHandler`` (HTTP routes) and into the realtime WebSocket
    handler, which must refuse an upgrade exactly as /v1/* refuses a request.
    """

    # The route label in metrics.
    route_name = "other"

    def __init__(self, *args, **kwargs):
        # Before Tornado's __init__, which already writes the default headers (the request id).
        # The proxy's id is always its own: a caller's could collide with, or pose as, another
        # request's in the logs; it is logged beside it as client_request_id.
        self.access = AccessRecord(route=self.route_name, request_id=uuid.uuid4().hex)
        super().__init__(*args, **kwargs)

    @property
    def request_id(self) -> str:
        return self.access.request_id

    def set_default_headers(self) -> None:
        # x-proxy-request-id: always this proxy's id (the access log's
        # request_id). x-request-id: the same, until an upstream answer
        # replaces it with OpenAI's id, which the SDKs read from that header.
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

    def note_fault(self, kind: str, detail: str = "") -> None:
        """An expected upstream fault: one warning line, never a traceback."""
        self.access.upstream_failure = kind
        log.warning("upstream fault request_id=%s kind=%s%s", self.request_id, kind, " " + detail if detail else "")


@stream_request_body
class BaseHandler(ApiMixin, RequestHandler):
    """Auth, body parsing (size-limited while it arrives), JSON errors."""

    # Methods that need no token on routes that otherwise do (the usage page
    # at GET /chat_complete); /v1/* has none: every call there is an API call.
    public_methods: tuple[str, ...] = ("GET", "HEAD", "OPTIONS")

    def initialize(self) -> None:
        self.config = self.application.config
        self._body = RequestBody(self.config.max_body_bytes)
        self._body_refused = False
        self._decoded_body: bytes | None = None
        self.upstream_call = None
        # When the pending flush to the client began (None: none pending).
        self.flush_started: float | None = None
        self.pending_flush = None
        # For the drain on shutdown (server.py): answered yet?
        self.answered = False
        requests = self.application.requests
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
            self.access.bytes_out += len(chunk)
        super().write(chunk)

    def flush(self, include_footers: bool = False):
        if self.application.draining:
            # Shutting down: this connection ends with this response (Tornado
            # then sends Connection: close), so a keep-alive client sends its
            # next request to another instance.
            internals.close_after_response(self.request)
        # Every answer, errors and streams included, gets its CORS headers
        # here, with the headers it is about to send.
        if not internals.headers_written(self) and not self._is_preflight():
            cors = self.application.cors
            for name, value in cors.response_headers(
                self.request.headers.get("Origin"), internals.response_headers(self)
            ):
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
            cors = self.application.cors
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
        # Tornado's own limit would answer a chunked body with a bare 400 first.
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
            "Request body is larger than %s%s."
            % (
                human.size(self.config.max_body_bytes),
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
        if internals.body_arriving(self.request) and not internals.finished(self):
            # The client left while sending its body: Tornado then ends the
            # request without a word; the access log still gets its line (499).
            IOLoop.current().add_callback(self._log_abandoned)
        # Fails a pending request body, so that the handler does not wait for it forever.
        super().on_connection_close()
        if not self.access.client_gone:
            self.access.client_gone = True
            self.access.left_before_headers = not internals.headers_written(self)
        self.release_token()
        # The client left: stop paying for tokens nobody will read.
        call = self.upstream_call
        if call is not None and call.abort_reason is None and call.finished_at is None:
            log.warning("client left request_id=%s kind=client_closed", self.request_id)
            call.abort("client_closed")

    def _log_abandoned(self) -> None:
        if not internals.finished(self) and not self.access.logged:
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
        stream = self.request.connection.stream
        if stream is None or stream.closed():
            # The write went out, then the client reset: the relay loop stops
            # here and the handler finishes, after which Tornado no longer calls
            # on_connection_close; without this the upstream transfer stayed
            # paused for good, holding its slot (tests/test_faults.py resets a client
            # right after a flush).
            self.on_connection_close()
            return False
        return True

    def drop_client(self) -> None:
        """Close the client's connection now, even with a flush pending."""
        self.request.connection.close()
        # HTTP1Connection.close() forgets the future of a pending write, which
        # then never resolves: fail it, or the relay loop waits forever and
        # its handler stays in flight (seen with a stalled client).
        flush = self.pending_flush
        if flush is not None and not flush.done():
            flush.set_exception(StreamClosedError())
