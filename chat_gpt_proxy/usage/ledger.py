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

from .meter import Charge

log = logging.getLogger("chat_gpt_proxy")
# aiosqlite logs every statement with its values at DEBUG: one line per
# batch and per query, which LOG_LEVEL=DEBUG would turn into a flood.
logging.getLogger("aiosqlite").setLevel(logging.INFO)

COLUMNS = (
    "at",
    "token",
    "route",
    "model",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "usd",
    "estimated",
    "status",
    "request_id",
)
# Built from constants only: no value ever goes into the SQL text.
SQLITE_INSERT = "INSERT INTO usage (%s) VALUES (%s)" % (", ".join(COLUMNS), ", ".join("?" * len(COLUMNS)))  # noqa: S608
BATCH_ROWS = 500
FLUSH_SECONDS = 0.5
MAX_BACKOFF = 30.0

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
    estimated INTEGER NOT NULL,
    status INTEGER NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_token_at ON usage (token, at);
CREATE INDEX IF NOT EXISTS usage_at ON usage (at);
"""


def day_of(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d")


def row_of(charge: Charge) -> tuple:
    return tuple(getattr(charge, c) for c in COLUMNS)


class SqliteStore:
    """The ledger in a SQLite file, through aiosqlite (its own thread: an fsync never stalls a stream)."""

    def __init__(self, path: str):
        self.path = path
        self.db = None

    async def open(self) -> None:
        import aiosqlite

        self.db = await aiosqlite.connect(self.path)
        await self.db.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL: a committed batch survives a crash of
        # the process; only a power loss can take the last few.
        await self.db.execute("PRAGMA synchronous=NORMAL")
        await self.db.executescript(SQLITE_SCHEMA)
        await self.db.commit()

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()
            self.db = None

    async def reconnect(self) -> None:
        """Nothing to do: a file does not go away like a server (a full disk clears by itself)."""

    async def insert(self, rows: list[Charge]) -> None:
        await self.db.executemany(
            SQLITE_INSERT,
            [row_of(r) for r in rows],
        )
        await self.db.commit()

    async def spent_since(self, token: str, since: float) -> tuple[float, int]:
        async with self.db.execute(
            "SELECT COALESCE(SUM(usd), 0), COALESCE(SUM(input_tokens + output_tokens), 0) "
            "FROM usage WHERE token = ? AND at >= ?",
            (token, since),
        ) as cursor:
            usd, tokens = await cursor.fetchone()
        return float(usd), int(tokens)

    async def report(self, since: float, until: float) -> list[dict]:
        """Spend grouped by UTC day, token and model, for ``since <= at < until``."""
        async with self.db.execute(
            "SELECT date(at, 'unixepoch') AS day, token, model, COUNT(*), SUM(input_tokens), SUM(cached_tokens), "
            "SUM(output_tokens), SUM(usd), SUM(estimated) FROM usage WHERE at >= ? AND at < ? "
            "GROUP BY day, token, model ORDER BY day, token, model",
            (since, until),
        ) as cursor:
            rows = await cursor.fetchall()
        return [report_row(*row) for row in rows]

    async def delete_before(self, at: float) -> int:
        cursor = await self.db.execute("DELETE FROM usage WHERE at < ?", (at,))
        await self.db.commit()
        return cursor.rowcount


def report_row(day, token, model, requests, input_tokens, cached_tokens, output_tokens, usd, estimated) -> dict:
    return {
        "day": str(day),
        "token": token,
        "model": model,
        "requests": int(requests),
        "input_tokens": int(input_tokens),
        "cached_tokens": int(cached_tokens),
        "output_tokens": int(output_tokens),
        "usd": float(usd),
        "estimated": int(estimated),
    }


def make_store(url: str):
    """The store USAGE_DATABASE names: ``postgresql://…`` (or ``postgres://…``), else a SQLite file path."""
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url)
    return SqliteStore(url.removeprefix("sqlite://"))


class Ledger:
    """The bounded queue in front of a store, and the task that drains it."""

    def __init__(self, store, max_queue: int, metrics=None):
        self.store = store
        self.max_queue = max_queue
        self.metrics = metrics
        self.queue: collections.deque[Charge] = collections.deque()
        self.dropped = 0
        self.failing = False
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.closing = False
        # One flush at a time: the writer task and a report both flush, and
        # two would take (and write) the same first rows.
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        await self.store.open()
        self.task = asyncio.ensure_future(self._writer())

    def record(self, charge: Charge) -> None:
        """Queue a row; never blocks, never raises."""
        if len(self.queue) >= self.max_queue:
            self.dropped += 1
            if self.metrics is not None:
                self.metrics.ledger_dropped.inc()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "usage ledger queue full: %d rows dropped so far (the database is down or too slow; "
                    "budgets are still enforced in memory) last_request_id=%s",
                    self.dropped,
                    charge.request_id,
                )
            return
        self.queue.append(charge)
        # While the database fails, the writer keeps to its growing pause.
        if len(self.queue) >= BATCH_ROWS and not self.failing:
            self.wake.set()

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
        """Write what is queued, a batch at a time; False if the database refused (the rows stay queued)."""
        async with self.lock:
            return await self._flush()

    async def _flush(self) -> bool:
        while self.queue:
            batch = [self.queue[i] for i in range(min(BATCH_ROWS, len(self.queue)))]
            try:
                await self.store.insert(batch)
            except Exception as exc:  # any driver error: keep the rows, say so once, retry later
                if not self.failing:
                    log.warning(
                        "usage ledger: cannot write to the database (%s); %d rows kept in memory, retrying",
                        type(exc).__name__,
                        len(self.queue),
                    )
                self.failing = True
                self._gauge()
                with contextlib.suppress(Exception):
                    await self.store.reconnect()
                return False
            for _ in batch:
                self.queue.popleft()
            if self.failing:
                log.warning("usage ledger: the database is back; rows written")
                self.failing = False
        self._gauge()
        return True

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.ledger_queue.set(len(self.queue))

    async def spent_since(self, token: str, since: float) -> tuple[float, int]:
        """What the database and the rows not yet written say ``token`` spent since ``since``."""
        async with self.lock:  # no batch moves from the queue to the database meanwhile
            usd, tokens = await self.store.spent_since(token, since)
            queued = list(self.queue)
        for charge in queued:
            if charge.token == token and charge.at >= since:
                usd += charge.usd
                tokens += charge.tokens
        return usd, tokens

    async def report(self, since: float, until: float) -> list[dict]:
        await self.flush()
        return await self.store.report(since, until)

    async def delete_before(self, at: float) -> int:
        return await self.store.delete_before(at)

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is left (bounded by ``timeout``), then close the store."""
        self.closing = True
        self.wake.set()
        if self.task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self.task, timeout)
        if self.queue:
            log.warning("usage ledger: %d rows could not be written before shutdown", len(self.queue))
        await self.store.close()
