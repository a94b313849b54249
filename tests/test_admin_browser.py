"""The /admin page in a real headless Chromium (Debian's), driven by Playwright, against ``python server.py``.

The proxy runs as a subprocess with the demo upstream, a SQLite usage ledger, ADMIN_TOKEN and a tokens
file of three named tokens; real spend comes from ``POST /chat_complete`` with each token (a few earlier
days are written into the ledger file before the server starts, so that the daily chart has more than
one bar). The page must draw what ``GET /admin/usage`` says, explain a wrong token and a missing ledger,
download the CSV, and contact nothing but 127.0.0.1; in English and Russian, light and dark, with nothing
clipped from 360 to 1920 px.

``UPDATE_SCREENSHOTS=1`` also copies the screenshots to docs/screenshots/admin-<language>-<theme>.png.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from playwright.sync_api import expect, sync_playwright

from chat_gpt_proxy.usage.ledger import SqliteStore
from chat_gpt_proxy.usage.meter import Charge
from handlers.pages import STRINGS
from tests.procs import ServerProcess
from tests.test_browser import (
    ARGS,
    BACKGROUNDS,
    CHROMIUM,
    CSP_RECORDER,
    LOCALES,
    background,
    clipped_at_widths,
    save_screenshot,
)

ADMIN_TOKEN = "admin-BROWSER-token-4f8e2d1c"
OPENAI_KEY = "sk-test-admin-browser-3c9a"
TOKENS = {
    "alice": "alice-ACCESS-token-71b3e9",
    "bob": "bob-ACCESS-token-2d5f0a8c",
    "carol": "carol-ACCESS-token-96e4c1",
}
TOKENS_FILE = """
[alice]
token = "{alice}"
budget_usd = 5.0

[bob]
token = "{bob}"

[carol]
token = "{carol}"
budget_tokens = 200000
budget_period = "week"
""".format(**TOKENS)
# Requests sent through the proxy: (token name, model, words in the prompt). The demo upstream echoes
# the prompt, so the output tokens (and the spend) grow with it.
REQUESTS = [
    ("alice", "gpt-4o-mini", 800),
    ("alice", "gpt-4o-mini", 1200),
    ("alice", "gpt-4.1", 1500),
    ("bob", "gpt-4o", 2000),
    ("bob", "gpt-4o", 600),
    ("bob", "gpt-4o-mini", 300),
    ("carol", "gpt-4o-mini", 400),
    ("carol", "gpt-4o-mini", 900),
]
# A caller-chosen model name full of markup: it must show as text. Unpriced, so charged $0. In the
# ledger on a day of its own, before the days the other tests (and the screenshots) show.
HOSTILE_MODEL = '<img src=x onerror="document.title=1">&amp;"'
HOSTILE_DAYS_AGO = 10
# Ten requests of $0.01485 to ten models, on a day of their own: $0.1485 together (ten rows each
# rounded to the cent would add up to $0.10).
TEN_DAYS_AGO = 12
TEN = [(TEN_DAYS_AGO, "bob", "model-%d" % n, 10, 10, 0.01485) for n in range(10)]
# Ledger rows of earlier days: (days ago, token, model, input tokens, output tokens, usd).
EARLIER = [
    *TEN,
    (HOSTILE_DAYS_AGO, "bob", HOSTILE_MODEL, 50, 60, 0.0),
    (1, "alice", "gpt-4o-mini", 12000, 9000, 0.0072),
    (1, "bob", "gpt-4o", 4000, 3000, 0.04),
    (2, "carol", "gpt-4o-mini", 30000, 20000, 0.0165),
    (3, "alice", "gpt-4.1", 5000, 6000, 0.058),
    (3, "bob", "gpt-4o-mini", 1000, 2000, 0.00135),
    (3, "carol", "gpt-4o-mini", 2000, 1000, 0.0009),
]
DAYS_SHOWN = 7  # the test asks for today and the six days before
TIMEOUT_MS = 10_000


def today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


def http(url: str, headers: dict, body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def usage(server, first: datetime.date, last: datetime.date) -> dict:
    query = urllib.parse.urlencode({"from": first.isoformat(), "to": last.isoformat()})
    status, body = http(server.url + "/admin/usage?" + query, {"admin-token": ADMIN_TOKEN})
    assert status == 200, body
    return json.loads(body)


async def seed_ledger(path: str) -> None:
    """Rows of earlier days, through the ledger's own store, before the server opens the file."""
    store = SqliteStore(path)
    await store.open()
    noon = datetime.datetime.combine(today(), datetime.time(12), datetime.UTC)
    rows = [
        Charge(
            at=(noon - datetime.timedelta(days=ago)).timestamp(),
            token=token,
            route="/chat_complete",
            model=model,
            input_tokens=inputs,
            cached_tokens=0,
            output_tokens=outputs,
            usd=usd,
            estimated=False,
            status=200,
            request_id="seed%d" % n,
        )
        for n, (ago, token, model, inputs, outputs, usd) in enumerate(EARLIER)
    ]
    try:
        await store.insert(rows)
    finally:
        await store.close()


def run_async(make_coroutine, timeout: float = 30):
    """Runs a coroutine to its end in a thread of its own: Playwright's sync API keeps an event loop
    running in this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make_coroutine())).result(timeout)


def start_server(env: dict, log_path: str) -> ServerProcess:
    server = ServerProcess({"DEMO_UPSTREAM": "1", "ADMIN_TOKEN": ADMIN_TOKEN, **env}, log_path)
    try:
        run_async(server.wait_ready)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    """The proxy with a ledger holding the spend of REQUESTS (today) and EARLIER; yields (server, report)."""
    temp = tmp_path_factory.mktemp("admin")
    (temp / "tokens.toml").write_text(TOKENS_FILE)
    database = str(temp / "usage.sqlite3")
    run_async(lambda: seed_ledger(database))
    env = {"USAGE_DATABASE": database, "ACCESS_TOKENS_FILE": str(temp / "tokens.toml")}
    server = start_server(env, str(temp / "server.log"))
    try:
        sent = REQUESTS
        for name, model, words in sent:
            prompt = " ".join("word%d" % (i % 97) for i in range(words))
            status, body = http(
                server.url + "/chat_complete",
                {"access-token": TOKENS[name], "openai-token": OPENAI_KEY, "Content-Type": "application/json"},
                {"prompt": prompt, "generate_params": {"model_name": model}},
            )
            assert status == 200, (name, model, body[:300])
        # The ledger writes in batches (every 0.5 s): wait until today's requests are all in.
        deadline = time.monotonic() + 15
        while True:
            report = usage(server, today() - datetime.timedelta(days=DAYS_SHOWN - 1), today())
            counted = sum(r["requests"] for r in report["rows"] if r["day"] == today().isoformat())
            if counted == len(sent):
                break
            assert time.monotonic() < deadline, "the ledger has %d of %d requests" % (counted, len(sent))
            time.sleep(0.2)
        yield server, report
    finally:
        server.stop()


@pytest.fixture(scope="module")
def proxy_without_ledger(tmp_path_factory):
    temp = tmp_path_factory.mktemp("admin-no-ledger")
    server = start_server({"ACCESS_TOKEN": TOKENS["alice"]}, str(temp / "server.log"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        yield instance
        instance.close()


@pytest.fixture
def open_page(browser):
    """open_page(url) -> a page on ``url`` + "/admin" in its own context, with what it did recorded:
    ``page.problems`` (console errors, page errors), ``page.requests`` (every URL it asked for)."""
    contexts = []

    def open_(url: str):
        context = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.problems, page.requests = [], []
        page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
        page.on("pageerror", lambda e: page.problems.append(str(e)))
        page.on("request", lambda r: page.requests.append(r.url))
        page.add_init_script(CSP_RECORDER)
        page.response = page.goto(url + "/admin")
        return page

    yield open_
    for context in contexts:
        context.close()


def show(page, token: str, first: datetime.date | None = None, last: datetime.date | None = None) -> None:
    page.fill("#admin-token", token)
    if first is not None:
        page.fill("#from", first.isoformat())
        page.fill("#to", last.isoformat())
    page.click("#load")


def only_this_server(page, url: str) -> None:
    for requested in page.requests:
        assert requested.startswith((url + "/", "blob:" + url + "/", "data:")), requested
    for resource in page.evaluate("performance.getEntriesByType('resource').map(e => e.name)"):
        assert resource.startswith((url + "/", "blob:", "data:")), resource


def shown_as(text: str, value: float) -> bool:
    """Whether ``text`` (the page's "$1,234.56", "$0.0123", "$0.00000315") shows ``value``: cents from a
    dollar up, three significant digits below."""
    shown = float(text.removeprefix("$").replace(",", ""))
    return abs(shown - value) <= (0.005 if value >= 1 else value * 0.005) + 1e-12


def first_amount(text: str) -> str:
    match = re.search(r"\$[0-9,]+\.[0-9]+", text)
    assert match, text
    return match.group(0)


def test_page_draws_the_ledger(open_page, proxy):
    server, report = proxy
    page = open_page(server.url)
    csp = page.response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert page.title() == "Usage and budgets · chat_gpt_proxy"
    # The dates default to this month (UTC days, as in the ledger).
    assert page.input_value("#from") == today().replace(day=1).isoformat()
    assert page.input_value("#to") == today().isoformat()
    assert page.locator("#report").is_hidden()

    first = today() - datetime.timedelta(days=DAYS_SHOWN - 1)
    show(page, ADMIN_TOKEN, first, today())
    expect(page.locator("#status")).to_contain_text("rows", timeout=TIMEOUT_MS)
    assert page.locator("#error").is_hidden()
    rows = report["rows"]
    tokens = {r["token"] for r in rows}
    models = {r["model"] for r in rows}
    assert tokens == {"alice", "bob", "carol"} and "gpt-4.1" in models

    # (a) one stacked segment per day and token that spent something, titled with both.
    segments = page.locator("#daily-chart rect.seg").evaluate_all(
        "els => els.map(e => [e.dataset.day, e.dataset.token, e.querySelector('title').textContent])"
    )
    expected = {(r["day"], r["token"]) for r in rows if r["usd"] > 0}
    assert sorted((day, token) for day, token, _ in segments) == sorted(expected)
    assert len({day for day, _ in expected}) >= 3, "earlier days and today"
    for day, token, title in segments:
        assert title.startswith(day + " · " + token + ": $"), title
    assert page.locator("#daily-chart g.day").count() == DAYS_SHOWN
    assert page.locator("#daily-chart svg > title").text_content().startswith("Spend per day by access token, from ")
    legend = page.locator("#daily-legend li").all_inner_texts()
    assert sorted(legend) == sorted(tokens)
    # The biggest spender at the bottom of every stack, i.e. first in the legend.
    spend = {t: sum(r["usd"] for r in rows if r["token"] == t) for t in tokens}
    ranked = sorted(tokens, key=lambda t: -spend[t])
    assert legend == ranked

    # (b) one bar per model.
    bars = page.locator("#model-chart rect.model-bar").evaluate_all(
        "els => els.map(e => [e.dataset.model, e.querySelector('title').textContent])"
    )
    assert sorted(model for model, _ in bars) == sorted(models)
    for model, title in bars:
        model_usd = sum(r["usd"] for r in rows if r["model"] == model)
        assert title.startswith(model + ": $") and shown_as(first_amount(title), model_usd), (title, model_usd)
    labels = page.locator("#model-chart text:not(.value)").all_text_contents()
    assert "gpt-4o-mini" in labels

    # (c) the table: one row per token, biggest spender first, with th headers.
    assert page.locator("#top-tokens thead th").count() == 9
    table_tokens = page.locator("#top-tokens tbody th[scope=row]").all_inner_texts()
    assert [t.strip() for t in table_tokens] == ranked
    first_row = page.locator("#top-tokens tbody tr").first.locator("td").all_inner_texts()
    assert shown_as(first_row[-2], spend[ranked[0]]), first_row
    requests_of_bob = sum(r["requests"] for r in rows if r["token"] == "bob")
    bob_cells = page.locator("#top-tokens tbody tr[data-token=bob] td").all_inner_texts()
    assert bob_cells[1] == str(requests_of_bob)

    # (d) budgets: alice in dollars, carol in tokens, bob has none.
    budgets = {b["token"]: b for b in report["budgets"]}
    assert set(budgets) == {"alice", "carol"} and budgets["alice"]["budget_usd"] == 5.0
    alice = page.locator("#budget-chart g.budget[data-token=alice][data-kind=usd]")
    assert alice.count() == 1
    alice_title = alice.locator("title").text_content()
    assert "of $5.00 this month" in alice_title and "resets" in alice_title
    assert alice_title.startswith("alice: $") and shown_as(first_amount(alice_title), budgets["alice"]["spent_usd"])
    resets = budgets["alice"]["resets_at"]
    reset_day = datetime.date.fromisoformat(resets[:10])
    shown_reset = "resets %s %d, %d %s UTC" % (reset_day.strftime("%b"), reset_day.day, reset_day.year, resets[11:16])
    assert shown_reset in alice.locator("text").all_text_contents()[-1]
    carol = page.locator("#budget-chart g.budget[data-token=carol][data-kind=tokens]")
    assert carol.count() == 1 and "200,000 tokens this week" in carol.locator("title").text_content()
    assert page.locator("#budget-chart g.budget[data-token=bob]").count() == 0
    assert page.locator("#budget-chart g.budget").count() == 2

    # The token is in this tab's storage, never in a URL; nothing but this server was asked.
    assert page.evaluate("sessionStorage.getItem('admin-token')") == ADMIN_TOKEN
    assert not any(ADMIN_TOKEN in url for url in page.requests)
    only_this_server(page, server.url)
    assert page.problems == [] and page.evaluate("window.__csp") == []


def test_model_names_are_text(open_page, proxy):
    """A model name full of markup (the caller chose it) shows as text, in the chart and its tooltip."""
    server, _ = proxy
    page = open_page(server.url)
    day = today() - datetime.timedelta(days=HOSTILE_DAYS_AGO)
    show(page, ADMIN_TOKEN, day, day)
    expect(page.locator("#status")).to_contain_text("as of")
    labels = page.locator("#model-chart text:not(.value)").all_text_contents()
    assert any(label.startswith("<img") for label in labels), labels
    titles = page.locator("#model-chart rect.model-bar title").all_text_contents()
    assert any(title.startswith(HOSTILE_MODEL + ": $") for title in titles), titles
    assert page.locator("img").count() == 0 and page.title() != "1", "a model name was taken as markup"
    assert page.problems == [] and page.evaluate("window.__csp") == []


def test_the_totals_add_up_exact_amounts(open_page, proxy):
    """The page adds the rows' exact amounts and rounds only what it shows: ten rows of $0.01485 are
    $0.1485, shown as $0.149 (not ten cents)."""
    server, _ = proxy
    page = open_page(server.url)
    day = today() - datetime.timedelta(days=TEN_DAYS_AGO)
    show(page, ADMIN_TOKEN, day, day)
    expect(page.locator("#status")).to_contain_text("as of")
    spend = page.locator("#totals dd").first.inner_text()
    total = page.locator("#top-tokens tfoot td").all_inner_texts()[-2]
    assert shown_as(spend, 0.1485) and shown_as(total, 0.1485), (spend, total)
    assert page.problems == [] and page.evaluate("window.__csp") == []


def test_token_survives_a_reload_and_can_be_forgotten(open_page, proxy):
    server, _ = proxy
    page = open_page(server.url)
    show(page, ADMIN_TOKEN)
    expect(page.locator("#status")).to_contain_text("rows")
    page.reload()
    # Kept in sessionStorage: the page loads this month at once.
    expect(page.locator("#daily-chart rect.seg").first).to_be_visible()
    page.click("#forget")
    assert page.evaluate("sessionStorage.getItem('admin-token')") is None
    assert page.input_value("#admin-token") == "" and page.locator("#report").is_hidden()
    assert page.problems == [] and page.evaluate("window.__csp") == []


def test_csv_download_sends_the_header(open_page, proxy):
    server, report = proxy
    page = open_page(server.url)
    first = today() - datetime.timedelta(days=DAYS_SHOWN - 1)
    page.fill("#admin-token", ADMIN_TOKEN)
    page.fill("#from", first.isoformat())
    page.fill("#to", today().isoformat())
    with page.expect_download(timeout=TIMEOUT_MS) as download:
        page.click("#csv")
    assert download.value.suggested_filename == "usage-%s-%s.csv" % (first, today())
    with open(download.value.path(), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "day,token,model,requests,input_tokens,cached_tokens,output_tokens,usd,estimated"
    assert len(lines) == len(report["rows"]) + 1
    assert not any(ADMIN_TOKEN in url for url in page.requests)
    only_this_server(page, server.url)
    assert page.problems == [] and page.evaluate("window.__csp") == []


def failed_loads(problems: list[str], status: int) -> list[str]:
    """Console errors other than Chromium's own note of a fetch answered with ``status``."""
    return [p for p in problems if "status of %d" % status not in p]


def test_wrong_admin_token_is_explained(open_page, proxy):
    server, _ = proxy
    page = open_page(server.url)
    show(page, "not-the-admin-token-at-all")
    expect(page.locator("#error")).to_contain_text("Wrong admin token")
    expect(page.locator("#error")).to_contain_text("ADMIN_TOKEN_FILE")
    assert page.locator("#report").is_hidden()
    assert page.evaluate("sessionStorage.getItem('admin-token')") is None, "a refused token is not kept"
    # Right after a good one, a wrong one takes the charts away.
    show(page, ADMIN_TOKEN)
    expect(page.locator("#report")).to_be_visible()
    assert page.locator("#error").is_hidden()
    show(page, "still-not-the-admin-token")
    expect(page.locator("#error")).to_contain_text("Wrong admin token")
    assert page.locator("#report").is_hidden()
    only_this_server(page, server.url)
    assert failed_loads(page.problems, 403) == [] and page.evaluate("window.__csp") == []


def test_ledger_off_is_explained(open_page, proxy_without_ledger):
    page = open_page(proxy_without_ledger.url)
    show(page, ADMIN_TOKEN)
    expect(page.locator("#error")).to_contain_text("usage ledger is off")
    expect(page.locator("#error")).to_contain_text("USAGE_DATABASE")
    assert page.locator("#report").is_hidden()
    only_this_server(page, proxy_without_ledger.url)
    assert failed_loads(page.problems, 404) == [] and page.evaluate("window.__csp") == []


@pytest.mark.parametrize(
    "first,last,english,russian",
    [
        ("2025-03-01", "2025-03-07", "from Mar 1 to Mar 7, 2025", "С 1 по 7 мар. 2025 г."),
        ("2025-04-28", "2025-05-07", "from Apr 28 to May 7, 2025", "С 28 апр. по 7 мая 2025 г."),
        ("2024-12-28", "2025-01-07", "from Dec 28, 2024 to Jan 7, 2025", "С 28 дек. 2024 г. по 7 янв. 2025 г."),
    ],
)
def test_the_status_line_writes_dates_the_languages_way(open_page, proxy, first, last, english, russian):
    """Not ISO dates: a period as each language writes one, the first day without what it shares
    with the last; reworded by the switch."""
    server, _ = proxy
    page = open_page(server.url)
    show(page, ADMIN_TOKEN, datetime.date.fromisoformat(first), datetime.date.fromisoformat(last))
    expect(page.locator("#status")).to_have_text("No usage recorded %s (UTC)." % english)
    page.click("button[data-lang=ru]")
    expect(page.locator("#status")).to_have_text("%s (UTC) расхода нет." % russian)
    assert page.problems == [] and page.evaluate("window.__csp") == []


def test_dates_in_the_wrong_order_are_refused_in_the_page(open_page, proxy):
    server, _ = proxy
    page = open_page(server.url)
    show(page, ADMIN_TOKEN, today(), today() - datetime.timedelta(days=1))
    expect(page.locator("#error")).to_contain_text("after")
    assert not any("/admin/usage" in url for url in page.requests)


# How each language writes an amount below a dollar: "$0.0784", "0,0784 $" (with a no-break space).
AMOUNT = {"en": re.compile(r"^\$0\.[0-9]+$"), "ru": re.compile(r"^0,[0-9]+\s\$$")}


@pytest.mark.parametrize("theme", ["light", "dark"])
@pytest.mark.parametrize("language", ["en", "ru"])
def test_each_language_and_theme(browser, proxy, language, theme, tmp_path):
    """The page in the browser's language (Accept-Language) and colour scheme: its words, amounts and
    dates that language's way, nothing clipped from a phone to a large monitor; its screenshot is
    docs/screenshots/admin-<language>-<theme>.png."""
    server, report = proxy
    strings = STRINGS[language]
    context = browser.new_context(viewport={"width": 1200, "height": 900}, locale=LOCALES[language], color_scheme=theme)
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.problems = []
        page.on("pageerror", lambda e: page.problems.append(str(e)))
        page.add_init_script(CSP_RECORDER)
        response = page.goto(server.url + "/admin")
        assert response.headers["content-language"] == language
        assert page.get_attribute("html", "lang") == language and page.title() == strings["admin.title"]
        assert background(page) == BACKGROUNDS[theme]
        show(page, ADMIN_TOKEN, today() - datetime.timedelta(days=DAYS_SHOWN - 1), today())
        expect(page.locator("#report")).to_be_visible()
        # "Usage from …" / "Расход с …": the part of the status line before its first placeholder.
        expect(page.locator("#status")).to_contain_text(strings["admin.status.rows"].split("{")[0])
        assert not re.search(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", page.inner_text("#status")), "no ISO dates"
        assert page.inner_text("#summary-title") == strings["admin.totals"]
        assert page.locator("#totals dt").all_inner_texts()[0] == strings["admin.fact.spend"]
        assert page.locator("#daily-chart svg > title").text_content().startswith(strings["admin.daily.chart"][:10])
        spend = page.locator("#top-tokens tbody tr").first.locator("td").all_inner_texts()[-2]
        assert AMOUNT[language].match(spend), spend
        resets = page.locator("#budget-chart g.budget[data-token=alice] text").all_text_contents()[-1]
        reset_day = datetime.date.fromisoformat(
            next(b["resets_at"] for b in report["budgets"] if b["token"] == "alice")[:10]
        )
        assert str(reset_day.year) in resets and resets.endswith("00:00 UTC"), resets
        assert clipped_at_widths(page) == {}
        page.set_viewport_size({"width": 1200, "height": 900})
        page.wait_for_timeout(250)
        save_screenshot(page, "admin-%s-%s" % (language, theme), tmp_path)
        assert page.problems == [] and page.evaluate("window.__csp") == []
    finally:
        context.close()


def test_the_switch_redraws_in_place(open_page, proxy):
    """The switch turns the charts, the table, the status line and the error line into the other
    language without a new request; the choice is remembered."""
    server, _ = proxy
    page = open_page(server.url)
    show(page, ADMIN_TOKEN, today() - datetime.timedelta(days=DAYS_SHOWN - 1), today())
    expect(page.locator("#status")).to_contain_text("rows")
    loads = sum("/admin/usage" in url for url in page.requests)
    page.click("button[data-lang=ru]")
    ru = STRINGS["ru"]
    assert page.inner_text("h1") == ru["admin.heading"] and page.title() == ru["admin.title"]
    assert page.inner_text("#status").startswith("Расход с ")
    assert page.locator("#daily-chart svg > title").text_content().startswith("Расход по дням и токенам")
    assert page.inner_text("#top-tokens tfoot th") == ru["admin.all_tokens"]
    assert page.locator("#top-tokens thead th").all_inner_texts()[1] == ru["admin.col.token"]
    assert AMOUNT["ru"].match(page.locator("#top-tokens tbody tr").first.locator("td").all_inner_texts()[-2])
    assert "за этот месяц" in page.locator("#budget-chart g.budget[data-token=alice] title").text_content()
    assert sum("/admin/usage" in url for url in page.requests) == loads, "redrawn from what the page holds"
    page.fill("#from", today().isoformat())
    page.fill("#to", (today() - datetime.timedelta(days=1)).isoformat())
    page.click("#load")
    expect(page.locator("#error")).to_have_text(ru["admin.error.dates_order"])
    page.click("button[data-lang=en]")
    expect(page.locator("#error")).to_have_text(STRINGS["en"]["admin.error.dates_order"])
    page.click("button[data-lang=ru]")
    page.reload()
    assert page.get_attribute("html", "lang") == "ru"
    assert page.problems == [] and page.evaluate("window.__csp") == []
