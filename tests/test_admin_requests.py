"""The admin API's reads of the ledger: one row per request (GET /admin/api/requests, filtered, paged, CSV),
each person's spend by model and by day and refusals by kind, and the migration that adds the
Requests tab's columns to a ledger made before them (SQLite and PostgreSQL), keeping its rows.

In process against the fake upstream, with a real SQLite ledger; the migration also on the test session's
PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import io
import json
import time

import aiosqlite
import asyncpg
import pytest

from chat_gpt_proxy.usage.ledger import make_store
from tests.conftest import new_database, proxy_settings
from tests.test_admin_api import ADMIN, api

KEY = "sk-test-admin-requests-1c2d"
TOKENS_TOML = """
[lead]
token = "lead-ADMIN-token-3e8b1d7c52"
admin = true
"""


@pytest.fixture
def config(request, fake_openai, tmp_path, ledger_url):
    (tmp_path / "tokens.toml").write_text(TOKENS_TOML)
    return proxy_settings(
        request,
        fake_openai,
        access_tokens_file=str(tmp_path / "tokens.toml"),
        usage_database=ledger_url,
        admin_token=ADMIN,
    )


async def ask(proxy, token: str, model: str = "gpt-4o-mini", stream: bool = False, **headers):
    body = {"prompt": "hi there", "generate_params": {"model_name": model, "stream": stream}}
    response = await proxy.request(
        json_body=body, headers={"access-token": token, "openai-token": KEY, **headers}, auth=False
    )
    return response.code


@pytest.mark.gen_test(timeout=60)
async def test_one_row_per_request_with_the_columns_the_page_shows(proxy, app, fake_openai):
    _, amy, _ = await api(proxy, "POST", "/tokens", {"name": "amy", "cache": True, "rate_limit_per_minute": 4})
    _, ben, _ = await api(proxy, "POST", "/tokens", {"name": "ben", "allowed_models": ["gpt-4o-mini"]})
    amy, ben = amy["token"], ben["token"]
    assert await ask(proxy, amy) == 200  # a cache miss
    assert await ask(proxy, amy) == 200  # the same: a hit
    assert await ask(proxy, amy, stream=True) == 200
    assert await ask(proxy, amy, model="gpt-4o") == 200
    assert await ask(proxy, amy) == 429  # the fifth within the minute
    assert await ask(proxy, ben) == 200
    assert await ask(proxy, ben, model="gpt-4o") == 403  # not allowed

    status, found, _ = await api(proxy, "GET", "/requests")
    assert status == 200
    rows = found["requests"]
    assert [(r["token"], r["status"], r["refusal"], r["cache"]) for r in rows] == [
        ("ben", 403, "model_not_allowed", None),
        ("ben", 200, None, None),
        ("amy", 429, "proxy_rate_limited", None),
        ("amy", 200, None, "miss"),
        ("amy", 200, None, "miss"),
        ("amy", 200, None, "hit"),
        ("amy", 200, None, "miss"),
    ]
    miss, hit, streamed = rows[6], rows[5], rows[4]
    assert miss["upstream"] == "default" and miss["model"] == "gpt-4o-mini" and miss["route"] == "chat_complete"
    assert miss["input_tokens"] > 0 and miss["output_tokens"] > 0 and miss["usd"] > 0 and not miss["estimated"]
    assert miss["latency_ms"] > 0 and miss["ttft_ms"] is None and miss["request_id"]
    assert hit["usd"] == 0 and hit["input_tokens"] == 0 and hit["upstream"] is None and hit["latency_ms"] > 0
    assert streamed["ttft_ms"] is not None and 0 < streamed["ttft_ms"] <= streamed["latency_ms"]
    assert rows[0]["usd"] == 0 and rows[0]["input_tokens"] == 0 and rows[0]["latency_ms"] > 0
    assert all(r["time"].endswith("Z") for r in rows)
    assert "prompt" not in json.dumps(found) and "hi there" not in json.dumps(found)

    async def ids(query: str) -> list[str]:
        status, page, _ = await api(proxy, "GET", "/requests?" + query)
        assert status == 200, page
        return [r["request_id"] for r in page["requests"]]

    every = [r["request_id"] for r in rows]
    assert await ids("name=ben") == every[:2]
    assert await ids("model=gpt-4o") == [every[3]]
    assert await ids("status=4xx") == [every[0], every[2]]
    assert await ids("status=429") == [every[2]]
    assert await ids("name=amy&status=200&model=gpt-4o-mini") == every[4:]
    today = datetime.datetime.now(datetime.UTC).date()
    assert await ids("from=%s&to=%s" % (today, today)) == every
    assert await ids("to=%s" % (today - datetime.timedelta(days=1))) == []
    moment = datetime.datetime.fromisoformat(rows[3]["time"].replace("Z", "+00:00")) + datetime.timedelta(seconds=1)
    later = await ids("from=" + moment.strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert set(later) <= set(every[:3])
    # Paged: three at a time, then the rest.
    status, first, _ = await api(proxy, "GET", "/requests?limit=3")
    assert [r["request_id"] for r in first["requests"]] == every[:3] and first["more"]
    status, last, _ = await api(proxy, "GET", "/requests?limit=3&offset=6")
    assert [r["request_id"] for r in last["requests"]] == every[6:] and not last["more"]

    status, _, response = await api(proxy, "GET", "/requests?format=csv&name=amy")
    assert status == 200 and response.headers["Content-Type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(response.body.decode())))
    assert [r["request_id"] for r in table] == every[2:]
    assert list(table[0]) == [
        "time",
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
        "refusal",
    ]
    assert table[0]["refusal"] == "proxy_rate_limited" and table[-1]["cache"] == "miss"


@pytest.mark.gen_test(timeout=60)
async def test_a_persons_own_view(proxy, app):
    _, cat, _ = await api(proxy, "POST", "/tokens", {"name": "cat", "budget_tokens": 100_000, "max_concurrent": 3})
    for model in ("gpt-4o-mini", "gpt-4o-mini", "gpt-4o"):
        assert await ask(proxy, cat["token"], model=model) == 200
    await api(proxy, "PATCH", "/tokens/cat", {"disabled": True})
    assert await ask(proxy, cat["token"]) == 403
    assert await ask(proxy, cat["token"]) == 403
    status, view, _ = await api(proxy, "GET", "/tokens/cat/usage")
    assert status == 200
    assert view["token"]["name"] == "cat" and view["token"]["max_concurrent"] == 3
    assert view["token"]["budget_tokens"] == 100_000 and view["token"]["status"] == "disabled"
    assert [(m["model"], m["requests"]) for m in view["by_model"]] == [("gpt-4o", 1), ("gpt-4o-mini", 2)]
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    assert [(d["day"], d["requests"]) for d in view["by_day"]] == [(today, 3)]
    assert view["by_day"][0]["usd"] == pytest.approx(sum(m["usd"] for m in view["by_model"]))
    assert view["refusals"] == {"access_token_disabled": 2}
    assert view["to"] == today
    status, answer, _ = await api(proxy, "GET", "/tokens/cat/usage?from=2030-01-02&to=2030-01-01")
    assert status == 400 and answer["error"]["param"] == "to"
    status, answer, _ = await api(proxy, "GET", "/tokens/nobody/usage")
    assert status == 404


OLD_SQLITE = """
CREATE TABLE usage (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, token TEXT NOT NULL, route TEXT NOT NULL, model TEXT,
    input_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    usd REAL NOT NULL, estimated INTEGER NOT NULL, status INTEGER NOT NULL, request_id TEXT NOT NULL
);
INSERT INTO usage (at, token, route, model, input_tokens, cached_tokens, output_tokens, usd, estimated, status,
    request_id) VALUES (1700006400, 'old', 'chat_complete', 'gpt-4o', 9, 0, 2, 0.25, 0, 200, 'old-row');
"""
OLD_POSTGRES = """
CREATE TABLE usage (
    id BIGSERIAL PRIMARY KEY, at DOUBLE PRECISION NOT NULL, token TEXT NOT NULL, route TEXT NOT NULL, model TEXT,
    input_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL,
    usd DOUBLE PRECISION NOT NULL, estimated BOOLEAN NOT NULL, status INTEGER NOT NULL, request_id TEXT NOT NULL
);
CREATE INDEX usage_token_at ON usage (token, at);
CREATE INDEX usage_at ON usage (at);
INSERT INTO usage (at, token, route, model, input_tokens, cached_tokens, output_tokens, usd, estimated, status,
    request_id) VALUES (1700006400, 'old', 'chat_complete', 'gpt-4o', 9, 0, 2, 0.25, false, 200, 'old-row');
"""
QUERY = "SELECT request_id, upstream, latency_ms, ttft_ms, cache, upstream_request_id FROM usage ORDER BY id"


@pytest.fixture(params=["sqlite", "postgresql"])
def old_ledger(request, tmp_path, io_loop):
    """USAGE_DATABASE holding a ledger made before the Requests tab's columns, with one row."""
    if request.param == "sqlite":
        url = str(tmp_path / "old.sqlite3")

        async def make():
            async with aiosqlite.connect(url) as db:
                await db.executescript(OLD_SQLITE)
                await db.commit()

        io_loop.run_sync(make)
        yield url
        return
    server = request.getfixturevalue("postgres_server")
    name, url = new_database(server)

    async def make_pg():
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute(OLD_POSTGRES)
        finally:
            await conn.close()

    io_loop.run_sync(make_pg)
    yield url
    server.drop_database(name)


async def fetch(url: str) -> list[tuple]:
    if url.startswith("postgresql://"):
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return [tuple(r) for r in await conn.fetch(QUERY)]
        finally:
            await conn.close()
    async with aiosqlite.connect(url) as db, db.execute(QUERY) as cursor:
        return [tuple(r) for r in await cursor.fetchall()]


@pytest.mark.gen_test(timeout=60)
async def test_an_older_ledger_gets_the_new_columns_and_keeps_its_rows(old_ledger):
    from chat_gpt_proxy.usage.meter import Charge

    for _ in range(2):  # the second opening finds the columns there
        store = make_store(old_ledger)
        await store.open()
        await store.close()
    store = make_store(old_ledger)
    await store.open()
    try:
        await store.insert(
            [
                Charge(
                    1700006500,
                    "new",
                    "chat_complete",
                    "gpt-4o",
                    9,
                    0,
                    2,
                    0.25,
                    False,
                    200,
                    "new-row",
                    upstream="openai-a",
                    latency_ms=12.5,
                    ttft_ms=3.25,
                    cache="miss",
                    upstream_request_id="req_upstream_1",
                )  # fmt: skip
            ]
        )
        assert await store.spent_since("old", 0) == (250_000_000, 11)  # nano-dollars
    finally:
        await store.close()
    assert await fetch(old_ledger) == [
        ("old-row", None, None, None, None, None),
        ("new-row", "openai-a", 12.5, 3.25, "miss", "req_upstream_1"),
    ]


@pytest.mark.gen_test(timeout=60)
async def test_a_poisoned_refusal_row_is_stored_and_odd_queries_are_400(proxy, app):
    """A caller's model name with a lone surrogate and a NUL: the refusal row is made storable and the
    rows after it arrive (SQLite and PostgreSQL); dates past 9999 and huge ids are a 400, not a 500."""
    now = time.time()
    app.console.refused((now, "amy", "chat_complete", "x\ud800\x00y", 403, "model_not_allowed", 1.5, "rid-poison"))
    app.console.refused((now + 0.001, "amy", "chat_complete", "gpt-4o", 429, "proxy_rate_limited", 0.5, "rid-after"))
    status, found, _ = await api(proxy, "GET", "/requests?name=amy")
    assert status == 200, found
    assert [(r["request_id"], r["model"]) for r in found["requests"]] == [
        ("rid-after", "gpt-4o"),
        ("rid-poison", "x?y"),
    ]
    for query, param in (("to=9999-12-31", "to"), ("from=10000-01-01", "from")):
        status, answer, _ = await api(proxy, "GET", "/requests?" + query)
        assert status == 400 and answer["error"]["param"] == param, (query, answer)
    status, answer, _ = await api(proxy, "GET", "/audit?before=" + "9" * 30)
    assert status == 400 and answer["error"]["param"] == "before"


@pytest.mark.gen_test(timeout=60)
async def test_refusals_flushed_by_the_writer_and_a_reader_at_once_are_written_once(proxy, app):
    for i in range(50):
        app.console.refused((time.time(), "bea", "chat_complete", None, 429, "proxy_rate_limited", 0.1, "r%d" % i))
    await asyncio.gather(app.console.flush_refusals(), app.console.flush_refusals(), app.console.flush_refusals())
    status, found, _ = await api(proxy, "GET", "/requests?name=bea&limit=100")
    assert status == 200 and sorted(r["request_id"] for r in found["requests"]) == sorted("r%d" % i for i in range(50))


@pytest.mark.gen_test(timeout=60)
async def test_retention_deletes_old_refusals_too(ledger_url):
    """USAGE_RETENTION_DAYS deletes refusal rows older than its days at startup, as it does the ledger's."""
    import dataclasses

    from chat_gpt_proxy.access.tokens import TokenRegistry
    from chat_gpt_proxy.console.runtime import RuntimeTokens
    from chat_gpt_proxy.console.store import make_console_store
    from settings import Settings

    now = time.time()
    store = make_console_store(ledger_url)
    await store.open()
    try:
        await store.insert_refusals(
            [
                (now - 40 * 86400, "old", "chat_complete", None, 429, "proxy_rate_limited", 1.0, "rid-old"),
                (now - 20 * 86400, "new", "chat_complete", None, 403, "model_not_allowed", 1.0, "rid-new"),
            ]
        )
    finally:
        await store.close()
    settings = dataclasses.replace(Settings(), usage_database=ledger_url, usage_retention_days=30)
    console = RuntimeTokens(settings, TokenRegistry(settings))
    await console.start()
    try:
        rows = await console.store.driver.fetch("SELECT request_id FROM refusals")
    finally:
        await console.close()
    assert rows == [("rid-new",)]


@pytest.mark.gen_test(timeout=60)
async def test_a_request_is_found_by_the_proxys_id_or_the_upstreams(proxy, app):
    """The x-request-id a user's SDK reports is the upstream's; x-proxy-request-id the proxy's: either finds the row."""
    _, dan, _ = await api(proxy, "POST", "/tokens", {"name": "dan", "allowed_models": ["gpt-4o-mini"]})
    ids = []
    for _ in range(2):
        response = await proxy.request(
            "/v1/chat/completions",
            json_body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers={"access-token": dan["token"], "openai-token": KEY},
            auth=False,
        )
        assert response.code == 200, response.body
        ids.append((response.headers["x-proxy-request-id"], response.headers["x-request-id"]))
    proxy_id, upstream_id = ids[0]
    assert upstream_id.startswith("req_fake_") and upstream_id != proxy_id
    assert await ask(proxy, dan["token"], model="gpt-4o") == 403  # a refusal: the proxy's id only
    for wanted in (proxy_id, upstream_id):
        status, found, _ = await api(proxy, "GET", "/requests?request_id=" + wanted)
        assert status == 200, found
        assert [(r["request_id"], r["upstream_request_id"]) for r in found["requests"]] == [ids[0]], wanted
    status, found, _ = await api(proxy, "GET", "/requests?name=dan&status=403")
    refusal_id = found["requests"][0]["request_id"]
    assert found["requests"][0]["upstream_request_id"] is None
    status, found, _ = await api(proxy, "GET", "/requests?request_id=" + refusal_id)
    assert [r["refusal"] for r in found["requests"]] == ["model_not_allowed"]
    status, found, _ = await api(proxy, "GET", "/requests?request_id=nothing-like-it")
    assert status == 200 and found["requests"] == []
    status, text, response = await api(proxy, "GET", "/requests?format=csv&request_id=" + upstream_id)
    rows = list(csv.DictReader(io.StringIO(response.body.decode())))
    assert [(r["request_id"], r["upstream_request_id"]) for r in rows] == [ids[0]]


@pytest.mark.gen_test(timeout=60)
async def test_postgresql_refuses_to_change_delete_or_truncate_the_audit(postgres_server):
    from chat_gpt_proxy.console.store import make_console_store

    name, url = new_database(postgres_server)
    try:
        for _ in range(2):  # a second opening finds the triggers there
            store = make_console_store(url)
            await store.open()
            await store.close()
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute(
                "INSERT INTO admin_audit (at, actor, action, name, request_id) VALUES (1, 'a', 'create', 'n', 'r')"
            )
            for statement in (
                "UPDATE admin_audit SET actor = 'x'",
                "DELETE FROM admin_audit",
                "TRUNCATE admin_audit",
            ):
                with pytest.raises(asyncpg.RaiseError, match="append-only"):
                    await conn.execute(statement)
            assert await conn.fetchval("SELECT COUNT(*) FROM admin_audit") == 1
        finally:
            await conn.close()
    finally:
        postgres_server.drop_database(name)
