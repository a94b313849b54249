"""What the routes that show private data share (the admin routes, /usage): answers no cache keeps,
a bound on guessing the admin token, and the base of the admin routes (admin.py, admin_api.py).

- ``NoStore``: every answer of the handler, errors included, says ``Cache-Control: no-store``
  (RFC 9111 section 5.2.2.5): spend, token names and budgets stay out of browser and shared caches.
- ``check_admin_token``: the ``admin-token`` header compared in constant time with ADMIN_TOKEN and
  with the tokens of the tokens file's named admins (``admin = true``), first: the right
  token always passes, never counted or limited, so that nobody can lock the admin out. Wrong ones
  are counted per client (the access log's ``client``: the peer, or X-Forwarded-For from
  TRUSTED_PROXIES; an IPv6 address by its /64, chat_gpt_proxy/access/attempts.py); a client with too
  many gets 429 with ``Retry-After`` for each further wrong token instead of 403.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import time

from chat_gpt_proxy.access.attempts import address_key
from chat_gpt_proxy.observability import client_address

from .base import BaseHandler
from .errors import ApiError

# Paths whose answers are private, matched or not: what no cache may keep under them.
PRIVATE_PREFIXES = ("/admin", "/usage")


def private_path(path: str) -> bool:
    """Whether ``path`` is /admin, /usage or under either."""
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PRIVATE_PREFIXES)


class NoStore:
    """Mixin (before ``BaseHandler``): ``Cache-Control: no-store`` on every answer, set as its headers
    go out, over whatever the handler set (a page's ``no-cache``); errors go out the same way."""

    def flush(self, include_footers: bool = False):
        self.set_header("Cache-Control", "no-store")
        return super().flush(include_footers)


# Who the audit names for ADMIN_TOKEN, the unnamed break-glass admin.
BREAK_GLASS = "ADMIN_TOKEN"


def admin_named(handler) -> str | None:
    """Who the ``admin-token`` header names: BREAK_GLASS for ADMIN_TOKEN, a named admin's name, or None."""
    raw = handler.request.headers.get("admin-token", "")
    presented = hashlib.sha256(raw.encode("utf-8", "surrogateescape"))
    expected = hashlib.sha256(handler.config.admin_token.encode())
    # Both compared whatever the first says: timing tells neither which matched. Without
    # ADMIN_TOKEN, an empty header must not match the empty string's digest.
    break_glass = hmac.compare_digest(presented.digest(), expected.digest()) and bool(handler.config.admin_token)
    entry = handler.application.tokens.lookup(raw)
    if break_glass:
        return BREAK_GLASS
    if entry is not None and entry.admin and not entry.policy.disabled and not entry.policy.expired(time.time()):
        return entry.name
    return None


def check_admin_token(handler) -> str:
    """Who is asking (ADMIN_TOKEN's holder or a named admin), who always passes; a wrong token is
    403 (and counted), or 429 while its client has failed too often."""
    actor = admin_named(handler)
    if actor is not None:
        return actor
    attempts = handler.application.admin_attempts
    metrics = handler.application.metrics
    address = address_key(client_address(handler, handler.config.trusted_proxies))
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
    attempts.failed(address, now)
    if metrics is not None:
        metrics.admin_token_failures.labels("wrong").inc()
    raise ApiError(403, "Missing or wrong admin-token header.", "permission_denied", "invalid_admin_token")


DATE_FORMAT = "%Y-%m-%d"


class AdminHandler(NoStore, BaseHandler):
    """Every admin route: no-store answers (errors too), the admin token checked with its
    failed attempts limited per client address (handlers/private.py)."""

    requires_access_token = False

    def prepare(self):
        if not self.config.admin_token and not self.application.tokens.has_admins:
            raise ApiError(404, "No such route: %s." % self.request.path[:200], code="not_found")
        return super().prepare()

    def check_admin_token(self) -> str:
        """Who the ``admin-token`` header names (the audit's "who"): ADMIN_TOKEN's holder, or a named admin."""
        return check_admin_token(self)


def day_arg(handler, name: str, default: datetime.date) -> datetime.date:
    value = handler.get_query_argument(name, "")
    if not value:
        return default
    try:
        day = datetime.datetime.strptime(value, DATE_FORMAT).replace(tzinfo=datetime.UTC).date()
    except ValueError:
        day = None
    # The day after the last one must exist too (9999-12-31 has none).
    if day is None or day >= datetime.date.max:
        raise ApiError(400, "%s must be a date as YYYY-MM-DD." % name, code="invalid_date")
    return day
