"""The base handler: authentication, JSON bodies, JSON errors, request ids.

Every route handler derives from ``BaseHandler`` so that no response, however
malformed the request, is an HTML error page, a 500 or a traceback.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import time
import traceback
import uuid

from tornado.iostream import StreamClosedError
from tornado.web import HTTPError, RequestHandler, stream_request_body

from chat_gpt_proxy.upstream import UpstreamError

log = logging.getLogger("chat_gpt_proxy")

# An API key goes into a header line: anything but visible ASCII could
# smuggle extra upstream headers (CR/LF) or break the request.
API_KEY_RE = re.compile(r"^[\x21-\x7e]{1,512}$")

# A caller-supplied request id is kept only if it cannot smuggle anything
# into logs or headers.
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# What each upstream failure means to a client (issue 2: 502 for an
# unreachable or broken upstream, 504 for a slow one).
UPSTREAM_ERROR_STATUS = {"connect": 502, "broken": 502, "timeout": 504, "idle": 504, "aborted": 503}


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


def dumps(obj) -> bytes:
    """JSON as UTF-8 without ``\\u`` escapes: many users write in Russian."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (valid in JSON as "\\ud800", not in UTF-8): keep it escaped.
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")


def _reject_constant(name: str):
    raise ValueError("%s is not valid JSON" % name)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def loads(data: bytes):
    """Strict JSON: NaN, Infinity and numbers that overflow a double are errors, as in RFC 8259."""
    return json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)


def check_model_allowed(config, model: str | None) -> None:
    """ALLOWED_MODELS (issue 4): an operator can keep a shared proxy on cheap models."""
    if config.allowed_models and model is not None and model not in config.allowed_models:
        raise ApiError(
            403, "Model %r is not allowed on this proxy." % model[:100], "permission_denied", "model_not_allowed"
        )


@stream_request_body
class BaseHandler(RequestHandler):
    """Auth, body parsing (size-limited while it arrives), JSON errors."""

    # Routes that are public (health, usage page, metrics) set this to False.
    requires_access_token = True
    # Methods that need no token on routes that otherwise do (the usage page
    # at GET /chat_complete); /v1/* has none: every call there is an API call.
    public_methods: tuple[str, ...] = ("GET", "HEAD", "OPTIONS")
    # The route label in metrics.
    route_name = "other"

    def initialize(self) -> None:
        self.config = self.settings["config"]
        self._body_parts: list[bytes] = []
        self._body_size = 0
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

    def write(self, chunk) -> None:
        if isinstance(chunk, bytes):
            self.bytes_out += len(chunk)
        super().write(chunk)

    @property
    def request_id(self) -> str:
        if not hasattr(self, "_request_id"):
            given = self.request.headers.get("x-request-id", "")
            self._request_id = given if REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        return self._request_id

    def set_default_headers(self) -> None:
        self.set_header("x-request-id", self.request_id)
        self.set_header("X-Content-Type-Options", "nosniff")

    # -- authentication

    def prepare(self) -> None:
        if self.requires_access_token and self.request.method not in self.public_methods:
            self.check_access_token()
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > self.config.max_body_bytes:
            raise self.too_large()
        if self.request.method in ("POST", "PUT", "PATCH"):
            self.request.connection.set_max_body_size(self.config.max_body_bytes + 1)

    def check_access_token(self) -> None:
        given = self.request.headers.get("access-token", "").encode("utf-8", "surrogateescape")
        matched = None
        for token in self.config.access_tokens:
            # Compare against every token so timing reveals neither which nor how much matched.
            if hmac.compare_digest(given, token.encode("utf-8")):
                matched = token
        if matched is None:
            raise ApiError(403, "Missing or wrong access-token header.", "permission_denied", "invalid_access_token")
        limiter = self.settings.get("rate_limiter")
        if limiter is not None:
            wait = limiter.take(matched)
            if wait:
                raise ApiError(
                    429,
                    "Rate limit of this proxy's access token reached; retry in %d s." % wait,
                    "rate_limit_exceeded",
                    "proxy_rate_limited",
                    headers={"Retry-After": str(wait)},
                )

    # How this surface names the key and its errors; /v1/* overrides them.
    missing_key_message = "Missing openai-token header: send your OpenAI API key in it."
    key_error_codes = ("missing_openai_token", "invalid_openai_token")

    def presented_key(self) -> str:
        return self.request.headers.get("openai-token", "").strip()

    def openai_key(self) -> str:
        """The caller's OpenAI key, for this one request; 401 if missing or malformed."""
        key = self.presented_key()
        missing, malformed = self.key_error_codes
        if not key:
            raise ApiError(401, self.missing_key_message, "authentication_error", missing)
        if not API_KEY_RE.match(key):
            raise ApiError(401, "The OpenAI key is malformed.", "authentication_error", malformed)
        return key

    # -- the request body, read as it arrives so that an oversized one is refused early

    def data_received(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size > self.config.max_body_bytes:
            raise self.too_large()
        self._body_parts.append(chunk)

    @property
    def body(self) -> bytes:
        return b"".join(self._body_parts)

    def too_large(self) -> ApiError:
        return ApiError(
            413, "Request body is larger than %d bytes." % self.config.max_body_bytes, code="request_too_large"
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
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps(self.error_body(status_code, message, error)))

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, HTTPError):
            return  # expected outcomes, recorded in the access log
        # A bug. Log where it happened, but not the exception's message or the
        # request: either could hold a key or a prompt.
        log.error(
            "unexpected error request_id=%s type=%s\n%s",
            self.request_id,
            typ.__name__,
            "".join(traceback.format_tb(tb)),
        )

    # -- disconnects

    def on_connection_close(self) -> None:
        # The client left: stop paying for tokens nobody will read (issue 2).
        call = self.upstream_call
        if call is not None and call.abort_reason is None and call.finished_at is None:
            log.warning("client left request_id=%s kind=client_closed", self.request_id)
            call.abort("client_closed")

    async def flush_or_abort(self) -> bool:
        """Flush to the client; False (and the upstream aborted) if the client is gone."""
        self.flush_started = time.monotonic()
        try:
            await self.flush()
        except StreamClosedError:
            self.on_connection_close()
            return False
        finally:
            self.flush_started = None
        return self.request.connection.stream is not None and not self.request.connection.stream.closed()
