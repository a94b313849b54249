"""The opt-in response cache: a repeated request answered from memory or Redis instead of the upstream.

Off unless asked for: per named token (``cache = true``, ``cache_ttl`` in the
tokens file), for everyone (CACHE_TTL > 0), and per request
(``x-proxy-cache: use`` or ``skip``; ``Cache-Control: no-cache`` or
``no-store`` skip it).

The key is a SHA-256 of the route, the partition (the token's name, or a hash
of the caller's own OpenAI key when no named token applies, so that nobody
receives an answer cached for another) and the canonical JSON of the whole
request body (sorted keys, so key order does not count and every parameter
does). Keys are never stored: the partition of a caller key is a hash of it.

An entry is a complete, successful answer as the client received it: a JSON
body, or a stream's events, replayed as a stream with the same framing.
Entries live in memory (LRU bounded by CACHE_MAX_BYTES) or, with REDIS_URL,
in Redis for every instance (with their TTL, at most CACHE_MAX_ENTRY_BYTES
each); a Redis failure is a miss, never an error. Identical requests that
arrive together wait for the first one's answer (coalescing) in each process.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import heapq
import json
import logging
import time

from .access.tokens import UNNAMED
from .formats.usage import Usage

log = logging.getLogger("chat_gpt_proxy")

# What an entry costs in memory besides its bytes (the dict slot, the key, the
# object), and each event besides its bytes (a bytes object, a tuple slot): measured
# with tracemalloc, ~2x the raw bytes for short events without it.
ENTRY_OVERHEAD = 200
EVENT_OVERHEAD = 80
REDIS_PREFIX = "cache"
# Expiry items of entries already gone (replaced, pushed out) the heap may hold beyond twice the entries.
STALE_EXPIRIES = 64
# When a request or a token asks for the cache and no TTL is set anywhere.
DEFAULT_TTL = 3600


def canonical(payload) -> bytes:
    """JSON with sorted keys and no spaces: the same request, whatever the order of its keys."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def cache_key(route: str, partition: str, payload) -> str:
    digest = hashlib.sha256()
    for part in (route.encode(), b"\0", partition.encode(), b"\0", canonical(payload)):
        digest.update(part)
    return digest.hexdigest()


def key_partition(token_name: str, caller_key: str, server_key: bool) -> str:
    """Whose answers these are: a named token's name, and, unless the request uses the server's key,
    a hash of the caller's own key (never the key): a made-up key must not read answers a real one paid for."""
    if server_key:
        return "token:" + token_name
    digest = hashlib.sha256(caller_key.encode("utf-8", "surrogateescape")).hexdigest()
    return ("token:%s:" % token_name if token_name != UNNAMED else "") + "key:" + digest


def cacheable(payload, route: str = "") -> bool:
    """One answer asked for (``n`` absent or 1), and, on the Responses API, nothing kept upstream:
    ``store`` false and no ``conversation`` or ``background`` (a hit would skip what the call does there)."""
    if not isinstance(payload, dict):
        return False
    n = payload.get("n")
    if n is not None and n != 1:
        return False
    if route == "v1/responses":
        return payload.get("store") is False and "conversation" not in payload and not payload.get("background")
    return True


@dataclasses.dataclass(frozen=True)
class Entry:
    """An answer as the client received it: ``body`` (JSON), or ``events`` (a stream, each event whole)."""

    kind: str  # "json" or "sse"
    content_type: str
    body: bytes = b""
    events: tuple[bytes, ...] = ()
    model: str | None = None
    usage: Usage | None = None
    expires: float = 0.0  # time.time()

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(e) + EVENT_OVERHEAD for e in self.events) + ENTRY_OVERHEAD

    def dumps(self) -> bytes:
        return json.dumps(
            {
                "kind": self.kind,
                "content_type": self.content_type,
                "body": self.body.decode("utf-8", "surrogateescape"),
                "events": [e.decode("utf-8", "surrogateescape") for e in self.events],
                "model": self.model,
                "usage": self.usage.as_dict() if self.usage is not None else None,
                "expires": self.expires,
            },
            ensure_ascii=True,
        ).encode()

    @classmethod
    def loads(cls, data: bytes) -> Entry:
        raw = json.loads(data)
        return cls(
            raw["kind"],
            raw["content_type"],
            raw["body"].encode("utf-8", "surrogateescape"),
            tuple(e.encode("utf-8", "surrogateescape") for e in raw["events"]),
            raw.get("model"),
            Usage.from_dict(raw.get("usage")),
            float(raw.get("expires", 0)),
        )


class MemoryStore:
    """Entries in this process, least recently used first out, within ``max_bytes``;
    none larger than ``max_entry_bytes``, none kept past its expiry.

    An expired entry that nobody asks for again would otherwise stay until the
    least recently used ones are pushed out at ``max_bytes``: a cache of
    different requests would grow for hours (256 MiB by default) instead of
    holding what its TTL keeps. Each put drops the expired ones first, soonest
    expiry first (a heap; the items of entries already gone are skipped, and the
    heap is rebuilt once they outnumber the entries).
    """

    def __init__(self, max_bytes: int, max_entry_bytes: int | None = None):
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_bytes if max_entry_bytes is None else max_entry_bytes
        self.bytes = 0
        self.entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self.expiries: list[tuple[float, str]] = []

    async def get(self, key: str) -> Entry | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.expires <= time.time():
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return entry

    async def put(self, key: str, entry: Entry) -> None:
        if entry.size > min(self.max_bytes, self.max_entry_bytes):
            return
        self.expire(time.time())
        if key in self.entries:
            self._drop(key)
        self.entries[key] = entry
        self.bytes += entry.size
        heapq.heappush(self.expiries, (entry.expires, key))
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))
        if len(self.expiries) > 2 * len(self.entries) + STALE_EXPIRIES:
            self.expiries = [(e.expires, k) for k, e in self.entries.items()]
            heapq.heapify(self.expiries)

    def expire(self, now: float) -> None:
        """Drop every entry whose expiry has passed."""
        heap = self.expiries
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            entry = self.entries.get(key)
            if entry is not None and entry.expires <= now:
                self._drop(key)

    def _drop(self, key: str) -> None:
        self.bytes -= self.entries.pop(key).size

    async def close(self) -> None:
        self.entries.clear()
        self.expiries.clear()
        self.bytes = 0


class RedisStore:
    """Entries in Redis for every instance, each with its TTL; any Redis failure is a miss."""

    def __init__(self, limits, max_entry_bytes: int):
        self.limits = limits
        self.client = limits.client
        self.max_entry_bytes = max_entry_bytes

    def redis_key(self, key: str) -> str:
        return "%s:%s:%s" % (self.limits.prefix, REDIS_PREFIX, key)

    async def get(self, key: str) -> Entry | None:
        from chat_gpt_proxy.access.shared_limits import FAILURES

        limits = self.limits
        if time.monotonic() < limits.skip_until:
            return None
        try:
            data = await asyncio.wait_for(self.client.get(self.redis_key(key)), limits.timeout)
        except FAILURES as exc:
            limits.failed("cache_get", exc)
            return None
        limits.succeeded()
        if data is None:
            return None
        try:
            return Entry.loads(data)
        except (ValueError, KeyError, TypeError):
            return None

    async def put(self, key: str, entry: Entry) -> None:
        from chat_gpt_proxy.access.shared_limits import FAILURES

        data = entry.dumps()
        ttl_ms = int((entry.expires - time.time()) * 1000)
        if len(data) > self.max_entry_bytes or ttl_ms <= 0 or time.monotonic() < self.limits.skip_until:
            return
        try:
            await asyncio.wait_for(self.client.set(self.redis_key(key), data, px=ttl_ms), self.limits.timeout)
        except FAILURES as exc:
            self.limits.failed("cache_put", exc)
            return
        self.limits.succeeded()

    async def close(self) -> None:
        pass


class ResponseCache:
    def __init__(self, settings, shared_limits=None, metrics=None):
        self.settings = settings
        self.metrics = metrics
        if shared_limits is not None:
            self.store = RedisStore(shared_limits, settings.cache_max_entry_bytes)
        else:
            self.store = MemoryStore(settings.cache_max_bytes, settings.cache_max_entry_bytes)
        # The most a request collects of a stream to keep it: beyond it, the stream is not kept.
        self.max_entry = min(settings.cache_max_bytes, settings.cache_max_entry_bytes)
        # Coalescing: the request fetching a key, and those waiting for it.
        self.inflight: dict[str, asyncio.Future] = {}

    def ttl_for(self, entry, headers) -> int:
        """Seconds to keep this request's answer for; 0: the cache is not used for it.

        A token's ``cache = true`` (for ``cache_ttl``, else CACHE_TTL, else
        DEFAULT_TTL) or ``cache = false``; else CACHE_TTL; a request may ask
        for it (``x-proxy-cache: use``) unless its token says false, and may
        always refuse it (``skip``, ``Cache-Control: no-cache`` / ``no-store``).
        """
        asked = headers.get("x-proxy-cache", "").strip().lower()
        control = headers.get("Cache-Control", "").lower()
        if asked == "skip" or "no-cache" in control or "no-store" in control:
            return 0
        policy = entry.policy if entry is not None else None
        choice = policy.cache if policy is not None else None
        if choice is False:
            return 0
        if choice is True:
            return policy.cache_ttl or self.settings.cache_ttl or DEFAULT_TTL
        if self.settings.cache_ttl:
            return self.settings.cache_ttl
        return DEFAULT_TTL if asked == "use" else 0

    async def get(self, key: str) -> Entry | None:
        return await self.store.get(key)

    async def put(self, key: str, entry: Entry) -> None:
        await self.store.put(key, entry)

    def count(self, result: str, token: str, saved_usd: float = 0.0, saved_tokens: int = 0) -> None:
        if self.metrics is None:
            return
        self.metrics.cache.labels(result, token).inc()
        if saved_tokens:
            self.metrics.cache_saved_tokens.labels(token).inc(saved_tokens)
        if saved_usd:
            self.metrics.cache_saved_usd.labels(token).inc(saved_usd)

    async def close(self) -> None:
        await self.store.close()
