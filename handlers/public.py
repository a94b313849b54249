"""Public pages: the usage page and the health check (no access token needed)."""

from __future__ import annotations

import time

from chat_gpt_proxy.human import money_fields
from chat_gpt_proxy.request.strict_json import dumps
from chat_gpt_proxy.usage.budgets import PERIODS, iso

from .admission import refuse_if_inactive
from .base import BaseHandler
from .errors import ApiError
from .private import NoStore
from .usage_page import UsagePageMixin


class UsageHandler(NoStore, UsagePageMixin, BaseHandler):
    """GET /usage: the usage page; with an ``access-token`` header, that token's spend as JSON.

    The old service's page is what a caller without the header still gets. No
    answer is stored by a cache: the same address answers each token its own spend.
    """

    requires_access_token = False

    def get(self) -> None:
        if "access-token" not in self.request.headers:
            super().get()
            return
        entry = self.application.tokens.lookup(self.presented_access_token())
        if entry is None:
            raise ApiError(403, "Missing or wrong access-token header.", "permission_denied", "invalid_access_token")
        refuse_if_inactive(entry.policy)
        now = time.time()
        book = self.application.spend.book
        spent = {}
        for period in PERIODS:
            counted, end = book.spent_now(entry.name, period, now)
            spent[period] = {"usd": counted.usd, "tokens": counted.tokens, "resets_at": iso(end)}
        budget = entry.policy.budget
        body = {
            "token": entry.name,
            "spent": spent,
            "budget": book.remaining(entry.name, budget, now) if budget else None,
            # Whether this token's requests are counted at all (a budget or a ledger), and, without
            # a ledger, only what this process has seen since it started.
            "metered": self.application.spend.metering(entry),
            "since_restart_only": self.application.spend.ledger is None,
        }
        self.set_header("Content-Type", "application/json; charset=utf-8")
        # Amounts exact (a page or a script adds rows up), each with a rounded *_display for people.
        self.finish(dumps(money_fields(body)))


class HealthHandler(BaseHandler):
    requires_access_token = False

    def get(self):
        """GET /healthz: 200 while the process serves requests.

        With REDIS_URL it also says whether Redis answers ("redis": "up" or
        "down"), still with 200: an instance without Redis serves
        (REDIS_FAILURE_MODE), and restarting it would not bring Redis back.
        It lists each upstream's state (``default`` without UPSTREAMS_FILE),
        still with 200: the others may serve, and a restart would not mend a route.
        """
        # Each upstream's state (up, down, half_open), never its key or address.
        body = {"status": "ok", "upstreams": self.application.router.states()}
        shared = self.application.shared_limits
        if shared is None:
            self.answer(body)
            return None
        return self.with_redis(shared, body)

    async def with_redis(self, shared, body: dict) -> None:
        self.answer({**body, "redis": await shared.state()})

    def answer(self, body: dict) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps(body))


class ReadyHandler(BaseHandler):
    """GET /readyz: whether a load balancer should send this instance new requests.

    Liveness (/healthz) stays 200 until the process exits, so nothing restarts
    an instance that is finishing its streams; readiness turns 503 as soon as
    SIGTERM or SIGINT arrives (server.py sets ``draining``), while the process
    still serves for SHUTDOWN_DELAY seconds, so that the balancer stops sending
    requests before the instance stops accepting them.
    """

    requires_access_token = False

    def get(self) -> None:
        if self.application.draining:
            raise ApiError(503, "Shutting down: this instance takes no new requests.", "server_error", code="draining")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps({"status": "ready"}))

    def error_body(self, status: int, message: str, error: dict) -> dict:
        body = super().error_body(status, message, error)
        # Only the 503 of a draining instance says so; a 405 (PUT /readyz) is no readiness answer.
        return {**body, "status": "draining"} if status == 503 else body


routes = [
    (r"/usage", UsageHandler),
    (r"/healthz", HealthHandler),
    (r"/readyz", ReadyHandler),
]
