"""JSON errors: ``ApiError``, what each upstream failure means to a client, and how every
handler (HTTP and WebSocket alike) renders an error, never as HTML, a 500 page or a traceback."""

from __future__ import annotations

import logging
import traceback

from tornado.web import HTTPError

from chat_gpt_proxy import tornado_internals as internals
from chat_gpt_proxy.request.strict_json import dumps
from chat_gpt_proxy.upstream.errors import UpstreamError
from chat_gpt_proxy.upstream.headers import relayed_headers

log = logging.getLogger("chat_gpt_proxy")

# What each upstream failure means to a client (502 for an
# unreachable or broken upstream, 504 for a slow one; 502 for the
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
        param: str | None = None,
    ):
        super().__init__(status, reason=None)
        self.message = message
        self.type = type_
        self.code = code
        # The request field at fault (OpenAI's error objects carry it as "param").
        self.param = param
        self.headers = headers or {}
        self.upstream_error = upstream_error

    @classmethod
    def from_upstream(cls, exc: UpstreamError) -> ApiError:
        error = exc.error_object()
        return cls(UPSTREAM_ERROR_STATUS.get(exc.kind, 502), exc.message, error["type"], error["code"])


def mirrored_error(status: int, answer, headers) -> ApiError:
    """An upstream error status with its error object, for the client."""
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict):
        error = {
            "message": "The upstream answered with status %d." % status,
            "type": "upstream_error",
            "code": None,
            "param": None,
        }
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = "The upstream answered with status %d." % status
    return ApiError(status, message, headers=dict(relayed_headers(headers)), upstream_error=error)


class JsonErrors:
    """How a handler answers an error: JSON in the route's shape, with its request ids."""

    def error_body(self, status: int, message: str, error: dict) -> dict:
        """The shape of an error on this route; /v1/* overrides it with OpenAI's shape."""
        return {"status": "error", "text": message, "error": error}

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            message, error = exc.message, exc.upstream_error
            if error is None:
                error = {"message": exc.message, "type": exc.type, "code": exc.code, "param": exc.param}
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, HTTPError) and status_code < 500:
            message = exc.log_message or internals.reason(self)
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
        if internals.body_arriving(self.request):
            # Answered before the request was read to its end: Tornado closes
            # the connection after this answer; say so (RFC 9112 section 9.6).
            self.set_header("Connection", "close")
        access = getattr(self, "access", None)
        if access is not None:
            access.error_code = error.get("code") if isinstance(error.get("code"), str) else "error_%d" % status_code
        # What is left of a budgeted token's budget goes with every answer, errors too.
        for name, value in getattr(self, "budget_headers", {}).items():
            self.set_header(name, value)
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
