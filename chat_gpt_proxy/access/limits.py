"""Per-token request limits, kept in this process."""

from __future__ import annotations

import math
import time


class RateLimiter:
    """Requests per minute per key (a token bucket each), in process.

    The rate is given with each request, so that a reloaded tokens file
    changes a token's rate without resetting what it has used.
    """

    def __init__(self) -> None:
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, per_minute: int) -> int:
        """0 if a request may go now, else the seconds to wait."""
        capacity = float(per_minute)
        rate = per_minute / 60.0
        now = time.monotonic()
        tokens, last = self.buckets.get(key, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * rate)
        if tokens >= 1:
            self.buckets[key] = (tokens - 1, now)
            return 0
        self.buckets[key] = (tokens, now)
        return max(1, math.ceil((1 - tokens) / rate))


class InFlight:
    """Requests (and streams) in flight per key, for ``max_concurrent``."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def acquire(self, key: str, limit: int) -> bool:
        """Count one more request under ``key``; False (and nothing counted) if ``limit`` (> 0) is reached."""
        count = self.counts.get(key, 0)
        if limit and count >= limit:
            return False
        self.counts[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self.counts.get(key, 0) - 1
        if count > 0:
            self.counts[key] = count
        else:
            self.counts.pop(key, None)
