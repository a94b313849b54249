"""The admin console's tables, in the ledger's database (USAGE_DATABASE), and its reads of the ledger.

Tables (created when missing, beside the ledger's ``usage``):

- ``access_tokens``: one row per token made from the admin page or API: its
  name, the hex SHA-256 of its value (never the value: a stolen database holds
  no usable token), its fields as JSON (the tokens file's names), when and by
  whom it was made and last changed.
- ``access_tokens_version``: one row, one number, raised by every change to
  ``access_tokens`` in the same transaction. Workers and instances compare it
  with the number they last loaded: one cheap query tells them whether to reload.
- ``admin_audit``: every admin action (time, who, action, name, fields before
  and after, the request id), append-only: triggers refuse UPDATE and DELETE.
- ``budget_alerts``: one row per (name, period, period start, threshold) whose
  alert was sent, so that instances and restarts send each once.
- ``refusals``: one row per request of a known token answered with an error
  before anything was charged (a limit, a budget, a disabled token, a model
  not allowed…): its code says which. The ledger's ``usage`` keeps charges
  only; the Requests tab shows both.

SQLite runs in aiosqlite's thread on a connection of its own (WAL: the
ledger's writer and this one do not block readers); PostgreSQL through a
small asyncpg pool. SQL is written once with ``?`` placeholders.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re

log = logging.getLogger("chat_gpt_proxy")

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS access_tokens (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    fields TEXT NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    updated_at REAL NOT NULL,
    updated_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS access_tokens_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT OR IGNORE INTO access_tokens_version (id, version) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS admin_audit (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    name TEXT NOT NULL,
    before TEXT,
    after TEXT,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS admin_audit_at ON admin_audit (at);
CREATE TRIGGER IF NOT EXISTS admin_audit_no_update BEFORE UPDATE ON admin_audit
BEGIN SELECT RAISE(ABORT, 'admin_audit is append-only'); END;
CREATE TRIGGER IF NOT EXISTS admin_audit_no_delete BEFORE DELETE ON admin_audit
BEGIN SELECT RAISE(ABORT, 'admin_audit is append-only'); END;
CREATE TABLE IF NOT EXISTS budget_alerts (
    name TEXT NOT NULL,
    period TEXT NOT NULL,
    period_start REAL NOT NULL,
    threshold INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (name, period, period_start, threshold)
);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    token TEXT NOT NULL,
    route TEXT NOT NULL,
    model TEXT,
    status INTEGER NOT NULL,
    code TEXT NOT NULL,
    latency_ms REAL,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS refusals_token_at ON refusals (token, at);
CREATE INDEX IF NOT EXISTS refusals_at ON refusals (at);
"""

POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS access_tokens (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    fields TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    created_by TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    updated_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS access_tokens_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO access_tokens_version (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS admin_audit (
    id BIGSERIAL PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    name TEXT NOT NULL,
    before TEXT,
    after TEXT,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS admin_audit_at ON admin_audit (at);
CREATE OR REPLACE FUNCTION admin_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'admin_audit is append-only'; END $$;
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'admin_audit_append_only') THEN
    CREATE TRIGGER admin_audit_append_only BEFORE UPDATE OR DELETE ON admin_audit
      FOR EACH ROW EXECUTE FUNCTION admin_audit_append_only();
  END IF;
  -- TRUNCATE fires no row trigger: a statement-level one refuses it too.
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'admin_audit_no_truncate') THEN
    CREATE TRIGGER admin_audit_no_truncate BEFORE TRUNCATE ON admin_audit
      FOR EACH STATEMENT EXECUTE FUNCTION admin_audit_append_only();
  END IF;
END $$;
CREATE TABLE IF NOT EXISTS budget_alerts (
    name TEXT NOT NULL,
    period TEXT NOT NULL,
    period_start DOUBLE PRECISION NOT NULL,
    threshold INTEGER NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, period, period_start, threshold)
);
CREATE TABLE IF NOT EXISTS refusals (
    id BIGSERIAL PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    token TEXT NOT NULL,
    route TEXT NOT NULL,
    model TEXT,
    status INTEGER NOT NULL,
    code TEXT NOT NULL,
    latency_ms DOUBLE PRECISION,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS refusals_token_at ON refusals (token, at);
CREATE INDEX IF NOT EXISTS refusals_at ON refusals (at);
"""
# pg_advisory_xact_lock key: one instance at a time creates these tables.
SCHEMA_LOCK = 0x63677063  # "cgpc"
QUERY_TIMEOUT = 10.0

TOKEN_COLUMNS = "name, token_sha256, fields, created_at, created_by, updated_at, updated_by"  # noqa: S105
AUDIT_COLUMNS = "id, at, actor, action, name, before, after, request_id"
# The ledger's columns the Requests tab shows (chat_gpt_proxy/usage/ledger.py), then a refusal's code.
CHARGE_COLUMNS = (
    "token",
    "route",
    "model",
    "upstream",
    "status",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "usd",
    "latency_ms",
    "ttft_ms",
    "cache",
    "estimated",
    "request_id",
    "upstream_request_id",
)
REQUEST_COLUMNS = ("at", *CHARGE_COLUMNS, "refusal")
STATUS_CLASS_RE = re.compile(r"^[1-5]xx\Z")


class Conflict(Exception):
    """A name (or a digest) already taken."""


class NotFound(Exception):
    """No token of that name in the table."""


def _pg(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1``, ``$2``…"""
    count = 0

    def number(_match) -> str:
        nonlocal count
        count += 1
        return "$%d" % count

    return re.sub(r"\?", number, sql)


class _SqliteDriver:
    dialect = "sqlite"
    day = "date(at, 'unixepoch')"
    false = "0"

    def __init__(self, path: str):
        self.path = path
        self.db = None
        # One connection: a transaction must not interleave with another coroutine's statements.
        self.lock = asyncio.Lock()

    async def open(self) -> None:
        import aiosqlite

        self.db = await aiosqlite.connect(self.path, isolation_level=None)
        await self.db.execute("PRAGMA journal_mode=WAL")
        await self.db.execute("PRAGMA busy_timeout=5000")
        await self.db.executescript(SQLITE_SCHEMA)

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()
            self.db = None

    async def fetch(self, sql: str, args=()) -> list[tuple]:
        async with self.lock, self.db.execute(sql, tuple(args)) as cursor:
            return list(await cursor.fetchall())

    @contextlib.asynccontextmanager
    async def transaction(self):
        import sqlite3

        async with self.lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(self.db)
            except sqlite3.IntegrityError:
                await self.db.execute("ROLLBACK")
                raise Conflict from None
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")

    async def insert_ignore(self, sql: str, args) -> bool:
        async with self.lock:
            cursor = await self.db.execute(sql.replace("INSERT", "INSERT OR IGNORE", 1), tuple(args))
            return cursor.rowcount == 1


class _SqliteTx:
    def __init__(self, db):
        self.db = db

    async def fetch(self, sql: str, args=()) -> list[tuple]:
        async with self.db.execute(sql, tuple(args)) as cursor:
            return list(await cursor.fetchall())

    async def execute(self, sql: str, args=()) -> int:
        cursor = await self.db.execute(sql, tuple(args))
        return cursor.rowcount


class _PostgresDriver:
    dialect = "postgres"
    day = "to_char(to_timestamp(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    false = "FALSE"

    def __init__(self, url: str):
        from chat_gpt_proxy.usage.postgres import _secrets_of, _where

        self.url = url
        self.secrets = _secrets_of(url)
        self.where = _where(url)
        self.pool = None

    async def open(self) -> None:
        import asyncpg

        self.pool = await asyncpg.create_pool(
            self.url, min_size=1, max_size=3, timeout=5.0, server_settings={"application_name": "chat_gpt_proxy"}
        )
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await conn.execute(POSTGRES_SCHEMA)

    async def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5.0)
            except (Exception, asyncio.CancelledError):
                pool.terminate()

    async def fetch(self, sql: str, args=()) -> list[tuple]:
        async with self.pool.acquire(timeout=QUERY_TIMEOUT) as conn:
            return [tuple(r) for r in await conn.fetch(_pg(sql), *args, timeout=QUERY_TIMEOUT)]

    @contextlib.asynccontextmanager
    async def transaction(self):
        import asyncpg

        async with self.pool.acquire(timeout=QUERY_TIMEOUT) as conn:
            try:
                async with conn.transaction():
                    yield _PostgresTx(conn)
            except asyncpg.UniqueViolationError:
                raise Conflict from None

    async def insert_ignore(self, sql: str, args) -> bool:
        async with self.pool.acquire(timeout=QUERY_TIMEOUT) as conn:
            status = await conn.execute(_pg(sql) + " ON CONFLICT DO NOTHING", *args, timeout=QUERY_TIMEOUT)
        return status.endswith(" 1")


class _PostgresTx:
    def __init__(self, conn):
        self.conn = conn

    async def fetch(self, sql: str, args=()) -> list[tuple]:
        return [tuple(r) for r in await self.conn.fetch(_pg(sql), *args, timeout=QUERY_TIMEOUT)]

    async def execute(self, sql: str, args=()) -> int:
        status = await self.conn.execute(_pg(sql), *args, timeout=QUERY_TIMEOUT)
        return int(status.rsplit(" ", 1)[1]) if status.rsplit(" ", 1)[-1].isdigit() else 0


def token_row(row: tuple) -> dict:
    name, digest, fields, created_at, created_by, updated_at, updated_by = row
    return {
        "name": name,
        "token_sha256": digest,
        "fields": json.loads(fields),
        "created_at": float(created_at),
        "created_by": created_by,
        "updated_at": float(updated_at),
        "updated_by": updated_by,
    }


def audit_row(row: tuple) -> dict:
    id_, at, actor, action, name, before, after, request_id = row
    return {
        "id": int(id_),
        "at": float(at),
        "actor": actor,
        "action": action,
        "name": name,
        "before": json.loads(before) if before else None,
        "after": json.loads(after) if after else None,
        "request_id": request_id,
    }


class ConsoleStore:
    """The console's tables and reads, over SQLite or PostgreSQL (``make_console_store``)."""

    def __init__(self, driver):
        self.driver = driver

    async def open(self) -> None:
        await self.driver.open()

    async def close(self) -> None:
        await self.driver.close()

    # -- tokens

    async def version(self) -> int:
        rows = await self.driver.fetch("SELECT version FROM access_tokens_version WHERE id = 1")
        return int(rows[0][0]) if rows else 0

    async def tokens(self) -> tuple[int, list[dict]]:
        """The version and every row, read together (one transaction: never a row set of another version)."""
        async with self.driver.transaction() as tx:
            version = await tx.fetch("SELECT version FROM access_tokens_version WHERE id = 1")
            rows = await tx.fetch("SELECT %s FROM access_tokens ORDER BY name" % TOKEN_COLUMNS)  # noqa: S608
        return (int(version[0][0]) if version else 0), [token_row(r) for r in rows]

    async def change(self, name: str, change, audit: dict) -> dict | None:
        """Apply ``change(before) -> (action, after row or None)`` to ``name``'s row in one transaction,
        raise the version and append the audit row; returns the row after (None once deleted).

        ``before`` is the row as it is (None if there is none); ``change`` raises to refuse.
        """
        async with self.driver.transaction() as tx:
            found = await tx.fetch(
                "SELECT %s FROM access_tokens WHERE name = ?%s"  # noqa: S608
                % (TOKEN_COLUMNS, " FOR UPDATE" if self.driver.dialect == "postgres" else ""),
                (name,),
            )
            before = token_row(found[0]) if found else None
            action, after = change(before)
            if after is None:
                await tx.execute("DELETE FROM access_tokens WHERE name = ?", (name,))
            elif before is None:
                await tx.execute(
                    "INSERT INTO access_tokens (%s) VALUES (?, ?, ?, ?, ?, ?, ?)" % TOKEN_COLUMNS,  # noqa: S608
                    _token_args(after),
                )
            else:
                await tx.execute(
                    "UPDATE access_tokens SET token_sha256 = ?, fields = ?, updated_at = ?, updated_by = ? "
                    "WHERE name = ?",
                    (
                        after["token_sha256"],
                        json.dumps(after["fields"]),
                        after["updated_at"],
                        after["updated_by"],
                        name,
                    ),
                )
            await tx.execute("UPDATE access_tokens_version SET version = version + 1 WHERE id = 1")
            await tx.execute(
                "INSERT INTO admin_audit (at, actor, action, name, before, after, request_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    audit["at"],
                    audit["actor"],
                    action,
                    name,
                    _audit_json(before),
                    _audit_json(after),
                    audit["request_id"],
                ),
            )
        return after

    # -- the audit

    async def audit(self, limit: int, before_id: int | None = None, name: str | None = None) -> list[dict]:
        where, args = [], []
        if before_id is not None:
            where.append("id < ?")
            args.append(before_id)
        if name:
            where.append("name = ?")
            args.append(name)
        sql = "SELECT %s FROM admin_audit%s ORDER BY id DESC LIMIT ?" % (  # noqa: S608
            AUDIT_COLUMNS,
            (" WHERE " + " AND ".join(where)) if where else "",
        )
        return [audit_row(r) for r in await self.driver.fetch(sql, (*args, limit))]

    # -- budget alerts

    async def claim_alert(self, name: str, period: str, start: float, threshold: int, at: float) -> bool:
        """True for the one caller (of every instance) that records this alert first."""
        return await self.driver.insert_ignore(
            "INSERT INTO budget_alerts (name, period, period_start, threshold, at) VALUES (?, ?, ?, ?, ?)",
            (name, period, start, threshold, at),
        )

    # -- reads of the ledger (chat_gpt_proxy/usage/ledger.py's ``usage`` table)

    async def requests(self, filters: dict, limit: int, offset: int) -> list[dict]:
        """One dict per ledger row (a charge) or refusal matching ``filters`` (name, model, status,
        since, until), newest first."""
        where, args = _request_filter(filters, upstream_ids=True)
        refusals_where, refusals_args = _request_filter(filters, upstream_ids=False)
        charges = "SELECT at, id, %s, NULL AS refusal FROM usage%s" % (  # noqa: S608
            ", ".join(CHARGE_COLUMNS),
            where,
        )
        refused = (
            "SELECT at, id, token, route, model, NULL, status, 0, 0, 0, 0.0, latency_ms, NULL, NULL, %s, request_id, "  # noqa: S608
            "NULL, code FROM refusals%s" % (self.driver.false, refusals_where)
        )
        sql = "SELECT * FROM (%s UNION ALL %s) AS r ORDER BY at DESC, id DESC LIMIT ? OFFSET ?" % (charges, refused)  # noqa: S608
        rows = await self.driver.fetch(sql, (*args, *refusals_args, limit, offset))
        out = []
        for row in rows:
            item = dict(zip(("at", "id", *CHARGE_COLUMNS, "refusal"), row, strict=True))
            del item["id"]
            item["at"] = float(item["at"])
            item["estimated"] = bool(item["estimated"])
            item["usd"] = float(item["usd"])
            out.append(item)
        return out

    async def person(self, name: str, since: float, until: float) -> dict:
        """``name``'s spend by model and by UTC day, and its refusals by kind, for ``since <= at < until``."""
        span = (name, since, until)
        models = await self.driver.fetch(
            "SELECT model, COUNT(*), SUM(input_tokens), SUM(cached_tokens), SUM(output_tokens), SUM(usd) "
            "FROM usage WHERE token = ? AND at >= ? AND at < ? GROUP BY model",
            span,
        )
        days = await self.driver.fetch(
            "SELECT %s AS day, COUNT(*), SUM(input_tokens + output_tokens), SUM(usd) "  # noqa: S608
            "FROM usage WHERE token = ? AND at >= ? AND at < ? GROUP BY day ORDER BY day" % self.driver.day,
            span,
        )
        refusals = await self.driver.fetch(
            "SELECT code, COUNT(*) FROM refusals WHERE token = ? AND at >= ? AND at < ? GROUP BY code ORDER BY code",
            span,
        )
        by_model = [
            {
                "model": m,
                "requests": int(n),
                "input_tokens": int(i or 0),
                "cached_tokens": int(c or 0),
                "output_tokens": int(o or 0),
                "usd": float(u or 0),
            }
            for m, n, i, c, o, u in models
        ]
        by_model.sort(key=lambda r: (-r["usd"], r["model"] or ""))
        by_day = [
            {"day": str(d), "requests": int(n), "tokens": int(t or 0), "usd": float(u or 0)} for d, n, t, u in days
        ]
        return {"by_model": by_model, "by_day": by_day, "refusals": {str(k): int(n) for k, n in refusals}}

    async def insert_refusals(self, rows: list[tuple]) -> None:
        """(at, token, route, model, status, code, latency_ms, request_id) rows, in one transaction."""
        async with self.driver.transaction() as tx:
            for row in rows:
                await tx.execute(
                    "INSERT INTO refusals (at, token, route, model, status, code, latency_ms, request_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )

    async def delete_refusals_before(self, at: float) -> int:
        """USAGE_RETENTION_DAYS: refusal rows older than ``at`` go, as the ledger's do."""
        async with self.driver.transaction() as tx:
            return await tx.execute("DELETE FROM refusals WHERE at < ?", (at,))

    async def spent_since(self, name: str, since: float) -> tuple[float, int]:
        """(US dollars, input + output tokens) of ``name``'s ledger rows since ``since`` (the written ones)."""
        rows = await self.driver.fetch(
            "SELECT COALESCE(SUM(usd), 0), COALESCE(SUM(input_tokens + output_tokens), 0) FROM usage "
            "WHERE token = ? AND at >= ?",
            (name, since),
        )
        return float(rows[0][0]), int(rows[0][1])

    async def last_active(self, names: list[str]) -> dict[str, float]:
        """When each name's latest ledger row was written (one indexed look-up per name)."""
        out = {}
        for name in names:
            rows = await self.driver.fetch("SELECT MAX(at) FROM usage WHERE token = ?", (name,))
            if rows and rows[0][0] is not None:
                out[name] = float(rows[0][0])
        return out


def _request_filter(filters: dict, upstream_ids: bool) -> tuple[str, list]:
    """WHERE of the Requests tab's filters; ``upstream_ids``: the table has ``upstream_request_id``
    (the ledger's; the refusals table keeps none)."""
    where, args = [], []
    if filters.get("request_id"):
        # The proxy's id (x-proxy-request-id), or the upstream's (the x-request-id an SDK reports).
        if upstream_ids:
            where.append("(request_id = ? OR upstream_request_id = ?)")
            args += [filters["request_id"]] * 2
        else:
            where.append("request_id = ?")
            args.append(filters["request_id"])
    if filters.get("name"):
        where.append("token = ?")
        args.append(filters["name"])
    if filters.get("model"):
        where.append("model = ?")
        args.append(filters["model"])
    status = filters.get("status")
    if status:
        if STATUS_CLASS_RE.match(status):
            low = int(status[0]) * 100
            where.append("status >= ? AND status < ?")
            args += [low, low + 100]
        else:
            where.append("status = ?")
            args.append(int(status))
    if filters.get("since") is not None:
        where.append("at >= ?")
        args.append(filters["since"])
    if filters.get("until") is not None:
        where.append("at < ?")
        args.append(filters["until"])
    return (" WHERE " + " AND ".join(where)) if where else "", args


def _token_args(row: dict) -> tuple:
    return (
        row["name"],
        row["token_sha256"],
        json.dumps(row["fields"]),
        row["created_at"],
        row["created_by"],
        row["updated_at"],
        row["updated_by"],
    )


def _audit_json(row: dict | None) -> str | None:
    """What the audit keeps of a row: its fields, never the digest (which identifies a value)."""
    if row is None:
        return None
    return json.dumps(row["fields"], sort_keys=True)


def make_console_store(url: str) -> ConsoleStore:
    """The store of USAGE_DATABASE, as the ledger reads it: ``postgresql://…`` or a SQLite file path."""
    if url.startswith(("postgresql://", "postgres://")):
        return ConsoleStore(_PostgresDriver(url))
    return ConsoleStore(_SqliteDriver(url.removeprefix("sqlite://")))
