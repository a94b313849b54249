"""/v1/*: the OpenAI API itself, passed through, so any OpenAI client only changes base_url.

Bodies go upstream byte for byte and answers come back with their status,
headers (less hop-by-hop ones) and body unchanged. Errors of the proxy itself
use OpenAI's error shape, so SDKs raise their usual exception classes.
"""

from __future__ import annotations

from chat_gpt_proxy.formats.openai import for_path
from chat_gpt_proxy.request.model import MODEL_FREE_PATH_RE, SESSION_MODEL_PATH_RE, RequestedModel, inspect_request
from chat_gpt_proxy.request.strict_json import dumps, loads
from chat_gpt_proxy.upstream.urls import join_url, normalised_path
from chat_gpt_proxy.usage.deferred import FINISHED, KINDS, deferred_kind

from .admission import check_model_allowed, model_undetermined
from .errors import ApiError
from .forwarding import ForwardingHandler
from .openai_style import OpenAIStyle

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


# The answers the response cache may keep (chat_gpt_proxy/cache.py): one
# request, one deterministic-enough answer.
CACHED_PATHS = frozenset(("chat/completions", "responses", "embeddings"))


class OpenAIHandler(OpenAIStyle, ForwardingHandler):
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
        found = self.requested = inspect_request(
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
                raise model_undetermined(found.problem)
            for model in found.models:
                check_model_allowed(allowed, model)
            # Fail closed: an endpoint that may run a model picks
            # one itself when the body does not name it where the endpoint
            # reads it (images, moderations, a stored prompt, a batch's file,
            # an assistant's run); a nested or query "model" does not count.
            # Realtime secrets and calls run the session's model, whatever else the body says.
            named = found.session_model if SESSION_MODEL_PATH_RE.match(self.v1_path) else found.named
            if named is None and not MODEL_FREE_PATH_RE.match(self.v1_path):
                raise model_undetermined(
                    "the body names no model, and /v1/%s is not an endpoint that runs none" % self.v1_path[:100]
                )
        return found.model, found.stream

    # What the body asks for (chat_gpt_proxy/request/model.py); nothing without a body.
    requested = RequestedModel()

    async def forward(self) -> None:
        # One normalised path for the allow-list check and the upstream.
        self.v1_path = normalised_path(self.request.path[len("/v1/") :])
        self.api_format = for_path(self.v1_path or "")
        url = None if self.v1_path is None else join_url(self.config.openai_base_url, self.v1_path, self.request.query)
        if url is None:
            raise ApiError(400, "Invalid path.", "invalid_request_error", "invalid_path")
        key = self.openai_key()
        headers = self.forwarded_headers(FORWARDED_REQUEST_HEADERS)
        model, stream = self.requested_model_and_stream()
        method = self.request.method
        self.runs_model = method in ("POST", "PUT", "PATCH") and not MODEL_FREE_PATH_RE.match(self.v1_path)
        self.deferred = deferred_kind(method, self.v1_path, self.requested.background)
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
        if (
            method == "POST"
            and self.v1_path in CACHED_PATHS
            and await self.answered_from_cache(self.v1_path, headers, body, key, stream)
        ):
            return
        if stream and self.metered and self.v1_path == "chat/completions":
            body = self.with_stream_usage(body)
        call = await self.open_upstream(
            method,
            self.v1_path,
            self.request.query,
            headers,
            self.body_for(model, body) if body is not None else None,
            stream=stream,
            model=model,
            key=key,
        )
        await self.relay_answer(call)

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

    def note_answer(self, answer) -> None:
        super().note_answer(answer)
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
        started_by = self.application.tokens.find(entry.token)
        if self.application.alerts is not None and started_by is not None and started_by.policy.budget:
            self.application.alerts.check(started_by)

    get = post = put = patch = delete = forward


routes = [(r"/v1/.*", OpenAIHandler)]
