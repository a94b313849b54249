"""Budgets per named token: reached exactly, on every route that reports usage, streams always counted.

Against the fake upstream (its usage: 9 prompt tokens, one completion token
per word of the answer) with the real SQLite ledger in a temporary folder.
"""

import asyncio
import json
import re
import sqlite3
import time

import openai
import pytest
import websockets

from chat_gpt_proxy.access.tokens import TokensFileError, parse_tokens_file
from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from chat_gpt_proxy.formats.usage import Usage
from chat_gpt_proxy.usage.budgets import Budget, BudgetBook, period_bounds
from chat_gpt_proxy.usage.prices import Price, PricesFileError, PriceTable, parse_prices
from chat_gpt_proxy.usage.report import csv_cell
from server import reload_tokens
from settings import Settings, SettingsError
from tests.conftest import open_raw, proxy_settings
from tests.test_readme import snippet

TOKENS = "tokens-TOKEN-0a1b2c3d4e"  # budget_tokens = 22: two requests of 11 tokens
DOLLARS = "dollars-TOKEN-5f6a7b8c9d"  # budget_usd
FREE = "free-TOKEN-1e2d3c4b5a"  # no budget
KEY = "sk-test-budgets-0123456789"

TOKENS_TOML = f"""
[tokens]
token = "{TOKENS}"
budget_tokens = 22
budget_period = "day"

[dollars]
token = "{DOLLARS}"
budget_usd = 1.0

[free]
token = "{FREE}"
"""


def as_(token: str, **headers) -> dict:
    return {"access-token": token, "openai-token": KEY, **headers}


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text(TOKENS_TOML)
    return path


@pytest.fixture
def config(request, fake_openai, tokens_file, tmp_path):
    return proxy_settings(
        request, fake_openai, access_tokens_file=str(tokens_file), usage_database=str(tmp_path / "usage.sqlite3")
    )


def ledger_rows(config) -> list[dict]:
    with sqlite3.connect(config.usage_database) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM usage ORDER BY id")]


async def flushed(app) -> None:
    await app.spend.ledger.flush()


@pytest.mark.gen_test(timeout=30)
async def test_a_token_budget_is_reached_exactly_then_429_with_retry_after(proxy, app, config):
    lefts = []
    for _ in range(2):
        response, body = await proxy.chat({"prompt": "hi"}, headers=as_(TOKENS))
        assert response.code == 200 and body["usage"]["total_tokens"] == 11
        lefts.append(response.headers["x-proxy-budget-remaining-tokens"])
    assert lefts == ["22", "11"]  # what was left when each request was admitted
    response, body = await proxy.chat({"prompt": "hi"}, headers=as_(TOKENS))
    assert response.code == 429 and body["error"]["code"] == "budget_exceeded"
    assert "22 of its 22 tokens" in body["text"]
    _, end = period_bounds("day", time.time())
    assert 0 < int(response.headers["Retry-After"]) <= end - time.time() + 1
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["x-proxy-budget-remaining-tokens"] == "0"
    assert response.headers["x-proxy-budget-period"] == "day"
    # Another token is not affected.
    response, _ = await proxy.chat({"prompt": "hi"}, headers=as_(FREE))
    assert response.code == 200 and "x-proxy-budget-remaining-tokens" not in response.headers
    await flushed(app)
    rows = ledger_rows(config)
    assert [(r["token"], r["input_tokens"], r["output_tokens"], r["estimated"]) for r in rows] == [
        ("tokens", 9, 2, 0),
        ("tokens", 9, 2, 0),
        ("free", 9, 2, 0),
    ]
    # gpt-4o-mini: $0.15 input, $0.60 output per 1M tokens.
    assert rows[0]["usd"] == pytest.approx((9 * 0.15 + 2 * 0.60) / 1e6)
    assert all(r["status"] == 200 and r["route"] == "chat_complete" and r["request_id"] for r in rows)


def normalised(body: bytes) -> bytes:
    """A stream with its per-request values (id, created) blanked, to compare two streams."""
    return re.sub(rb'"created":\d+', b'"created":0', re.sub(rb'"id":"[^"]+"', b'"id":""', body))


@pytest.mark.gen_test(timeout=30)
async def test_a_stream_is_counted_without_the_caller_asking_and_arrives_unchanged(proxy, app, fake_openai):
    body = {"prompt": "one two three", "generate_params": {"stream": True}}
    free = await proxy.stream(body, headers=as_(FREE))
    budgeted = await proxy.stream(body, headers=as_(TOKENS))
    assert fake_openai.received[1].json["stream_options"] == {"include_usage": True}
    assert b"usage" not in budgeted.body
    assert normalised(budgeted.body) == normalised(free.body)
    # One request of 9 + 4 tokens ("Echo: one two three") is charged.
    spent, _ = app.spend.book.spent_now("tokens", "day", time.time())
    assert spent.tokens == 13


@pytest.mark.gen_test(timeout=30)
async def test_a_caller_who_asks_for_usage_gets_it_and_is_charged_once(proxy, app, fake_openai):
    body = {"prompt": "hi", "generate_params": {"stream": True, "stream_options": {"include_usage": True}}}
    streamed = await proxy.stream(body, headers=as_(TOKENS))
    usage_events = [json.loads(e) for e in streamed.events() if '"usage":{' in e]
    assert usage_events and usage_events[0]["usage"]["total_tokens"] == 11
    spent, _ = app.spend.book.spent_now("tokens", "day", time.time())
    assert spent.tokens == 11


@pytest.mark.gen_test(timeout=30)
async def test_v1_chat_stream_responses_and_embeddings_are_charged(proxy, app, config, fake_openai):
    headers = as_(DOLLARS, Authorization="Bearer " + KEY)
    stream = await proxy.stream(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a b"}], "stream": True},
        headers=headers,
        **{"path": "/v1/chat/completions"},
    )
    assert stream.response.code == 200 and b"usage" not in stream.body
    assert fake_openai.received[-1].json["stream_options"] == {"include_usage": True}
    response = await proxy.request(
        "/v1/responses", json_body={"model": "gpt-4o", "input": "hello there"}, headers=headers
    )
    assert response.code == 200
    response = await proxy.request(
        "/v1/embeddings", json_body={"model": "text-embedding-3-small", "input": "x"}, headers=headers
    )
    assert response.code == 200
    await flushed(app)
    rows = ledger_rows(config)
    assert [(r["route"], r["model"], r["estimated"]) for r in rows] == [
        ("v1", "gpt-4o-mini", 0),
        ("v1", "gpt-4o", 0),
        ("v1", "text-embedding-3-small", 0),
    ]
    assert all(r["usd"] > 0 for r in rows)
    assert rows[2]["input_tokens"] == 3 and rows[2]["output_tokens"] == 0
    left = float(response.headers["x-proxy-budget-remaining-usd"])
    assert left == pytest.approx(1.0 - rows[0]["usd"] - rows[1]["usd"], abs=1e-6)


@pytest.mark.gen_test(timeout=30)
async def test_a_client_that_leaves_mid_stream_is_charged_an_estimate(proxy, app, config, fake_openai):
    fake_openai.push(Behaviour(chunks=["tok "] * 50, delay=0.1))
    head, reader, writer = await open_raw(
        proxy.base_url, {"prompt": "x" * 400, "generate_params": {"stream": True}}, headers=as_(TOKENS)
    )
    assert head.startswith("HTTP/1.1 200")
    await reader.readuntil(b'"content":"tok "')
    await reader.readuntil(b'"content":"tok "')
    writer.close()
    await fake_openai.wait_abort(timeout=5)
    deadline = time.monotonic() + 5
    while not app.spend.ledger.queue and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await flushed(app)
    (row,) = ledger_rows(config)
    assert row["estimated"] == 1 and row["token"] == "tokens"
    # The request body's bytes / 4, and at least one token per event relayed.
    assert row["input_tokens"] >= 100 and row["output_tokens"] >= 2


@pytest.mark.gen_test(timeout=60)
async def test_the_openai_sdk_raises_a_budget_refusal_at_once_instead_of_waiting_for_the_reset(
    proxy, base_url, fake_openai
):
    """Retry-After is the time to the period's reset; x-should-retry: false keeps the SDK (default
    max_retries) from sleeping that long before raising."""
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=KEY, default_headers={"access-token": TOKENS})
    hi = [{"role": "user", "content": "hi"}]
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o-mini", messages=hi)
    with pytest.raises(openai.RateLimitError) as refused:
        await asyncio.wait_for(client.chat.completions.create(model="gpt-4o-mini", messages=hi), 10)
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert len(fake_openai.received) == 2
    await client.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_money_budget_refuses_a_model_without_a_price(proxy):
    response, body = await proxy.chat(
        {"prompt": "hi", "generate_params": {"model_name": "my-local-model"}}, headers=as_(DOLLARS)
    )
    assert response.code == 403 and body["error"]["code"] == "model_not_priced"
    assert response.headers["x-should-retry"] == "false"
    assert "PRICES_FILE" in body["text"]
    # A token without a money budget may use it (its tokens are still counted).
    response, _ = await proxy.chat(
        {"prompt": "hi", "generate_params": {"model_name": "my-local-model"}}, headers=as_(FREE)
    )
    assert response.code == 200


@pytest.mark.gen_test(timeout=30)
async def test_an_explicit_default_price_allows_unlisted_models(proxy, app, tmp_path):
    prices = tmp_path / "prices.toml"
    prices.write_text("[default]\ninput = 1.0\noutput = 2.0\n")
    app.spend.prices = PriceTable(str(prices))
    response, _ = await proxy.chat(
        {"prompt": "hi", "generate_params": {"model_name": "my-local-model"}}, headers=as_(DOLLARS)
    )
    assert response.code == 200
    spent, _ = app.spend.book.spent_now("dollars", "month", time.time())
    assert spent.usd == pytest.approx((9 * 1.0 + 2 * 2.0) / 1e6)


@pytest.mark.gen_test(timeout=30)
async def test_sighup_changes_a_budget_and_keeps_what_was_spent(proxy, app, tokens_file):
    for _ in range(2):
        response, _ = await proxy.chat({"prompt": "hi"}, headers=as_(TOKENS))
        assert response.code == 200
    tokens_file.write_text(TOKENS_TOML.replace("budget_tokens = 22", "budget_tokens = 40"))
    reload_tokens(app)
    response, _ = await proxy.chat({"prompt": "hi"}, headers=as_(TOKENS))
    assert response.code == 200 and response.headers["x-proxy-budget-remaining-tokens"] == "18"
    # 33 spent: under 40, so admitted; it ends at 44, and the next is refused.
    response, _ = await proxy.chat({"prompt": "hi"}, headers=as_(TOKENS))
    assert response.code == 200 and response.headers["x-proxy-budget-remaining-tokens"] == "7"
    response, body = await proxy.chat({"prompt": "hi"}, headers=as_(TOKENS))
    assert response.code == 429 and "44 of its 40 tokens" in body["text"]


@pytest.mark.gen_test(timeout=30)
async def test_usage_shows_a_tokens_own_spend_and_the_old_page_without_the_header(proxy):
    await proxy.chat({"prompt": "hi"}, headers=as_(TOKENS))
    response = await proxy.request("/usage", method="GET", auth=False, headers={"access-token": TOKENS})
    body = json.loads(response.body)
    assert body["token"] == "tokens" and body["spent"]["day"]["tokens"] == 11
    assert body["budget"]["remaining_tokens"] == 11 and body["budget"]["period"] == "day"
    assert body["metered"] is True
    response = await proxy.request("/usage", method="GET", auth=False, headers={"access-token": "wrong-token-xxxxx"})
    assert response.code == 403
    response = await proxy.request("/usage", method="GET", auth=False)
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/plain")


@pytest.mark.gen_test(timeout=30)
async def test_a_realtime_session_is_charged_and_refused_at_its_budget(proxy, app, base_url):
    url = "ws" + base_url[len("http") :] + "/v1/realtime?model=gpt-realtime"
    headers = {"access-token": TOKENS, "Authorization": "Bearer " + KEY}
    async with websockets.connect(url, additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "response.create"}))
        while json.loads(await ws.recv())["type"] != "response.done":
            pass
    deadline = time.monotonic() + 5
    while app.spend.book.spent_now("tokens", "day", time.time())[0].tokens == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    spent, _ = app.spend.book.spent_now("tokens", "day", time.time())
    assert spent.tokens >= 8  # the fake's response.done: 7 input tokens and its output
    app.spend.book.charge("tokens", time.time(), 0, 100)
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url, additional_headers=headers):
            pass
    assert refused.value.response.status_code == 429
    assert json.loads(refused.value.response.body)["error"]["code"] == "budget_exceeded"


def test_calendar_periods_are_utc_and_weeks_start_on_monday():
    at = 1_764_806_400 + 3600  # 2025-12-04 01:00 UTC, a Thursday
    assert period_bounds("day", at) == (1_764_806_400, 1_764_892_800)
    assert period_bounds("week", at) == (1_764_547_200, 1_765_152_000)  # Monday 2025-12-01 to 2025-12-08
    assert period_bounds("month", at) == (1_764_547_200, 1_767_225_600)  # 2025-12-01 to 2026-01-01


def test_a_new_period_starts_from_zero():
    book, budget = BudgetBook(), Budget(tokens=10, period="day")
    day = 1_764_806_400
    book.charge("a", day + 10, 0, 10)
    assert book.check("a", budget, day + 20).which == "budget_tokens"
    assert book.check("a", budget, day + 86_400 + 1) is None


def test_dated_model_names_take_their_familys_price():
    prices = PriceTable()
    assert prices.price("gpt-4o-mini-2024-07-18") == prices.price("gpt-4o-mini")
    assert prices.price("gpt-4-0613") == prices.price("gpt-4")
    assert prices.price("gpt-4.1-2025-04-14") == prices.price("gpt-4.1")
    assert prices.price("claude-sonnet-4-5-20250929") == prices.price("claude-sonnet-4-5")
    assert prices.price("claude-opus-4-20250514") == prices.price("claude-opus-4-0") == prices.price("claude-opus-4")
    assert prices.price("claude-3-5-haiku-20241022") == prices.price("claude-3-5-haiku-latest")
    assert prices.price("no-such-model") is None


def test_every_claude_price_has_its_cache_write_and_read_rates():
    """Anthropic charges a cache write above the input rate and a cache read at about a tenth of it (or less)."""
    claude = {name: p for name, p in PriceTable().prices.items() if name.startswith("claude-")}
    assert len(claude) >= 20 and "claude-opus-5-5" in claude  # Claude Code's default model
    # Priced by prompt length: listed at its rates for prompts over 100,000 tokens, the higher ones.
    assert claude["claude-haiku-5-5"].input == 0.50 and claude["claude-haiku-5-5"].output == 2.50
    for name, price in claude.items():
        assert price.cache_write == 2 * price.input, name
        assert price.cached_input <= price.input * 0.12, name  # Haiku 3: 0.03 of 0.25
        assert price.output == 5 * price.input, name


def test_a_usage_with_cache_writes_and_reads_costs_each_at_its_rate():
    price = Price(input=3.0, output=15.0, cached_input=0.30, cache_write=6.0)
    # 1,000 uncached, 2,000 written to the cache, 10,000 read from it: 13,000 input tokens in all.
    usage = Usage(input_tokens=13_000, output_tokens=500, cached_tokens=10_000, cache_write_tokens=2_000)
    assert price.cost(usage) == pytest.approx((1_000 * 3.0 + 2_000 * 6.0 + 10_000 * 0.30 + 500 * 15.0) / 1e6)
    # Without a cache_write rate, a write costs the input price (as OpenAI charges it).
    assert Price(input=3.0, output=15.0).cost(Usage(3_000, 0, 0, 2_000)) == pytest.approx(0.009)


def test_a_prices_file_may_give_a_cache_write_rate(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text('["claude-x"]\ninput = 1\ncache_write = 1.25\ncached_input = 0.1\noutput = 5\n')
    assert parse_prices(str(path))["claude-x"] == Price(input=1.0, output=5.0, cached_input=0.1, cache_write=1.25)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("budget_usd = -1", "budget_usd must be a number of US dollars, 0 or more"),
        ('budget_usd = "ten"', "budget_usd must be a number of US dollars, 0 or more"),
        ("budget_tokens = 1.5", "budget_tokens must be an integer"),
        ('budget_tokens = 5\nbudget_period = "year"', 'budget_period must be one of "day", "week", "month"'),
        ('budget_period = "day"', "budget_period is set but neither budget_usd nor budget_tokens"),
    ],
)
def test_a_bad_budget_is_one_line_naming_the_token(tmp_path, entry, message):
    path = tmp_path / "tokens.toml"
    path.write_text('[ann]\ntoken = "ann-TOKEN-0123456789"\n%s\n' % entry)
    with pytest.raises(TokensFileError) as error:
        parse_tokens_file(str(path), Settings())
    assert "token 'ann'" in str(error.value) and message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[gpt-x]\ninput = 1\n", "model 'gpt-x': output is missing"),
        ("[gpt-x]\ninput = -1\noutput = 1\n", "model 'gpt-x': input must be a number"),
        ("[gpt-x]\ninput = 1\noutput = 1\nextra = 2\n", "unknown field 'extra'"),
        ("[gpt-x\n", "not valid TOML"),
    ],
)
def test_a_broken_prices_file_stops_startup_with_one_line(tmp_path, text, message):
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(PricesFileError) as error:
        parse_prices(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"PRICES_FILE": str(path)})
    assert str(error.value).startswith("PRICES_FILE: " + str(path))


def test_the_readme_budgets_file_gives_three_people_20_dollars_a_month(tmp_path):
    language, code = snippet("budgets-file")
    assert language == "toml"
    path = tmp_path / "tokens.toml"
    path.write_text(code)
    entries = parse_tokens_file(str(path), Settings(openai_api_key="sk-the-servers-own-key"))
    assert [(e.name, e.policy.budget) for e in entries] == [
        (name, Budget(usd=20.0, period="month")) for name in ("anna", "boris", "vera")
    ]
    # They call with the proxy's key (without it, a 401 asking for one of their own).
    assert all(e.policy.use_server_key for e in entries)


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised():
    assert [csv_cell(v) for v in ("=1+1", "+1", "-2+3", "@SUM(A1)", "-", "+", "gpt-4o", 5, 0.5, None)] == [
        "'=1+1",
        "'+1",
        "'-2+3",
        "'@SUM(A1)",
        "-",
        "+",
        "gpt-4o",
        "5",
        "0.5",
        "",
    ]


@pytest.mark.gen_test(timeout=30)
async def test_a_money_budget_needs_a_named_model_where_the_upstream_would_pick_one(proxy):
    headers = as_(DOLLARS, Authorization="Bearer " + KEY)
    response = await proxy.request("/v1/embeddings", json_body={"input": "x"}, headers=headers)
    assert response.code == 403 and json.loads(response.body)["error"]["code"] == "model_not_priced"
    assert "names no model" in json.loads(response.body)["error"]["message"]
    # Reading what runs no model stays open.
    response = await proxy.request("/v1/models", method="GET", headers=headers)
    assert response.code == 200


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize(
    ("generate_params", "output_tokens"),
    [
        # Whatever the model may have generated by then: the caller's own cap...
        ({"max_tokens": 300}, 300),
        # ... or the model's documented one (prices.toml's max_output for gpt-4o-mini).
        ({}, 16384),
    ],
)
async def test_a_client_that_leaves_before_the_answer_begins_is_charged_an_estimate(
    proxy, app, config, fake_openai, generate_params, output_tokens
):
    fake_openai.push(Behaviour(kind="hang"))
    port = int(proxy.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps({"prompt": "y" * 80, "generate_params": generate_params}).encode()
    head = "POST /chat_complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += "".join("%s: %s\r\n" % item for item in as_(TOKENS).items())
    writer.write(head.encode() + b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    deadline = time.monotonic() + 5
    while not fake_openai.received and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert fake_openai.received, "the request never reached the upstream"
    writer.close()
    await fake_openai.wait_abort(timeout=5)
    deadline = time.monotonic() + 5
    while not app.spend.ledger.queue and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await flushed(app)
    (row,) = ledger_rows(config)
    assert (row["status"], row["estimated"], row["output_tokens"]) == (499, 1, output_tokens)
    assert row["input_tokens"] >= 20


@pytest.mark.gen_test(timeout=30)
async def test_metrics_show_money_spent_and_budget_refusals(proxy):
    for _ in range(3):
        await proxy.chat({"prompt": "hi"}, headers=as_(TOKENS))
    response = await proxy.request("/metrics", method="GET", auth=False)
    text = response.body.decode()
    spent = [line for line in text.splitlines() if line.startswith('proxy_spend_usd_total{token="tokens"}')]
    assert spent and float(spent[0].split()[-1]) == pytest.approx(2 * (9 * 0.15 + 2 * 0.60) / 1e6)
    assert 'proxy_limited_total{limit="budget_tokens",token="tokens"} 1.0' in text
    assert "proxy_usage_queue_rows" in text and "proxy_usage_rows_dropped_total 0.0" in text
