"""When to try an upstream request again.

Only requests the upstream cannot have started to process: the connection
was never made (refused, DNS failure, connect timeout, the egress proxy
unreachable or unable to reach the upstream), or, opted in with
``RETRY_ON_STATUS``, an error status whose answer has not been relayed. A
reset or a timeout after the request was sent is never retried: it may have
been processed, and billed, already. The one exception is a GET or HEAD,
which changes nothing, whose kept-alive connection closed before any answer
byte. A kept-alive connection found closed before the request was sent
is retried at once (``reused_connection_closed``).
"""

from __future__ import annotations

import email.utils
import random
import time

# The first retry waits 0.1-0.2 s, the next 0.2-0.4 s, ...: enough for a
# flapping route, short against a request's timeout. Random "equal jitter"
# keeps many clients that failed together from retrying in step.
BACKOFF_BASE = 0.2


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based)."""
    ceiling = BACKOFF_BASE * 2 ** (attempt - 1)
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 (jitter, not a secret)


# The least time a retry must have left once its wait is over: with less, its
# timeout would round to 0 ms, which libcurl reads as no timeout at all.
MIN_ATTEMPT_SECONDS = 0.01


def retry_after_seconds(headers) -> float | None:
    """An upstream's ``retry-after-ms`` (OpenAI's) or ``Retry-After`` (RFC 9110 10.2.3), or None."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    # ASCII digits only (RFC 9110 section 10.2.3): isdigit() alone takes "²", which float() refuses.
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class RetryPolicy:
    def __init__(self, settings):
        self.retries = settings.upstream_retries
        self.statuses = frozenset(settings.retry_on_status)
        self.max_wait = settings.retry_max_wait
        self.budget = settings.request_timeout

    def after_error(self, exc, attempt: int, elapsed: float) -> float | None:
        """Seconds to wait before trying again after ``exc``; None: do not retry."""
        if exc.retry_reason is None:
            return None
        # A closed kept-alive connection says nothing about the route: at once.
        wait = 0.0 if exc.retry_reason == "reused_connection_closed" else backoff(attempt)
        return self._wait(wait, attempt, elapsed)

    def after_status(self, status: int, headers, attempt: int, elapsed: float) -> float | None:
        """Seconds to wait before trying again after an error status; None: answer it now."""
        if status not in self.statuses:
            return None
        wait = retry_after_seconds(headers)
        if wait is None:
            wait = backoff(attempt)
        elif wait > self.max_wait:
            return None  # the caller is better told at once than kept waiting
        return self._wait(wait, attempt, elapsed)

    def _wait(self, wait: float, attempt: int, elapsed: float) -> float | None:
        # A retry needs time left after its wait: libcurl reads a 0 ms timeout
        # as none at all and refuses a negative one.
        if attempt > self.retries or elapsed + wait > self.budget - MIN_ATTEMPT_SECONDS:
            return None
        return wait
