"""Numbers for people (chat_gpt_proxy/human.py): amounts exact where they are added up (the JSON's
amounts, the CSV) and rounded where people read them (the JSON's *_display, the report table, the
messages); durations and sizes in human units."""

from __future__ import annotations

import datetime
import json
import time

import pytest

from chat_gpt_proxy.access.tokens import TokenPolicy, concurrency_refusal, rate_refusal
from chat_gpt_proxy.human import count, dollars, duration, exact, exact_text, money, money_fields, plain, size
from chat_gpt_proxy.usage.budgets import Over
from chat_gpt_proxy.usage.ledger import SqliteStore
from chat_gpt_proxy.usage.meter import Charge
from chat_gpt_proxy.usage.report import to_csv, to_table
from tests.conftest import proxy_settings

ADMIN = "admin-HUMAN-token-5e1c9a7b"
ALICE = "alice-HUMAN-token-8d2f4b6a"
# What the ledger holds for alice today: floats whose sum is no short number of cents, and ten
# requests of $0.01485 to ten models (ten rows): $0.1485 together, $0.10 if each row were rounded.
TEN = [("model-%d" % n, 0.01485) for n in range(10)]
SEEDED = [("gpt-4o-mini", 0.1), ("gpt-4o-mini", 0.2), ("gpt-4o", 0.1234567), ("gpt-4.1", 0.0000135), *TEN]
TOTAL = 0.1 + 0.2 + 0.1234567 + 0.0000135 + 0.1485


@pytest.mark.parametrize(
    "usd,rounded,written",
    [
        (0.2074879999999997, 0.21, "$0.21"),
        (0.30000000000000004, 0.3, "$0.30"),
        (0.125, 0.13, "$0.13"),  # half up, not to even
        (1234.565, 1234.57, "$1234.57"),
        (20, 20.0, "$20.00"),
        (0.01, 0.01, "$0.01"),
        (0.00999999, 0.00999999, "$0.00999999"),
        (0.0000135, 0.0000135, "$0.0000135"),
        (0.000001234567, 0.00000123457, "$0.00000123457"),
        (0, 0.0, "$0.00"),
    ],
)
def test_money(usd, rounded, written):
    assert money(usd) == rounded
    assert dollars(usd) == written
    assert "e" not in plain(usd)


@pytest.mark.parametrize(
    "seconds,written",
    [
        (0, "0 s"),
        (0.2, "1 s"),
        (45, "45 s"),
        (60, "1 min"),
        (125, "2 min 5 s"),
        (3601, "1 h"),
        (3660, "1 h 1 min"),
        (86400, "1 day"),
        (2128088, "24 days 15 h"),
    ],
)
def test_duration(seconds, written):
    assert duration(seconds) == written


@pytest.mark.parametrize(
    "count,written",
    [
        (1, "1 byte"),
        (512, "512 bytes"),
        (64 * 1024, "64 KiB"),
        (32 << 20, "32 MiB"),
        (100_000, "100000 bytes (97.7 KiB)"),
    ],
)
def test_size(count, written):
    assert size(count) == written


def test_messages_use_human_units():
    resets = time.time() + 2128088
    over = Over("budget_usd", 20.0000001, 20.0, resets, 2128088).message
    assert "has spent $20.00 of its $20.00 budget" in over and over.endswith("(in 24 days 15 h).")
    refusal = rate_refusal(TokenPolicy(rate_limit_per_minute=60), 75)
    assert refusal.message.endswith("retry in 1 min 15 s.")


@pytest.mark.parametrize(
    "usd,kept,written",
    [
        (0.14850000000000002, 0.1485, "0.1485"),
        (0.2074879999999997, 0.207488, "0.207488"),
        (19.999662, 19.999662, "19.999662"),
        (20, 20.0, "20"),
        (0.0000135, 0.0000135, "0.0000135"),
        (1.5e-7, 1.5e-7, "0.00000015"),
        (-0.0, 0.0, "0"),
    ],
)
def test_exact(usd, kept, written):
    assert exact(usd) == kept and exact_text(usd) == written


def test_counts_are_singular_or_plural():
    assert [count(n, "request") for n in (0, 1, 2)] == ["0 requests", "1 request", "2 requests"]
    assert rate_refusal(TokenPolicy(rate_limit_per_minute=1), 60).message.startswith(
        "Rate limit of this access token (1 request per minute) reached"
    )
    assert "already has 1 request in flight" in concurrency_refusal(TokenPolicy(max_concurrent=1)).message
    assert "already has 3 requests in flight" in concurrency_refusal(TokenPolicy(max_concurrent=3)).message
    assert "spent 2 of its 1 token budget" in Over("budget_tokens", 2, 1, time.time() + 60, 60).message


def test_money_fields_keep_amounts_exact_beside_rounded_ones():
    body = {"rows": [{"usd": 0.30000000000000004, "requests": 3}], "budgets": [{"spent_usd": 1 / 3, "tokens": 7}]}
    assert money_fields(body) == {
        "rows": [{"usd": 0.3, "usd_display": "$0.30", "requests": 3}],
        "budgets": [{"spent_usd": 0.333333333, "spent_usd_display": "$0.33", "tokens": 7}],
    }


def test_the_csv_is_exact_and_the_report_table_rounds():
    def row(day, token, usd):
        return {"day": day, "token": token, "model": "gpt-4o", "requests": 1, "input_tokens": 5,
                "cached_tokens": 0, "output_tokens": 6, "usd": usd, "estimated": 0}  # fmt: skip

    rows = [row("2026-12-%02d" % n, "alice", 0.01485) for n in range(1, 11)] + [row("2026-12-01", "bob", 0.0000135)]
    lines = to_csv(rows).splitlines()
    amounts = [line.split(",")[-2] for line in lines[1:]]
    assert amounts == ["0.01485"] * 10 + ["0.0000135"]
    # What a spreadsheet's SUM of the column gives is what was spent.
    assert sum(float(a) for a in amounts) == pytest.approx(0.1485135, abs=1e-12)
    table = to_table(rows)
    assert "$0.01" in table and "$0.0000135" in table and "0.01485" not in table
    assert "total alice" in table and "$0.15" in table.split("total alice")[1]


@pytest.fixture
def config(request, fake_openai, tmp_path, io_loop):
    """The proxy with a ledger that holds SEEDED for alice today, a budget for her and the admin routes."""
    database = str(tmp_path / "usage.sqlite3")
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[alice]\ntoken = "%s"\nbudget_usd = 20.0\n' % ALICE)

    async def seed():
        store = SqliteStore(database)
        await store.open()
        now = time.time()
        charges = [
            Charge(at=now, token="alice", route="/chat_complete", model=model, input_tokens=10, cached_tokens=0,
                   output_tokens=10, usd=usd, estimated=False, status=200, request_id="seed%d" % n)
            for n, (model, usd) in enumerate(SEEDED)
        ]  # fmt: skip
        try:
            await store.insert(charges)
        finally:
            await store.close()

    io_loop.run_sync(seed)
    return proxy_settings(
        request, fake_openai, usage_database=database, admin_token=ADMIN, access_tokens_file=str(tokens)
    )


@pytest.mark.gen_test
async def test_json_and_csv_keep_amounts_exact_beside_rounded_ones(proxy):
    """The rows the admin page (or a script, or a spreadsheet) adds up are exact, so that their sum is
    what was spent; each amount of the JSON has its rounded ``*_display`` beside it."""
    response = await proxy.request("/admin/usage", method="GET", auth=False, headers={"admin-token": ADMIN})
    body = json.loads(response.body)
    rows = {row["model"]: (row["usd"], row["usd_display"]) for row in body["rows"]}
    assert {model: rows[model] for model in ("gpt-4.1", "gpt-4o", "gpt-4o-mini")} == {
        "gpt-4.1": (0.0000135, "$0.0000135"),
        "gpt-4o": (0.1234567, "$0.12"),
        "gpt-4o-mini": (0.3, "$0.30"),
    }
    assert [rows[model] for model, _ in TEN] == [(0.01485, "$0.01")] * 10
    assert sum(row["usd"] for row in body["rows"]) == pytest.approx(TOTAL, abs=1e-9)
    budget = body["budgets"][0]
    assert (budget["spent_usd"], budget["remaining_usd"], budget["budget_usd"]) == (
        exact(TOTAL),
        exact(20 - TOTAL),
        20.0,
    )
    assert (budget["spent_usd_display"], budget["remaining_usd_display"], budget["budget_usd_display"]) == (
        "$0.57",
        "$19.43",
        "$20.00",
    )
    response = await proxy.request("/admin/usage?format=csv", method="GET", auth=False, headers={"admin-token": ADMIN})
    amounts = [line.split(",")[-2] for line in response.body.decode().splitlines()[1:]]
    assert sorted(amounts) == sorted(["0.0000135", "0.1234567", "0.3"] + ["0.01485"] * 10)
    assert sum(float(amount) for amount in amounts) == pytest.approx(TOTAL, abs=1e-9)
    response = await proxy.request("/usage", method="GET", auth=False, headers={"access-token": ALICE})
    usage = json.loads(response.body)
    month = usage["spent"]["month"]
    assert (month["usd"], month["usd_display"]) == (exact(TOTAL), "$0.57")
    assert (usage["budget"]["remaining_usd"], usage["budget"]["remaining_usd_display"]) == (exact(20 - TOTAL), "$19.43")
    assert datetime.date.today().isoformat()[:4] in usage["spent"]["day"]["resets_at"]


@pytest.mark.gen_test
async def test_the_budget_header_is_the_exact_amount_that_usage_rounds(proxy):
    """x-proxy-budget-remaining-usd is for programs: /usage's exact remaining_usd to 6 decimal places,
    while remaining_usd_display (and the pages) round it for people."""
    response = await proxy.request("/usage", method="GET", auth=False, headers={"access-token": ALICE})
    budget = json.loads(response.body)["budget"]
    assert (budget["remaining_usd"], budget["remaining_usd_display"]) == (exact(20 - TOTAL), "$19.43")
    response, _ = await proxy.chat({"prompt": "x"}, headers={"access-token": ALICE})
    assert response.code == 200
    assert response.headers["x-proxy-budget-remaining-usd"] == "%.6f" % budget["remaining_usd"] == "19.428030"
