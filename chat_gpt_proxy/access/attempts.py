"""Failed attempts at a secret (the admin token), per client address, in a sliding window.

After ``MAX_FAILURES`` within ``WINDOW`` seconds an address must wait until
its oldest failure leaves the window. Only failures are recorded: a client
that presents the right secret is never counted. The table is bounded
(``MAX_ADDRESSES``, the least recently failed address out first), so an
attacker with many addresses cannot make it grow.
"""

from __future__ import annotations

import collections
import ipaddress
import math

MAX_FAILURES = 10
WINDOW = 300.0
MAX_ADDRESSES = 10_000


def address_key(address: str) -> str:
    """What one client is counted as: its IPv4 address, or its IPv6 address's /64, which one
    subscriber or host usually holds whole (RFC 6177), so that it cannot change address per try."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if parsed.version == 6 and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    if parsed.version == 6:
        return str(ipaddress.ip_network((parsed, 64), strict=False))
    return address


class FailedAttempts:
    def __init__(self, max_failures: int = MAX_FAILURES, window: float = WINDOW, max_addresses: int = MAX_ADDRESSES):
        self.max_failures = max_failures
        self.window = window
        self.max_addresses = max_addresses
        # address -> times (monotonic) of its failures within the window, oldest first.
        self.failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def retry_after(self, address: str, now: float) -> int:
        """Whole seconds until ``address`` may try again; 0: it may now."""
        times = self.failures.get(address)
        if times is None:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self.failures[address]
            return 0
        if len(times) < self.max_failures:
            return 0
        return max(1, math.ceil(times[0] + self.window - now))

    def failed(self, address: str, now: float) -> None:
        times = self.failures.pop(address, None)
        if times is None:
            times = collections.deque(maxlen=self.max_failures)
            while len(self.failures) >= self.max_addresses:
                self.failures.popitem(last=False)
        times.append(now)
        self.failures[address] = times
