"""What the routes that show private data share (the admin routes, /usage): answers no cache keeps,
and a bound on guessing the admin token.

- ``NoStore``: every answer of the handler, errors included, says ``Cache-Control: no-store``
  (RFC 9111 section 5.2.2.5): spend, token names and budgets stay out of browser and shared caches.
- ``check_admin_token``: the ``admin-token`` header compared in constant time; wrong ones counted per
  client address (the access log's ``client``: the peer, or X-Forwarded-For from TRUSTED_PROXIES,
  chat_gpt_proxy/access/attempts.py). An address with too many is answered 429 with ``Retry-After``
  without its token being looked at, so that a 429 says nothing about a guess; the right token is
  never counted or limited.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from chat_gpt_proxy.observability import client_address

from .errors import ApiError


class NoStore:
    """Mixin (before ``BaseHandler``): ``Cache-Control: no-store`` on every answer, set as its headers
    go out, over whatever the handler set (a page's ``no-cache``); errors go out the same way."""

    def flush(self, include_footers: bool = False):
        self.set_header("Cache-Control", "no-store")
        return super().flush(include_footers)


def check_admin_token(handler) -> None:
    """Refuse ``handler``'s request unless it carries ADMIN_TOKEN: 429 if its address has failed
    too often, else 403 if the token is wrong (and counted)."""
    presented = hashlib.sha256(handler.request.headers.get("admin-token", "").encode("utf-8", "surrogateescape"))
    expected = hashlib.sha256(handler.config.admin_token.encode())
    valid = hmac.compare_digest(presented.digest(), expected.digest())
    attempts = handler.application.admin_attempts
    metrics = handler.application.metrics
    address = client_address(handler, handler.config.trusted_proxies)
    now = time.monotonic()
    wait = attempts.retry_after(address, now)
    if wait:
        if metrics is not None:
            metrics.admin_token_failures.labels("limited").inc()
        raise ApiError(
            429,
            "Too many wrong admin tokens from this address; try again in %d s." % wait,
            "rate_limit_error",
            "admin_token_attempts",
            headers={"Retry-After": str(wait)},
        )
    if not valid:
        attempts.failed(address, now)
        if metrics is not None:
            metrics.admin_token_failures.labels("wrong").inc()
        raise ApiError(403, "Missing or wrong admin-token header.", "permission_denied", "invalid_admin_token")
