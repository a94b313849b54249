"""Numbers for people (chat_gpt_proxy/human.py): money rounded in the JSON, the CSV and the messages,
durations and sizes in human units; the ledger keeps the exact amounts."""

from __future__ import annotations

import datetime
import json
import time

import pytest

from chat_gpt_proxy.access.tokens import TokenPolicy, rate_refusal
from chat_gpt_proxy.human import dollars, duration, money, money_fields, plain, size
from chat_gpt_proxy.usage.budgets import Over
from chat_gpt_proxy.usage.ledger import SqliteStore
from chat_gpt_proxy.usage.meter import Charge
from chat_gpt_proxy.usage.report import to_csv, to_table
from tests.conftest import proxy_settings

ADMIN = "admin-HUMAN-token-5e1c9a7b"
ALICE = "alice-HUMAN-token-8d2f4b6a"
# What the ledger holds for alice today: floats whose sum is no short number of cents.
SEEDED = [("gpt-4o-mini", 0.1), ("gpt-4o-mini", 0.2), ("gpt-4o", 0.1234567), ("gpt-4.1", 0.0000135)]


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


def test_money_fields_rounds_money_only():
    body = {"rows": [{"usd": 0.30000000000000004, "requests": 3}], "budgets": [{"spent_usd": 1 / 3, "tokens": 7}]}
    assert money_fields(body) == {"rows": [{"usd": 0.3, "requests": 3}], "budgets": [{"spent_usd": 0.33, "tokens": 7}]}


def test_the_report_table_and_csv_round():
    rows = [{"day": "2026-12-01", "token": "alice", "model": "gpt-4o", "requests": 2, "input_tokens": 5,
             "cached_tokens": 0, "output_tokens": 6, "usd": 0.30000000000000004, "estimated": 0},
            {"day": "2026-12-01", "token": "bob", "model": "gpt-4o", "requests": 1, "input_tokens": 1,
             "cached_tokens": 0, "output_tokens": 1, "usd": 0.0000135, "estimated": 0}]  # fmt: skip
    lines = to_csv(rows).splitlines()
    assert lines[1].endswith(",0.3,0") and lines[2].endswith(",0.0000135,0")
    table = to_table(rows)
    assert "$0.30" in table and "$0.0000135" in table and "0.30000000000000004" not in table


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
async def test_json_and_csv_show_money_rounded(proxy):
    response = await proxy.request("/admin/usage", method="GET", auth=False, headers={"admin-token": ADMIN})
    body = json.loads(response.body)
    assert sorted((row["model"], row["usd"]) for row in body["rows"]) == [
        ("gpt-4.1", 0.0000135),
        ("gpt-4o", 0.12),
        ("gpt-4o-mini", 0.3),
    ]
    budget = body["budgets"][0]
    assert (budget["spent_usd"], budget["remaining_usd"], budget["budget_usd"]) == (0.42, 19.58, 20.0)
    response = await proxy.request("/admin/usage?format=csv", method="GET", auth=False, headers={"admin-token": ADMIN})
    amounts = sorted(line.split(",")[-2] for line in response.body.decode().splitlines()[1:])
    assert amounts == ["0.0000135", "0.12", "0.3"]
    response = await proxy.request("/usage", method="GET", auth=False, headers={"access-token": ALICE})
    usage = json.loads(response.body)
    assert usage["spent"]["month"]["usd"] == 0.42 and usage["budget"]["remaining_usd"] == 19.58
    assert datetime.date.today().isoformat()[:4] in usage["spent"]["day"]["resets_at"]
