"""Per-token budgets: calendar periods, what each token spent in its current one, and the refusal.

Spend is counted per (token name, period start), so a SIGHUP that changes a
budget keeps what was spent, and a new period starts from zero by itself.
The counters are rebuilt from the ledger at startup (``Ledger.spent_since``).
Money is counted in integer nano-dollars (chat_gpt_proxy/usage/storable.py):
a budget is reached exactly, whatever the number of charges added.
"""

from __future__ import annotations

import dataclasses
import datetime
import math

from chat_gpt_proxy import human

from .storable import to_nanos, to_usd

PERIODS = ("day", "week", "month")
UTC = datetime.UTC


@dataclasses.dataclass(frozen=True)
class Budget:
    usd: float | None = None
    tokens: int | None = None
    period: str = "month"

    def __bool__(self) -> bool:
        return self.usd is not None or self.tokens is not None


NO_BUDGET = Budget()


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """Start and end (Unix seconds) of the UTC calendar ``period`` holding ``now``; weeks start on Monday."""
    day = datetime.datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = day, day + datetime.timedelta(days=1)
    elif period == "week":
        start = day - datetime.timedelta(days=day.weekday())
        end = start + datetime.timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = (start + datetime.timedelta(days=32)).replace(day=1)
    return start.timestamp(), end.timestamp()


def iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Over:
    """A token at or over its budget: answered 429 ``budget_exceeded`` with Retry-After."""

    which: str  # "budget_usd" or "budget_tokens"
    spent: float
    limit: float
    resets_at: float
    retry_after: int

    @property
    def message(self) -> str:
        if self.which == "budget_usd":
            amount = "%s of its %s" % (human.dollars(self.spent), human.dollars(self.limit))
        else:
            amount = "%d of its %s" % (self.spent, human.count(int(self.limit), "token"))
        return "This access token has spent %s budget for this period; it resets at %s (in %s)." % (
            amount,
            iso(self.resets_at),
            human.duration(self.retry_after),
        )


@dataclasses.dataclass
class Spent:
    nanos: int = 0
    tokens: int = 0

    @property
    def usd(self) -> float:
        return to_usd(self.nanos)


@dataclasses.dataclass(frozen=True)
class Measured:
    """What an instance found a token spent in a period, to seed a Redis that has no total for it.

    ``source``: "ledger" (every instance's rows written by ``read_at``, and this
    instance's rows numbered below ``recorded``) or "local" (this instance's own counter).
    """

    nanos: int
    tokens: int
    source: str
    read_at: float
    recorded: int | None


class BudgetBook:
    """What each token spent in its current period, in this process (or mirrored from Redis)."""

    def __init__(self) -> None:
        # (token name, period, period start) -> Spent
        self.spent: dict[tuple[str, str, float], Spent] = {}

    def _slot(self, name: str, period: str, now: float) -> tuple[tuple[str, str, float], float]:
        start, end = period_bounds(period, now)
        return (name, period, start), end

    def spent_now(self, name: str, period: str, now: float) -> tuple[Spent, float]:
        """What ``name`` spent in the ``period`` holding ``now``, and when that period ends."""
        key, end = self._slot(name, period, now)
        return self.spent.get(key) or Spent(), end

    def check(self, name: str, budget: Budget, now: float) -> Over | None:
        spent, end = self.spent_now(name, budget.period, now)
        retry = max(1, math.ceil(end - now))
        if budget.usd is not None and spent.nanos >= to_nanos(budget.usd):
            return Over("budget_usd", spent.usd, budget.usd, end, retry)
        if budget.tokens is not None and spent.tokens >= budget.tokens:
            return Over("budget_tokens", spent.tokens, budget.tokens, end, retry)
        return None

    def remaining(self, name: str, budget: Budget, now: float) -> dict:
        spent, end = self.spent_now(name, budget.period, now)
        out = {"period": budget.period, "resets_at": iso(end), "spent_usd": spent.usd, "spent_tokens": spent.tokens}
        if budget.usd is not None:
            out["budget_usd"] = budget.usd
            out["remaining_usd"] = to_usd(max(0, to_nanos(budget.usd) - spent.nanos))
        if budget.tokens is not None:
            out["budget_tokens"] = budget.tokens
            out["remaining_tokens"] = max(0, budget.tokens - spent.tokens)
        return out

    def charge(self, name: str, at: float, nanos: int, tokens: int) -> None:
        """Add a charge to every period it falls in (a token's period may change on SIGHUP)."""
        for period in PERIODS:
            key, _ = self._slot(name, period, at)
            spent = self.spent.setdefault(key, Spent())
            spent.nanos += nanos
            spent.tokens += tokens

    def set(self, name: str, period: str, start: float, nanos: int, tokens: int) -> None:
        """What the ledger (at startup) says a token spent in a period."""
        self.spent[(name, period, start)] = Spent(nanos, tokens)

    def raise_to(self, name: str, period: str, start: float, nanos: int, tokens: int) -> None:
        """What the instances' shared total says, where it is more than this counter: a smaller
        total (a Redis that lost charges, or has not yet received this instance's) never lowers it."""
        spent = self.spent.setdefault((name, period, start), Spent())
        spent.nanos = max(spent.nanos, nanos)
        spent.tokens = max(spent.tokens, tokens)

    def forget_before(self, now: float) -> None:
        """Drop the counters of periods that have ended (called now and then)."""
        for key in [k for k in self.spent if period_bounds(k[1], k[2])[1] <= now]:
            del self.spent[key]
