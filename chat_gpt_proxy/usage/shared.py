"""Budget counters shared by every instance through Redis (with REDIS_URL).

Per named token and calendar period, a hash ``{<REDIS_PREFIX>:<name>}:spend:<period>:<start>``
with ``usd`` and ``tokens`` (the same hash tag as the token's limits, so one
Redis Cluster slot), expiring a day after its period ends.

- A charge is one EVALSHA that adds to the three periods' hashes at once,
  sent without waiting for the answer.
- Admitting a request of a budgeted token is one HMGET of its period's hash;
  the answer also becomes this instance's local counter, so that if Redis
  goes away the instance goes on from the shared total (REDIS_FAILURE_MODE
  open), or refuses (closed: 503 ``limits_unavailable``).
- At startup, each period's hash is seeded from the ledger only if Redis
  does not have it yet (HSETNX): Redis, which every instance updates, is the
  authority once it holds a period.

So two instances never exceed a budget by more than what their requests in
flight at that moment spend: each admission reads the total of every charge
made so far.
"""

from __future__ import annotations

import asyncio
import logging
import time

from chat_gpt_proxy.access.shared_limits import FAILURES, SharedLimits
from chat_gpt_proxy.access.tokens import UNAVAILABLE

from .budgets import PERIODS, period_bounds

log = logging.getLogger("chat_gpt_proxy")

# Seconds a period's hash outlives the period (a late charge, a clock apart).
KEEP_AFTER_END = 86400
# Seconds the startup seeding may wait for Redis.
SEED_TIMEOUT = 5.0

# KEYS: the day, week and month hashes. ARGV: usd, tokens, then each key's expiry (Unix seconds).
CHARGE_LUA = """
for i = 1, #KEYS do
  redis.call('HINCRBYFLOAT', KEYS[i], 'usd', ARGV[1])
  redis.call('HINCRBY', KEYS[i], 'tokens', ARGV[2])
  redis.call('EXPIREAT', KEYS[i], ARGV[2 + i])
end
return 1
"""

# KEYS: one period's hash. ARGV: usd, tokens, expiry. Sets it only if Redis has none.
SEED_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'usd', ARGV[1], 'tokens', ARGV[2])
  redis.call('EXPIREAT', KEYS[1], ARGV[3])
  return 1
end
return 0
"""


class SharedSpend:
    def __init__(self, limits: SharedLimits):
        self.limits = limits
        self.client = limits.client
        self.charge_script = self.client.register_script(CHARGE_LUA)
        self.seed_script = self.client.register_script(SEED_LUA)
        self.pending: set[asyncio.Future] = set()

    def key(self, name: str, period: str, start: float) -> str:
        return "{%s:%s}:spend:%s:%d" % (self.limits.prefix, name, period, start)

    async def spent(self, name: str, period: str, now: float):
        """(usd, tokens) spent by ``name`` in the ``period`` holding ``now``, or UNAVAILABLE."""
        limits = self.limits
        if time.monotonic() < limits.skip_until:
            limits.failed("budget", None)
            return UNAVAILABLE
        start, _ = period_bounds(period, now)
        try:
            usd, tokens = await asyncio.wait_for(
                self.client.hmget(self.key(name, period, start), "usd", "tokens"), limits.timeout
            )
        except FAILURES as exc:
            limits.failed("budget", exc)
            return UNAVAILABLE
        limits.succeeded()
        return float(usd or 0), int(tokens or 0)

    def charge(self, name: str, at: float, usd: float, tokens: int) -> None:
        """Add a charge to ``name``'s three periods in Redis; not awaited (the local counter has it already)."""
        keys, expiries = [], []
        for period in PERIODS:
            start, end = period_bounds(period, at)
            keys.append(self.key(name, period, start))
            expiries.append(int(end) + KEEP_AFTER_END)
        future = asyncio.ensure_future(self._charge(keys, [repr(usd), tokens, *expiries]))
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)

    async def _charge(self, keys: list[str], args: list) -> None:
        limits = self.limits
        try:
            await asyncio.wait_for(self.charge_script(keys=keys, args=args), limits.timeout)
        except FAILURES as exc:
            # This charge stays only in this instance's counters and the ledger;
            # the next start seeds a period only where Redis has none.
            limits.failed("charge", exc)
            return
        limits.succeeded()

    async def seed(self, name: str, period: str, start: float, usd: float, tokens: int) -> None:
        """At startup, before any request: a first connection may take longer than REDIS_TIMEOUT,
        which bounds what a request waits for, and a slow one must not count as Redis down."""
        end = period_bounds(period, start)[1]
        try:
            await asyncio.wait_for(
                self.seed_script(
                    keys=[self.key(name, period, start)], args=[repr(usd), tokens, int(end) + KEEP_AFTER_END]
                ),
                max(self.limits.timeout, SEED_TIMEOUT),
            )
        except FAILURES as exc:
            log.warning(
                "shared budgets: could not seed %s's %s spend in Redis (%s); Redis keeps what it has",
                name,
                period,
                type(exc).__name__,
            )

    async def close(self) -> None:
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=self.limits.timeout * 2)
