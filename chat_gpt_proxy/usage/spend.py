"""Spend control for the application: prices, what each token spent, budgets, and the ledger.

One ``Spend`` per application (``application.spend``). Handlers ask it three
things: whether a token may start a request (``refusal``), what to tell the
caller is left (``headers``), and, when the request has ended, to charge it
(``charge``). Charging only records state: an in-memory counter per token and
period, and a row queued for the ledger; the database is written by the
ledger's own task.

Metering (``metering``) is on when there is a ledger (USAGE_DATABASE) or the
token has a budget: only then does the proxy ask a stream for its usage.
With neither, nothing here runs per request.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from chat_gpt_proxy.access.tokens import UNNAMED
from chat_gpt_proxy.formats.usage import Usage

from .budgets import NO_BUDGET, PERIODS, Budget, BudgetBook, Measured, Over, period_bounds
from .deferred import DeferredWork
from .ledger import Ledger, SqliteStore, make_store
from .meter import Charge, cost, estimate
from .prices import Price, PriceTable

log = logging.getLogger("chat_gpt_proxy")


@dataclasses.dataclass(frozen=True)
class NotPriced:
    """A token with a money budget asked for a model without a price: 403 ``model_not_priced``."""

    model: str | None

    @property
    def message(self) -> str:
        if self.model is None:
            return (
                "This request names no model, and this access token has a budget in US dollars: "
                "name the model, so that it can be priced."
            )
        return (
            "Model %r has no price on this proxy, and this access token has a budget in US dollars; "
            "the operator can add its price in PRICES_FILE." % self.model[:100]
        )


class Spend:
    def __init__(self, config, metrics=None, shared_limits=None):
        """``shared_limits``: with REDIS_URL, the budget counters are shared through its Redis client."""
        self.config = config
        self.prices = PriceTable(config.prices_file)
        self.book = BudgetBook()
        self.metrics = metrics
        self.ledger: Ledger | None = None
        # Token names whose spend was read from the ledger (at startup, or when a reload added them).
        self.rebuilt: set[str] = set()
        # Background responses and batches to charge once they report their usage.
        self.deferred = DeferredWork()
        self.shared = None
        if shared_limits is not None:
            from .shared import SharedSpend  # imports redis: only with REDIS_URL

            self.shared = SharedSpend(shared_limits, self)
        if config.usage_database:
            self.ledger = Ledger(make_store(config.usage_database), config.usage_queue_rows, metrics)

    async def start(self, entries) -> None:
        """Open the ledger and rebuild every named token's spend in its current periods from it."""
        if self.shared is not None and any(e.policy.budget for e in entries):
            self.warn_unshared_ledger()
        if self.ledger is None:
            return
        await self.ledger.start()
        await self.rebuild(entries, starting=True)
        if self.config.usage_retention_days:
            cutoff = time.time() - self.config.usage_retention_days * 86400
            deleted = await self.ledger.delete_before(cutoff)
            if deleted:
                log.info("usage ledger: %d rows older than %d days deleted", deleted, self.config.usage_retention_days)

    def warn_unshared_ledger(self) -> None:
        """Redis restarted empty is seeded from the ledger: exact only if it holds every instance's rows."""
        if self.ledger is not None and not isinstance(self.ledger.store, SqliteStore):
            return
        log.warning(
            "shared budgets: the usage ledger is not shared between instances (%s): if Redis restarts empty, "
            "a budget is seeded from what the instance asking first knows, and the spend of instances that "
            "do not write this ledger is forgotten; for exact shared budgets across hosts set USAGE_DATABASE "
            "to one PostgreSQL database",
            "no USAGE_DATABASE" if self.ledger is None else "SQLite: shared only by the processes of one host",
        )

    async def rebuild(self, entries, starting: bool = False) -> None:
        """Read from the ledger what tokens not yet read spent in their current periods."""
        if self.ledger is None:
            return
        now = time.time()
        for name in {e.name for e in entries} - self.rebuilt:
            self.rebuilt.add(name)
            for period in PERIODS:
                start, _ = period_bounds(period, now)
                measured = await self.measure(name, period, start)
                self.book.set(name, period, start, measured.nanos, measured.tokens)
                if self.shared is not None:
                    # Only where Redis has nothing yet: once it holds a period, it is the authority.
                    await self.shared.seed(name, period, start, measured)
        if self.shared is None:
            return
        if starting:
            # Before the first request: one wait, then every total Redis lacks is seeded.
            await self.shared.seed_marked()
        else:
            # A reload does not wait: a total marked here is seeded by its token's first request.
            self.shared.to_seed.clear()

    async def measure(self, name: str, period: str, start: float) -> Measured:
        """What this instance knows ``name`` spent in a period: the ledger (every instance's rows,
        and this one's not yet written), or without one, its own counter. Seeds Redis."""
        if self.ledger is not None:
            read_at = time.time()
            nanos, tokens = await self.ledger.spent_since(name, start)
            # Nothing ran between the ledger's look at its queue and here: rows before ``recorded`` are in.
            return Measured(nanos, tokens, "ledger", read_at, self.ledger.recorded)
        spent, _ = self.book.spent_now(name, period, start)
        return Measured(spent.nanos, spent.tokens, "local", time.time(), None)

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()
        if self.ledger is not None:
            await self.ledger.close()

    async def refresh(self, entry, now: float) -> bool:
        """Bring this instance's counter of ``entry``'s period up to the total in Redis (never down:
        a smaller total is missing charges); False if Redis did not answer."""
        period = entry.policy.budget.period
        found = await self.shared.spent(entry.name, period, now)
        if not isinstance(found, tuple):
            return False
        start, _ = period_bounds(period, now)
        self.book.raise_to(entry.name, period, start, *found)
        return True

    def metering(self, entry) -> bool:
        return self.ledger is not None or (entry is not None and bool(entry.policy.budget))

    def refusal(self, entry, model: str | None, now: float, runs_model: bool = True) -> Over | NotPriced | None:
        """Why ``entry`` may not start a request for ``model`` now, if it may not.

        A money budget needs a price: for the model named, or, when a request
        that may run a model names none (the upstream would pick it), the
        operator's ``[default]`` price. Nothing is free by accident.
        """
        budget: Budget = entry.policy.budget if entry is not None else NO_BUDGET
        if not budget:
            return None
        over = self.book.check(entry.name, budget, now)
        if over is not None:
            return over
        if budget.usd is not None and (model is not None or runs_model) and self.prices.price(model) is None:
            return NotPriced(model)
        return None

    def headers(self, entry, now: float) -> dict[str, str]:
        """What is left of ``entry``'s budget, for every answer to a budgeted token."""
        budget = entry.policy.budget if entry is not None else NO_BUDGET
        if not budget:
            return {}
        left = self.book.remaining(entry.name, budget, now)
        out = {"x-proxy-budget-period": budget.period, "x-proxy-budget-resets": left["resets_at"]}
        if budget.usd is not None:
            out["x-proxy-budget-remaining-usd"] = "%.6f" % left["remaining_usd"]
        if budget.tokens is not None:
            out["x-proxy-budget-remaining-tokens"] = str(left["remaining_tokens"])
        return out

    def pricing(self, asked: str | None, aliased: str | None, ran: str | None) -> tuple[str | None, Price | None]:
        """The model a request is charged as, and its price: the first the table prices of the model
        that ran (the answer's ``model``) and the model asked for after aliases; else the price of
        the model asked for (or the operator's default), on which ``model_not_priced`` was decided."""
        for model in (ran, aliased):
            if model is not None and model != asked:
                found = self.prices.listed(model)
                if found is not None:
                    return model, found
        return ran or aliased or asked, self.prices.price(asked)

    def charge(
        self,
        *,
        token: str,
        route: str,
        model: str | None,
        usage: Usage | None,
        status: int,
        request_id: str,
        request_bytes: int,
        events: int,
        model_call: bool,
        ran_model: str | None = None,
        upstream_model: str | None = None,
        partial: Usage | None = None,
        left_early: bool = False,
        output_cap: int | None = None,
        upstream: str | None = None,
        latency_ms: float | None = None,
        ttft_ms: float | None = None,
        cache: str | None = None,
        upstream_request_id: str | None = None,
    ) -> Charge:
        """Charge one finished request: its usage, or an estimate when a model ran and none came back
        (chat_gpt_proxy/usage/meter.py says how). ``model``: the model asked for; ``upstream_model``:
        the same after the upstream's aliases; ``ran_model``: the one the upstream says ran."""
        charged_as, price = self.pricing(model, upstream_model, ran_model)
        estimated = False
        if usage is None:
            if model_call:
                usage = estimate(
                    request_bytes, events, partial=partial, left_early=left_early, cap=output_cap, price=price
                )
                estimated = True
            else:
                usage = Usage(0, 0)
        at = time.time()
        usd = cost(price, usage)
        row = Charge(
            at,
            token,
            route,
            charged_as,
            usage.input_tokens,
            usage.cached_tokens,
            usage.output_tokens,
            usd,
            estimated,
            status,
            request_id,
            upstream=upstream,
            latency_ms=latency_ms,
            ttft_ms=ttft_ms,
            cache=cache,
            upstream_request_id=upstream_request_id,
        )
        return self.account(row)

    def account(self, row: Charge) -> Charge:
        """Count a priced row everywhere: the ledger's queue, this instance's budgets, Redis, the metrics."""
        seq = self.ledger.record(row) if self.ledger is not None else None
        self.book.charge(row.token, row.at, row.nanos, row.tokens)
        if self.shared is not None and row.token != UNNAMED:
            self.shared.charge(row.token, row.at, row.nanos, row.tokens, seq)
        if self.metrics is not None and row.usd:
            self.metrics.spend.labels(row.token).inc(row.usd)
        return row

    def record_hit(self, *, token: str, route: str, model: str | None, status: int, request_id: str, **timings) -> None:
        """A cache hit: charged nothing, but a ledger row all the same (cache "hit"), for the Requests tab."""
        if self.ledger is not None:
            self.ledger.record(
                Charge(
                    time.time(), token, route, model, 0, 0, 0, 0.0, False, status, request_id, cache="hit", **timings
                )
            )
