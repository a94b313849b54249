"""Budget alerts: one POST to ALERT_WEBHOOK_URL per token, threshold and period, retried while the webhook
is down, sent through the egress proxy, never holding a secret.

In process against the fake upstream (9 prompt tokens and 2 completion tokens per "hi": 11 per request)
with the real SQLite ledger; the webhook is a Tornado server on the test's loop, recording what it gets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest
import tornado.httpserver
import tornado.web
from tornado.testing import bind_unused_port

from chat_gpt_proxy.console import alerts as alerts_module
from settings import Settings, SettingsError
from tests.conftest import proxy_settings
from tests.egress_servers import TinyProxy
from tests.procs import free_port

TOKEN = "budget-ALERT-token-5a7c9e1b3d"  # budget_tokens = 44: four requests
KEY = "sk-test-alerts-2f4a"
SECRET_PATH = "/hooks/T0SECRET/B0SECRET/xyzSECRETxyz"
SMALL = "small-BUDGET-token-8e2d4f6a1c"  # budget_tokens = 10: one request crosses 50 and 100 %
TOKENS_TOML = """
[alice]
token = "%s"
budget_tokens = 44
budget_period = "day"

[bert]
token = "%s"
budget_tokens = 10
budget_period = "day"
""" % (TOKEN, SMALL)


class Webhook:
    """A webhook on the test's loop: ``posts`` holds (path with query, parsed JSON body); ``answers``: the
    statuses of the next posts (then 200)."""

    def __init__(self, port: int | None = None):
        self.posts: list[tuple[str, dict]] = []
        self.answers: list[int] = []
        webhook = self

        class Receiver(tornado.web.RequestHandler):
            def post(self, *_):
                status = webhook.answers.pop(0) if webhook.answers else 200
                if status == 200:
                    webhook.posts.append((self.request.uri, json.loads(self.request.body)))
                self.set_status(status)
                self.finish("ok")

        self.server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/(.*)", Receiver)]))
        if port is None:
            sock, port = bind_unused_port()
            self.server.add_socket(sock)
        else:
            self.server.listen(port, "127.0.0.1")
        self.port = port
        self.url = "http://127.0.0.1:%d%s" % (port, SECRET_PATH)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.stop()


@pytest.fixture
def config(request, fake_openai, tmp_path, webhook):
    (tmp_path / "tokens.toml").write_text(TOKENS_TOML)
    return proxy_settings(
        request,
        fake_openai,
        access_tokens_file=str(tmp_path / "tokens.toml"),
        usage_database=str(tmp_path / "usage.sqlite3"),
        alert_webhook_url=webhook.url,
        alert_thresholds=(50, 100),
    )


async def spend(proxy, times: int) -> list[int]:
    codes = []
    for _ in range(times):
        response = await proxy.request(
            json_body={"prompt": "hi"}, headers={"access-token": TOKEN, "openai-token": KEY}, auth=False
        )
        codes.append(response.code)
    return codes


async def until(check, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def alerts_metric(app, result: str) -> float:
    return app.metrics.registry.get_sample_value("proxy_budget_alerts_total", {"result": result}) or 0.0


@pytest.mark.gen_test(timeout=30)
async def test_one_post_per_threshold_and_period(proxy, app, webhook):
    assert await spend(proxy, 2) == [200, 200]  # 22 of 44: 50 %
    await until(lambda: len(webhook.posts) == 1, "the 50 % alert")
    assert await spend(proxy, 3) == [200, 200, 429]  # 44 of 44: 100 %, then refused
    await until(lambda: len(webhook.posts) == 2, "the 100 % alert")
    await asyncio.sleep(0.5)
    assert len(webhook.posts) == 2, "nothing more: each threshold once"
    (path, first), (_, second) = webhook.posts
    assert path == SECRET_PATH
    assert first["text"].startswith("chat_gpt_proxy: alice has used 50% of its daily budget: 22 of 44 tokens")
    assert (first["name"], first["threshold"], first["percent"], first["budget"]) == (
        "alice",
        50,
        50.0,
        "budget_tokens",
    )
    assert (first["spent"], first["limit"], first["period"]) == (22, 44, "day")
    assert first["resets_at"] > first["period_start"] and first["resets_at"].endswith("Z")
    assert second["threshold"] == 100 and "refused (429)" in second["text"]
    assert TOKEN not in json.dumps(webhook.posts) and KEY not in json.dumps(webhook.posts)
    assert alerts_metric(app, "sent") == 2 and alerts_metric(app, "retried") == 0
    # Another process of the same ledger (an instance, a restart) finds them recorded: not sent again.
    app.alerts.seen.clear()
    app.alerts.check(app.tokens.find("alice"))
    await asyncio.sleep(0.5)
    assert len(webhook.posts) == 2


@pytest.mark.gen_test(timeout=30)
async def test_one_charge_crossing_two_thresholds_sends_the_highest_alone(proxy, app, webhook):
    response = await proxy.request(
        json_body={"prompt": "hi"}, headers={"access-token": SMALL, "openai-token": KEY}, auth=False
    )
    assert response.code == 200
    await until(lambda: len(webhook.posts) == 1, "the 100 % alert")
    await asyncio.sleep(0.5)
    assert [(p["name"], p["threshold"]) for _, p in webhook.posts] == [("bert", 100)]
    # Nor is the lower one sent later, here or by another process of the same ledger.
    app.alerts.check(app.tokens.find("bert"))
    app.alerts.seen.clear()
    app.alerts.check(app.tokens.find("bert"))
    await asyncio.sleep(0.5)
    assert len(webhook.posts) == 1 and alerts_metric(app, "sent") == 1


# A port nothing listens on until the test starts the webhook there.
DOWN_PORT = free_port()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.settings(alert_webhook_url="http://127.0.0.1:%d%s" % (DOWN_PORT, SECRET_PATH), alert_thresholds=(50,))
async def test_retried_while_the_webhook_is_down(proxy, app, monkeypatch, caplog):
    down_port = DOWN_PORT
    monkeypatch.setattr(alerts_module, "FIRST_PAUSE", 0.2)
    assert await spend(proxy, 2) == [200, 200]
    await until(lambda: alerts_metric(app, "retried") >= 2, "two failed attempts")
    hook = Webhook(down_port)
    try:
        await until(lambda: len(hook.posts) == 1, "sent once the webhook is up")
        assert alerts_metric(app, "sent") == 1
        # An error answer is retried too.
        hook.answers = [503, 500]
        app.alerts.seen.clear()
        tried = alerts_metric(app, "retried")
        app.alerts.store = None  # this time, as without a database: sent by this process
        app.alerts.check(app.tokens.find("alice"))
        await until(lambda: len(hook.posts) == 2, "sent after two error answers")
        assert alerts_metric(app, "retried") == tried + 2
    finally:
        hook.stop()
    said = [r.getMessage() for r in caplog.records if "budget alert" in r.getMessage()]
    assert any("attempt 1 of" in m and "retrying" in m for m in said), said
    assert any("HTTP 503" in m for m in said), said
    # The URL's path (the secret of a Slack or Telegram URL) is never logged.
    assert not any("SECRET" in m for m in said) and any("127.0.0.1:%d/***" % down_port in m for m in said)


@pytest.fixture
def tinyproxy(tmp_path):
    server = TinyProxy(str(tmp_path))
    yield server
    server.stop()


@pytest.mark.gen_test(timeout=30)
async def test_sent_through_the_egress_proxy_with_a_telegram_style_query(app, proxy, tinyproxy):
    hook = Webhook()
    try:
        settings = dataclasses.replace(
            app.config,
            alert_webhook_url="http://127.0.0.1:%d/bot123:SECRET/sendMessage?chat_id=-100123" % hook.port,
            upstream_proxy=tinyproxy.proxy(),
        )
        alerts = alerts_module.BudgetAlerts(settings, app.spend.book, app.metrics)
        alerts.start()
        try:
            before = tinyproxy.connections()
            assert await spend(proxy, 2) == [200, 200]
            alerts.check(app.tokens.find("alice"))
            await until(lambda: len(hook.posts) == 1, "sent through tinyproxy")
            assert tinyproxy.connections() > before
            path, body = hook.posts[0]
            assert path == "/bot123:SECRET/sendMessage?chat_id=-100123" and body["text"].startswith("chat_gpt_proxy:")
        finally:
            await alerts.close()
    finally:
        hook.stop()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ALERT_WEBHOOK_URL": "ftp://example.com/x"}, "http:// or https://"),
        ({"ALERT_WEBHOOK_URL": "https:///nohost"}, "with a host"),
        ({"ALERT_WEBHOOK_URL": "https://example.com:99999/x"}, "not a valid URL"),
        ({"ALERT_THRESHOLDS": "80,abc"}, "percentages from 1 to 1000"),
        ({"ALERT_THRESHOLDS": "0"}, "percentages from 1 to 1000"),
        ({"ALERT_THRESHOLDS": "8\u00b2"}, "percentages from 1 to 1000"),
        ({"ALERT_THRESHOLDS": ","}, "lists no percentage"),
    ],
)
def test_bad_alert_settings(env, message):
    with pytest.raises(SettingsError, match=message) as info:
        Settings.from_env(env)
    assert str(info.value).startswith(next(iter(env)))


def test_alert_settings_and_their_mask():
    settings = Settings.from_env({"ALERT_WEBHOOK_URL": "https://hooks.example.com/services/T0/B0/SECRET"})
    assert settings.alert_thresholds == (80, 100)
    assert settings.masked()["alert_webhook_url"] == "https://hooks.example.com/***"
    assert "SECRET" not in repr(settings)
    assert Settings.from_env({"ALERT_THRESHOLDS": "100, 50,80"}).alert_thresholds == (50, 80, 100)


def test_the_retry_schedule_is_the_documented_one():
    """docs/team.md: after 1 s, then 2, 4… up to 5 minutes apart, 12 attempts in all."""
    pauses, pause = [], alerts_module.FIRST_PAUSE
    for _ in range(alerts_module.ATTEMPTS - 1):
        pauses.append(pause)
        pause = min(alerts_module.MAX_PAUSE, pause * 2)
    assert pauses == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
