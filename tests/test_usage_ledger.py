"""The usage ledger: SqliteStore and PostgresStore held to one contract, and the Ledger in front of either.

Every contract test runs twice: on a SQLite file in tmp_path and on a new
PostgreSQL database of the session's throwaway server (tests/postgres_server.py).
The PostgreSQL databases collate with ICU ``en-US``, where ``_z``, ``alice``,
``Bob`` sort unlike SQLite's bytewise order, so that both stores giving the
same report rows in the same order means something. Then PostgreSQL alone: the
server stopped and started again while rows are recorded, a connection broken
at a batch's COMMIT (through a relay, CommitCutter) writing the batch once, no
message holding the URL's password, instances starting together, a role
without CREATE.
"""

import asyncio
import logging
import os
import subprocess
import sys
import time
import traceback
import urllib.parse

import aiosqlite
import asyncpg
import pytest

from chat_gpt_proxy.usage import ledger as ledger_module
from chat_gpt_proxy.usage.ledger import BATCH_ROWS, Ledger, SqliteStore, make_store
from chat_gpt_proxy.usage.meter import Charge
from chat_gpt_proxy.usage.postgres import PostgresStore, PostgresStoreError
from tests.conftest import new_database
from tests.procs import ROOT, free_port

# 2023-11-15 00:00:00 UTC.
DAY = 1_700_006_400.0
FOREVER = (0.0, 4_000_000_000.0)


def charge(at, token="alice", model="gpt-4o", tokens=(10, 0, 5), usd=0.25, estimated=False, request_id="req"):
    """Prices that are exact binary fractions: sums compare with == on both stores."""
    input_tokens, cached_tokens, output_tokens = tokens
    return Charge(
        at, token, "/v1/chat/completions", model, input_tokens, cached_tokens, output_tokens, usd, estimated, 200,
        request_id,
    )  # fmt: skip


@pytest.fixture
def pg_url(postgres_server):  # noqa: F811
    name, url = new_database(postgres_server)
    yield url
    postgres_server.drop_database(name)


@pytest.fixture
def store(ledger_url, io_loop):
    opened = make_store(ledger_url)
    io_loop.run_sync(opened.open, timeout=30)
    yield opened
    io_loop.run_sync(opened.close, timeout=30)


@pytest.fixture
def ledgers(io_loop):
    """Ledgers made by the test, closed at the end whatever happened (closing twice is harmless)."""
    made = []

    def make(store, max_queue=100_000, metrics=None):
        made.append(Ledger(store, max_queue, metrics))
        return made[-1]

    yield make
    for ledger in made:
        io_loop.run_sync(ledger.close, timeout=30)


class Counter:
    def __init__(self):
        self.value = 0

    def inc(self, amount=1):
        self.value += amount

    def set(self, value):
        self.value = value


class Gauge:
    """A gauge read through its function, as prometheus_client's ``set_function`` is at each scrape."""

    def __init__(self):
        self.function = None

    def set_function(self, function):
        self.function = function

    @property
    def value(self):
        return self.function()


class FakeMetrics:
    """The two instruments the Ledger uses (chat_gpt_proxy/observability.py Metrics has them)."""

    def __init__(self):
        self.ledger_dropped = Counter()
        self.ledger_queue = Gauge()


async def request_ids(url) -> list[str]:
    """Every row's request_id, through a connection of its own (not the store under test)."""
    if url.startswith("postgresql://"):
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return [r[0] for r in await conn.fetch("SELECT request_id FROM usage ORDER BY id")]
        finally:
            await conn.close()
    async with aiosqlite.connect(url) as db, db.execute("SELECT request_id FROM usage ORDER BY id") as cursor:
        return [r[0] for r in await cursor.fetchall()]


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within %s s: %s" % (timeout, what)
        await asyncio.sleep(0.02)


def test_make_store_picks_the_backend_from_the_url():
    for url in ("postgresql://app@127.0.0.1:5432/usage", "postgres://app:pw@db.internal/usage"):
        store = make_store(url)
        assert isinstance(store, PostgresStore) and store.url == url
    store = make_store("/var/lib/chat_gpt_proxy/usage.db")
    assert isinstance(store, SqliteStore) and store.path == "/var/lib/chat_gpt_proxy/usage.db"


@pytest.mark.parametrize(
    "url, password",
    [
        ("postgresql://app:pg-PASS-1@db.internal:5433/usage", "pg-PASS-1"),
        ("postgresql://app:pg%2FPASS%402@db.internal:5433/usage", "pg/PASS@2"),
        ("postgresql://app:pg@PASS@3@db.internal:5433/usage", "pg@PASS@3"),
        ("postgresql://app:pg/PASS@4@db.internal:5433/usage", "pg/PASS@4"),  # not even a valid URL
        ("postgresql://app@db.internal:5433/usage?sslmode=require&password=pg-PASS-5", "pg-PASS-5"),
    ],
)
def test_a_postgres_store_names_its_server_without_the_password(url, password):
    store = PostgresStore(url)
    assert store.where.startswith("postgresql://app") and "5433/usage" in store.where
    for shown in (store.where, repr(store), str(PostgresStoreError(store.where))):
        assert password not in shown and urllib.parse.quote(password, safe="") not in shown


# -- the stores' contract, on both backends


@pytest.mark.gen_test(timeout=30)
async def test_spent_since_sums_one_token_from_a_time_on(store):
    await store.insert(
        [
            charge(DAY - 10, usd=0.5, tokens=(10, 0, 5)),
            charge(DAY, usd=0.25, tokens=(100, 50, 20)),  # cached tokens are part of the input, not added
            charge(DAY + 5, usd=0.125, tokens=(1, 0, 1)),
            charge(DAY + 1, token="bob", usd=8.0, tokens=(1000, 0, 1000)),
            charge(DAY + 2, token="Alice", usd=1.0, tokens=(3, 0, 3)),  # another token: case matters
        ]
    )
    assert await store.spent_since("alice", DAY) == (375_000_000, 122)  # at == since counts; nano-dollars
    assert await store.spent_since("alice", DAY - 100) == (875_000_000, 137)
    assert await store.spent_since("bob", DAY) == (8_000_000_000, 2000)
    nothing = await store.spent_since("alice", DAY + 6)
    assert nothing == (0, 0) and type(nothing[0]) is int and type(nothing[1]) is int
    assert await store.spent_since("carol", 0.0) == (0, 0)


@pytest.mark.gen_test(timeout=30)
async def test_report_groups_by_utc_day_token_and_model_in_byte_order(store):
    last_second = DAY - 0.5  # 2023-11-14 23:59:59.5 UTC
    await store.insert(
        [
            charge(DAY - 86400, token="alice", request_id="since"),  # at == since: in
            charge(last_second, token="alice", model="gpt-4o", usd=0.5, tokens=(7, 3, 2)),
            charge(last_second, token="alice", model="gpt-4o", usd=0.25, tokens=(1, 0, 1), estimated=True),
            charge(DAY, token="alice", model="gpt-4o", usd=0.125, tokens=(5, 0, 5)),
            charge(DAY + 60, token="alice", model=None, usd=0.0, tokens=(4, 0, 4), estimated=True),
            charge(DAY + 60, token="alice", model="gpt-4o-mini", usd=0.0625, tokens=(2, 1, 2)),
            charge(DAY + 120, token="_z", model="gpt-4o", usd=2.0, tokens=(9, 0, 9)),
            charge(DAY + 180, token="Bob", model="o3", usd=1.5, tokens=(6, 0, 6), estimated=True),
            charge(DAY + 240, token="Bob", model="gpt-4o", usd=1.5, tokens=(6, 6, 6)),
            charge(DAY + 86400, token="alice", request_id="until"),  # at == until: out
        ]
    )

    def row(day, token, model, requests, i, c, o, usd, estimated):
        return dict(
            day=day, token=token, model=model, requests=requests, input_tokens=i, cached_tokens=c, output_tokens=o,
            usd=usd, estimated=estimated,
        )  # fmt: skip

    assert await store.report(DAY - 86400, DAY + 86400) == [
        row("2023-11-14", "alice", "gpt-4o", 3, 18, 3, 8, 1.0, 1),
        # Bytewise, as SQLite sorts: upper case, then "_", then lower case; no model first.
        row("2023-11-15", "Bob", "gpt-4o", 1, 6, 6, 6, 1.5, 0),
        row("2023-11-15", "Bob", "o3", 1, 6, 0, 6, 1.5, 1),
        row("2023-11-15", "_z", "gpt-4o", 1, 9, 0, 9, 2.0, 0),
        row("2023-11-15", "alice", None, 1, 4, 0, 4, 0.0, 1),
        row("2023-11-15", "alice", "gpt-4o", 1, 5, 0, 5, 0.125, 0),
        row("2023-11-15", "alice", "gpt-4o-mini", 1, 2, 1, 2, 0.0625, 0),
    ]
    assert await store.report(DAY + 86400 * 2, DAY + 86400 * 3) == []


@pytest.mark.gen_test(timeout=30)
async def test_delete_before_removes_only_older_rows_and_says_how_many(store):
    await store.insert([charge(DAY + offset, request_id=str(offset)) for offset in (-2, -1, 0, 1)])
    assert await store.delete_before(DAY) == 2
    assert await store.delete_before(DAY) == 0
    assert await store.spent_since("alice", 0.0) == (500_000_000, 30)
    assert [r["requests"] for r in await store.report(*FOREVER)] == [2]


# -- the Ledger in front of either store


@pytest.mark.gen_test(timeout=30)
async def test_the_writer_task_writes_recorded_rows_in_batches_after_start(ledger_url, ledgers):
    store = make_store(ledger_url)
    batches = []
    insert = store.insert

    async def counted_insert(rows):
        await insert(rows)
        batches.append(len(rows))

    store.insert = counted_insert
    ledger = ledgers(store)
    total = 2 * BATCH_ROWS + 200
    for i in range(total):
        ledger.record(charge(DAY + i, request_id="r%d" % i))
    await asyncio.sleep(0.1)
    assert batches == [] and len(ledger.queue) == total  # nothing is written before start()
    await ledger.start()
    await until(lambda: not ledger.queue, 10, "the writer drains the queue")
    assert batches == [BATCH_ROWS, BATCH_ROWS, 200]
    # A few rows more: written within FLUSH_SECONDS, without a flush() or close() from here.
    for i in range(3):
        ledger.record(charge(DAY + total + i, request_id="late%d" % i))
    await until(lambda: not ledger.queue, 5, "the writer writes a small batch on its timer")
    assert batches == [BATCH_ROWS, BATCH_ROWS, 200, 3]
    assert await request_ids(ledger_url) == ["r%d" % i for i in range(total)] + ["late0", "late1", "late2"]
    assert await ledger.spent_since("alice", 0.0) == ((total + 3) * 250_000_000, (total + 3) * 15)


@pytest.mark.gen_test(timeout=30)
async def test_close_writes_what_is_left(ledger_url, ledgers):
    ledger = ledgers(make_store(ledger_url))
    await ledger.start()
    for i in range(7):
        ledger.record(charge(DAY + i, request_id="r%d" % i))
    # Straight away: the writer's timer has not fired; close() must write them.
    await ledger.close()
    assert not ledger.queue
    assert await request_ids(ledger_url) == ["r%d" % i for i in range(7)]


@pytest.mark.gen_test(timeout=30)
async def test_a_full_queue_drops_counts_exactly_and_never_raises(ledger_url, ledgers, caplog):
    metrics = FakeMetrics()
    ledger = ledgers(make_store(ledger_url), max_queue=10, metrics=metrics)
    for i in range(25):
        ledger.record(charge(DAY + i, request_id="r%d" % i))
    assert len(ledger.queue) == 10
    assert ledger.dropped == 15 and metrics.ledger_dropped.value == 15
    full = [r for r in caplog.records if "queue full" in r.getMessage()]
    assert len(full) == 1 and full[0].levelno == logging.WARNING  # said once, not 15 times
    await ledger.start()
    await ledger.close()
    # The first ten were kept; the others were never queued.
    assert await request_ids(ledger_url) == ["r%d" % i for i in range(10)]
    assert metrics.ledger_queue.value == 0


# -- PostgreSQL only


@pytest.mark.gen_test(timeout=90)
async def test_postgres_stopped_mid_load_loses_no_row(postgres_server, pg_url, ledgers, monkeypatch):  # noqa: F811
    # The writer's pause after failures is capped at 1 s here (30 s in production): the test waits less.
    monkeypatch.setattr(ledger_module, "MAX_BACKOFF", 1.0)
    loop = asyncio.get_running_loop()
    ledger = ledgers(make_store(pg_url))
    await ledger.start()
    recorded: list[str] = []
    raised: list[BaseException] = []
    loading = True

    async def load():
        """About 2000 rows a second, as a busy proxy would charge them."""
        while loading:
            for _ in range(20):
                request_id = "r%d" % len(recorded)
                try:
                    ledger.record(charge(time.time(), request_id=request_id))
                except BaseException as exc:  # record() must never raise: collected, asserted below
                    raised.append(exc)
                recorded.append(request_id)
            await asyncio.sleep(0.01)

    loader = asyncio.ensure_future(load())
    try:
        await asyncio.sleep(0.8)
        written_before = len(await request_ids(pg_url))
        assert written_before > 0, "the writer writes while the server is up"
        await loop.run_in_executor(None, postgres_server.stop)
        await asyncio.sleep(1.5)
        assert ledger.failing, "the writer noticed the server is gone"
        queued_while_down = len(ledger.queue)
        assert queued_while_down > BATCH_ROWS
        await loop.run_in_executor(None, postgres_server.start)
        await asyncio.sleep(0.5)
    finally:
        loading = False
        await loader
        if not postgres_server.running:
            await loop.run_in_executor(None, postgres_server.start)
    # No flush() or close() from here: the writer catches up by itself.
    await until(lambda: not ledger.queue and not ledger.failing, 20, "the writer empties the queue once it is back")
    assert raised == []
    assert ledger.dropped == 0
    ids = await request_ids(pg_url)
    assert len(ids) == len(recorded), "rows recorded %d, in the table %d" % (len(recorded), len(ids))
    assert sorted(ids) == sorted(recorded)  # none lost, none written twice


READY = b"Z\x00\x00\x00\x05"
# What a backend sends when the server shuts down under it (pg_ctl stop -m fast).
_FIELDS = b"SFATAL\x00VFATAL\x00C57P01\x00Mterminating connection due to administrator command\x00\x00"
FATAL = b"E" + (4 + len(_FIELDS)).to_bytes(4, "big") + _FIELDS


class CommitCutter:
    """A TCP relay to PostgreSQL that breaks one connection at its next COMMIT, once armed.

    ``lose_reply``: the COMMIT reaches the server, its answer never reaches the
    client (the connection drops). ``fatal_after_reply``: the answer arrives,
    then the FATAL of a server shutting down, as it happens at a fast stop.
    Either way the rows are in the table while the client saw an error.
    ``hold_open``: the client's side drops before the COMMIT is relayed, the
    server's stays open: the transaction is neither committed nor aborted.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.armed: str | None = None
        self.cuts = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _relay(self, client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [client_writer, server_writer]
        cut = None

        async def up():
            nonlocal cut
            while data := await client_reader.read(65536):
                if self.armed and cut is None and b"COMMIT;\x00" in data:
                    cut, self.armed = self.armed, None
                    if cut == "hold_open":
                        self.cuts += 1
                        client_writer.close()
                        return
                server_writer.write(data)
                await server_writer.drain()

        async def down():
            while data := await server_reader.read(65536):
                if cut == "lose_reply":
                    break
                if cut == "fatal_after_reply" and READY in data:
                    client_writer.write(data + FATAL)
                    await client_writer.drain()
                    break
                client_writer.write(data)
                await client_writer.drain()
            if cut in ("lose_reply", "fatal_after_reply"):
                self.cuts += 1
            client_writer.close()
            server_writer.close()

        await asyncio.gather(up(), down(), return_exceptions=True)

    async def close(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


@pytest.mark.parametrize("cut", ["lose_reply", "fatal_after_reply", "hold_open"])
@pytest.mark.gen_test(timeout=30)
async def test_postgres_a_batch_whose_commit_answer_is_lost_is_written_once(
    postgres_server,  # noqa: F811
    pg_url,
    ledgers,
    cut,
):
    cutter = CommitCutter(postgres_server.port)
    await cutter.start()
    try:
        ledger = ledgers(PostgresStore(pg_url.replace(":%d/" % postgres_server.port, ":%d/" % cutter.port)))
        await ledger.start()
        cutter.armed = cut
        for i in range(10):
            ledger.record(charge(DAY + i, request_id="r%d" % i))
        await until(lambda: cutter.cuts == 1, 5, "the relay breaks the batch's connection at its COMMIT")
        await until(lambda: not ledger.queue and not ledger.failing, 15, "the ledger is done with the batch")
        await ledger.close()
    finally:
        await cutter.close()
    assert sorted(await request_ids(pg_url)) == sorted("r%d" % i for i in range(10))


@pytest.mark.gen_test(timeout=30)
async def test_postgres_messages_never_hold_the_url_password(ledgers, caplog):
    port = free_port()  # nothing listens there
    urls = {
        "pg-PASS-9d2f7c": "postgresql://app:pg-PASS-9d2f7c@127.0.0.1:%d/usage" % port,
        "pg/PASS@7e1a": "postgresql://app:pg%%2FPASS%%407e1a@127.0.0.1:%d/usage" % port,
        "pg-QUERY-PASS-41b": "postgresql://app@127.0.0.1:%d/usage?password=pg-QUERY-PASS-41b" % port,
    }
    for password, url in urls.items():
        store = PostgresStore(url)
        with pytest.raises(PostgresStoreError) as raised:
            await store.open()
        message = str(raised.value)
        assert "127.0.0.1:%d/usage" % port in message and "ConnectionRefusedError" in message
        shown = "".join(traceback.format_exception(raised.value)) + repr(raised.value) + repr(store)
        await store.reconnect()  # never raises, the server still being down
        # A Ledger in front of it keeps the row and says why without the password.
        ledger = ledgers(store)
        ledger.record(charge(DAY))
        assert await ledger.flush() is False and len(ledger.queue) == 1
        logged = "\n".join(r.getMessage() for r in caplog.records)
        encoded = url.split(":", 2)[2].split("@")[0]
        for secret in {password, encoded}:
            assert secret not in shown + message
            assert secret not in logged


@pytest.mark.gen_test(timeout=30)
async def test_postgres_instances_starting_together_create_the_schema_once(pg_url):
    stores = [PostgresStore(pg_url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        await stores[0].insert([charge(DAY)])
        assert await stores[3].spent_since("alice", 0.0) == (250_000_000, 15)
    finally:
        await asyncio.gather(*(s.close() for s in stores))


@pytest.mark.gen_test(timeout=30)
async def test_postgres_opens_without_create_privilege_once_the_table_exists(postgres_server, pg_url):  # noqa: F811
    owner = PostgresStore(pg_url)
    await owner.open()
    await owner.close()
    database = pg_url.rsplit("/", 1)[1]
    role = "writer_%s" % database
    postgres_server.psql(
        "CREATE ROLE %s LOGIN; REVOKE CREATE ON SCHEMA public FROM PUBLIC; "
        "GRANT SELECT, INSERT, DELETE ON usage TO %s; GRANT USAGE ON SEQUENCE usage_id_seq TO %s" % (role, role, role),
        database,
    )
    writer = PostgresStore(pg_url.replace("://app@", "://%s@" % role))
    try:
        await writer.open()
        await writer.insert([charge(DAY)])
        assert await writer.spent_since("alice", 0.0) == (250_000_000, 15)
    finally:
        await writer.close()
        postgres_server.psql("DROP OWNED BY %s; DROP ROLE %s" % (role, role), database)


@pytest.mark.gen_test(timeout=30)
async def test_flushes_at_the_same_time_write_each_row_once(ledger_url, ledgers):
    """A report flushes while the writer task may be flushing: one flush at a time."""
    ledger = ledgers(make_store(ledger_url))
    await ledger.start()
    count = 3 * BATCH_ROWS + 7
    for i in range(count):
        ledger.record(charge(DAY + i, request_id="r%d" % i))
    await asyncio.gather(ledger.flush(), ledger.flush(), ledger.flush())
    assert not ledger.queue
    assert await request_ids(ledger_url) == ["r%d" % i for i in range(count)]


class RefusingStore(SqliteStore):
    """A real SQLite store whose disk is full: every insert fails, and each try is counted."""

    def __init__(self, path):
        super().__init__(path)
        self.tries = 0

    async def insert(self, rows):
        self.tries += 1
        raise aiosqlite.OperationalError("database or disk is full")


@pytest.mark.gen_test(timeout=30)
async def test_a_failing_database_is_retried_with_a_growing_pause_even_under_load(tmp_path, ledgers, caplog):
    store = RefusingStore(str(tmp_path / "full.sqlite3"))
    ledger = ledgers(store)
    await ledger.start()
    started = time.monotonic()
    while time.monotonic() - started < 3:
        for i in range(BATCH_ROWS):  # every record() past BATCH_ROWS used to wake the writer at once
            ledger.record(charge(DAY + i))
        await asyncio.sleep(0.05)
    # Pauses of 0.5, 1, 2 s...: a handful of tries in 3 s, not one per wake-up.
    assert 1 <= store.tries <= 5, store.tries
    assert ledger.failing and len(ledger.queue) > 0
    ledger.store = SqliteStore(str(tmp_path / "full.sqlite3"))  # the disk has room again
    await ledger.store.open()
    await store.close()
    assert await ledger.flush()


# -- rows a caller poisoned, rows the database refuses, money as integers


async def rows_of(url) -> list[tuple]:
    """(request_id, token, model, usd_nanos) of every row, through a connection of its own."""
    query = "SELECT request_id, token, model, usd_nanos FROM usage ORDER BY id"
    if url.startswith("postgresql://"):
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return [tuple(r) for r in await conn.fetch(query)]
        finally:
            await conn.close()
    async with aiosqlite.connect(url) as db, db.execute(query) as cursor:
        return [tuple(r) for r in await cursor.fetchall()]


@pytest.mark.gen_test(timeout=30)
async def test_strings_a_caller_poisoned_never_stop_the_ledger(ledger_url, ledgers):
    """A lone surrogate (valid JSON: "x\\ud800"), a NUL, bytes that were not UTF-8 (surrogate-escaped),
    a huge name: each row is stored, made storable, and every other token's rows after it arrive."""
    metrics = FakeMetrics()
    ledger = ledgers(make_store(ledger_url), metrics=metrics)
    await ledger.start()
    ledger.record(charge(DAY, token="mallory", model="x\ud800", request_id="poison-surrogate"))
    ledger.record(charge(DAY + 1, token="mallory", model="a\x00b", request_id="poison-nul"))
    ledger.record(
        charge(DAY + 2, token="mallory", model=b"caf\xe9".decode("utf-8", "surrogateescape"), request_id="r\x00id")
    )
    ledger.record(charge(DAY + 3, token="mallory", model="m" * 100_000, request_id="poison-long"))
    for i in range(20):
        ledger.record(charge(DAY + 10 + i, token="bob" if i % 2 else "carol", request_id="after%d" % i))
    await until(lambda: not ledger.queue, 10, "the writer writes the poisoned rows and every row after them")
    assert not ledger.failing and ledger.dropped == 0 and metrics.ledger_dropped.value == 0
    await ledger.close()
    # As a restarted proxy reads them: every row is there.
    rows = await rows_of(ledger_url)
    assert [r[0] for r in rows] == ["poison-surrogate", "poison-nul", "rid", "poison-long"] + [
        "after%d" % i for i in range(20)
    ]
    assert [r[2] for r in rows[:3]] == ["x\ufffd", "ab", "caf\ufffd"]
    assert rows[3][2] == "m" * 256
    reopened = make_store(ledger_url)
    await reopened.open()
    try:
        assert await reopened.spent_since("bob", 0.0) == (10 * 250_000_000, 150)
        assert await reopened.spent_since("mallory", 0.0) == (4 * 250_000_000, 60)
    finally:
        await reopened.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_row_the_database_refuses_is_dropped_alone_and_counted(ledger_url, ledgers, caplog):
    """2**63 tokens fit neither SQLite's INTEGER nor PostgreSQL's BIGINT: that row alone is dropped,
    counted and logged once; the rows of its batch and after it are written, and nothing is retried for ever."""
    metrics = FakeMetrics()
    store = make_store(ledger_url)
    ledger = ledgers(store, metrics=metrics)
    await ledger.start()
    for i in range(5):
        ledger.record(charge(DAY + i, request_id="before%d" % i))
    ledger.record(charge(DAY + 5, token="mallory", tokens=(2**63, 0, 1), request_id="refused"))
    for i in range(5):
        ledger.record(charge(DAY + 6 + i, token="bob", request_id="after%d" % i))
    await until(lambda: not ledger.queue, 10, "the writer is done with the batch")
    assert not ledger.failing
    assert ledger.dropped == 1 and metrics.ledger_dropped.value == 1
    assert await request_ids(ledger_url) == ["before%d" % i for i in range(5)] + ["after%d" % i for i in range(5)]
    said = [r for r in caplog.records if "refused" in r.getMessage() and r.name == "chat_gpt_proxy"]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, [r.getMessage() for r in said]
    assert "request_id=refused" in said[0].getMessage()
    # Later rows go on being written by the writer's timer.
    ledger.record(charge(DAY + 20, token="bob", request_id="later"))
    await until(lambda: not ledger.queue, 5, "a later row is written")
    assert (await request_ids(ledger_url))[-1] == "later"


@pytest.mark.gen_test(timeout=30)
async def test_money_is_kept_as_exact_integer_nanodollars(ledger_url, ledgers):
    """1000 requests of 2.55 micro-dollars (9 + 2 tokens of gpt-4o-mini) sum to exactly $0.00255."""
    ledger = ledgers(make_store(ledger_url))
    await ledger.start()
    for i in range(1000):
        ledger.record(charge(DAY + i, usd=(9 * 0.15 + 2 * 0.60) / 1e6, request_id="r%d" % i))
    ledger.record(charge(DAY + 86400, usd=0.1, request_id="dime"))
    ledger.record(charge(DAY + 86401, usd=0.2, request_id="two-dimes"))
    await ledger.flush()
    rows = await rows_of(ledger_url)
    assert {r[3] for r in rows[:1000]} == {2550} and [r[3] for r in rows[1000:]] == [100_000_000, 200_000_000]
    assert all(type(r[3]) is int for r in rows)
    assert await ledger.spent_since("alice", 0.0) == (2_550_000 + 300_000_000, 1002 * 15)
    # The reports still speak dollars, now without float drift: 0.1 + 0.2 is 0.3 here.
    (day1, day2) = await ledger.report(*FOREVER)
    assert day1["usd"] == 0.00255 and type(day1["usd"]) is float
    assert day2["usd"] == 0.3


# The ledger's schema before money was kept in integers: a database made by an older release.
OLD_SQLITE_SCHEMA = """
CREATE TABLE usage (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, token TEXT NOT NULL, route TEXT NOT NULL, model TEXT,
    input_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    usd REAL NOT NULL, estimated INTEGER NOT NULL, status INTEGER NOT NULL, request_id TEXT NOT NULL
);
CREATE INDEX usage_token_at ON usage (token, at);
CREATE INDEX usage_at ON usage (at);
"""
OLD_POSTGRES_SCHEMA = """
CREATE TABLE usage (
    id BIGSERIAL PRIMARY KEY, at DOUBLE PRECISION NOT NULL, token TEXT NOT NULL, route TEXT NOT NULL, model TEXT,
    input_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL,
    usd DOUBLE PRECISION NOT NULL, estimated BOOLEAN NOT NULL, status INTEGER NOT NULL, request_id TEXT NOT NULL
);
CREATE INDEX usage_token_at ON usage (token, at);
CREATE INDEX usage_at ON usage (at);
"""
OLD_INSERT = (
    "INSERT INTO usage (at, token, route, model, input_tokens, cached_tokens, output_tokens, usd, estimated, status, "
    "request_id) VALUES (%s)"
)


async def old_ledger(url, rows) -> None:
    """A ledger as an older release left it: dollars in a float column."""
    if url.startswith("postgresql://"):
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute(OLD_POSTGRES_SCHEMA)
            await conn.executemany(OLD_INSERT % ", ".join("$%d" % i for i in range(1, 12)), rows)
        finally:
            await conn.close()
        return
    async with aiosqlite.connect(url) as db:
        await db.executescript(OLD_SQLITE_SCHEMA)
        await db.executemany(OLD_INSERT % ", ".join("?" * 11), rows)
        await db.commit()


@pytest.mark.gen_test(timeout=30)
async def test_an_older_ledger_is_migrated_and_keeps_its_rows(ledger_url, ledgers, caplog):
    old = [
        (
            DAY + i,
            "alice",
            "/v1/chat/completions",
            "gpt-4o",
            9,
            0,
            2,
            (9 * 0.15 + 2 * 0.60) / 1e6,
            False,
            200,
            "old%d" % i,
        )
        for i in range(10)
    ] + [(DAY + 20, "bob", "chat_complete", None, 3, 0, 1, 0.1, True, 499, "old-bob")]
    await old_ledger(ledger_url, old)
    ledger = ledgers(make_store(ledger_url))
    await ledger.start()  # migrates
    said = [r.getMessage() for r in caplog.records if "nano-dollars" in r.getMessage()]
    assert len(said) == 1 and "(11 rows converted)" in said[0], said
    ledger.record(charge(DAY + 30, usd=0.2, request_id="new"))
    await ledger.flush()
    rows = await rows_of(ledger_url)
    assert [r[0] for r in rows] == ["old%d" % i for i in range(10)] + ["old-bob", "new"]
    assert [r[3] for r in rows] == [2550] * 10 + [100_000_000, 200_000_000]
    assert await ledger.spent_since("alice", 0.0) == (10 * 2550 + 200_000_000, 10 * 11 + 15)
    (report,) = [r for r in await ledger.report(*FOREVER) if r["token"] == "bob"]
    assert (report["usd"], report["estimated"], report["requests"]) == (0.1, 1, 1)
    await ledger.close()
    # Opening it again (the next restart) migrates nothing twice.
    caplog.clear()
    again = make_store(ledger_url)
    await again.open()
    assert not [r for r in caplog.records if "nano-dollars" in r.getMessage()]
    try:
        assert await again.spent_since("alice", 0.0) == (10 * 2550 + 200_000_000, 10 * 11 + 15)
    finally:
        await again.close()


@pytest.mark.gen_test(timeout=60)
async def test_sqlite_keeps_its_wal_small(tmp_path, ledgers):
    """The WAL is checkpointed every 256 KiB and cut back to that: 30,000 rows (megabytes) leave a
    WAL of about that, not SQLite's default of 4 MiB kept at its largest."""
    path = str(tmp_path / "usage.sqlite3")
    ledger = ledgers(make_store(path))
    await ledger.start()
    for i in range(30_000):
        ledger.record(charge(DAY + i, model="gpt-4o-mini-2024-07-18", request_id="req-%032d" % i))
    await ledger.flush()
    assert os.path.getsize(path) > 2 << 20
    assert os.path.getsize(path + "-wal") <= 512 << 10, os.path.getsize(path + "-wal")


async def columns_of(url) -> set[str]:
    if url.startswith("postgresql://"):
        conn = await asyncpg.connect(url, timeout=5)
        try:
            found = await conn.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = 'usage'")
        finally:
            await conn.close()
        return {r[0] for r in found}
    async with aiosqlite.connect(url) as db, db.execute("PRAGMA table_info(usage)") as cursor:
        return {r[1] for r in await cursor.fetchall()}


@pytest.mark.gen_test(timeout=60)
async def test_the_report_command_reads_an_older_ledger_without_changing_it(ledger_url, tmp_path):
    """``python -m chat_gpt_proxy.usage`` only reads: an older release's ledger is reported as it is, not
    migrated (the server that writes it migrates it when it is upgraded), and SQLite's file is not written."""
    old = [(DAY + i, "alice", "/v1/chat/completions", "gpt-4o", 9, 0, 2, 0.25, False, 200, "o%d" % i) for i in range(4)]
    await old_ledger(ledger_url, old)
    before = await columns_of(ledger_url)
    stamp = None if ledger_url.startswith("postgresql://") else os.stat(ledger_url).st_mtime_ns
    report = subprocess.run(
        [sys.executable, "-m", "chat_gpt_proxy.usage", "--since", "2023-11-01", "--until", "2023-11-30", "--csv"],
        cwd=ROOT,
        env={"USAGE_DATABASE": ledger_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert report.returncode == 0, report.stderr
    assert report.stdout.splitlines()[1:] == ["2023-11-15,alice,gpt-4o,4,36,0,8,1,0"]
    assert await columns_of(ledger_url) == before and "usd_nanos" not in before
    if stamp is not None:
        assert os.stat(ledger_url).st_mtime_ns == stamp
