"""/v1/*: the OpenAI API itself, passed through, so any OpenAI client only changes base_url (issue 4).

Bodies go upstream byte for byte and answers come back with their status,
headers (less hop-by-hop ones) and body unchanged. Errors of the proxy itself
use OpenAI's error shape, so SDKs raise their usual exception classes.
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote

from tornado.httputil import parse_body_arguments

from chat_gpt_proxy.upstream import HOP_BY_HOP_HEADERS, UpstreamError

from .base import ApiError, check_model_allowed
from .proxy import ProxyHandler, StreamWatch

# Request headers an OpenAI client may need upstream (issue 4). Everything
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
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP_HEADERS | {"set-cookie", "content-encoding", "server", "date"}

# Answers up to this size are relayed whole, with their Content-Length.
SMALL_BODY = 1024 * 1024

# Characters allowed in a relayed path or query (RFC 3986 pchar, '/', '?').
SAFE_PATH_RE = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")
SAFE_QUERY_RE = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*$")


def upstream_url(base_url: str, raw_path: str, query: str) -> str | None:
    """``base_url`` + the path after ``/v1``, or None if the path could leave the API.

    Rejects dot segments (also percent-encoded), encoded slashes and
    backslashes, and empty segments: whatever the client sends, the request
    goes to ``OPENAI_BASE_URL``'s host and under its path (no SSRF).
    """
    if not SAFE_PATH_RE.match(raw_path) or not SAFE_QUERY_RE.match(query):
        return None
    lowered = raw_path.lower()
    if "%2f" in lowered or "%5c" in lowered or "%00" in lowered:
        return None
    segments = raw_path.split("/")
    if any(seg in ("", ".", "..") or unquote(seg) in (".", "..") for seg in segments):
        return None
    return base_url + "/" + raw_path + ("?" + query if query else "")


class OpenAIHandler(ProxyHandler):
    """ANY /v1/<path>: forward the request to OPENAI_BASE_URL/<path> and relay the answer."""

    route_name = "v1"
    public_methods = ()  # GET /v1/models is an API call too
    missing_key_message = "Missing API key: send it as 'Authorization: Bearer <key>'."
    key_error_codes = ("missing_api_key", "invalid_api_key")

    def error_body(self, status: int, message: str, error: dict) -> dict:
        return {"error": error}

    # Set when the bearer credential is the proxy's access token, not an OpenAI key.
    bearer_is_access_token = False

    def bearer(self) -> str:
        auth = self.request.headers.get("Authorization", "")
        return auth[7:].strip() if auth[:7].lower() == "bearer " else ""

    def presented_access_token(self) -> str:
        token = self.request.headers.get("access-token")
        if token is None and self.bearer():
            # An SDK given only base_url and api_key sends the proxy's token as
            # its API key (issue 13): such a request carries no OpenAI key of
            # its own, so its token's use_server_key decides.
            self.bearer_is_access_token = True
            return self.bearer()
        return token or ""

    def presented_key(self) -> str:
        if not self.bearer_is_access_token and self.bearer():
            return self.bearer()
        return super().presented_key()

    def requested_model_and_stream(self) -> tuple[str | None, bool]:
        """The ``model`` and ``stream`` of the body, which is forwarded as it is."""
        content_type = self.request.headers.get("Content-Type", "")
        body = self.body
        if not body:
            return None, False
        if content_type.startswith("multipart/form-data"):
            arguments: dict = {}
            parse_body_arguments(content_type, body, arguments, {})
            values = arguments.get("model")
            return (values[0].decode("utf-8", "replace") if values else None), False
        # Parsed whatever the Content-Type says, so that a mislabelled body
        # cannot slip a model past ALLOWED_MODELS.
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            return None, False  # the upstream will say what is wrong with it
        if isinstance(parsed, dict):
            model = parsed.get("model")
            return (model if isinstance(model, str) else None), parsed.get("stream") is True
        return None, False

    async def forward(self) -> None:
        raw_path = self.request.path[len("/v1/") :]
        url = upstream_url(self.config.openai_base_url, raw_path, self.request.query)
        if url is None:
            raise ApiError(400, "Invalid path.", "invalid_request_error", "invalid_path")
        headers = {"Authorization": "Bearer " + self.openai_key()}
        for name in FORWARDED_REQUEST_HEADERS:
            value = self.request.headers.get(name)
            if value is not None:
                headers[name] = value
        model, stream = self.requested_model_and_stream()
        self.model = model
        check_model_allowed(self.allowed_models(), model)
        method = self.request.method
        body = self.body if method in ("POST", "PUT", "PATCH") else None
        call = await self.open_upstream(method, url, headers, body, stream=stream)
        self.set_status(call.status)
        seen = set()
        for name, value in call.headers.get_all():
            lowered = name.lower()
            if lowered in DROPPED_RESPONSE_HEADERS:
                continue
            # The first value replaces ours (Content-Type, x-request-id); repeats add.
            (self.add_header if lowered in seen else self.set_header)(name, value)
            seen.add(lowered)
        if call.headers.get("Content-Type", "").startswith("text/event-stream"):
            await self.relay_stream(call)
        else:
            await self.relay_body(call)

    async def relay_body(self, call) -> None:
        """Relay a non-SSE answer: small ones whole, large ones chunk by chunk, never held whole."""
        length = call.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= SMALL_BODY:
            try:
                body = await call.read_all(SMALL_BODY)
            except UpstreamError as exc:
                raise self.upstream_failed(exc) from None
            if b'"usage":' in body:
                self.note_usage(body)
            self.finish(body)
            return
        watch = StreamWatch(self, None, self.config.client_stall_timeout)
        try:
            await self._relay_chunks(call)
        finally:
            watch.stop()

    def note_usage(self, body: bytes) -> None:
        """Keep the usage of a JSON answer (chat, responses, embeddings) for logs and metrics (issue 13)."""
        try:
            usage = json.loads(body).get("usage")
        except (ValueError, RecursionError, AttributeError):
            return
        if isinstance(usage, dict):
            self.usage = usage

    async def _relay_chunks(self, call) -> None:
        while True:
            try:
                chunk = await call.read()
            except UpstreamError as exc:
                if not self._headers_written:
                    raise self.upstream_failed(exc) from None
                self.upstream_failed(exc)
                # The status is out: only closing the connection tells the
                # client that the body is incomplete.
                self.request.connection.close()
                return
            if chunk is None:
                return
            self.write(chunk)
            if not await self.flush_or_abort():
                return

    get = post = put = patch = delete = forward


routes = [(r"/v1/.*", OpenAIHandler)]
