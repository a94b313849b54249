"""Per-token limits shared by every instance through Redis.

Imported only when REDIS_URL is set (server.py), so that without it the
``redis`` package is never loaded and nothing is contacted.

What Redis holds, per token key (a name, or ``-<n>`` for the n-th token of
ACCESS_TOKEN), all under one hash tag ``{<REDIS_PREFIX>:<key>}`` so that the
keys of one token land in one Redis Cluster slot and one script may touch them:

- ``{p:k}:rate``: the GCRA "theoretical arrival time" of the next request (ms,
  Redis's own clock): the same token bucket as the in-process limiter
  (limits.py), N at once then one every 60/N s; expires when it no longer
  holds anything back.
- ``{p:k}:inflight``: a hash, instance id -> requests that instance has in
  flight under the token (``max_concurrent``).
- ``{p:k}:alive``: a sorted set, instance id -> until when (ms) its count
  holds. An instance refreshes its entry every REDIS_INFLIGHT_TTL / 3 while it
  has requests in flight; the admission script drops the counts of instances
  whose entry has expired, so an instance that dies (SIGKILL, lost machine)
  leaves nothing behind after REDIS_INFLIGHT_TTL.

One request costs one EVALSHA (check both limits and count the request,
atomically) and, if it counted against ``max_concurrent``, one more at its
end to uncount it, sent without waiting for the answer. Every call is bounded
by REDIS_TIMEOUT; a failed one makes the caller fall back (REDIS_FAILURE_MODE).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from chat_gpt_proxy.access.tokens import (
    UNAVAILABLE,
    Refusal,
    TokenEntry,
    Unavailable,
    concurrency_refusal,
    rate_refusal,
)

log = logging.getLogger("chat_gpt_proxy")

# Lua keeps every number as a double: milliseconds since the epoch are exact.
_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function extend(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
"""

# KEYS: rate, inflight, alive. ARGV: per_minute (0: none), max_concurrent
# (0: none), instance id, in-flight TTL in ms.
# Returns {0, in flight now} admitted; {1, in flight} refused by max_concurrent;
# {2, ms to wait} refused by the rate.
ADMIT_LUA = (
    _NOW
    + """
local per_minute = tonumber(ARGV[1])
local max_concurrent = tonumber(ARGV[2])
local me = ARGV[3]
local ttl = tonumber(ARGV[4])
local in_flight = 0
if max_concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  local counts = redis.call('HGETALL', KEYS[2])
  for i = 1, #counts, 2 do
    if redis.call('ZSCORE', KEYS[3], counts[i]) then
      in_flight = in_flight + tonumber(counts[i + 1])
    else
      -- An instance that stopped refreshing its entry: dead, its requests gone.
      redis.call('HDEL', KEYS[2], counts[i])
    end
  end
  if in_flight >= max_concurrent then
    return {1, in_flight}
  end
end
if per_minute > 0 then
  local interval = 60000 / per_minute
  local allowance = interval * (per_minute - 1)
  local tat = tonumber(redis.call('GET', KEYS[1])) or now
  if tat < now then tat = now end
  if tat - now > allowance then
    return {2, math.ceil(tat - now - allowance)}
  end
  tat = tat + interval
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now))
end
if max_concurrent > 0 then
  redis.call('HINCRBY', KEYS[2], me, 1)
  redis.call('ZADD', KEYS[3], now + ttl, me)
  extend(KEYS[2], ttl)
  extend(KEYS[3], ttl)
end
return {0, in_flight + 1}
"""
)

# KEYS: inflight, alive. ARGV: instance id.
RELEASE_LUA = """
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if left <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return left
"""

# KEYS: inflight, alive. ARGV: instance id, this instance's count, TTL in ms,
# 1 to overwrite the count (after a call that failed and may or may not have
# run), 0 to restore it only if missing (Redis restarted, or pruned us), so
# that it never races the admissions and releases under way.
HEARTBEAT_LUA = (
    _NOW
    + """
local me = ARGV[1]
local count = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
if count <= 0 then
  redis.call('HDEL', KEYS[1], me)
  redis.call('ZREM', KEYS[2], me)
  return 0
end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], me, count)
else
  redis.call('HSETNX', KEYS[1], me, count)
end
redis.call('ZADD', KEYS[2], now + ttl, me)
extend(KEYS[1], ttl)
extend(KEYS[2], ttl)
return count
"""
)

# Redis unreachable: the next calls are not even tried for this long (each
# would cost up to REDIS_TIMEOUT), then one is, to notice recovery.
RETRY_AFTER_FAILURE = 1.0
# At most one warning per this many seconds while Redis fails.
WARNING_INTERVAL = 10.0
# A failure this soon after Redis answered again is the same outage going on (a Redis that answers reads
# but refuses writes, read-only or out of memory, fails and recovers every second): said once, and
# the outage ends only after this long without a failure.
RELAPSE_WINDOW = 60.0
# What a failed call may raise: the client's errors, the socket's, wait_for's.
FAILURES = (RedisError, OSError, asyncio.TimeoutError)


class SharedLimits:
    def __init__(self, settings, errors=None):
        """``errors``: the proxy_redis_errors counter (None without metrics)."""
        self.settings = settings
        self.prefix = settings.redis_prefix
        self.timeout = settings.redis_timeout
        self.ttl_ms = max(1, round(settings.redis_inflight_ttl * 1000))
        self.heartbeat_interval = settings.redis_inflight_ttl / 3
        self.closed_mode = settings.redis_failure_mode == "closed"
        self.errors = errors
        # Unique across machines and restarts: a replacement on the same host
        # and pid must not inherit a dead instance's counts.
        self.instance = "%s:%d:%s" % (socket.gethostname()[:40], os.getpid(), uuid.uuid4().hex[:8])
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            # Waiting for a free connection counts against the same bound.
            timeout=self.timeout,
            max_connections=64,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            # No retries inside the client: one bounded try, then our fallback.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self.client = Redis(connection_pool=pool)
        self.admit_script = self.client.register_script(ADMIT_LUA)
        self.release_script = self.client.register_script(RELEASE_LUA)
        self.heartbeat_script = self.client.register_script(HEARTBEAT_LUA)
        # Requests this instance counted in Redis (admitted, or being
        # admitted), per token key: what its heartbeat keeps alive.
        self.counts: dict[str, int] = {}
        # Keys whose count in Redis may be wrong (a call failed): set at the next heartbeat.
        self.dirty: set[str] = set()
        self.heartbeat_task: asyncio.Task | None = None
        self.pending: set[asyncio.Future] = set()
        self.up: bool | None = None  # None: not asked yet
        self.skip_until = 0.0
        self.failures = 0
        self.warned_at = -math.inf
        self.suppressed = 0
        # When Redis last answered again after failing, and when a call last failed (monotonic).
        self.back_at = -math.inf
        self.failed_at = -math.inf
        # Failing and answering in turn: not logged until RELAPSE_WINDOW passes without a failure.
        self.relapsing = False

    def describe(self) -> str:
        if self.closed_mode:
            mode = "closed (Redis down: 503 limits_unavailable for tokens with limits)"
        else:
            mode = "open (Redis down: each instance applies the limits on its own)"
        return "shared limits in Redis at %s, prefix %r, REDIS_FAILURE_MODE=%s, REDIS_TIMEOUT=%gs" % (
            self.settings.masked()["redis_url"],
            self.prefix,
            mode,
            self.timeout,
        )

    def keys(self, key: str) -> tuple[str, str, str]:
        tag = "{%s:%s}" % (self.prefix, key)
        return tag + ":rate", tag + ":inflight", tag + ":alive"

    # -- the calls

    async def admit(self, entry: TokenEntry) -> Refusal | None | Unavailable:
        """One round trip: None (admitted, ``release`` it at the end), a ``Refusal``, or ``UNAVAILABLE``."""
        if time.monotonic() < self.skip_until:
            self.failed("admit", None)
            return UNAVAILABLE
        policy, key = entry.policy, entry.key
        counted = policy.max_concurrent > 0
        if counted:
            # Counted from now: a heartbeat meanwhile must keep it alive.
            self.counts[key] = self.counts.get(key, 0) + 1
        rate, inflight, alive = self.keys(key)
        try:
            verdict, value = await asyncio.wait_for(
                self.admit_script(
                    keys=[rate, inflight, alive],
                    args=[policy.rate_limit_per_minute, policy.max_concurrent, self.instance, self.ttl_ms],
                ),
                self.timeout,
            )
        except FAILURES as exc:
            if counted:
                self.uncount(key)
                # The script may have run before the answer was lost.
                self.dirty.add(key)
                self.start_heartbeat()
            self.failed("admit", exc)
            return UNAVAILABLE
        self.succeeded()
        if verdict == 0:
            if counted:
                self.start_heartbeat()
            return None
        if counted:
            self.uncount(key)
        if verdict == 1:
            return concurrency_refusal(policy)
        return rate_refusal(policy, max(1, math.ceil(int(value) / 1000)))

    def release(self, entry: TokenEntry) -> None:
        """The end of a request ``admit`` counted against ``max_concurrent``; sent without waiting."""
        key = entry.key
        self.uncount(key)
        future = asyncio.ensure_future(self._release(key))
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)

    async def _release(self, key: str) -> None:
        if time.monotonic() < self.skip_until:
            self.dirty.add(key)
            self.start_heartbeat()
            return
        inflight, alive = self.keys(key)[1:]
        try:
            await asyncio.wait_for(self.release_script(keys=[inflight, alive], args=[self.instance]), self.timeout)
        except FAILURES as exc:
            # The count stays too high in Redis until the next heartbeat sets
            # it, or, if none gets through, until this instance's entry expires.
            self.dirty.add(key)
            self.start_heartbeat()
            self.failed("release", exc)
            return
        self.succeeded()

    def uncount(self, key: str) -> None:
        count = self.counts.get(key, 0) - 1
        if count > 0:
            self.counts[key] = count
        else:
            self.counts.pop(key, None)

    def start_heartbeat(self) -> None:
        if self.heartbeat_task is None or self.heartbeat_task.done():
            self.heartbeat_task = asyncio.ensure_future(self._heartbeat())

    async def _heartbeat(self) -> None:
        """While this instance has requests counted in Redis: keep its entries alive, and repair counts."""
        while self.counts or self.dirty:
            await asyncio.sleep(self.heartbeat_interval)
            keys = set(self.counts) | self.dirty
            await asyncio.gather(*(self._beat(key) for key in keys))

    async def _beat(self, key: str) -> None:
        inflight, alive = self.keys(key)[1:]
        force = key in self.dirty
        try:
            await asyncio.wait_for(
                self.heartbeat_script(
                    keys=[inflight, alive],
                    args=[self.instance, self.counts.get(key, 0), self.ttl_ms, "1" if force else "0"],
                ),
                self.timeout,
            )
        except FAILURES as exc:
            self.failed("heartbeat", exc)
            return
        if force:
            self.dirty.discard(key)
        self.succeeded()

    async def state(self) -> str:
        """ "up" or "down", for /healthz: one PING, bounded by REDIS_TIMEOUT."""
        if time.monotonic() < self.skip_until:
            return "down"
        try:
            await asyncio.wait_for(self.client.ping(), self.timeout)
        except FAILURES as exc:
            self.failed("ping", exc)
            return "down"
        self.succeeded()
        return "up"

    async def close(self) -> None:
        if self.heartbeat_task is not None:
            self.heartbeat_task.cancel()
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=self.timeout * 2)
        await self.client.aclose()

    # -- failures: explicit, counted, logged without flooding

    def failed(self, op: str, exc: BaseException | None) -> None:
        if self.errors is not None:
            self.errors.labels(op).inc()
        self.failures += 1
        if exc is not None:
            self.up = False
            self.skip_until = time.monotonic() + RETRY_AFTER_FAILURE
            # The idle connections are to the Redis that failed: after a
            # restart each would fail once more, each time starting another
            # pause (seen in tests/test_scale_out_redis.py). Reconnect afresh.
            future = asyncio.ensure_future(self.client.connection_pool.disconnect(inuse_connections=False))
            self.pending.add(future)
            future.add_done_callback(self.pending.discard)
        now = time.monotonic()
        self.failed_at = now
        if self.relapsing:
            self.suppressed += 1
            return
        if now - self.back_at < RELAPSE_WINDOW:
            self.relapsing = True
            log.warning(
                "shared limits: Redis %s failed again %.0fs after it answered (%s); as long as it keeps "
                "failing now and then (a read-only or full Redis answers reads, refuses writes), this is "
                "not logged again until it has answered for %gs without a failure; see "
                "proxy_redis_errors_total",
                op,
                now - self.back_at,
                describe_failure(exc, self.timeout),
                RELAPSE_WINDOW,
            )
            return
        if now - self.warned_at < WARNING_INTERVAL:
            self.suppressed += 1
            return
        cause = describe_failure(exc, self.timeout)
        log.warning(
            "shared limits: Redis %s failed (%s); %s%s",
            op,
            cause,
            "refusing requests of tokens with limits (503 limits_unavailable)"
            if self.closed_mode
            else "each instance applies the limits on its own",
            "; %d more failures in the last %gs" % (self.suppressed, WARNING_INTERVAL) if self.suppressed else "",
        )
        self.warned_at = now
        self.suppressed = 0

    def succeeded(self) -> None:
        if self.relapsing:
            if time.monotonic() - self.failed_at < RELAPSE_WINDOW:
                self.up = True
                self.skip_until = 0.0
                return
            self.relapsing = False
            self.up = False  # said below, once
        if self.up is False:
            log.info("shared limits: Redis answers again, after %d failed or skipped calls", self.failures)
            self.failures = 0
            self.warned_at = -math.inf
            self.suppressed = 0
            self.back_at = time.monotonic()
        self.up = True
        # Any call that got through (a heartbeat too) ends the pause.
        self.skip_until = 0.0


def describe_failure(exc: BaseException | None, timeout: float) -> str:
    if exc is None:
        return "not retried yet after a failure"
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer within REDIS_TIMEOUT=%gs" % timeout
    # redis-py's messages name the host and port, never the password.
    return "%s: %s" % (type(exc).__name__, str(exc).replace("\n", " ")[:200])
