"""/admin: the spend of every token, for whoever holds ADMIN_TOKEN or a token with ``admin = true`` in
the tokens file (neither: these routes do not exist).

- ``GET /admin/usage``: the ledger grouped by UTC day, token and model, between
  ``from`` and ``to`` (``YYYY-MM-DD``, both included; default: this month so
  far), with every budgeted token's spend and what is left; ``?format=csv``
  gives the rows as CSV.
- ``GET /admin``: a page with charts of the same (static/admin.*, no CDN).

The admin token travels in the ``admin-token`` header and is compared in
constant time (digests of equal length), like the access tokens; wrong ones
are limited per client address (handlers/private.py). No answer is stored
by a cache (``Cache-Control: no-store``). The JSON admin API (tokens, audit,
requests) is in admin_api.py.
"""

from __future__ import annotations

import datetime
import time

from chat_gpt_proxy.access.tokens import UNNAMED
from chat_gpt_proxy.human import money_fields
from chat_gpt_proxy.request.strict_json import dumps
from chat_gpt_proxy.usage.report import to_csv

from .errors import ApiError
from .pages import render_page
from .private import DATE_FORMAT, AdminHandler, day_arg


def budgets_report(application, now: float) -> list[dict]:
    spend = application.spend
    out = []
    for entry in application.tokens.entries:
        if entry.name != UNNAMED and entry.policy.budget:
            out.append({"token": entry.name, **spend.book.remaining(entry.name, entry.policy.budget, now)})
    return out


class AdminUsageHandler(AdminHandler):
    async def get(self) -> None:
        """GET /admin/usage[?from=YYYY-MM-DD&to=YYYY-MM-DD&format=json|csv]."""
        self.check_admin_token()
        ledger = self.application.spend.ledger
        if ledger is None:
            raise ApiError(
                404, "The usage ledger is off: set USAGE_DATABASE.", "invalid_request_error", "usage_database_unset"
            )
        today = datetime.datetime.now(datetime.UTC).date()
        first = day_arg(self, "from", today.replace(day=1))
        last = day_arg(self, "to", today)
        if last < first:
            raise ApiError(400, "to is before from.", code="invalid_date")
        since = datetime.datetime.combine(first, datetime.time(), datetime.UTC).timestamp()
        until = datetime.datetime.combine(last + datetime.timedelta(days=1), datetime.time(), datetime.UTC).timestamp()
        rows = await ledger.report(since, until)
        kind = self.get_query_argument("format", "json")
        if kind == "csv":
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_header("Content-Disposition", 'attachment; filename="usage-%s-%s.csv"' % (first, last))
            self.finish(to_csv(rows).encode())
            return
        if kind != "json":
            raise ApiError(400, "format must be json or csv.", code="invalid_format")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        body = {
            "from": first.strftime(DATE_FORMAT),
            "to": last.strftime(DATE_FORMAT),
            "rows": rows,
            "budgets": budgets_report(self.application, time.time()),
        }
        # Amounts exact (a page or a script adds rows up), each with a rounded *_display for people.
        self.finish(dumps(money_fields(body)))


class AdminPageHandler(AdminHandler):
    def get(self) -> None:
        """GET /admin: the charts page; it asks for the admin token and reads /admin/usage with it."""
        render_page(self, "admin.html", ("admin",))


routes = [(r"/admin", AdminPageHandler), (r"/admin/usage", AdminUsageHandler)]
