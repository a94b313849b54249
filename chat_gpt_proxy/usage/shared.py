"""Budget counters shared by every instance through Redis (with REDIS_URL).

Per named token and calendar period, a hash ``{<REDIS_PREFIX>:<name>}:budget:<period>:<start>``
(the same hash tag as the token's limits, so one Redis Cluster slot), expiring
a day after its period ends, with:

- ``nanos`` and ``tokens``: what every instance charged in the period (money in
  integer nano-dollars: exact sums, where float dollars drift);
- ``seed``: who first filled the hash and from what (``<instance>|ledger|<time>``
  or ``<instance>|local|<time>``). A hash without it is not trusted;
- ``pending``, on a hash without its seed: the mark of the instance that found
  it so (``<instance>|pending|<time>``), until it is seeded.

What each step costs and does:

- A charge is one EVALSHA that adds to the three periods' hashes at once, sent
  without waiting for the answer. It adds only to a hash that has its seed.
- Admitting a request of a budgeted token is one HMGET of its period's hash;
  the answer raises this instance's local counter to the shared total (never
  lowers it: a smaller total is one that lost charges), so that if Redis goes
  away the instance goes on from there (REDIS_FAILURE_MODE open), or refuses
  (closed: 503 ``limits_unavailable``).
- A hash without its seed (Redis restarted or emptied, a key evicted, a new
  period) is seeded before it is trusted: from the ledger, which holds every
  instance's rows (and this instance's rows not yet written), or without a
  ledger from this instance's own counter; one atomic script, so the first
  instance to seed it wins and the others read its total. Redis emptied
  while up loses charges other instances had added whose ledger rows are
  still queued (written every ``FLUSH_SECONDS``): so, with a ledger, the
  hash is first marked ``pending`` and seeded only ``settle_seconds`` after
  this instance first saw that mark, and only if the mark is still there (no
  emptying since; no charge lands meanwhile, as a charge needs the seed). A
  request of that token waits that long once (about 2 s); at startup one
  wait covers every hash.
- A charge Redis did not take (unreachable, no seed yet) is kept, per hash,
  and added once Redis answers again, unless the seed already holds it: a seed
  this instance made holds its rows recorded before; a seed another instance
  made from the ledger at time T holds this instance's rows written to the
  database before T (``Ledger.written_before``).

So two instances sharing one ledger never exceed a budget by more than what
their requests in flight at that moment spend, Redis restarted or emptied
included (closed mode; in open mode, while Redis is down each instance counts
alone), with one window left: an instance whose ledger write takes longer
than ``SETTLE_MARGIN`` (its database slow or down) when Redis is emptied has
its charges of the last moments before that missing from the new seed.
Without a shared ledger (none, or one SQLite file per instance) a seed holds
only what its instance knew: see ``docs/team.md``. A charge whose answer
was lost (a timeout) may have been applied: it is added again, so Redis may
count it twice (never zero times); the ledger has it once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from chat_gpt_proxy.access.shared_limits import FAILURES, SharedLimits
from chat_gpt_proxy.access.tokens import UNAVAILABLE

from . import ledger as ledger_module
from .budgets import PERIODS, Measured, period_bounds
from .ledger import describe

log = logging.getLogger("chat_gpt_proxy")

# Seconds a period's hash outlives the period (a late charge, a clock apart).
KEEP_AFTER_END = 86400
# Seconds the startup seeding may wait for Redis.
SEED_TIMEOUT = 5.0
# Seconds a request waits for the ledger's total when its token's Redis total must be seeded first.
MEASURE_TIMEOUT = 1.0
# Seconds between two tries to add the charges kept, once Redis is not skipped any more.
RETRY_PAUSE = 0.25
# Charges kept per hash before neighbours are merged (memory stays bounded however long Redis is away).
PENDING_MAX = 10_000
# Seconds, beyond the ledger's pause between writes, that a hash found without its seed waits before
# it is seeded from the ledger: time for every instance's write in progress.
SETTLE_MARGIN = 1.5
# A charge larger than this (a corrupt usage) is added as this: HINCRBY refuses what overflows 64 bits.
LARGEST = 1 << 50

# KEYS: the day, week and month hashes. ARGV: nanos, tokens, then each key's expiry (Unix seconds).
# Returns, per key, 1 if added, 0 if the hash has no seed (the caller keeps the charge).
CHARGE_LUA = """
local added = {}
for i = 1, #KEYS do
  if redis.call('HEXISTS', KEYS[i], 'seed') == 1 then
    redis.call('HINCRBY', KEYS[i], 'nanos', ARGV[1])
    redis.call('HINCRBY', KEYS[i], 'tokens', ARGV[2])
    redis.call('EXPIREAT', KEYS[i], ARGV[2 + i])
    added[i] = 1
  else
    added[i] = 0
  end
end
return added
"""

# KEYS: one period's hash. ARGV: nanos, tokens, seed, expiry, the ``pending`` mark expected ('' for
# none needed). Fills it only if it has no seed and still has that mark (no emptying since).
# Returns its nanos, tokens and seed afterwards ('', '', '' if not filled).
SEED_LUA = """
local seed = redis.call('HGET', KEYS[1], 'seed')
if not seed then
  if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'pending') ~= ARGV[5] then
    return {'', '', ''}
  end
  redis.call('HSET', KEYS[1], 'nanos', ARGV[1], 'tokens', ARGV[2], 'seed', ARGV[3])
  redis.call('HDEL', KEYS[1], 'pending')
  redis.call('EXPIREAT', KEYS[1], ARGV[4])
  seed = ARGV[3]
end
local found = redis.call('HMGET', KEYS[1], 'nanos', 'tokens')
return {found[1], found[2], seed}
"""

# KEYS: one period's hash. ARGV: a ``pending`` mark, expiry. On a hash without its seed, sets the mark
# unless one is there. Returns {seed or '', the mark}.
PEND_LUA = """
local seed = redis.call('HGET', KEYS[1], 'seed')
if seed then
  return {seed, ''}
end
if redis.call('HSETNX', KEYS[1], 'pending', ARGV[1]) == 1 then
  redis.call('EXPIREAT', KEYS[1], ARGV[2])
end
return {'', redis.call('HGET', KEYS[1], 'pending')}
"""

# KEYS: one period's hash. ARGV: the seed expected, nanos, tokens, expiry.
# Adds only under that seed; returns the seed found ('' for none).
ADD_LUA = """
local seed = redis.call('HGET', KEYS[1], 'seed')
if seed == ARGV[1] then
  redis.call('HINCRBY', KEYS[1], 'nanos', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[3])
  redis.call('EXPIREAT', KEYS[1], ARGV[4])
end
return seed or ''
"""


@dataclasses.dataclass
class Kept:
    """A charge Redis has not taken yet; ``seq``: its ledger row's number (None: not in the ledger)."""

    nanos: int
    tokens: int
    seq: int | None


@dataclasses.dataclass
class Slot:
    name: str
    period: str
    start: float
    expiry: int
    kept: list[Kept] = dataclasses.field(default_factory=list)
    # The first ``busy`` charges kept are being added or seeded: never merged meanwhile.
    busy: int = 0


class SharedSpend:
    def __init__(self, limits: SharedLimits, spend):
        """``spend``: the application's Spend, which measures what a token spent (``measure``) and
        may have a ledger (``ledger``) that says when a row reached the database."""
        self.limits = limits
        self.spend = spend
        self.client = limits.client
        self.charge_script = self.client.register_script(CHARGE_LUA)
        self.seed_script = self.client.register_script(SEED_LUA)
        self.add_script = self.client.register_script(ADD_LUA)
        self.pend_script = self.client.register_script(PEND_LUA)
        self.pending: set[asyncio.Future] = set()
        # Charges Redis has not taken, per hash key.
        self.slots: dict[str, Slot] = {}
        # One seeding or adding of kept charges at a time: each decides from what is kept.
        self.lock = asyncio.Lock()
        self.catch_up_task: asyncio.Task | None = None
        self.measure_failing = False
        # Per hash found without its seed: its ``pending`` mark and when this instance first saw it (monotonic).
        self.marks: dict[str, tuple[str, float]] = {}
        # (name, period, start) marked by ``seed``, for ``seed_marked``.
        self.to_seed: list[tuple[str, str, float]] = []

    def key(self, name: str, period: str, start: float) -> str:
        return "{%s:%s}:budget:%s:%d" % (self.limits.prefix, name, period, start)

    def settle_seconds(self) -> float:
        """How long a hash without its seed waits, from the first sight of its ``pending`` mark, before it is
        seeded from the ledger.

        Redis emptied while up (FLUSHALL, a key evicted or deleted) loses the charges every instance had
        added to the hash, and their ledger rows may still be queued in the instance that made them, for
        up to the ledger's pause between writes. The mark, set on the empty hash, says no charge was added
        since (a charge needs the seed), and its staying there that no emptying came since: once a pause
        and a write have passed, the ledger holds every charge the seed must start from."""
        if self.spend.ledger is None:
            return 0.0
        return ledger_module.FLUSH_SECONDS + SETTLE_MARGIN

    async def _mark(self, key: str, expiry: int, timeout: float) -> tuple[str, float] | None:
        """For a hash seen without its seed: (its pending mark, seconds left before it may be seeded),
        ('', 0) if it has a seed now, None if Redis did not answer."""
        if not self.settle_seconds():
            return "", 0.0
        try:
            seed, mark = await asyncio.wait_for(
                self.pend_script(keys=[key], args=[self.marker("pending", time.time()), expiry]), timeout
            )
        except FAILURES as exc:
            self.limits.failed("seed", exc)
            return None
        self.limits.succeeded()
        if seed:
            self.marks.pop(key, None)
            return "", 0.0
        mark = mark.decode() if isinstance(mark, bytes) else mark
        known = self.marks.get(key)
        if known is None or known[0] != mark:
            known = self.marks[key] = (mark, time.monotonic())
        return mark, max(0.0, known[1] + self.settle_seconds() - time.monotonic())

    def marker(self, source: str, read_at: float) -> str:
        return "%s|%s|%r" % (self.limits.instance, source, read_at)

    # -- admission

    async def spent(self, name: str, period: str, now: float):
        """(nanos, tokens) spent by ``name`` in the ``period`` holding ``now``, or UNAVAILABLE."""
        limits = self.limits
        if time.monotonic() < limits.skip_until:
            limits.failed("budget", None)
            return UNAVAILABLE
        start, _ = period_bounds(period, now)
        key = self.key(name, period, start)
        try:
            nanos, tokens, seed = await asyncio.wait_for(
                self.client.hmget(key, "nanos", "tokens", "seed"), limits.timeout
            )
        except FAILURES as exc:
            limits.failed("budget", exc)
            return UNAVAILABLE
        limits.succeeded()
        if seed is None:
            # Redis lost this total (or never had it): not trusted before it is seeded, once the other
            # instances' rows of the charges it lost are in the ledger.
            expiry = int(period_bounds(period, start)[1]) + KEEP_AFTER_END
            for _ in range(3):  # emptied again while settling: start again
                marked = await self._mark(key, expiry, limits.timeout)
                if marked is None:
                    return UNAVAILABLE
                if marked[1]:
                    await asyncio.sleep(marked[1])
                async with self.lock:
                    found = await self._seed(name, period, start, max(limits.timeout, MEASURE_TIMEOUT), marked[0])
                if found is None:
                    return UNAVAILABLE
                if found[2]:
                    break
            else:
                return UNAVAILABLE
            nanos, tokens, _ = found
        return int(nanos or 0), int(tokens or 0)

    # -- charges

    def charge(self, name: str, at: float, nanos: int, tokens: int, seq: int | None) -> None:
        """Add a charge to ``name``'s three periods in Redis; not awaited (the local counter has it already)."""
        keys, expiries = [], []
        for period in PERIODS:
            start, end = period_bounds(period, at)
            keys.append(self.key(name, period, start))
            expiries.append(int(end) + KEEP_AFTER_END)
        kept = Kept(min(nanos, LARGEST), min(tokens, LARGEST), seq)
        if time.monotonic() < self.limits.skip_until:
            # Redis failed a moment ago: kept without trying, as a request does not ask it either.
            self.limits.failed("charge", None)
            self._keep(name, at, [True, True, True], kept)
            return
        future = asyncio.ensure_future(self._charge(name, at, keys, expiries, kept))
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)

    async def _charge(self, name: str, at: float, keys: list[str], expiries: list[int], kept: Kept) -> None:
        limits = self.limits
        try:
            added = await asyncio.wait_for(
                self.charge_script(keys=keys, args=[kept.nanos, kept.tokens, *expiries]), limits.timeout
            )
        except FAILURES as exc:
            # Kept, and added once Redis answers (a timeout may have been applied: counted twice then).
            limits.failed("charge", exc)
            self._keep(name, at, [True, True, True], kept)
            return
        limits.succeeded()
        if not all(int(a) for a in added):
            self._keep(name, at, [not int(a) for a in added], kept)

    def _keep(self, name: str, at: float, which: list[bool], kept: Kept) -> None:
        for period, keep in zip(PERIODS, which, strict=True):
            if not keep:
                continue
            start, end = period_bounds(period, at)
            key = self.key(name, period, start)
            slot = self.slots.get(key)
            if slot is None:
                slot = self.slots[key] = Slot(name, period, start, int(end) + KEEP_AFTER_END)
            slot.kept.append(kept)
            if len(slot.kept) > PENDING_MAX:
                slot.kept = slot.kept[: slot.busy] + merged(slot.kept[slot.busy :])
        if self.catch_up_task is None or self.catch_up_task.done():
            self.catch_up_task = asyncio.ensure_future(self._catch_up())

    async def _catch_up(self) -> None:
        """While charges are kept: once Redis is not skipped, seed what needs it and add the rest."""
        while self.slots:
            await asyncio.sleep(max(0.0, self.limits.skip_until - time.monotonic()) + RETRY_PAUSE)
            if time.monotonic() < self.limits.skip_until:
                continue
            async with self.lock:
                for key in list(self.slots):
                    if not await self._add_kept(key):
                        break

    async def _add_kept(self, key: str) -> bool:
        """Add what is kept for ``key`` that its seed does not hold; False if Redis did not answer."""
        limits = self.limits
        for _ in range(3):  # another instance may seed between our read and our add
            slot = self.slots.get(key)
            if slot is None:
                return True
            try:
                seed = await asyncio.wait_for(self.client.hget(key, "seed"), limits.timeout)
            except FAILURES as exc:
                limits.failed("charge", exc)
                return False
            if seed is None:
                marked = await self._mark(key, slot.expiry, limits.timeout)
                if marked is None or marked[1]:
                    return False  # tried again at the next round
                timeout = max(limits.timeout, SEED_TIMEOUT)
                if await self._seed(slot.name, slot.period, slot.start, timeout, marked[0]) is None:
                    return False
                continue
            seed = seed.decode() if isinstance(seed, bytes) else seed
            batch = list(slot.kept)
            todo = [k for k in batch if not self._held_by(seed, k)]
            nanos = min(sum(k.nanos for k in todo), LARGEST)
            tokens = min(sum(k.tokens for k in todo), LARGEST)
            slot.busy = len(batch)
            try:
                found = await asyncio.wait_for(
                    self.add_script(keys=[key], args=[seed, nanos, tokens, slot.expiry]), limits.timeout
                )
            except FAILURES as exc:
                limits.failed("charge", exc)
                return False
            finally:
                slot.busy = 0
            limits.succeeded()
            found = found.decode() if isinstance(found, bytes) else found
            if found == seed:
                self._forget(key, batch)
                return True
        return True  # seeded again and again meanwhile: tried at the next round

    def _held_by(self, seed: str, kept: Kept) -> bool:
        """Whether the total ``seed`` started from already holds ``kept``."""
        instance, source, read_at = seed.rsplit("|", 2)
        if instance == self.limits.instance:
            return False  # our own seed: what it held was forgotten when it was made
        ledger = self.spend.ledger
        if source != "ledger" or ledger is None or kept.seq is None:
            return False
        return ledger.written_before(kept.seq, float(read_at))

    def _forget(self, key: str, done: list[Kept]) -> None:
        slot = self.slots.get(key)
        if slot is None:
            return
        ids = {id(k) for k in done}
        slot.kept = [k for k in slot.kept if id(k) not in ids]
        if not slot.kept:
            del self.slots[key]

    # -- seeding

    async def seed(self, name: str, period: str, start: float, measured: Measured) -> None:
        """At startup, before any request: a first connection may take longer than REDIS_TIMEOUT,
        which bounds what a request waits for, and a slow one must not count as Redis down.

        With a ledger, a hash without its seed is only marked here (Redis may have been emptied a
        moment ago, other instances' rows still queued); ``seed_marked`` seeds it once settled."""
        timeout = max(self.limits.timeout, SEED_TIMEOUT)
        if self.settle_seconds():
            key = self.key(name, period, start)
            marked = await self._mark(key, int(period_bounds(period, start)[1]) + KEEP_AFTER_END, timeout)
            if marked is not None and marked[0]:
                self.to_seed.append((name, period, start))
            return
        async with self.lock:
            await self._seed(name, period, start, timeout, "", measured)

    async def seed_marked(self) -> None:
        """After ``seed`` of every token: one wait for all the hashes marked, then each seeded from a
        fresh read of the ledger (a hash emptied again meanwhile is left to its first request)."""
        todo, self.to_seed = self.to_seed, []
        if not todo:
            return
        await asyncio.sleep(self.settle_seconds())
        timeout = max(self.limits.timeout, SEED_TIMEOUT)
        for name, period, start in todo:
            known = self.marks.get(self.key(name, period, start))
            if known is None:
                continue  # seeded meanwhile
            async with self.lock:
                await self._seed(name, period, start, timeout, known[0])

    async def _seed(
        self, name: str, period: str, start: float, timeout: float, mark: str = "", measured: Measured | None = None
    ):
        """Fill the hash from what this instance knows if it has no seed (and still has the pending
        ``mark``, if one is given); its (nanos, tokens, seed) after (seed '': the mark had gone, not
        filled), or None if Redis or the ledger did not answer within ``timeout``."""
        key = self.key(name, period, start)
        if measured is None:
            try:
                measured = await asyncio.wait_for(self.spend.measure(name, period, start), timeout)
            except Exception as exc:  # any driver's error: this admission falls back to REDIS_FAILURE_MODE
                if not self.measure_failing:
                    log.warning(
                        "shared budgets: cannot read %s's %s spend to seed Redis (%s); retrying",
                        name,
                        period,
                        describe(exc),
                    )
                self.measure_failing = True
                return None
            self.measure_failing = False
        slot = self.slots.get(key)
        # The charges kept that the measure holds: by row number (the ledger), or all kept by now (the counter).
        held = [k for k in slot.kept if covered(k, measured)] if slot is not None else []
        end = period_bounds(period, start)[1]
        mine = self.marker(measured.source, measured.read_at)
        if slot is not None:
            slot.busy = len(slot.kept)
        try:
            found = await asyncio.wait_for(
                self.seed_script(
                    keys=[key], args=[measured.nanos, measured.tokens, mine, int(end) + KEEP_AFTER_END, mark]
                ),
                timeout,
            )
        except FAILURES as exc:
            self.limits.failed("seed", exc)
            return None
        finally:
            if slot is not None:
                slot.busy = 0
        self.limits.succeeded()
        nanos, tokens, seed = (v.decode() if isinstance(v, bytes) else v for v in found)
        if seed:
            self.marks.pop(key, None)
        if seed == mine:
            # This seed holds those kept charges: this instance's rows recorded before it measured
            # (from the ledger), or everything it had counted (its own counter).
            self._forget(key, held)
        return int(nanos or 0), int(tokens or 0), seed

    async def close(self) -> None:
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=self.limits.timeout * 2)
        if self.slots and time.monotonic() >= self.limits.skip_until:
            # Redis may be back: a last try for the charges kept.
            async with self.lock:
                for key in list(self.slots):
                    if not await self._add_kept(key):
                        break
        if self.catch_up_task is not None:
            self.catch_up_task.cancel()
        if self.slots:
            log.warning(
                "shared budgets: charges of %d token periods never reached Redis (they are in this "
                "instance's ledger rows; a Redis restarted empty is seeded from the ledger)",
                len(self.slots),
            )


def covered(kept: Kept, measured: Measured) -> bool:
    if measured.source == "local":
        return True
    return kept.seq is not None and measured.recorded is not None and kept.seq < measured.recorded


def merged(kept: list[Kept]) -> list[Kept]:
    """Neighbours merged in pairs: a merged charge is held by a seed only if both halves are."""
    out = []
    for i in range(0, len(kept) - 1, 2):
        a, b = kept[i], kept[i + 1]
        seq = None if a.seq is None or b.seq is None else max(a.seq, b.seq)
        out.append(Kept(min(a.nanos + b.nanos, LARGEST), min(a.tokens + b.tokens, LARGEST), seq))
    if len(kept) % 2:
        out.append(kept[-1])
    return out
