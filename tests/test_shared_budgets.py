"""Budgets across instances: the counters in Debian's redis-server, shared by two proxies.

Each "instance" is a full application on its own port (make_app, as
server.py builds it) with REDIS_URL on the test's own redis-server; both use
one ledger: a SQLite file, or a database on the test session's PostgreSQL.
"""

import asyncio
import dataclasses
import json
import time
import uuid

import pytest
import redis
import tornado.httpclient
from tornado.testing import bind_unused_port

from server import make_app, make_server
from settings import Settings
from tests.conftest import ACCESS_TOKEN

ANNA = "anna-TOKEN-2b4d6f8a0c"
KEY = "sk-test-shared-budgets-0123"
# The fake's usage for {"prompt": "hi"}: 9 prompt + 2 completion tokens.
PER_REQUEST = 11


@pytest.fixture
def settings(fake_openai, redis_server, tmp_path, ledger_url):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[anna]\ntoken = "%s"\nbudget_tokens = %d\nbudget_period = "week"\n' % (ANNA, 5 * PER_REQUEST))
    return dataclasses.replace(
        Settings(),
        access_tokens=(ACCESS_TOKEN,),
        access_tokens_file=str(tokens),
        openai_base_url=fake_openai.url,
        usage_database=ledger_url,
        redis_url=redis_server.url,
        port=0,
        host="127.0.0.1",
    )


@pytest.fixture
def instances(settings, io_loop):
    """An async factory of running instances (app, base URL); each stopped at the end."""
    started = []

    async def start(**overrides):
        config = dataclasses.replace(settings, **overrides)
        app = make_app(config)
        await app.spend.start(app.tokens.entries)
        sock, port = bind_unused_port()
        server = make_server(app, config)
        server.add_socket(sock)
        started.append((app, server))
        return app, "http://127.0.0.1:%d" % port

    yield start
    for app, server in started:
        server.stop()
        io_loop.run_sync(server.close_all_connections, timeout=10)
        app.pool.close()
        io_loop.run_sync(app.spend.close)
        io_loop.run_sync(app.shared_limits.close)


async def chat(base_url: str):
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    try:
        response = await client.fetch(
            base_url + "/chat_complete",
            method="POST",
            body=json.dumps({"prompt": "hi"}),
            headers={"access-token": ANNA, "openai-token": KEY},
            raise_error=False,
        )
    finally:
        client.close()
    return response


async def settled(*apps):
    """Until every charge sent to Redis has landed."""
    for app in apps:
        if app.spend.shared.pending:
            await asyncio.wait(list(app.spend.shared.pending), timeout=5)


@pytest.mark.gen_test(timeout=30)
async def test_two_instances_share_one_budget_exactly(instances):
    (a, url_a), (b, url_b) = await instances(), await instances()
    codes = []
    for url in (url_a, url_b, url_a, url_b, url_a, url_b, url_a):
        codes.append((await chat(url)).code)
        await settled(a, b)
    assert codes == [200, 200, 200, 200, 200, 429, 429]
    response = await chat(url_b)
    assert json.loads(response.body)["error"]["code"] == "budget_exceeded"
    assert response.headers["x-proxy-budget-remaining-tokens"] == "0"


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_requests_overshoot_by_at_most_what_was_in_flight(instances):
    """Ten requests at once, five on each instance, against a budget of five: all were admitted
    at 0 spent, so all ten run; the overshoot is exactly the requests in flight, and the next is refused."""
    (a, url_a), (b, url_b) = await instances(), await instances()
    responses = await asyncio.gather(*(chat(url) for url in [url_a, url_b] * 5))
    admitted = sum(r.code == 200 for r in responses)
    await settled(a, b)
    spent = await a.spend.shared.spent("anna", "week", time.time())
    assert spent[1] == admitted * PER_REQUEST
    assert spent[1] - 5 * PER_REQUEST <= len(responses) * PER_REQUEST
    assert (await chat(url_a)).code == 429 and (await chat(url_b)).code == 429


@pytest.mark.gen_test(timeout=30)
async def test_a_new_redis_is_seeded_from_the_ledger(instances, redis_server):
    (a, url_a) = await instances()
    for _ in range(3):
        assert (await chat(url_a)).code == 200
    await settled(a)
    await a.spend.ledger.flush()
    redis_server.command("FLUSHALL")  # Redis restarted empty
    (b, url_b) = await instances()  # a new instance reads the ledger and seeds Redis
    assert (await chat(url_b)).code == 200  # 33 of 55: admitted
    assert (await chat(url_b)).code == 200  # 44 of 55: admitted
    await settled(a, b)
    assert (await chat(url_a)).code == 429  # 55: instance a sees b's spend


@pytest.mark.gen_test(timeout=30)
async def test_redis_down_open_mode_goes_on_from_the_shared_total(instances, redis_server):
    (a, url_a), (b, url_b) = await instances(), await instances()
    for url in (url_a, url_b, url_b):
        assert (await chat(url)).code == 200
        await settled(a, b)
    assert (await chat(url_a)).code == 200  # a mirrors the total: 33 before, 44 after
    redis_server.stop()
    try:
        assert (await chat(url_a)).code == 200  # 44 of 55 in a's own counter: admitted
        assert (await chat(url_a)).code == 429  # 55
    finally:
        redis_server.start()


@pytest.mark.gen_test(timeout=30)
async def test_redis_down_closed_mode_refuses_budgeted_tokens(instances, redis_server):
    (a, url_a) = await instances(redis_failure_mode="closed")
    assert (await chat(url_a)).code == 200
    redis_server.stop()
    try:
        response = await chat(url_a)
        assert response.code == 503 and json.loads(response.body)["error"]["code"] == "limits_unavailable"
    finally:
        redis_server.start()


# Budgets in requests of PER_REQUEST tokens: spent before Redis dies, while it is away, after it
# comes back, and never.
OUTAGE_BUDGETS = {"early": 12, "middle": 150, "late": 250, "never": 100_000}
OUTAGE_TOKENS = {name: "%s-TOKEN-%s" % (name, uuid.uuid5(uuid.NAMESPACE_URL, name).hex[:12]) for name in OUTAGE_BUDGETS}


def outage_tokens_file(tmp_path) -> str:
    path = tmp_path / "outage-tokens.toml"
    path.write_text(
        "".join(
            '[%s]\ntoken = "%s"\nbudget_tokens = %d\nbudget_period = "month"\n'
            % (name, OUTAGE_TOKENS[name], budget * PER_REQUEST)
            for name, budget in OUTAGE_BUDGETS.items()
        )
    )
    return str(path)


async def chat_as(client, base_url: str, token: str):
    return await client.fetch(
        base_url + "/chat_complete",
        method="POST",
        body=json.dumps({"prompt": "hi"}),
        headers={"access-token": token, "openai-token": KEY},
        raise_error=False,
    )


@pytest.mark.parametrize("mode", ["closed", "open"])
@pytest.mark.gen_test(timeout=120)
async def test_redis_restarted_empty_under_load_keeps_every_budget(instances, redis_server, tmp_path, mode):
    """Two instances, each token's requests on both; Redis killed mid-load and started again empty, no
    instance restarted. Redis is seeded again from the ledger before it is trusted, the charges it
    missed are added, no local counter goes down: a token ends above its budget by at most the
    requests in flight when it crossed it (one per instance here), and Redis ends holding the ledger's
    totals. In open mode, while Redis is away each instance counts alone: a budget crossed then may
    be passed by what the other instance spent meanwhile (measured, not hidden)."""
    tokens_file = outage_tokens_file(tmp_path)
    (a, url_a), (b, url_b) = (
        await instances(access_tokens_file=tokens_file, redis_failure_mode=mode),
        await instances(access_tokens_file=tokens_file, redis_failure_mode=mode),
    )
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=20)
    statuses: dict[str, list[int]] = {name: [] for name in OUTAGE_BUDGETS}
    loading = True

    async def worker(name, url):
        while loading:
            response = await chat_as(client, url, OUTAGE_TOKENS[name])
            statuses[name].append(response.code)
            await asyncio.sleep(0.01 if response.code == 200 else 0.05)

    workers = [asyncio.ensure_future(worker(name, url)) for name in OUTAGE_BUDGETS for url in (url_a, url_b)]
    try:
        await asyncio.sleep(1.5)
        redis_server.stop()
        await asyncio.sleep(2.0)
        redis_server.start()  # empty: no persistence
        await asyncio.sleep(3.0)
    finally:
        loading = False
        await asyncio.gather(*workers)
        client.close()
    await settled(a, b)
    for app in (a, b):
        await app.spend.ledger.flush()
        await app.spend.shared.close()  # the charges it kept go to Redis now if not before
    start = time.time()
    report = {}
    for name, budget in OUTAGE_BUDGETS.items():
        spent_nanos, spent_tokens = await a.spend.ledger.spent_since(name, 0.0)
        in_redis = await a.spend.shared.spent(name, "month", start)
        report[name] = (spent_tokens // PER_REQUEST, budget, in_redis[1] // PER_REQUEST)
    print("Redis restarted empty, %s mode: token: (requests charged, budget, requests in Redis) %s" % (mode, report))
    assert report["early"][0] <= OUTAGE_BUDGETS["early"] + 2, report
    assert report["never"][0] > OUTAGE_BUDGETS["early"], "the load ran"
    for name, (charged, budget, in_redis) in report.items():
        assert in_redis == charged, (name, report)
        if mode == "closed" or name == "early":
            assert charged <= budget + 2, (name, report)
        else:
            # Each instance alone never passes the budget: together, twice it at worst.
            assert charged <= 2 * budget + 2, (name, report)
    assert {s for codes in statuses.values() for s in codes} <= {200, 429, 503}


@pytest.mark.gen_test(timeout=30)
async def test_without_a_ledger_an_emptied_redis_is_seeded_from_the_instances_own_counter(instances, redis_server):
    (a, url_a), (b, url_b) = await instances(usage_database=""), await instances(usage_database="")
    for _ in range(3):
        assert (await chat(url_a)).code == 200
        await settled(a)
    await wait_caught_up(a)
    redis_server.command("FLUSHALL")  # Redis restarted empty
    assert (await chat(url_a)).code == 200  # seeded from a's own 33 first: 44 of 55
    await settled(a)
    assert (await chat(url_b)).code == 200  # b reads 44: 55
    await settled(a, b)
    assert (await chat(url_a)).code == 429
    assert (await chat(url_b)).code == 429
    assert (await b.spend.shared.spent("anna", "week", time.time()))[1] == 5 * PER_REQUEST


async def shared_total(app, name: str, period: str, timeout: float = 10):
    """What Redis holds for ``name``: an instance whose connections Redis dropped fails one call first."""
    deadline = time.monotonic() + timeout
    while True:
        found = await app.spend.shared.spent(name, period, time.time())
        if isinstance(found, tuple):
            return found
        assert time.monotonic() < deadline, "Redis did not answer"
        await asyncio.sleep(0.1)


async def wait_caught_up(*apps, timeout: float = 10) -> None:
    """Until no instance keeps charges Redis has not taken."""
    deadline = time.monotonic() + timeout
    while any(getattr(app.spend.shared, "slots", None) for app in apps):
        assert time.monotonic() < deadline, "charges still kept: %r" % [list(app.spend.shared.slots) for app in apps]
        await asyncio.sleep(0.05)


@pytest.mark.gen_test(timeout=30)
async def test_charges_redis_could_not_take_are_added_once_it_answers(instances, redis_server):
    """Redis refusing every new connection (its password changed, its clients cut) but keeping its
    data: the charges made meanwhile are kept and added once, when it lets the instance in again."""
    (a, url_a), (b, url_b) = await instances(), await instances()
    assert (await chat(url_a)).code == 200
    await settled(a)
    admin = redis.Redis(port=redis_server.port, password=redis_server.password, socket_timeout=5)
    try:
        admin.config_set("requirepass", "wrong-REDIS-pass-77d1")
        admin.client_kill_filter(_type="normal")
        assert (await chat(url_a)).code == 200  # REDIS_FAILURE_MODE=open: a's own counter
        await asyncio.sleep(1.2)  # past the pause after a failure: this charge is tried, and fails
        assert (await chat(url_a)).code == 200
        await settled(a)
    finally:
        admin.config_set("requirepass", redis_server.password)
        admin.close()
    await wait_caught_up(a)
    # Exactly once: 3 requests.
    assert (await shared_total(b, "anna", "week"))[1] == 3 * PER_REQUEST
    assert (await chat(url_b)).code == 200  # 44 of 55
    await settled(b)
    assert (await chat(url_b)).code == 200  # 55
    await settled(b)
    assert (await chat(url_a)).code == 429


@pytest.mark.gen_test(timeout=30)
async def test_charges_kept_stay_bounded_in_memory_and_add_up_to_the_same(instances, monkeypatch):
    """However long Redis is away, the charges an instance keeps per total are at most PENDING_MAX:
    neighbours are merged, their sum unchanged, and a merged charge is held by a seed only if both were."""
    from chat_gpt_proxy.usage import shared as shared_module

    monkeypatch.setattr(shared_module, "PENDING_MAX", 10)
    (a, _) = await instances()
    shared = a.spend.shared
    shared.limits.skip_until = time.monotonic() + 60  # Redis "failed a moment ago": every charge is kept
    try:
        for i in range(100):
            shared.charge("anna", time.time(), 1000 + i, 11, i if i % 7 else None)
        assert shared.slots
        for slot in shared.slots.values():
            assert len(slot.kept) <= 10
            assert sum(k.nanos for k in slot.kept) == sum(1000 + i for i in range(100))
            assert sum(k.tokens for k in slot.kept) == 1100
            assert any(k.seq is None for k in slot.kept)  # a charge outside the ledger is never "held"
    finally:
        shared.limits.skip_until = 0.0


@pytest.mark.gen_test(timeout=60)
async def test_redis_emptied_without_downtime_keeps_the_other_instances_recent_charges(
    instances, redis_server, tmp_path, monkeypatch
):
    """FLUSHALL while b's last charges are in Redis but their ledger rows still wait for b's next write:
    the instance that seeds Redis again must not miss them. Requests one at a time, so nothing is in
    flight: exactly the budget is admitted."""
    from chat_gpt_proxy.usage import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "FLUSH_SECONDS", 2.0)  # b's rows wait longer, the race is certain
    tokens = tmp_path / "ten.toml"
    tokens.write_text('[anna]\ntoken = "%s"\nbudget_tokens = %d\nbudget_period = "week"\n' % (ANNA, 10 * PER_REQUEST))
    (a, url_a), (b, url_b) = (
        await instances(access_tokens_file=str(tokens), redis_failure_mode="closed"),
        await instances(access_tokens_file=str(tokens), redis_failure_mode="closed"),
    )
    for _ in range(5):
        assert (await chat(url_a)).code == 200
        await settled(a)
    await a.spend.ledger.flush()
    await b.spend.ledger.flush()  # b's writer has just written: its next rows wait 2 s
    for _ in range(4):
        assert (await chat(url_b)).code == 200
        await settled(b)
    assert b.spend.ledger.queue, "b's rows are not written yet"
    redis_server.command("FLUSHALL")  # no downtime: both instances keep their connections
    codes = []
    for url in [url_a, url_b] * 5:
        codes.append((await chat(url)).code)
        await settled(a, b)
    for app in (a, b):
        await app.spend.ledger.flush()
    (_, charged) = await a.spend.ledger.spent_since("anna", 0.0)
    assert charged == 10 * PER_REQUEST, (charged // PER_REQUEST, codes)
    assert codes.count(200) == 1 and set(codes) == {200, 429}, codes


@pytest.mark.gen_test(timeout=30)
async def test_budgets_shared_without_a_shared_ledger_are_warned_about_once(instances, ledger_url, caplog):
    """Exact shared budgets need the ledger every instance writes (PostgreSQL): with none, or a SQLite file
    of each instance's own, Redis restarted empty is seeded from what one instance knows. Said at startup."""
    for database in ("", ledger_url):
        caplog.clear()
        await instances(usage_database=database)
        warned = [r for r in caplog.records if "not shared" in r.getMessage() and r.levelname == "WARNING"]
        shared = database.startswith("postgresql://")
        assert len(warned) == (0 if shared else 1), [r.getMessage() for r in warned]


@pytest.mark.gen_test(timeout=60)
async def test_a_read_only_redis_is_logged_once_not_every_second(instances, redis_server, tmp_path, caplog):
    """A replica (or a Redis out of memory) answers the budget's read and refuses its charge: it fails and
    recovers every second. That is one outage: one warning, not a warning and an info line a second."""
    tokens = tmp_path / "big.toml"
    tokens.write_text('[anna]\ntoken = "%s"\nbudget_tokens = %d\n' % (ANNA, 10_000 * PER_REQUEST))
    (a, url_a) = await instances(access_tokens_file=str(tokens))
    assert (await chat(url_a)).code == 200
    await settled(a)
    caplog.clear()
    assert redis_server.command("REPLICAOF", "127.0.0.1", "1") == "+OK"  # its master never answers
    try:
        deadline = time.monotonic() + 5
        codes = []
        while time.monotonic() < deadline:
            codes.append((await chat(url_a)).code)
            await settled(a)
            await asyncio.sleep(0.1)
    finally:
        assert redis_server.command("REPLICAOF", "NO", "ONE") == "+OK"
    assert set(codes) == {200}
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "shared limits" in r.getMessage()]
    assert any("READONLY" in text or "ReadOnly" in text for _, text in said), said
    assert len(said) <= 3, said  # the first failure, the first recovery, the relapse
