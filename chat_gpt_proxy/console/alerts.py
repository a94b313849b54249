"""Budget alerts: one POST to ALERT_WEBHOOK_URL per token, threshold (ALERT_THRESHOLDS) and budget period.

``check(entry)`` runs after a request of a budgeted token was charged: a few
comparisons with the counters the budget itself uses, and, when a threshold
is crossed for the first time in this period, an alert queued. It never
waits and never fails a request: a task of its own sends the queue.

Sending: with a database (USAGE_DATABASE) the alert is first claimed in its
``budget_alerts`` table, so that of all instances and restarts exactly one
sends it; then POSTed as JSON through the egress proxy the upstream uses
(UPSTREAM_PROXY or the environment, NO_PROXY), retried with a doubling pause
when the webhook is down or answers an error. Every failed attempt is logged
(without the URL's path, which is often the secret) and counted in
``proxy_budget_alerts_total{result}``.

The body is what Slack, Mattermost and Rocket.Chat incoming webhooks show as
is (``text``), plus the same facts as fields; it holds no token value and no key.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time

import pycurl
from tornado.curl_httpclient import CurlAsyncHTTPClient
from tornado.httpclient import HTTPRequest

from chat_gpt_proxy.access.tokens import iso_time
from chat_gpt_proxy.upstream import egress
from chat_gpt_proxy.upstream.urls import mask_webhook
from chat_gpt_proxy.usage.budgets import period_bounds

log = logging.getLogger("chat_gpt_proxy")

# The first pause after a failed attempt, doubled after each, up to MAX_PAUSE; ATTEMPTS in all.
FIRST_PAUSE = 1.0
MAX_PAUSE = 300.0
ATTEMPTS = 12
TIMEOUT = 10.0
MAX_QUEUED = 10_000
PERIOD_WORDS = {"day": "daily", "week": "weekly", "month": "monthly"}


def _usd(value: float) -> str:
    return "$%.2f" % value if value >= 0.01 or value == 0 else "$%.6f" % value


def alert_body(name: str, threshold: int, kind: str, spent, limit, period: str, now: float) -> dict:
    """What is POSTed: ``text`` for chat tools, then the facts as fields."""
    start, end = period_bounds(period, now)
    percent = round(100.0 * spent / limit, 1) if limit else 100.0
    amount = f"{_usd(spent)} of {_usd(limit)}" if kind == "budget_usd" else f"{spent:,} of {limit:,} tokens"
    text = "chat_gpt_proxy: %s has used %s%% of its %s budget: %s; it resets at %s." % (
        name,
        ("%g" % percent),
        PERIOD_WORDS[period],
        amount,
        iso_time(end),
    )
    if percent >= 100:
        text += " Its requests are refused (429) until then."
    return {
        "text": text,
        "name": name,
        "threshold": threshold,
        "percent": percent,
        "budget": kind,
        "spent": spent,
        "limit": limit,
        "period": period,
        "period_start": iso_time(start),
        "resets_at": iso_time(end),
    }


class BudgetAlerts:
    def __init__(self, settings, book, metrics=None, store=None):
        """``book``: the budget counters (usage/budgets.py); ``store``: the console's, to send each alert once."""
        self.url = settings.alert_webhook_url
        self.shown = mask_webhook(self.url)
        self.thresholds = settings.alert_thresholds
        self.book = book
        self.metrics = metrics
        self.store = store
        self.proxy = egress.proxy_for(self.url, settings.upstream_proxy, settings.no_proxy)
        self.ca_file = settings.upstream_ca_file
        # (name, period, period start, threshold) already queued by this process.
        self.seen: set[tuple[str, str, float, int]] = set()
        self.queue: collections.deque[dict] = collections.deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.client: CurlAsyncHTTPClient | None = None

    def start(self) -> None:
        self.client = CurlAsyncHTTPClient(force_instance=True, max_clients=2)
        self.task = asyncio.ensure_future(self._sender())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self.client is not None:
            self.client.close()

    def count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.budget_alerts.labels(result).inc()

    def check(self, entry, now: float | None = None) -> None:
        """After a charge of ``entry`` (which has a budget): queue the thresholds just crossed. Never raises."""
        budget = entry.policy.budget
        now = time.time() if now is None else now
        spent, _ = self.book.spent_now(entry.name, budget.period, now)
        start, _ = period_bounds(budget.period, now)
        crossed = {}
        kinds = (("budget_usd", spent.usd, budget.usd), ("budget_tokens", spent.tokens, budget.tokens))
        for kind, used, limit in kinds:
            if limit is None:
                continue
            for threshold in self.thresholds:
                if used >= limit * threshold / 100 and threshold not in crossed:
                    crossed[threshold] = (kind, used, limit)
        if not crossed:
            return
        # One charge may cross several thresholds at once (80 and 100): one alert, the highest.
        # The lower ones are passed over for good (here, and by every process: each tries the highest).
        threshold = max(crossed)
        kind, used, limit = crossed[threshold]
        key = (entry.name, budget.period, start, threshold)
        if key in self.seen:
            return
        if len(self.seen) > 100_000:
            self.seen = {k for k in self.seen if k[2] >= start}
        self.seen.update((entry.name, budget.period, start, t) for t in crossed)
        if len(self.queue) >= MAX_QUEUED:
            self.count("failed")
            return
        body = alert_body(entry.name, threshold, kind, used, limit, budget.period, now)
        self.queue.append({"key": key, "body": body})
        self.wake.set()

    async def _sender(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                alert = self.queue.popleft()
                try:
                    await self._deliver(alert)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug must not stop the alerts that follow
                    log.warning("budget alert: not sent (%s)", type(exc).__name__)
                    self.count("failed")

    async def _claim(self, key) -> bool:
        """Whether this process sends it: the first to record it in the database (or no database)."""
        if self.store is None:
            return True
        name, period, start, threshold = key
        try:
            return await self.store.claim_alert(name, period, start, threshold, time.time())
        except Exception as exc:  # the database away: better twice than never
            log.warning("budget alert: cannot record it in the database (%s); sending it anyway", type(exc).__name__)
            return True

    async def _deliver(self, alert: dict) -> None:
        if not await self._claim(alert["key"]):
            return
        body = json.dumps(alert["body"]).encode()
        pause = FIRST_PAUSE
        for attempt in range(1, ATTEMPTS + 1):
            problem = await self._post(body)
            if problem is None:
                self.count("sent")
                log.info(
                    "budget alert sent: %s at %d%% of its %s budget to %s",
                    alert["body"]["name"],
                    alert["body"]["threshold"],
                    alert["body"]["period"],
                    self.shown,
                )
                return
            self.count("retried" if attempt < ATTEMPTS else "failed")
            log.warning(
                "budget alert for %s (%d%%) to %s: attempt %d of %d failed (%s)%s",
                alert["body"]["name"],
                alert["body"]["threshold"],
                self.shown,
                attempt,
                ATTEMPTS,
                problem,
                "; retrying in %gs" % pause if attempt < ATTEMPTS else "; given up",
            )
            if attempt < ATTEMPTS:
                await asyncio.sleep(pause)
                pause = min(MAX_PAUSE, pause * 2)

    async def _post(self, body: bytes) -> str | None:
        """None when the webhook took it (2xx), else what went wrong, in a few words."""
        request = HTTPRequest(
            self.url,
            method="POST",
            body=body,
            headers={"Content-Type": "application/json", "User-Agent": "chat_gpt_proxy budget alerts"},
            connect_timeout=TIMEOUT,
            request_timeout=TIMEOUT,
            follow_redirects=False,
            ca_certs=self.ca_file or None,
            prepare_curl_callback=self._prepare,
        )
        try:
            response = await self.client.fetch(request, raise_error=False)
        except Exception as exc:
            return type(exc).__name__
        if 200 <= response.code < 300:
            return None
        if response.code == 599:
            return "no answer: %s" % (type(response.error).__name__ if response.error else "connection failed")
        return "HTTP %d" % response.code

    def _prepare(self, curl) -> None:
        # As the upstream calls do (upstream/call.py): this proxy, or "" for a direct connection,
        # never what libcurl would read from the environment by itself.
        proxy = self.proxy
        if proxy is None:
            curl.setopt(pycurl.PROXY, "")
            return
        curl.setopt(pycurl.PROXY, proxy.address)
        curl.setopt(pycurl.NOPROXY, "")
        if proxy.username or proxy.password:
            curl.setopt(pycurl.PROXYUSERNAME, proxy.username)
            curl.setopt(pycurl.PROXYPASSWORD, proxy.password)
        curl.setopt(pycurl.HTTPPROXYTUNNEL, 1 if proxy.tunnels else 0)
        if proxy.scheme == "https" and self.ca_file:
            curl.setopt(pycurl.PROXY_CAINFO, self.ca_file)
