"""Per-token request limits, kept in this process."""

from __future__ import annotations

import math
import time


class RateLimiter:
    """Requests per minute per access token, in process (a token bucket each)."""

    def __init__(self, per_minute: int):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> int:
        """0 if a request may go now, else the seconds to wait."""
        now = time.monotonic()
        tokens, last = self.buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self.buckets[key] = (tokens - 1, now)
            return 0
        self.buckets[key] = (tokens, now)
        return max(1, math.ceil((1 - tokens) / self.rate))
