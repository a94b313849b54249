"""The ledger when things fail: a caller's poisoned strings, a full disk, a kill, a database that goes away.

Through the whole proxy where the issue is end to end (the in-process app
with its real SQLite file or PostgreSQL database, the fake upstream), and
``python server.py`` where a process must die. Every row is accounted for:
in the database, or in ``proxy_usage_rows_dropped_total``.
"""

import asyncio
import contextlib
import csv
import io
import logging
import os
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest

from chat_gpt_proxy.usage.report import to_csv, to_table
from chat_gpt_proxy.usage.storable import storable_text
from server import make_app
from tests.conftest import proxy_settings
from tests.procs import ROOT

MALLORY = "mallory-TOKEN-7c1e9a3b5d"
BOB = "bob-TOKEN-2f4a6c8e0b"
CAROL = "carol-TOKEN-9d8c7b6a5e"
KEY = "sk-test-ledger-failures-0123"
TOKENS_TOML = f"""
[mallory]
token = "{MALLORY}"
[bob]
token = "{BOB}"
[carol]
token = "{CAROL}"
budget_tokens = 1000000
"""
# The fake's usage for one user message "hi": 9 prompt + 2 completion tokens.
PER_REQUEST = 11


def as_(token: str) -> dict:
    return {"access-token": token, "Authorization": "Bearer " + KEY, "Content-Type": "application/json"}


@pytest.fixture
def config(request, fake_openai, tmp_path, ledger_url):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS_TOML)
    return proxy_settings(request, fake_openai, access_tokens_file=str(tokens), usage_database=ledger_url)


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within %s s: %s" % (timeout, what)
        await asyncio.sleep(0.02)


@pytest.mark.gen_test(timeout=60)
async def test_a_poisoned_model_name_does_not_stop_the_ledger_for_anyone(proxy, app, config):
    """{"model": "x\\ud800"} is valid JSON; so is a NUL in a string. Each is charged, and every other
    token's rows after them reach the database and are there after a restart."""
    for model in ("x\\ud800", "a\\u0000b"):
        body = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % model
        response = await proxy.request("/v1/chat/completions", body=body.encode(), headers=as_(MALLORY))
        assert response.code == 200, response.body
    for _ in range(3):
        for token in (BOB, CAROL):
            response = await proxy.request(
                "/v1/chat/completions",
                json_body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                headers=as_(token),
            )
            assert response.code == 200
    ledger = app.spend.ledger
    await until(lambda: not ledger.queue and not ledger.failing, 10, "every row written")
    assert ledger.dropped == 0
    await app.spend.close()
    # The restart: a new application on the same ledger.
    restarted = make_app(config)
    await restarted.spend.start(restarted.tokens.entries)
    try:
        now = time.time()
        for name in ("bob", "carol"):
            spent, _ = restarted.spend.book.spent_now(name, "month", now)
            assert spent.tokens == 3 * PER_REQUEST, name
        rows = await restarted.spend.ledger.report(0, now + 1)
        assert sorted((r["token"], r["model"], r["requests"]) for r in rows) == [
            ("bob", "gpt-4o-mini", 3),
            ("carol", "gpt-4o-mini", 3),
            ("mallory", "ab", 1),
            ("mallory", "x\ufffd", 1),
        ]
    finally:
        restarted.pool.close()
        await restarted.spend.close()


# A model name a terminal would run: clear the screen, ring, and forge a line of the report.
FORGED = "gpt\x1b[2J\x07\r\nday  boss  gpt-4o  1  0  0  $0.00\x85\x9b"


def test_control_characters_never_reach_a_stored_row():
    assert storable_text(FORGED) == "gpt\ufffd[2J\ufffd\ufffd\ufffdday  boss  gpt-4o  1  0  0  $0.00\ufffd\ufffd"
    assert storable_text("gpt-4o\x7f") == "gpt-4o\ufffd" and storable_text("a\x00b\tc") == "ab\ufffdc"
    assert storable_text("gpt-4o-2024-08-06") == "gpt-4o-2024-08-06" and storable_text("модель") == "модель"


def test_the_report_escapes_control_characters_of_rows_stored_before():
    """A ledger written by an older release may hold raw controls: the table shows them escaped, one line a
    row, and the CSV quotes a cell with a line break (RFC 4180), so no row is forged either way."""
    row = {"day": "2026-12-01", "token": "alice\x1b]0;x\x07", "model": FORGED, "requests": 1, "input_tokens": 9}
    row |= {"cached_tokens": 0, "output_tokens": 2, "usd": 0.5, "estimated": 0}
    table = to_table([row])
    assert not any(not c.isprintable() for c in table.replace("\n", ""))
    assert len(table.splitlines()) == 4 and "gpt\\x1b[2J\\x07\\r\\nday" in table
    (header, cells) = list(csv.reader(io.StringIO(to_csv([row]), newline="")))
    assert cells[1] == row["token"] and cells[2] == FORGED


@pytest.mark.gen_test(timeout=60)
async def test_a_model_name_with_control_characters_is_stored_replaced(proxy, app, config, ledger_url):
    body = {"model": FORGED, "messages": [{"role": "user", "content": "hi"}]}
    response = await proxy.request("/v1/chat/completions", json_body=body, headers=as_(BOB))
    assert response.code == 200, response.body
    ledger = app.spend.ledger
    await until(lambda: not ledger.queue and not ledger.failing, 10, "the row written")
    (row,) = await ledger.report(0, time.time() + 1)
    assert row["model"] == storable_text(FORGED)
    if ledger_url.startswith("postgresql://"):
        return
    await app.spend.close()
    report = subprocess.run(
        [sys.executable, "-m", "chat_gpt_proxy.usage", "--since", "2020-01-01", "--database", ledger_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert report.returncode == 0, report.stderr
    assert "\x1b" not in report.stdout and "\r" not in report.stdout and len(report.stdout.splitlines()) == 4


# -- a full disk


@pytest.fixture
def volume(tmp_path):
    """``volume(size)``: a tmpfs of ``size`` ("1m"), a disk that fills; unmounted at the end.
    Mounting needs root, as CI and this sandbox run the tests."""
    mounted = []

    def mount(size: str):
        path = tmp_path / ("volume%d" % len(mounted))
        path.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", str(path)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            pytest.fail("cannot mount a tmpfs for the full-disk tests (run as root): %s" % result.stderr.strip())
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture
def small_volume(volume):
    return volume("1m")


def fill(volume) -> str:
    """Take every free byte of the volume; the filler's path, to free it again."""
    filler = os.path.join(volume, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        block = b"\0" * 65536
        while True:
            try:
                os.write(fd, block)
            except OSError:
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    return filler


def metric(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


@pytest.fixture
def disk_config(request, fake_openai, tmp_path, small_volume):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS_TOML)
    return proxy_settings(
        request, fake_openai, access_tokens_file=str(tokens), usage_database=str(small_volume / "usage.sqlite3")
    )


@pytest.mark.gen_test(timeout=120)
async def test_a_full_disk_loses_nothing_silently(disk_config, small_volume, io_loop, monkeypatch, caplog):
    """Load while the volume fills, is freed, and fills again until shutdown: every charged request
    is a row in the database or counted in proxy_usage_rows_dropped_total; while space is back the
    ledger catches up (nothing dropped then), and the queue gauge says what waits."""
    from tornado.testing import bind_unused_port

    from chat_gpt_proxy.usage import ledger as ledger_module
    from server import make_server
    from tests.conftest import ProxyClient

    monkeypatch.setattr(ledger_module, "MAX_BACKOFF", 1.0)  # the writer's longest pause (30 s in production)
    app = make_app(disk_config)
    await app.spend.start(app.tokens.entries)
    sock, port = bind_unused_port()
    server = make_server(app, disk_config)
    server.add_socket(sock)
    client = ProxyClient("http://127.0.0.1:%d" % port)
    charged = 0
    loading = True

    async def worker():
        nonlocal charged
        while loading:
            response = await client.request(
                "/v1/chat/completions",
                json_body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                headers=as_(BOB),
            )
            assert response.code == 200
            charged += 1

    async def scrape() -> str:
        return (await client.request("/metrics", method="GET", auth=False)).body.decode()

    ledger = app.spend.ledger
    workers = [asyncio.ensure_future(worker()) for _ in range(6)]
    try:
        await asyncio.sleep(1.0)
        filler = fill(small_volume)
        await until(lambda: ledger.failing, 10, "the writer finds the disk full")
        await asyncio.sleep(1.5)
        before = len(ledger.queue)
        waiting = metric(await scrape(), "proxy_usage_queue_rows")
        assert before > 0 and before <= waiting <= len(ledger.queue), (before, waiting, len(ledger.queue))
        os.remove(filler)
        await until(lambda: not ledger.failing, 15, "the writer writes again once space is back")
        await asyncio.sleep(1.5)
        assert ledger.dropped == 0, "nothing lost while the disk had room again"
        fill(small_volume)  # full again, until shutdown
        await until(lambda: ledger.failing, 10, "the writer finds the disk full again")
        await asyncio.sleep(0.5)
    finally:
        loading = False
        await asyncio.gather(*workers, return_exceptions=True)
    queued_at_shutdown = len(ledger.queue)
    assert queued_at_shutdown > 0
    server.stop()
    await server.close_all_connections()
    app.pool.close()
    await app.spend.close()
    dropped = app.metrics.registry.get_sample_value("proxy_usage_rows_dropped_total")
    client.close()
    with contextlib.closing(sqlite3.connect(disk_config.usage_database)) as db:
        (rows,) = db.execute("SELECT COUNT(*) FROM usage").fetchone()
    assert rows + dropped == charged, (rows, dropped, charged)
    # Lost: only what was still queued when the proxy stopped on a full disk, and said so.
    assert 0 < dropped <= queued_at_shutdown
    said = [r.getMessage() for r in caplog.records if r.name == "chat_gpt_proxy"]
    assert "usage ledger: %d rows could not be written before shutdown and are lost" % dropped in said
    assert (
        "usage ledger: %d rows lost since start (queue full: 0, refused by the database: 0, unwritten at "
        "shutdown: %d); see proxy_usage_rows_dropped_total" % (dropped, dropped) in said
    )


# -- the queue gauge, a database that goes away, a kill


@pytest.mark.gen_test(timeout=30)
async def test_the_queue_gauge_says_what_waits_between_writes(tmp_path):
    from chat_gpt_proxy.observability import Metrics
    from chat_gpt_proxy.usage.ledger import Ledger, SqliteStore
    from chat_gpt_proxy.usage.meter import Charge

    metrics = Metrics()
    ledger = Ledger(SqliteStore(str(tmp_path / "usage.sqlite3")), 1000, metrics)
    await ledger.start()
    try:
        for i in range(7):  # fewer than a batch: written at the writer's next tick, not before
            ledger.record(Charge(time.time(), "bob", "v1", "gpt-4o", 1, 0, 1, 0.0, False, 200, "r%d" % i))
        assert metrics.registry.get_sample_value("proxy_usage_queue_rows") == 7
        await ledger.flush()
        assert metrics.registry.get_sample_value("proxy_usage_queue_rows") == 0
    finally:
        await ledger.close()


@pytest.mark.gen_test(timeout=90)
async def test_postgres_down_is_one_warning_line_without_the_drivers_tracebacks(postgres_server, caplog, monkeypatch):
    from chat_gpt_proxy.usage import ledger as ledger_module
    from chat_gpt_proxy.usage.ledger import Ledger, make_store
    from chat_gpt_proxy.usage.meter import Charge

    monkeypatch.setattr(ledger_module, "MAX_BACKOFF", 1.0)
    caplog.set_level(logging.INFO)  # as the proxy runs by default (LOG_LEVEL=INFO)
    url = postgres_server.create_database("down_%s" % uuid.uuid4().hex[:12])
    loop = asyncio.get_running_loop()
    ledger = Ledger(make_store(url), 100_000)
    await ledger.start()
    recorded = 0

    async def record_for(seconds):
        nonlocal recorded
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ledger.record(Charge(time.time(), "bob", "v1", "gpt-4o", 1, 0, 1, 0.0, False, 200, "r%d" % recorded))
            recorded += 1
            await asyncio.sleep(0.01)

    try:
        await record_for(0.7)
        await loop.run_in_executor(None, postgres_server.stop)
        try:
            await record_for(4)
            assert ledger.failing
        finally:
            await loop.run_in_executor(None, postgres_server.start)
        await until(lambda: not ledger.queue and not ledger.failing, 30, "the ledger catches up")
    finally:
        await ledger.close()
    shown = [r for r in caplog.records if r.levelno >= logging.INFO and not r.name.startswith("asyncio")]
    assert [r for r in shown if r.exc_info or r.name != "chat_gpt_proxy"] == [], [
        (r.name, r.getMessage()) for r in shown if r.name != "chat_gpt_proxy"
    ]
    down = [r.getMessage() for r in shown if "cannot write to the database" in r.getMessage()]
    assert len(down) == 1, down
    assert len([r for r in shown if "the database is back" in r.getMessage()]) == 1
    assert ledger.dropped == 0


@pytest.mark.gen_test(timeout=90)
async def test_sigkill_loses_at_most_the_rows_of_the_last_flush_interval(tmp_path, fake_openai):
    """A proxy killed outright (SIGKILL, the OOM killer) under load: the rows it had not yet written
    are lost, none other. Rows go to the database every FLUSH_SECONDS (0.5 s): the loss is at most
    what was charged in the last second before the kill (the interval, plus the write in progress)."""
    import tornado.httpclient

    from chat_gpt_proxy.usage.ledger import FLUSH_SECONDS
    from tests.procs import ServerProcess

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS_TOML)
    database = tmp_path / "usage.sqlite3"
    proc = ServerProcess(
        {"ACCESS_TOKENS_FILE": str(tokens), "OPENAI_BASE_URL": fake_openai.url, "USAGE_DATABASE": str(database)},
        str(tmp_path / "proxy.log"),
    )
    answered: list[float] = []
    killed_at = None
    try:
        await proc.wait_ready()
        client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'

        async def worker():
            while killed_at is None:
                try:
                    response = await client.fetch(
                        proc.url + "/v1/chat/completions", method="POST", body=body, headers=as_(BOB),
                        request_timeout=10,
                    )  # fmt: skip
                except (OSError, tornado.httpclient.HTTPClientError):
                    return  # the kill
                assert response.code == 200
                answered.append(time.monotonic())

        workers = [asyncio.ensure_future(worker()) for _ in range(6)]
        await asyncio.sleep(3.3)
        proc.proc.kill()
        killed_at = time.monotonic()
        await asyncio.gather(*workers)
        client.close()
    finally:
        proc.stop()
    with contextlib.closing(sqlite3.connect(database)) as db:
        (rows,) = db.execute("SELECT COUNT(*) FROM usage").fetchone()
    lost = len(answered) - rows
    rate = len([t for t in answered if t > answered[0] + 1.0]) / max(0.1, answered[-1] - answered[0] - 1.0)
    last_second = len([t for t in answered if t > killed_at - 2 * FLUSH_SECONDS])
    print("SIGKILL: %d answered, %d in the ledger, %d lost (%.2f s of load at %.0f requests/s)" % (
        len(answered), rows, lost, lost / rate, rate))  # fmt: skip
    assert 0 <= lost <= last_second, (lost, last_second)


@pytest.mark.gen_test(timeout=90)
async def test_a_nearly_full_disk_takes_every_row_once_freed(volume, monkeypatch):
    """2,000 rows a second on a 2 MiB volume, filled for two seconds then freed: the backlog and
    the rows after it (1.5 MB of data) all reach the database. SQLite's default WAL (checkpointed
    at 4 MiB) filled the freed disk again and was never checkpointed: two thirds of the rows lost."""
    from chat_gpt_proxy.usage import ledger as ledger_module
    from chat_gpt_proxy.usage.ledger import Ledger, SqliteStore
    from chat_gpt_proxy.usage.meter import Charge

    monkeypatch.setattr(ledger_module, "MAX_BACKOFF", 1.0)
    disk = volume("2m")
    path = str(disk / "usage.sqlite3")
    ledger = Ledger(SqliteStore(path), 100_000)
    await ledger.start()
    recorded = 0

    async def load(seconds):
        nonlocal recorded
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(20):
                ledger.record(Charge(time.time(), "bob", "v1", "gpt-4o", 10, 0, 5, 0.25, False, 200, "r%d" % recorded))
                recorded += 1
            await asyncio.sleep(0.01)

    try:
        await load(1)
        filler = fill(disk)
        await load(2)
        assert ledger.failing
        os.remove(filler)
        await load(4)
        await until(lambda: not ledger.queue, 20, "the backlog written")
    finally:
        await ledger.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        (rows,) = db.execute("SELECT COUNT(*) FROM usage").fetchone()
    assert (rows, ledger.dropped) == (recorded, 0)
    assert recorded > 10_000
