"""The usage ledger in PostgreSQL (USAGE_DATABASE=postgresql://…), for several instances sharing one ledger.

Why asyncpg: it speaks the protocol on the event loop itself (no thread, no
blocking call), a batch of rows goes as one pipelined ``executemany`` in one
transaction, and its pool replaces a dead connection on the next acquire, so
the ledger recovers by itself when the server comes back.

What the store does: the same five operations as ``SqliteStore`` (insert a
batch, what a token spent since a time, the report by UTC day, token and
model, delete old rows), with the same results: ``report`` rows are built by
``report_row`` and sorted bytewise (``COLLATE "C"``, NULL model first) as
SQLite sorts, whatever the database's collation. ``open`` creates the table
and its indexes when they are missing (under an advisory lock, so that
instances starting together do not race) and needs no CREATE privilege when
they exist. A batch is written once even when the connection breaks
during its COMMIT: the next attempt asks the server (``pg_xact_status``)
whether that transaction committed. The URL's password never appears in a
message of this module: errors name the server as
``postgresql://user@host:port/db``.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse

from .ledger import COLUMNS, REQUEST_COLUMNS, describe, report_row, row_of
from .meter import Charge

log = logging.getLogger("chat_gpt_proxy")

CONNECT_TIMEOUT = 5.0
# A batch or a budget look-up that takes longer is abandoned (the ledger keeps the rows and retries).
QUERY_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
POOL_MIN, POOL_MAX = 1, 4
# pg_advisory_xact_lock key: one instance at a time creates the schema.
SCHEMA_LOCK = 0x63677075  # "cgpu"

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id BIGSERIAL PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    token TEXT NOT NULL,
    route TEXT NOT NULL,
    model TEXT,
    input_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    usd DOUBLE PRECISION NOT NULL,
    usd_nanos BIGINT,
    estimated BOOLEAN NOT NULL,
    status INTEGER NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_token_at ON usage (token, at);
CREATE INDEX IF NOT EXISTS usage_at ON usage (at);
"""
# Migration step (see add_request_columns): nullable, so older rows stay as they are.
ADD_REQUEST_COLUMNS = """
ALTER TABLE usage ADD COLUMN IF NOT EXISTS upstream TEXT;
ALTER TABLE usage ADD COLUMN IF NOT EXISTS latency_ms DOUBLE PRECISION;
ALTER TABLE usage ADD COLUMN IF NOT EXISTS ttft_ms DOUBLE PRECISION;
ALTER TABLE usage ADD COLUMN IF NOT EXISTS cache TEXT;
ALTER TABLE usage ADD COLUMN IF NOT EXISTS upstream_request_id TEXT;
"""
SCHEMA_PRESENT = (
    "SELECT to_regclass('usage') IS NOT NULL AND to_regclass('usage_token_at') IS NOT NULL "
    "AND to_regclass('usage_at') IS NOT NULL AND EXISTS (SELECT 1 FROM pg_attribute "
    "WHERE attrelid = to_regclass('usage') AND attname = 'usd_nanos' AND NOT attisdropped)"
)
# A ledger an older release made: money in integers, its rows converted once.
MIGRATE = (
    "ALTER TABLE usage ADD COLUMN IF NOT EXISTS usd_nanos BIGINT; "
    "UPDATE usage SET usd_nanos = round(usd * 1e9)::bigint WHERE usd_nanos IS NULL"
)
NANOS = "COALESCE(usd_nanos, round(usd * 1e9)::bigint)"
# Built from constants only: no value ever goes into the SQL text.
INSERT = "INSERT INTO usage (%s) VALUES (%s)" % (  # noqa: S608
    ", ".join(COLUMNS),
    ", ".join("$%d" % (i + 1) for i in range(len(COLUMNS))),
)
SPENT = (
    "SELECT COALESCE(SUM(%s), 0)::bigint, COALESCE(SUM(input_tokens + output_tokens), 0)::bigint "  # noqa: S608
    "FROM usage WHERE token = $1 AND at >= $2" % NANOS
)
# Day as SQLite's date(at, 'unixepoch'); order as SQLite's (bytewise, NULL first).
REPORT_OF = (
    "SELECT to_char(to_timestamp(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, token, model, COUNT(*), "  # noqa: S608
    "SUM(input_tokens), SUM(cached_tokens), SUM(output_tokens), SUM(%s)::bigint, "
    "COUNT(*) FILTER (WHERE estimated) FROM usage WHERE at >= $1 AND at < $2 GROUP BY day, token, model "
    'ORDER BY day, token COLLATE "C", model COLLATE "C" NULLS FIRST'
)
REPORT = REPORT_OF % NANOS
# An older release's ledger, read as it is (the report command never migrates).
USD_NANOS_PRESENT = (
    "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('usage') AND attname = 'usd_nanos' "
    "AND NOT attisdropped)"
)


class _DriverLogFilter(logging.Filter):
    """asyncpg's pool logs a warning with a traceback each time it fails to reconnect in the
    background (several while the server is down). The store's failures are already told in the
    ledger's one warning line: the driver's own records become one DEBUG line each, without the
    traceback or the password."""

    def __init__(self, scrub):
        super().__init__()
        self.scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text = "%s (%s)" % (text, describe(record.exc_info[1]))
        record.msg, record.args = "postgresql driver: %s", (self.scrub(" ".join(text.split())[:300]),)
        record.exc_info = record.exc_text = record.stack_info = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        # The logger's level was checked before this filter ran: the handlers would print it at any level.
        return log.isEnabledFor(logging.DEBUG)


DRIVER_LOGGER = "asyncpg.pool"


class PostgresStoreError(Exception):
    """The store cannot open or is not open; the message names the server without its password."""


def _secrets_of(url: str) -> list[str]:
    """The password of ``url`` (its user-info part or a ``password=`` query parameter), as written and decoded."""
    found = []
    _, _, rest = url.partition("://")
    before_query = rest.split("?", 1)[0]
    # The user info ends at the host's "@"; a password written with a raw "/" or "@" is found too.
    for where in (before_query.split("/", 1)[0], before_query):
        userinfo, at, _ = where.rpartition("@")
        if at and ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])
    _, _, query = rest.partition("?")
    for name, value in urllib.parse.parse_qsl(query.split("#", 1)[0], keep_blank_values=True):
        if name == "password":
            found.append(value)
    for raw in list(found):
        found.append(urllib.parse.unquote(raw))
    # Longest first, so that a password that holds another is replaced whole.
    return sorted({s for s in found if s}, key=len, reverse=True)


def _where(url: str) -> str:
    """``postgresql://user@host:port/db``: the URL without its password and query."""
    try:
        parts = urllib.parse.urlsplit(url)
        user = ("%s@" % urllib.parse.unquote(parts.username)) if parts.username else ""
        return "%s://%s%s%s" % (parts.scheme, user, parts.netloc.rpartition("@")[2], parts.path)
    except ValueError:
        return "postgresql://(a URL that does not parse)"


class PostgresStore:
    """The ledger in PostgreSQL through an asyncpg pool (POOL_MIN to POOL_MAX connections)."""

    def __init__(self, url: str):
        self.url = url
        self._secrets = _secrets_of(url)
        self.where = self._scrub(_where(url))
        self.pool = None
        self.schema_ready = False
        # (transaction id, server pid, rows) of a batch that failed after BEGIN: written or not, unknown.
        self.in_doubt: tuple[str, int, list[Charge]] | None = None
        self.log_filter = _DriverLogFilter(self._scrub)
        self.report_sql = REPORT

    def __repr__(self) -> str:
        return "PostgresStore(%r)" % self.where

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _describe(self, exc: BaseException) -> str:
        return self._scrub("%s: %s" % (type(exc).__name__, exc)) if str(exc) else type(exc).__name__

    async def open(self) -> None:
        """Connect and create the table and its indexes if missing; PostgresStoreError if either fails."""
        try:
            self.pool = await self._create_pool()
            await self._ensure_schema()
        except Exception as exc:
            # ``from None``: the driver's exception is not shown with this one.
            raise self._not_opened(exc) from None

    async def open_read_only(self) -> None:
        """For the report command: every transaction read-only, no schema made or migrated, an older
        release's table read as it is."""
        try:
            self.pool = await self._create_pool(read_only=True)
            async with self.pool.acquire() as conn:
                if not await conn.fetchval(USD_NANOS_PRESENT):
                    self.report_sql = REPORT_OF % "round(usd * 1e9)::bigint"
            self.schema_ready = True
        except Exception as exc:
            # ``from None``: the driver's exception is not shown with this one.
            raise self._not_opened(exc) from None

    def _not_opened(self, exc: BaseException) -> PostgresStoreError:
        """Undo a half-done opening (the pool, the driver's log filter); the error to raise."""
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.terminate()
        logging.getLogger(DRIVER_LOGGER).removeFilter(self.log_filter)
        return PostgresStoreError("usage database %s: %s" % (self.where, self._describe(exc)))

    async def _create_pool(self, read_only: bool = False):
        import asyncpg

        logging.getLogger(DRIVER_LOGGER).addFilter(self.log_filter)  # once, however often called
        settings = {"application_name": "chat_gpt_proxy"}
        if read_only:
            settings["default_transaction_read_only"] = "on"
        return await asyncpg.create_pool(
            self.url,
            min_size=POOL_MIN,
            max_size=POOL_MAX,
            timeout=CONNECT_TIMEOUT,
            server_settings=settings,
        )

    async def _ensure_schema(self) -> None:
        async with self.pool.acquire() as conn:
            if not await conn.fetchval(SCHEMA_PRESENT):
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                    await conn.execute(SCHEMA)
                    status = await conn.execute(MIGRATE)
                converted = int(status.rsplit(" ", 1)[1])
                if converted:
                    log.info(
                        "usage database %s: money now kept in integer nano-dollars (%d rows converted)",
                        self.where,
                        converted,
                    )
            await self.add_request_columns(conn)
        self.schema_ready = True

    async def add_request_columns(self, conn) -> None:
        """Migration step: the Requests tab's columns, added to a ledger made before them (rows kept, NULL there)."""
        present = {
            r[0]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'usage' AND table_schema = current_schema()"
            )
        }
        if all(c in present for c in REQUEST_COLUMNS):
            return
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await conn.execute(ADD_REQUEST_COLUMNS)
        log.info("usage database %s: added the Requests tab's columns", self.where)

    def _pool(self):
        if self.pool is None or not self.schema_ready:
            raise PostgresStoreError("usage database %s: not connected" % self.where)
        return self.pool

    async def close(self) -> None:
        pool, self.pool = self.pool, None
        try:
            if pool is not None:
                await self._close(pool)
        finally:
            logging.getLogger(DRIVER_LOGGER).removeFilter(self.log_filter)

    async def _close(self, pool) -> None:
        try:
            # Waits for connections in use to come back; a hung query does not hold shutdown longer.
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
        except asyncio.CancelledError:
            pool.terminate()
            raise
        except Exception as exc:
            pool.terminate()
            log.warning("usage database %s: connections closed abruptly (%s)", self.where, self._describe(exc))

    async def reconnect(self) -> None:
        """After a failure: a new pool if there is none (or it closed), else fresh connections. Never raises."""
        try:
            if self.pool is None or self.pool.is_closing():
                old, self.pool = self.pool, None
                if old is not None:
                    old.terminate()
                self.pool = await self._create_pool()
            else:
                # Idle connections from before the failure are replaced on their next acquire.
                await self.pool.expire_connections()
            if not self.schema_ready:
                await self._ensure_schema()
        except Exception as exc:
            log.debug("usage database %s: reconnect failed (%s)", self.where, self._describe(exc))

    def describe(self, exc: BaseException) -> str:
        return self._scrub(describe(exc))

    def refuses(self, exc: BaseException) -> bool:
        """Whether ``exc`` is about the values of the rows: a data exception or an integrity
        violation (SQLSTATE classes 22 and 23, raised by asyncpg too for a value it cannot send).
        Anything else (the server down, a full disk, a lost permission) means: retry later."""
        if isinstance(exc, UnicodeError | OverflowError):
            return True
        import asyncpg

        return isinstance(exc, asyncpg.PostgresError) and str(getattr(exc, "sqlstate", "")).startswith(("22", "23"))

    async def insert(self, rows: list[Charge]) -> None:
        """One transaction per batch: all the rows are written or none, and none twice.

        A batch whose connection broke after BEGIN may still have committed
        (the server committed, its answer was lost): its transaction id is
        kept, and the next call asks the server what became of it before
        writing those rows again (the ledger retries with the same rows).
        """
        rows = await self._not_yet_written(rows)
        if not rows:
            return
        xid = pid = None
        committed = False
        try:
            async with self._pool().acquire(timeout=QUERY_TIMEOUT) as conn:
                async with conn.transaction():
                    xid = await conn.fetchval("SELECT pg_current_xact_id()::text")
                    pid = conn.get_server_pid()
                    await conn.executemany(INSERT, [row_of(r) for r in rows], timeout=QUERY_TIMEOUT)
                committed = True
            # Leaving ``acquire`` resets the connection for the pool: that can fail
            # after the COMMIT went through (the server shutting down meanwhile).
        except (Exception, asyncio.CancelledError) as exc:
            if committed and not isinstance(exc, asyncio.CancelledError):
                log.debug("usage database %s: batch written; connection dropped (%s)", self.where, type(exc).__name__)
                return
            if xid is not None:
                self.in_doubt = (xid, pid, rows)
            raise

    async def _not_yet_written(self, rows: list[Charge]) -> list[Charge]:
        """``rows`` without those of the batch in doubt (the same objects) if its transaction committed."""
        if self.in_doubt is None or not rows:
            return rows
        import asyncpg

        xid, pid, batch = self.in_doubt
        async with self._pool().acquire(timeout=QUERY_TIMEOUT) as conn:
            try:
                status = await conn.fetchval("SELECT pg_xact_status($1::text::xid8)", xid, timeout=QUERY_TIMEOUT)
            except asyncpg.InvalidParameterValueError:
                status = None  # "in the future": another server than the one that had it
            if status == "in progress":
                # Its client is gone (that was us): end the session, so that the transaction rolls back.
                if pid != conn.get_server_pid():
                    await conn.execute("SELECT pg_terminate_backend($1)", pid, timeout=QUERY_TIMEOUT)
                raise PostgresStoreError("usage database %s: the interrupted batch is still open" % self.where)
        self.in_doubt = None
        if status != "committed":
            return rows
        done = {id(r) for r in batch}
        log.info("usage database %s: a batch whose answer was lost had been written; not written again", self.where)
        return [r for r in rows if id(r) not in done]

    async def spent_since(self, token: str, since: float) -> tuple[int, int]:
        """Nano-dollars and tokens ``token`` spent since ``since``."""
        async with self._pool().acquire(timeout=QUERY_TIMEOUT) as conn:
            nanos, tokens = await conn.fetchrow(SPENT, token, since, timeout=QUERY_TIMEOUT)
        return int(nanos), int(tokens)

    async def report(self, since: float, until: float) -> list[dict]:
        """Spend grouped by UTC day, token and model, for ``since <= at < until``."""
        async with self._pool().acquire() as conn:
            rows = await conn.fetch(self.report_sql, since, until)
        return [report_row(*row) for row in rows]

    async def delete_before(self, at: float) -> int:
        async with self._pool().acquire() as conn:
            status = await conn.execute("DELETE FROM usage WHERE at < $1", at)
        return int(status.rsplit(" ", 1)[1])
