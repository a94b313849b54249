"""Admission: the access token, its limits (here or in Redis), the caller's or the server's OpenAI
key, the allow-list and the upstream concurrency cap, decided before anything is read or sent."""

from __future__ import annotations

import logging
import re
import time

from chat_gpt_proxy.access.tokens import UNAVAILABLE, iso_time
from chat_gpt_proxy.observability import CLIENT_CLOSED_STATUS, upstream_request_id
from chat_gpt_proxy.upstream.pool import UpstreamPool
from chat_gpt_proxy.upstream.routing import OPENAI_KINDS, Upstream
from chat_gpt_proxy.usage.budgets import Over
from chat_gpt_proxy.usage.meter import output_cap

from .errors import ApiError

log = logging.getLogger("chat_gpt_proxy")

# An API key goes into a header line: anything but visible ASCII could
# smuggle extra upstream headers (CR/LF) or break the request.
API_KEY_RE = re.compile(r"^[\x21-\x7e]{1,512}$")


# On a refusal no retry can fix: the official OpenAI and Anthropic SDKs read
# x-should-retry before their status rules and Retry-After.
NO_RETRY = {"x-should-retry": "false"}


def elapsed_ms(started: float, until: float | None = None) -> float:
    return round(((until if until is not None else time.monotonic()) - started) * 1000, 2)


def check_model_allowed(allowed_models: tuple[str, ...], model: str | None) -> None:
    """ALLOWED_MODELS, or a token's own list: keep a shared proxy on cheap models."""
    if allowed_models and model is not None and model not in allowed_models:
        raise ApiError(
            403, "Model %r is not allowed on this proxy." % model[:100], "permission_denied", "model_not_allowed"
        )


def model_undetermined(problem: str) -> ApiError:
    """With an allow-list in force, a body whose model two parsers could read differently
    (chat_gpt_proxy/request/model.py) is refused rather than guessed at."""
    return ApiError(
        400,
        "ALLOWED_MODELS (or the token's allowed_models) is in force and the model of this request "
        "cannot be determined: %s. "
        'Send a JSON object with one string "model" as application/json '
        "(or one model field in multipart/form-data)." % problem,
        "invalid_request_error",
        "model_undetermined",
    )


def take_upstream_slot(handler, pool: UpstreamPool) -> None:
    """Count ``handler`` in MAX_CONCURRENT_UPSTREAM (HTTP calls and realtime sessions alike), or refuse with 503."""
    if len(pool.handlers) >= handler.config.max_concurrent_upstream:
        handler.access.limited = "max_concurrent_upstream"
        # Never queue silently: the caller can retry elsewhere or later.
        raise ApiError(
            503,
            "The proxy is at its limit of concurrent upstream requests; retry shortly.",
            "server_error",
            "proxy_overloaded",
            headers={"Retry-After": "1"},
        )
    pool.handlers.add(handler)


class Admission:
    """Who is calling, with which key, and whether they may: mixed into every API handler."""

    # Routes that are public (health, usage page, metrics) set this to False.
    requires_access_token = True

    # The access token's entry (chat_gpt_proxy/access/tokens.py), and whether the
    # request counts against its max_concurrent.
    token = None
    token_admitted = ""
    # The access token as presented (whatever header carried it).
    presented_token = ""

    # Whether this request goes upstream with the server-held key.
    used_server_key = False

    # Spend (chat_gpt_proxy/usage/spend.py): whether this request is charged,
    # whether the proxy asked a stream for usage the caller did not ask for,
    # and what is left of the token's budget (on every answer, errors too).
    metered = False
    usage_injected = False
    charged = False
    # Whether the request may run a model even when it names none (a stored
    # prompt), and whether its usage is charged later (deferred work).
    runs_model = True
    charge_later = False
    budget_headers: dict = {}  # noqa: RUF012 (replaced per request, never mutated)

    def check_budget(self, model: str | None, runs_model: bool = True):
        """Refuse a token at or over its budget (429) or a money budget on a model without a price (403).

        ``runs_model``: whether the request may run a model (and cost money)
        even when it names none, as /v1 endpoints that pick one themselves do.
        An awaitable only when the budget counters are shared in Redis (one HMGET).
        """
        spend = self.application.spend
        entry = self.token
        self.metered = spend.metering(entry)
        if not self.metered or entry is None or not entry.policy.budget:
            return None
        if spend.shared is not None:
            return self.check_shared_budget(spend, entry, model, runs_model)
        self.budget_verdict(spend, entry, model, runs_model)
        return None

    async def check_shared_budget(self, spend, entry, model: str | None, runs_model: bool) -> None:
        if not await spend.refresh(entry, time.time()) and self.application.shared_limits.closed_mode:
            # REDIS_FAILURE_MODE=closed: no request of a budgeted token passes unchecked.
            self.metered = False
            raise ApiError(
                503,
                "The shared budget of this access token cannot be checked right now; retry shortly.",
                "server_error",
                "limits_unavailable",
                headers={"Retry-After": "1"},
            )
        self.budget_verdict(spend, entry, model, runs_model)

    def budget_verdict(self, spend, entry, model: str | None, runs_model: bool) -> None:
        now = time.time()
        self.budget_headers = spend.headers(entry, now)
        for name, value in self.budget_headers.items():
            self.set_header(name, value)
        refusal = spend.refusal(entry, model, now, runs_model)
        if refusal is None:
            return
        self.metered = False  # refused: nothing to charge
        if isinstance(refusal, Over):
            self.access.limited = refusal.which
            raise ApiError(
                429,
                refusal.message,
                "rate_limit_exceeded",
                "budget_exceeded",
                # Retry-After tells people and programs when the period resets;
                # x-should-retry: false stops the OpenAI and Anthropic SDKs,
                # which obey Retry-After for weeks, from waiting for it.
                headers={"Retry-After": str(refusal.retry_after), **NO_RETRY},
            )
        self.access.limited = "model_not_priced"
        raise ApiError(403, refusal.message, "permission_denied", "model_not_priced", headers=dict(NO_RETRY))

    def charge_spend(self, model_call: bool = True) -> None:
        """Charge the finished request once: its usage, or an estimate if a model ran and none came back."""
        if not self.metered or self.charged:
            return
        self.charged = True
        access = self.access
        call = access.call
        if self.request.method not in ("POST", "PUT", "PATCH"):
            # Reading a stored object (GET /v1/responses/{id}) runs no model:
            # the usage it shows was charged when the model ran.
            return
        status = getattr(call, "status", 0)
        if not status:
            if call is None or not access.client_gone or access.model is None:
                return  # refused, or the upstream never answered: nothing ran
            # The client left after the request went upstream, before the
            # answer began: the model may run all the same.
            status = CLIENT_CLOSED_STATUS
        ok = 200 <= status < 300 or status == CLIENT_CLOSED_STATUS
        if access.model is None and access.usage is None and access.ran_model is None and not self.runs_model:
            return  # no model call (files, uploads): nothing to charge
        meter = getattr(self, "stream_meter", None)
        # A stream's usage counts once its final usage event came, even if the
        # client left right after it (Codex CLI closes on response.completed).
        usage = access.usage if ok and (meter is None or meter.final) else None
        # A stream that ended without its final count (Anthropic's message_stop after a
        # message_delta without usage) is estimated by the caller's cap too: events undercount it.
        left_early = usage is None and (access.client_gone or getattr(meter, "ended_uncounted", False))
        self.application.spend.charge(
            token=access.token,
            route=access.route,
            model=access.model,
            usage=usage,
            status=status,
            request_id=access.request_id,
            # A model ran, so the body was read and decoded.
            request_bytes=len(self._decoded_body or b""),
            events=access.events,
            # Deferred work is charged when its usage is known (chat_gpt_proxy/usage/deferred.py).
            model_call=ok and model_call and not self.charge_later,
            ran_model=access.ran_model,
            upstream_model=access.upstream_model,
            partial=access.usage,
            left_early=left_early,
            output_cap=self.request_output_cap() if usage is None and left_early else None,
            upstream=access.upstream,
            latency_ms=elapsed_ms(access.started),
            ttft_ms=elapsed_ms(access.started, access.first_byte_at) if access.first_byte_at else None,
            cache=access.cache,
            upstream_request_id=upstream_request_id(call.headers) if call is not None else None,
        )
        self.check_alerts()

    def check_alerts(self) -> None:
        """After a charge: tell ALERT_WEBHOOK_URL if the token's budget just crossed a threshold."""
        alerts = self.application.alerts
        if alerts is not None and self.token is not None and self.token.policy.budget:
            alerts.check(self.token)

    def record_refusal(self) -> None:
        """An error answer to a known token that charged nothing: a row saying why (its code), for the admin page."""
        access = self.access
        self.application.console.refused(
            (
                time.time(),
                access.token,
                access.route,
                access.model[:200] if isinstance(access.model, str) else None,
                self.get_status(),
                access.error_code,
                elapsed_ms(access.started),
                access.request_id,
            )
        )

    def request_output_cap(self) -> int | None:
        """The cap on output tokens the request set itself (its JSON body's), for an estimate."""
        return output_cap(self._decoded_body)

    def server_key_refused(self) -> ApiError:
        """The upstream refused the server's own key: the operator's problem, not the caller's.

        OpenAI's 401 shows the refused key's first and last characters; a
        caller of a shared key never sees them (the key appears in
        no error body).
        """
        log.warning(
            "server key refused by the upstream request_id=%s upstream=%s (check its key, or OPENAI_API_KEY)",
            self.request_id,
            self.access.upstream,
        )
        return ApiError(
            502,
            "The upstream refused this proxy's own %s; tell the proxy's operator." % self.key_name,
            "upstream_error",
            "server_key_refused",
        )

    refused_access_message = "Missing or wrong access-token header."

    def presented_access_token(self) -> str:
        return self.request.headers.get("access-token", "")

    def check_access_token(self):
        """Find and admit the presented token; an awaitable only when shared limits need a Redis round trip."""
        tokens = self.application.tokens
        self.presented_token = self.presented_access_token()
        entry = tokens.lookup(self.presented_token)
        if entry is None:
            raise ApiError(403, self.refused_access_message, "permission_denied", "invalid_access_token")
        self.token = entry
        # Names the caller in the access log and metrics; "-" for ACCESS_TOKEN's.
        self.access.token = entry.name
        refuse_if_inactive(entry.policy)
        return self.admit_token(tokens, entry)

    def admit_token(self, tokens, entry):
        """Apply the token's limits; 429 with Retry-After when one is reached.

        With REDIS_URL, a token with limits is admitted by Redis (one round
        trip, chat_gpt_proxy/access/shared_limits.py): the awaitable returned does
        it. Everything else stays synchronous, as without Redis.
        """
        shared = self.application.shared_limits
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
            # REDIS_FAILURE_MODE=closed: no request of a limited token passes unchecked.
            raise ApiError(
                503,
                "The shared limits of this access token cannot be checked right now; retry shortly.",
                "server_error",
                "limits_unavailable",
                headers={"Retry-After": "1"},
            )
        else:
            self.admitted(tokens.admit(entry), "local")
        if self.access.client_gone:
            # The client left while Redis answered: on_connection_close found nothing to release yet.
            self.release_token()

    def admitted(self, refusal, counted_by: str) -> None:
        if refusal is not None:
            self.access.limited = refusal.limit
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
            self.application.tokens.release(self.token)
        elif counted_by == "shared":
            self.application.shared_limits.release(self.token)

    def on_finish(self) -> None:
        self.release_token()
        self.charge_spend()
        access = self.access
        if access.cache == "hit" and self.request.method == "POST":
            self.application.spend.record_hit(
                token=access.token,
                route=access.route,
                model=access.model[:200] if isinstance(access.model, str) else None,
                status=self.get_status(),
                request_id=access.request_id,
                upstream=None,
                latency_ms=elapsed_ms(access.started),
                ttft_ms=elapsed_ms(access.started, access.first_byte_at) if access.first_byte_at else None,
            )
        if (
            not self.charged
            and self.token is not None
            and self.access.error_code is not None
            and self.application.console is not None
        ):
            self.record_refusal()

    def allowed_models(self) -> tuple[str, ...]:
        """ALLOWED_MODELS, or the caller's token's own allowed_models."""
        return self.token.policy.allowed_models if self.token is not None else self.config.allowed_models

    def upstream_candidates(
        self, model: str | None, *, realtime: bool = False, kinds: tuple[str, ...] = OPENAI_KINDS
    ) -> list[Upstream]:
        """The upstreams of ``kinds`` (those that speak the request's API) to try for ``model``, best first;
        404 if none serves it, 403 if none is this token's."""
        router = self.application.router
        allowed = self.token.policy.upstreams if self.token is not None else ()
        found = router.candidates(model, allowed, self.used_server_key, kinds)
        if realtime:
            # Azure's realtime API is shaped otherwise, and an alias would have to rewrite the query.
            found = [u for u in found if u.kind == "openai" and u.upstream_model(model) == model]
        if found:
            return found
        if not any(u.kind in kinds for u in router.upstreams):
            raise ApiError(
                404,
                "No upstream of this proxy speaks this API: the operator can add one of kind = %s to UPSTREAMS_FILE."
                % " or ".join('"%s"' % kind for kind in kinds),
                "invalid_request_error",
                "model_not_found",
            )
        if not any(u.serves(model) for u in router.upstreams if u.kind in kinds):
            raise ApiError(
                404,
                "No upstream of this proxy serves the model %r." % (model or "")[:100],
                "invalid_request_error",
                "model_not_found",
            )
        raise ApiError(
            403,
            "No upstream this access token may use serves the model %r%s."
            % ((model or "")[:100], "" if self.used_server_key else " with the caller's own key"),
            "permission_denied",
            "upstream_not_allowed",
        )

    def route_tenant(self) -> str:
        """Whose request this is, for the circuit breaker (routing.py: one tenant's error answers
        alone never open a route): its token's name. Only a named token's request can carry the
        upstream's own key (use_server_key), the one kind whose answers count against a route."""
        return self.access.token

    def upstream_key(self, upstream: Upstream, caller_key: str) -> str:
        """The caller's key, or, for a server-key request, the upstream's own key or OPENAI_API_KEY."""
        if not self.used_server_key:
            return caller_key if upstream.forward_caller_key else ""
        return upstream.api_key or self.config.openai_api_key

    def note_failover(self, upstream: Upstream, reason: str) -> None:
        log.warning("upstream failover request_id=%s from=%s reason=%s", self.request_id, upstream.name, reason)
        metrics = self.application.metrics
        if metrics is not None:
            metrics.upstream_failovers.labels(upstream.name, reason).inc()

    # How this surface names the key and its errors; /v1/* and /v1/messages override them.
    key_name = "OpenAI key"
    missing_key_message = "Missing openai-token header: send your OpenAI API key in it."

    key_error_codes = ("missing_openai_token", "invalid_openai_token")

    def presented_key(self) -> str:
        return self.request.headers.get("openai-token", "").strip()

    def openai_key(self) -> str:
        """The caller's OpenAI key, for this one request; 401 if missing or malformed.

        A caller who sends none may use the server's key if its token allows
        it (use_server_key); a key the caller sends always wins.
        """
        key = self.presented_key()
        if key and key == self.presented_token:
            # The proxy's own token sent again as a key (access-token: T and
            # Authorization: Bearer T) is no key of the caller's: it never goes upstream.
            key = ""
        missing, malformed = self.key_error_codes
        if not key and self.token is not None and self.token.policy.use_server_key:
            self.used_server_key = True
            return self.config.openai_api_key
        if not key:
            raise ApiError(401, self.missing_key_message, "authentication_error", missing)
        if not API_KEY_RE.match(key):
            raise ApiError(401, "The %s is malformed." % self.key_name, "authentication_error", malformed)
        return key


def refuse_if_inactive(policy) -> None:
    """403 for a disabled or expired token: every route that takes a token says so alike."""
    if policy.disabled:
        raise ApiError(403, "This access token is disabled.", "permission_denied", "access_token_disabled")
    if policy.expires is not None and policy.expired(time.time()):
        raise ApiError(
            403,
            "This access token expired at %s." % iso_time(policy.expires),
            "permission_denied",
            "access_token_expired",
        )
