"""Anthropic's Messages API, for Claude Code and the Anthropic SDKs: ``POST /v1/messages`` (also
``?beta=true``, as Claude Code sends it), ``POST /v1/messages/count_tokens``, and ``GET /v1/models``
(and ``/v1/models/{id}``) for a client that sends ``anthropic-version`` or ``x-api-key``, relayed to the
upstreams of ``kind = "anthropic"`` in UPSTREAMS_FILE.

``anthropic-version``, ``anthropic-beta``, the query and the body go upstream byte for byte (the proxy
pins no version and validates nothing the upstream would take); answers come back as they came. Only
what the proxy must know is read: the model (for the allow-list, routing, budgets and the price).
Everything else is the relay every surface shares (handlers/forwarding.py, handlers/relay.py) with
Anthropic's format (chat_gpt_proxy/formats/anthropic.py): its usage, its stream events, its errors.
"""

from __future__ import annotations

from tornado.routing import Matcher, PathMatches, Rule

from chat_gpt_proxy.formats.anthropic import ANTHROPIC_MESSAGES
from chat_gpt_proxy.request.model import inspect_request
from chat_gpt_proxy.request.strict_json import loads
from chat_gpt_proxy.upstream.errors import UpstreamError
from chat_gpt_proxy.upstream.headers import relayed_headers
from chat_gpt_proxy.upstream.urls import normalised_path

from .admission import check_model_allowed, model_undetermined
from .errors import ApiError
from .forwarding import ForwardingHandler

# Request headers that go upstream. Everything else stays here, above all the
# caller's credentials: the upstream's own key, or the caller's, is added per upstream.
FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept", "anthropic-version", "anthropic-beta")


class AnthropicStyle:
    """How the Anthropic surface takes credentials and words its errors: as Anthropic does.

    Claude Code and the SDKs send one credential: ``ANTHROPIC_AUTH_TOKEN`` as
    ``Authorization: Bearer``, ``ANTHROPIC_API_KEY`` (and the SDKs' ``api_key``)
    as ``x-api-key`` or a bearer token. Without an ``access-token`` header that
    credential is the proxy's token, and the request carries no Anthropic key
    of its own (its token's ``use_server_key`` decides); with one, the
    credential is the caller's own Anthropic key.
    """

    api_format = ANTHROPIC_MESSAGES
    key_name = "Anthropic key"
    missing_key_message = (
        "This proxy token may not use the proxy's own Anthropic key (use_server_key): send the proxy's token "
        "in the access-token header and your own Anthropic key in x-api-key."
    )
    key_error_codes = ("missing_api_key", "invalid_api_key")
    refused_access_message = (
        "Missing or wrong proxy token: send it as Authorization: Bearer (ANTHROPIC_AUTH_TOKEN), "
        "as x-api-key (ANTHROPIC_API_KEY) or in the access-token header."
    )
    # Set when the request's one credential is the proxy's token, not an Anthropic key.
    credential_is_access_token = False

    def error_body(self, status: int, message: str, error: dict) -> dict:
        return self.api_format.error_body(status, message)

    def bearer(self) -> str:
        auth = self.request.headers.get("Authorization", "")
        return auth[7:].strip() if auth[:7].lower() == "bearer " else ""

    def presented_access_token(self) -> str:
        token = self.request.headers.get("access-token")
        if token is not None:
            return token
        self.credential_is_access_token = True
        return self.bearer() or self.request.headers.get("x-api-key", "").strip()

    def presented_key(self) -> str:
        if self.credential_is_access_token:
            return ""
        return self.request.headers.get("x-api-key", "").strip() or self.bearer()

    def upstream_key(self, upstream, caller_key: str) -> str:
        """The upstream's own key for a server-key request (never OPENAI_API_KEY), else the caller's."""
        if self.used_server_key:
            return upstream.api_key
        return caller_key if upstream.forward_caller_key else ""


class AnthropicHandler(AnthropicStyle, ForwardingHandler):
    public_methods = ()  # GET /v1/models is an API call too
    # The API path after /v1/, as the upstream sees it.
    api_path = ""

    def forwarded_headers(self, names: tuple[str, ...]) -> dict[str, str]:
        # Two anthropic-version lines would go upstream joined ("2023-06-01,2023-06-01"), a
        # version no one sent: refused, as the upstream would refuse the joined one.
        if len(self.request.headers.get_list("anthropic-version")) > 1:
            raise ApiError(
                400, "The anthropic-version header is given more than once: send it once.", code="invalid_header"
            )
        return super().forwarded_headers(names)

    async def relay_body(self, call) -> None:
        """A JSON answer, read whole (a message is some KiB, at most a few MiB) and relayed as it came, once
        known to be Anthropic's: a success in another shape is a 502, an error in another shape (an HTML
        page, OpenAI's error object) is told in Anthropic's with the upstream's status."""
        try:
            body = await call.read_all(self.config.max_answer_bytes)
        except UpstreamError as exc:
            raise self.upstream_failed(exc) from None
        try:
            answer = loads(body)
        except (ValueError, RecursionError):
            answer = None
        succeeded = 200 <= call.status < 300
        if succeeded and not self.api_format.is_own_answer(self.api_path, answer):
            self.note_fault("foreign_format")
            raise ApiError(502, self.api_format.foreign_message, "upstream_error", "upstream_wrong_format")
        if not succeeded and not self.api_format.is_own_error(answer):
            self.note_fault("foreign_error", "status=%d" % call.status)
            error = answer.get("error") if isinstance(answer, dict) else None
            told = error.get("message") if isinstance(error, dict) else None
            message = "The upstream answered with status %d%s." % (
                call.status,
                ": " + told[:500] if isinstance(told, str) and told else "",
            )
            raise ApiError(call.status, message, "upstream_error", headers=dict(relayed_headers(call.headers)))
        if succeeded:
            self.note_answer(answer)
            self.keep_json_answer(call, body)
        self.finish(body)


class MessagesHandler(AnthropicHandler):
    """POST /v1/messages and /v1/messages/count_tokens."""

    route_name = "messages"

    async def post(self) -> None:
        self.api_path = "messages/count_tokens" if self.request.path.endswith("/count_tokens") else "messages"
        key = self.openai_key()
        model, stream = self.requested_model_and_stream()
        headers = self.forwarded_headers(FORWARDED_REQUEST_HEADERS)
        body = self.body
        if self.api_path == "messages":
            # count_tokens runs no model: Anthropic does not bill it, nor does the proxy.
            pending = self.check_budget(model)
            if pending is not None:
                await pending  # budget counters in Redis
            if await self.answered_from_cache(self.api_path, headers, body, key, stream):
                return
        call = await self.open_upstream(
            "POST",
            self.api_path,
            self.request.query,
            headers,
            self.body_for(model, body),
            stream=stream,
            model=model,
            key=key,
        )
        await self.relay_answer(call)

    def requested_model_and_stream(self) -> tuple[str, bool]:
        """The body's ``model`` (checked against the allow-list) and ``stream``, read as /v1/* reads
        them: with an allow-list in force, a body whose model two parsers could read differently (a
        duplicate "model", one in another letter case) is refused, since the upstream might read
        the other one."""
        found = inspect_request(self.request.headers.get_list("Content-Type"), None, self.body, self.request.query)
        allowed = self.allowed_models()
        if found.problem is None:
            model, stream = found.named, found.stream
        else:
            payload = self.json_body()
            if allowed:
                raise model_undetermined(found.problem)
            model, stream = payload.get("model"), payload.get("stream") is True
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model: a model name (a string) is required.", code="missing_model")
        self.access.model = model
        # Only the top-level model runs: a "model" inside a message or a tool's input is the caller's text.
        check_model_allowed(allowed, model)
        return model, stream


class ModelsHandler(AnthropicHandler):
    """GET /v1/models (``?limit=…``, Claude Code's gateway model discovery) and GET /v1/models/{id},
    from the upstreams of kind = "anthropic" that serve every model."""

    route_name = "models"

    async def get(self, model_id: str | None = None) -> None:
        self.api_path = normalised_path("models" + ("/" + model_id if model_id else ""))
        if self.api_path is None:
            raise ApiError(400, "Invalid path.", code="invalid_path")
        key = self.openai_key()
        headers = self.forwarded_headers(FORWARDED_REQUEST_HEADERS)
        call = await self.open_upstream(
            "GET", self.api_path, self.request.query, headers, None, stream=False, model=None, key=key
        )
        await self.relay_answer(call)


class NotServedHandler(AnthropicHandler):
    """Any other path under /v1/messages/ (the Message Batches API, a trailing slash): Anthropic's
    paths, never an OpenAI upstream's, answered as Anthropic answers a path it does not have."""

    route_name = "messages"

    async def get(self, *args) -> None:
        raise ApiError(
            404,
            "%s %s is not served by this proxy: it relays POST /v1/messages and POST /v1/messages/count_tokens."
            % (self.request.method, self.request.path[:200]),
            code="not_found",
        )

    post = put = patch = delete = get


class AnthropicClient(Matcher):
    """A request on ``path`` from an Anthropic client: one that sends ``anthropic-version`` (every
    Anthropic SDK and Claude Code does) or ``x-api-key``; OpenAI's clients send neither."""

    def __init__(self, path: str):
        self.path = PathMatches(path)

    def match(self, request):
        if "anthropic-version" not in request.headers and "x-api-key" not in request.headers:
            return None
        return self.path.match(request)

    def reverse(self, *args):
        return None


routes = [
    (r"/v1/messages(?:/count_tokens)?", MessagesHandler),
    (r"/v1/messages/.*", NotServedHandler),
    Rule(AnthropicClient(r"/v1/models(?:/([^/]+))?$"), ModelsHandler),
]
