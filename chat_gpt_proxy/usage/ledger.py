"""The durable usage ledger: one row per charged request, written in batches off the event loop.

``Ledger.record`` only appends to a bounded in-memory queue; a background
task writes what is queued in one transaction per batch. The database never
blocks or fails a request: SQLite runs in aiosqlite's thread, PostgreSQL
through asyncpg. When the database is slow or down the queue holds the rows
(up to USAGE_QUEUE_ROWS) and the writer retries with a growing pause; budgets
are enforced from the in-memory counters meanwhile. Rows that did not fit
are counted (``proxy_usage_rows_dropped_total``) and logged, never lost
silently.

Backends: ``SqliteStore`` (a file path in USAGE_DATABASE; WAL mode so that
the report command reads while the server writes) and
``PostgresStore`` (chat_gpt_proxy/usage/postgres.py, ``postgresql://…``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging
import os
import time

from .meter import Charge
from .storable import to_usd

log = logging.getLogger("chat_gpt_proxy")
# aiosqlite logs every statement with its values at DEBUG: one line per
# batch and per query, which LOG_LEVEL=DEBUG would turn into a flood.
logging.getLogger("aiosqlite").setLevel(logging.INFO)

# Added by the migration step ``add_request_columns`` (the admin page's Requests tab); NULL in older rows.
REQUEST_COLUMNS = ("upstream", "latency_ms", "ttft_ms", "cache", "upstream_request_id")
REQUEST_COLUMN_TYPES = {
    "upstream": "TEXT",
    "latency_ms": "REAL",
    "ttft_ms": "REAL",
    "cache": "TEXT",
    "upstream_request_id": "TEXT",
}
COLUMNS = (
    "at",
    "token",
    "route",
    "model",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "usd",
    "usd_nanos",
    "estimated",
    "status",
    "request_id",
    *REQUEST_COLUMNS,
)
# Built from constants only: no value ever goes into the SQL text.
SQLITE_INSERT = "INSERT INTO usage (%s) VALUES (%s)" % (", ".join(COLUMNS), ", ".join("?" * len(COLUMNS)))  # noqa: S608
BATCH_ROWS = 500
FLUSH_SECONDS = 0.5
MAX_BACKOFF = 30.0
# Rows dropped (full queue, refused by the database) are logged for the first and every this many.
LOG_EVERY = 1000
# (time, rows done) of the last batches written: when a row reached the database (Ledger.written_before).
COMMITS_KEPT = 4096

# ``usd_nanos`` holds the money (an exact integer); ``usd`` the same in dollars, for older releases
# sharing the database and queries by hand. A row an older release wrote has no ``usd_nanos``.
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    token TEXT NOT NULL,
    route TEXT NOT NULL,
    model TEXT,
    input_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    usd REAL NOT NULL,
    usd_nanos INTEGER,
    estimated INTEGER NOT NULL,
    status INTEGER NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_token_at ON usage (token, at);
CREATE INDEX IF NOT EXISTS usage_at ON usage (at);
"""
SQLITE_NANOS = "COALESCE(usd_nanos, CAST(round(usd * 1000000000) AS INTEGER))"
SQLITE_MIGRATE = (
    "ALTER TABLE usage ADD COLUMN usd_nanos INTEGER",
    "UPDATE usage SET usd_nanos = CAST(round(usd * 1000000000) AS INTEGER) WHERE usd_nanos IS NULL",
)
# The WAL is checkpointed every this many pages (256 KiB) and cut back to this size after (SQLite
# keeps it at its largest otherwise). SQLite's default, 1000 pages, lets the WAL take 4 MiB on top of
# the data: on a disk nearly full it fills the disk before the checkpoint that would move it into the
# database, which then has no room to grow (measured on a 2 MiB volume: most rows lost).
SQLITE_WAL_LIMIT = 256 << 10
SQLITE_AUTOCHECKPOINT = 64


def day_of(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d")


def row_of(charge: Charge) -> tuple:
    return (
        charge.at,
        charge.token,
        charge.route,
        charge.model,
        charge.input_tokens,
        charge.cached_tokens,
        charge.output_tokens,
        to_usd(charge.nanos),
        charge.nanos,
        charge.estimated,
        charge.status,
        charge.request_id,
        *(getattr(charge, c) for c in REQUEST_COLUMNS),
    )


class SqliteStore:
    """The ledger in a SQLite file, through aiosqlite (its own thread: an fsync never stalls a stream)."""

    def __init__(self, path: str):
        self.path = path
        self.db = None
        # The money of a row, in SQL: an older release's ledger opened read-only has no usd_nanos.
        self.nanos = SQLITE_NANOS

    async def open(self) -> None:
        import aiosqlite

        connection = aiosqlite.connect(self.path)
        try:
            self.db = await connection
        except BaseException:
            # aiosqlite stops its thread on a failed connect without waiting: the thread's last answer would
            # then reach a closed event loop (a traceback after the exit line). Wait for it, briefly.
            thread = getattr(connection, "_thread", None)
            for _ in range(200):
                if thread is None or not thread.is_alive():
                    break
                await asyncio.sleep(0.01)
            raise
        try:
            await self._prepare()
        except BaseException:
            # aiosqlite's thread is not a daemon: left open, it keeps the process alive after its exit line.
            await self.close()
            raise

    async def open_read_only(self) -> None:
        """For the report command: read the file as it is, older schemas included; never write it."""
        import urllib.parse

        import aiosqlite

        uri = "file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(self.path))
        connection = aiosqlite.connect(uri, uri=True)
        self.db = await connection
        try:
            async with self.db.execute("PRAGMA table_info(usage)") as cursor:
                columns = {row[1] for row in await cursor.fetchall()}
        except BaseException:
            await self.close()
            raise
        if "usd_nanos" not in columns:
            self.nanos = "CAST(round(usd * 1000000000) AS INTEGER)"

    async def _prepare(self) -> None:
        await self.db.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL: a committed batch survives a crash of
        # the process; only a power loss can take the last few.
        await self.db.execute("PRAGMA synchronous=NORMAL")
        await self.db.execute("PRAGMA journal_size_limit=%d" % SQLITE_WAL_LIMIT)
        await self.db.execute("PRAGMA wal_autocheckpoint=%d" % SQLITE_AUTOCHECKPOINT)
        await self.db.executescript(SQLITE_SCHEMA)
        await self.db.commit()
        await self._migrate()
        await self.add_request_columns()

    async def _migrate(self) -> None:
        """Money in integers for a ledger an older release made; one process at a time (BEGIN IMMEDIATE)."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            async with self.db.execute("PRAGMA table_info(usage)") as cursor:
                columns = {row[1] for row in await cursor.fetchall()}
            if "usd_nanos" not in columns:
                await self.db.execute(SQLITE_MIGRATE[0])
                cursor = await self.db.execute(SQLITE_MIGRATE[1])
                log.info("usage ledger: money now kept in integer nano-dollars (%d rows converted)", cursor.rowcount)
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise

    async def add_request_columns(self) -> None:
        """Migration step: the Requests tab's columns, added to a ledger made before them (rows kept,
        NULL there); one process at a time (BEGIN IMMEDIATE), as ``_migrate``."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            async with self.db.execute("PRAGMA table_info(usage)") as cursor:
                present = {row[1] for row in await cursor.fetchall()}
            missing = [c for c in REQUEST_COLUMNS if c not in present]
            for column in missing:
                # Names and types are constants of this module.
                await self.db.execute("ALTER TABLE usage ADD COLUMN %s %s" % (column, REQUEST_COLUMN_TYPES[column]))
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise
        if missing:
            log.info("usage ledger: added the columns %s", ", ".join(missing))

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()
            self.db = None

    async def reconnect(self) -> None:
        """After a failed write (a full disk): copy the WAL into the database and cut it to nothing,
        which gives its space back once the database file can grow; else fails, tried again later."""
        import sqlite3

        with contextlib.suppress(sqlite3.Error):
            await self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def describe(self, exc: BaseException) -> str:
        return describe(exc)

    def refuses(self, exc: BaseException) -> bool:
        """Whether ``exc`` is about the values of the rows (False: the database cannot write now)."""
        import sqlite3

        return isinstance(exc, UnicodeError | OverflowError | sqlite3.DataError | sqlite3.IntegrityError)

    async def insert(self, rows: list[Charge]) -> None:
        try:
            await self.db.executemany(SQLITE_INSERT, [row_of(r) for r in rows])
            await self.db.commit()
        except Exception:
            # A full disk may leave the transaction open with part of the batch in it:
            # the retry must not commit those rows a second time.
            with contextlib.suppress(Exception):
                await self.db.rollback()
            raise

    async def spent_since(self, token: str, since: float) -> tuple[int, int]:
        """Nano-dollars and tokens ``token`` spent since ``since``."""
        async with self.db.execute(
            "SELECT COALESCE(SUM(%s), 0), COALESCE(SUM(input_tokens + output_tokens), 0) "  # noqa: S608
            "FROM usage WHERE token = ? AND at >= ?" % SQLITE_NANOS,
            (token, since),
        ) as cursor:
            nanos, tokens = await cursor.fetchone()
        return int(nanos), int(tokens)

    async def report(self, since: float, until: float) -> list[dict]:
        """Spend grouped by UTC day, token and model, for ``since <= at < until``."""
        async with self.db.execute(
            "SELECT date(at, 'unixepoch') AS day, token, model, COUNT(*), SUM(input_tokens), SUM(cached_tokens), "  # noqa: S608
            "SUM(output_tokens), SUM(%s), SUM(estimated) FROM usage WHERE at >= ? AND at < ? "
            "GROUP BY day, token, model ORDER BY day, token, model" % self.nanos,
            (since, until),
        ) as cursor:
            rows = await cursor.fetchall()
        return [report_row(*row) for row in rows]

    async def delete_before(self, at: float) -> int:
        cursor = await self.db.execute("DELETE FROM usage WHERE at < ?", (at,))
        await self.db.commit()
        return cursor.rowcount


def report_row(day, token, model, requests, input_tokens, cached_tokens, output_tokens, nanos, estimated) -> dict:
    return {
        "day": str(day),
        "token": token,
        "model": model,
        "requests": int(requests),
        "input_tokens": int(input_tokens),
        "cached_tokens": int(cached_tokens),
        "output_tokens": int(output_tokens),
        "usd": to_usd(int(nanos)),
        "estimated": int(estimated),
    }


def make_store(url: str):
    """The store USAGE_DATABASE names: ``postgresql://…`` (or ``postgres://…``), else a SQLite file path."""
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url)
    return SqliteStore(url.removeprefix("sqlite://"))


class Ledger:
    """The bounded queue in front of a store, and the task that drains it.

    Every row recorded ends in exactly one of: the database, or
    ``proxy_usage_rows_dropped_total`` with a log line (the queue was full,
    the database refused that row alone, or it was still unwritten at
    shutdown).
    """

    def __init__(self, store, max_queue: int, metrics=None):
        self.store = store
        self.max_queue = max_queue
        self.metrics = metrics
        self.queue: collections.deque[Charge] = collections.deque()
        self.dropped = 0  # all rows lost, whatever the reason
        self.full = 0  # ... because the queue was full
        self.refused = 0  # ... because the database refused the row
        self.recorded = 0  # rows recorded since start: the next row's sequence number
        self.done = 0  # rows taken off the queue (written, or refused)
        self.commits: collections.deque[tuple[float, int]] = collections.deque(maxlen=COMMITS_KEPT)
        self.failing = False
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.closing = False
        # One flush at a time: the writer task and a report both flush, and
        # two would take (and write) the same first rows.
        self.lock = asyncio.Lock()
        if metrics is not None:
            # Read at each scrape: the rows waiting now, not at the last write.
            metrics.ledger_queue.set_function(lambda: len(self.queue))

    async def start(self) -> None:
        await self.store.open()
        self.task = asyncio.ensure_future(self._writer())

    def record(self, charge: Charge) -> int | None:
        """Queue a row; never blocks, never raises. Its sequence number, or None if it was dropped."""
        if len(self.queue) >= self.max_queue:
            self.full += 1
            self._lost(1)
            if self.full == 1 or self.full % LOG_EVERY == 0:
                log.warning(
                    "usage ledger queue full: %d rows dropped so far (the database is down or too slow; "
                    "budgets are still enforced in memory) last_request_id=%s",
                    self.full,
                    charge.request_id,
                )
            return None
        self.queue.append(charge)
        seq = self.recorded
        self.recorded += 1
        # While the database fails, the writer keeps to its growing pause.
        if len(self.queue) >= BATCH_ROWS and not self.failing:
            self.wake.set()
        return seq

    def written_before(self, seq: int, at: float) -> bool:
        """Whether row ``seq`` was in the database (or refused) by wall-clock time ``at``."""
        done = 0
        for when, count in self.commits:
            if when >= at:
                break
            done = count
        return seq < done

    def _lost(self, rows: int) -> None:
        self.dropped += rows
        if self.metrics is not None:
            self.metrics.ledger_dropped.inc(rows)

    async def _writer(self) -> None:
        backoff = FLUSH_SECONDS
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), FLUSH_SECONDS if not self.failing else backoff)
            self.wake.clear()
            try:
                ok = await self.flush()
            except Exception:  # a bug must not stop every later write silently
                log.exception("usage ledger: the writer failed; retrying")
                ok = False
            if self.closing:
                return
            backoff = FLUSH_SECONDS if ok else min(MAX_BACKOFF, backoff * 2)

    async def flush(self) -> bool:
        """Write what is queued, a batch at a time; False if the database cannot write (the rows stay queued)."""
        async with self.lock:
            return await self._flush()

    async def _flush(self) -> bool:
        while self.queue:
            batch = [self.queue[i] for i in range(min(BATCH_ROWS, len(self.queue)))]
            try:
                await self._write(batch)
            except Exception as exc:  # the database cannot write now: keep the rows, say so once, retry later
                if not self.failing:
                    log.warning(
                        "usage ledger: cannot write to the database (%s); %d rows kept in memory, retrying",
                        self.store.describe(exc),
                        len(self.queue),
                    )
                self.failing = True
                with contextlib.suppress(Exception):
                    await self.store.reconnect()
                return False
            if self.failing:
                log.warning("usage ledger: the database is back; writing the %d rows kept", len(self.queue))
                self.failing = False
        return True

    async def _write(self, rows: list[Charge]) -> None:
        """Write ``rows``, the first of the queue, and take them off it; rows the database refuses
        (found by halving the batch) are dropped alone. Raises while the database cannot write."""
        try:
            await self.store.insert(rows)
        except Exception as exc:
            if not self.store.refuses(exc):
                raise
            if len(rows) > 1:
                half = len(rows) // 2
                await self._write(rows[:half])
                await self._write(rows[half:])
                return
            self._refuse(rows[0], exc)
        for _ in rows:
            self.queue.popleft()
        self.done += len(rows)
        self.commits.append((time.time(), self.done))

    def _refuse(self, row: Charge, exc: BaseException) -> None:
        self.refused += 1
        self._lost(1)
        if self.refused == 1 or self.refused % LOG_EVERY == 0:
            log.warning(
                "usage ledger: the database refused a row (%s); dropped, %d rows refused so far request_id=%s token=%s",
                describe(exc),
                self.refused,
                row.request_id,
                row.token,
            )

    async def spent_since(self, token: str, since: float) -> tuple[int, int]:
        """Nano-dollars and tokens the database and the rows not yet written say ``token`` spent since ``since``."""
        async with self.lock:  # no batch moves from the queue to the database meanwhile
            nanos, tokens = await self.store.spent_since(token, since)
            queued = list(self.queue)
        for charge in queued:
            if charge.token == token and charge.at >= since:
                nanos += charge.nanos
                tokens += charge.tokens
        return nanos, tokens

    async def report(self, since: float, until: float) -> list[dict]:
        await self.flush()
        return await self.store.report(since, until)

    async def delete_before(self, at: float) -> int:
        return await self.store.delete_before(at)

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is left (bounded by ``timeout``), count what could not be, then close the store."""
        self.closing = True
        self.wake.set()
        if self.task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self.task, timeout)
        left = len(self.queue)
        if left:
            self.queue.clear()
            self._lost(left)
            log.warning("usage ledger: %d rows could not be written before shutdown and are lost", left)
        if self.dropped:
            log.warning(
                "usage ledger: %d rows lost since start (queue full: %d, refused by the database: %d, "
                "unwritten at shutdown: %d); see proxy_usage_rows_dropped_total",
                self.dropped,
                self.full,
                self.refused,
                left,
            )
        await self.store.close()


def describe(exc: BaseException) -> str:
    """One line for a driver's error: its type and the start of its message."""
    text = " ".join(str(exc).split())[:200]
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__
