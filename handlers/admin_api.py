"""/admin/api/: the JSON admin API behind the admin page's Tokens, Requests and Audit tabs.

- ``GET /admin/api/tokens``: every named token (the file's and the page's), its
  limits, status, spend this period and last activity; never a token value.
- ``POST /admin/api/tokens``: a new token (``name`` and the tokens file's
  fields); 201 with its value, shown this once.
- ``GET|PATCH|DELETE /admin/api/tokens/{name}``; ``POST …/{name}/rotate``
  (a new value, the old one refused at once); ``GET …/{name}/usage``: that
  person's spend by model and by day, and refusals by kind.
- ``GET /admin/api/audit``: the admin actions, newest first.
- ``GET /admin/api/requests``: the ledger's rows, newest first, filtered and paged; ``format=csv``.

Credentials: the ``admin-token`` header only (ADMIN_TOKEN, or a token with
``admin = true`` in the tokens file); no cookie is read, so no other site can
make a browser act here. Every answer is ``Cache-Control: no-store``.
"""

from __future__ import annotations

import csv
import datetime
import io
import time

from chat_gpt_proxy.access.tokens import FROM_PAGE, UNNAMED, iso_time
from chat_gpt_proxy.console.runtime import ApiRefusal
from chat_gpt_proxy.console.store import REQUEST_COLUMNS, STATUS_CLASS_RE
from chat_gpt_proxy.request.strict_json import dumps
from chat_gpt_proxy.usage.budgets import period_bounds
from chat_gpt_proxy.usage.report import csv_cell

from .errors import ApiError
from .private import AdminHandler, day_arg

NO_DATABASE = (
    "Tokens managed from the admin page need a database: set USAGE_DATABASE (a SQLite file path, "
    "or a postgresql:// URL for several instances) and restart the proxy."
)
MAX_PAGE = 500
MAX_CSV_ROWS = 100_000


def digits(value: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²", which int() then refuses."""
    return value.isascii() and value.isdigit()


class AdminApiHandler(AdminHandler):
    actor = ""

    def prepare(self):
        result = super().prepare()
        self.actor = self.check_admin_token()
        return result

    def console(self):
        console = self.application.console
        if console is None:
            raise ApiError(409, NO_DATABASE, "invalid_request_error", "usage_database_unset")
        return console

    def ledger(self):
        ledger = self.application.spend.ledger
        if ledger is None or self.application.console is None:
            raise ApiError(409, NO_DATABASE, "invalid_request_error", "usage_database_unset")
        return ledger

    def send_json(self, body, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps(body))

    def body_object(self) -> dict:
        return self.json_body()

    async def run(self, change):
        try:
            return await change
        except ApiRefusal as exc:
            raise ApiError(exc.status, exc.message, "invalid_request_error", exc.code, param=exc.field) from None

    def int_arg(self, name: str, default: int, low: int, high: int) -> int:
        value = self.get_query_argument(name, "")
        if not value:
            return default
        if not (digits(value) and len(value) <= 18) or not low <= int(value) <= high:
            raise ApiError(
                400, "%s must be an integer from %d to %d." % (name, low, high), code="invalid_query", param=name
            )
        return int(value)

    async def describe(self, entry, now: float, last_active: dict[str, float]) -> dict:
        """One token as the API shows it: never its value nor its digest."""
        policy = entry.policy
        budget = policy.budget
        period = budget.period if budget else "month"
        start, end = period_bounds(period, now)
        console = self.application.console
        if console is not None and self.application.spend.ledger is not None:
            # From the ledger's table (flushed by last_active), so every worker and instance counts.
            usd, tokens = await console.store.spent_since(entry.name, start)
        else:
            spent, _ = self.application.spend.book.spent_now(entry.name, period, now)
            usd, tokens = spent.usd, spent.tokens
        spend = {"period": period, "resets_at": iso_time(end), "spent_usd": usd, "spent_tokens": tokens}
        over = False
        if budget.usd is not None:
            spend["remaining_usd"] = max(0.0, budget.usd - usd)
            over = over or usd >= budget.usd
        if budget.tokens is not None:
            spend["remaining_tokens"] = max(0, budget.tokens - tokens)
            over = over or tokens >= budget.tokens
        if policy.disabled:
            status = "disabled"
        elif policy.expired(now):
            status = "expired"
        elif over:
            status = "over_budget"
        else:
            status = "active"
        row = console.rows.get(entry.name) if console is not None and entry.source == FROM_PAGE else None
        out = {
            "name": entry.name,
            "source": entry.source,
            "admin": entry.admin,
            "status": status,
            "rate_limit_per_minute": policy.rate_limit_per_minute,
            "max_concurrent": policy.max_concurrent,
            "allowed_models": list(policy.allowed_models) or None,
            "use_server_key": policy.use_server_key,
            "budget_usd": budget.usd,
            "budget_tokens": budget.tokens,
            "budget_period": budget.period if budget else None,
            "upstreams": list(policy.upstreams) or None,
            "cache": policy.cache,
            "cache_ttl": policy.cache_ttl,
            "deferred": policy.deferred,
            "expires": iso_time(policy.expires) if policy.expires is not None else None,
            "disabled": policy.disabled,
            "spend": spend,
            "last_active": iso_time(last_active[entry.name]) if entry.name in last_active else None,
            # What was set on the page (the rest are the defaults), for the edit form.
            "fields": row["fields"] if row else None,
            "created_at": iso_time(row["created_at"]) if row else None,
            "created_by": row["created_by"] if row else None,
            "updated_at": iso_time(row["updated_at"]) if row else None,
            "updated_by": row["updated_by"] if row else None,
        }
        return out

    async def describe_name(self, name: str) -> dict:
        entry = self.application.tokens.find(name)
        if entry is None:
            raise ApiError(404, "No token named %r." % name[:64], code="not_found")
        return await self.describe(entry, time.time(), await self.last_active([name]))

    async def last_active(self, names: list[str]) -> dict[str, float]:
        console = self.application.console
        if console is None or self.application.spend.ledger is None:
            return {}
        await self.application.spend.ledger.flush()
        return await console.store.last_active(names)


class TokensHandler(AdminApiHandler):
    async def get(self) -> None:
        """GET /admin/api/tokens."""
        entries = [e for e in self.application.tokens.entries if e.name != UNNAMED]
        now = time.time()
        active = await self.last_active([e.name for e in entries])
        tokens = [await self.describe(e, now, active) for e in entries]
        tokens.sort(key=lambda t: t["name"])
        self.send_json({"tokens": tokens, "runtime_tokens": self.application.console is not None})

    async def post(self) -> None:
        """POST /admin/api/tokens: 201 with the new token's value."""
        console = self.console()
        body = self.body_object()
        _, value = await self.run(console.create(body, self.actor, self.request_id))
        described = await self.describe_name(body["name"])
        self.set_header("Location", "/admin/api/tokens/" + body["name"])
        self.send_json({**described, "token": value}, 201)


class TokenHandler(AdminApiHandler):
    async def get(self, name: str) -> None:
        self.send_json(await self.describe_name(name))

    async def patch(self, name: str) -> None:
        console = self.console()
        await self.run(console.update(name, self.body_object(), self.actor, self.request_id))
        self.send_json(await self.describe_name(name))

    async def delete(self, name: str) -> None:
        console = self.console()
        await self.run(console.delete(name, self.actor, self.request_id))
        self.send_json({"deleted": name})


class RotateHandler(AdminApiHandler):
    async def post(self, name: str) -> None:
        console = self.console()
        _, value = await self.run(console.rotate(name, self.actor, self.request_id))
        self.send_json({**(await self.describe_name(name)), "token": value})


class PersonHandler(AdminApiHandler):
    async def get(self, name: str) -> None:
        """GET /admin/api/tokens/{name}/usage[?from&to]: spend by model and by day, refusals by kind."""
        described = await self.describe_name(name)
        ledger = self.ledger()
        today = datetime.datetime.now(datetime.UTC).date()
        first = day_arg(self, "from", today - datetime.timedelta(days=29))
        last = day_arg(self, "to", today)
        if last < first:
            raise ApiError(400, "to is before from.", code="invalid_date", param="to")
        since, until = day_span(first, last)
        await ledger.flush()
        await self.application.console.flush_refusals()
        found = await self.application.console.store.person(name, since, until)
        self.send_json({"token": described, "from": first.isoformat(), "to": last.isoformat(), **found})


class AuditHandler(AdminApiHandler):
    async def get(self) -> None:
        """GET /admin/api/audit[?limit=100&before=<id>&name=<name>]: newest first."""
        console = self.console()
        limit = self.int_arg("limit", 100, 1, MAX_PAGE)
        before = self.get_query_argument("before", "")
        if before and not (digits(before) and len(before) <= 18):
            raise ApiError(400, "before must be an audit row id.", code="invalid_query", param="before")
        rows = await console.store.audit(limit, int(before) if before else None, self.get_query_argument("name", ""))
        for row in rows:
            row["at"] = iso_time(row["at"])
        self.send_json({"audit": rows})


def day_span(first: datetime.date, last: datetime.date) -> tuple[float, float]:
    since = datetime.datetime.combine(first, datetime.time(), datetime.UTC).timestamp()
    until = datetime.datetime.combine(last + datetime.timedelta(days=1), datetime.time(), datetime.UTC).timestamp()
    return since, until


def time_arg(handler, name: str, end: bool) -> float | None:
    """``from``/``to`` of the Requests tab: a UTC date (``to``: through its end) or an ISO 8601 date-time."""
    value = handler.get_query_argument(name, "")
    if not value:
        return None
    try:
        if len(value) == 10:
            day = datetime.date.fromisoformat(value)
            return day_span(day, day)[1 if end else 0]
        text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
        moment = datetime.datetime.fromisoformat(text)
        moment.timestamp()
    except (ValueError, OverflowError):  # 9999-12-31 has no day after it
        moment = None
    if moment is None:
        raise ApiError(
            400,
            "%s must be a date (2027-01-31) or a date and time (2027-01-31T14:02:00Z)." % name,
            code="invalid_query",
            param=name,
        )
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


class RequestsHandler(AdminApiHandler):
    async def get(self) -> None:
        """GET /admin/api/requests[?name&model&status&request_id&from&to&limit&offset&format=csv]: newest first.

        ``request_id``: the proxy's id (x-proxy-request-id) or the upstream's (the x-request-id an SDK reports).
        """
        ledger = self.ledger()
        status = self.get_query_argument("status", "")
        if status and not (
            STATUS_CLASS_RE.match(status) or (digits(status) and len(status) == 3 and 100 <= int(status) <= 599)
        ):
            raise ApiError(
                400, "status must be an HTTP status (429) or a class (4xx).", code="invalid_query", param="status"
            )
        filters = {
            "name": self.get_query_argument("name", ""),
            "model": self.get_query_argument("model", ""),
            "request_id": self.get_query_argument("request_id", ""),
            "status": status,
            "since": time_arg(self, "from", False),
            "until": time_arg(self, "to", True),
        }
        kind = self.get_query_argument("format", "json")
        if kind not in ("json", "csv"):
            raise ApiError(400, "format must be json or csv.", code="invalid_format", param="format")
        await ledger.flush()
        await self.application.console.flush_refusals()
        store = self.application.console.store
        if kind == "csv":
            rows = await store.requests(filters, MAX_CSV_ROWS, 0)
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_header("Content-Disposition", 'attachment; filename="requests.csv"')
            self.finish(requests_csv(rows).encode())
            return
        limit = self.int_arg("limit", 50, 1, MAX_PAGE)
        offset = self.int_arg("offset", 0, 0, 10**9)
        # One more than asked: whether there is a next page.
        rows = await store.requests(filters, limit + 1, offset)
        for row in rows:
            row["time"] = iso_time(row["at"])
        self.send_json({"requests": rows[:limit], "offset": offset, "limit": limit, "more": len(rows) > limit})


def requests_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(("time", *REQUEST_COLUMNS[1:]))
    for row in rows:
        cells = [int(row[c]) if isinstance(row[c], bool) else row[c] for c in REQUEST_COLUMNS[1:]]
        writer.writerow([iso_time(row["at"]), *(csv_cell(c) for c in cells)])
    return out.getvalue()


NAME = r"([A-Za-z0-9][A-Za-z0-9._@-]{0,63})"
routes = [
    (r"/admin/api/tokens", TokensHandler),
    (r"/admin/api/tokens/%s" % NAME, TokenHandler),
    (r"/admin/api/tokens/%s/rotate" % NAME, RotateHandler),
    (r"/admin/api/tokens/%s/usage" % NAME, PersonHandler),
    (r"/admin/api/audit", AuditHandler),
    (r"/admin/api/requests", RequestsHandler),
]
