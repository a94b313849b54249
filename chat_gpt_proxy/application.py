"""The proxy's Tornado application, with its runtime state as typed attributes.

Tornado's ``settings`` dict holds Tornado's own options; what the proxy's
handlers share at run time lives here instead, each with its type: the
settings, the upstream pool, the access tokens, the limits shared in Redis,
the metrics, the CORS policy, and the drain state.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import tornado.web

from .access.attempts import FailedAttempts
from .tornado_internals import body_buffered, no_body_timeout

if TYPE_CHECKING:
    from settings import Settings

    from .access.shared_limits import SharedLimits
    from .access.tokens import TokenRegistry
    from .cache import ResponseCache
    from .console.alerts import BudgetAlerts
    from .console.runtime import RuntimeTokens
    from .observability import Metrics
    from .request.cors import CorsPolicy
    from .upstream.pool import UpstreamPool
    from .upstream.routing import Router
    from .usage.spend import Spend


class ProxyApplication(tornado.web.Application):
    def __init__(
        self,
        handlers,
        *,
        config: Settings,
        pool: UpstreamPool,
        router: Router,
        tokens: TokenRegistry,
        cors: CorsPolicy,
        spend: Spend,
        metrics: Metrics | None = None,
        shared_limits: SharedLimits | None = None,
        cache: ResponseCache | None = None,
        console: RuntimeTokens | None = None,
        alerts: BudgetAlerts | None = None,
        **settings,
    ):
        super().__init__(handlers, **settings)
        self.config = config
        self.pool = pool
        # The upstreams (UPSTREAMS_FILE, or OPENAI_BASE_URL alone) and their health; replaced in place on SIGHUP.
        self.router = router
        # Replaced in place on SIGHUP.
        self.tokens = tokens
        self.cors = cors
        # Prices, budgets and the usage ledger; its ledger is opened by ``spend.start``.
        self.spend = spend
        self.metrics = metrics
        # With REDIS_URL: the per-token counters every instance shares.
        self.shared_limits = shared_limits
        # The opt-in response cache (chat_gpt_proxy/cache.py); None in apps built without one.
        self.cache = cache
        # With USAGE_DATABASE: the tokens the admin API manages (chat_gpt_proxy/console/runtime.py).
        self.console = console
        # With ALERT_WEBHOOK_URL: the budget alerts (chat_gpt_proxy/console/alerts.py).
        self.alerts = alerts
        # Set on SIGTERM/SIGINT: /readyz answers 503, answers say Connection: close.
        self.draining = False
        # Every request handler while it lives, for the drain (weak: nothing to clean up).
        self.requests: weakref.WeakSet = weakref.WeakSet()
        # Wrong admin tokens per client address (handlers/private.py).
        self.admin_attempts = FailedAttempts()

    def find_handler(self, request, **kwargs):
        # Called once the headers are parsed and before the body is read.
        # BODY_TIMEOUT guards against a client that sends its body slowly;
        # a body that arrived with the headers (nearly every API call) has
        # nothing left to wait for, and Tornado's timer around reading it from
        # memory cost about 7 % of the CPU per request (bench/profile.py).
        if body_buffered(request):
            no_body_timeout(request)
        return super().find_handler(request, **kwargs)
