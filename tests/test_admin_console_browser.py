"""The admin page's Tokens, Requests and Audit tabs in a real headless Chromium (Debian's), driven by
Playwright, against ``python server.py`` with the demo upstream, a SQLite ledger, ADMIN_TOKEN and a tokens
file of one name.

A lead adds a person in three clicks (the Tokens tab, "Add a person", "Create", with the name typed),
copies the token from the page, the person uses it, the lead disables it, and finds the request (and
the refusal) in the Requests tab, that person's view and the audit. ``UPDATE_ADMIN_SCREENSHOT=1`` also
copies the screenshot of each tab to docs/.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.procs import ROOT
from tests.test_admin_browser import (
    ADMIN_TOKEN,
    OPENAI_KEY,
    TIMEOUT_MS,
    failed_loads,
    http,
    only_this_server,
    start_server,
)
from tests.test_browser import ARGS, CHROMIUM, CSP_RECORDER

FILED = "filed-USER-token-94a2c7e1d3"
TOKENS_FILE = '[team-bot]\ntoken = "%s"\nbudget_usd = 2.0\n' % FILED


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    temp = tmp_path_factory.mktemp("console")
    (temp / "tokens.toml").write_text(TOKENS_FILE)
    env = {"USAGE_DATABASE": str(temp / "usage.sqlite3"), "ACCESS_TOKENS_FILE": str(temp / "tokens.toml")}
    started = start_server(env, str(temp / "server.log"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        yield instance
        instance.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.problems, page.requests = [], []
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.on("request", lambda r: page.requests.append(r.url))
    page.add_init_script(CSP_RECORDER)
    page.goto(server.url + "/admin")
    yield page
    context.close()


def chat(server, token: str, model: str = "gpt-4o-mini") -> tuple[int, str]:
    """One /chat_complete; its status and the proxy's request id (what the ledger keeps)."""
    status, body = http(
        server.url + "/chat_complete",
        {"access-token": token, "openai-token": OPENAI_KEY, "Content-Type": "application/json"},
        {"prompt": "hello from the browser test", "generate_params": {"model_name": model}},
    )
    return status, body


def screenshot(page, server, name: str) -> None:
    path = os.path.join(os.path.dirname(server.log_path), name)
    page.screenshot(path=path, full_page=True)
    assert os.path.getsize(path) > 10_000
    if os.environ.get("UPDATE_ADMIN_SCREENSHOT"):
        shutil.copy(path, os.path.join(ROOT, "docs", name))


def request_ids(server, name: str) -> list[str]:
    status, body = http(server.url + "/admin/api/requests?name=" + name, {"admin-token": ADMIN_TOKEN})
    assert status == 200, body
    return [r["request_id"] for r in json.loads(body)["requests"]]


def test_add_a_person_copy_use_disable_and_find_the_request(page, server):
    page.fill("#admin-token", ADMIN_TOKEN)
    # Three clicks: the tab, "Add a person", "Create" (and the name typed).
    page.click("#tab-tokens-button")
    expect(page.locator("#tokens-table tbody tr[data-name=team-bot]")).to_be_visible()
    page.click("#add-person")
    page.fill("#tf-name", "dana")
    page.click("#token-form-submit")
    expect(page.locator("#new-token")).to_be_visible()
    expect(page.locator("#new-token-title")).to_contain_text("dana")
    value = page.locator("#new-token-value").text_content()
    assert value.startswith("cgp_") and len(value) > 40
    page.click("#copy-token")
    expect(page.locator("#copy-status")).to_have_text("Copied.")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == value
    row = page.locator("#tokens-table tbody tr[data-name=dana]")
    expect(row.locator(".badge")).to_have_text("active")
    assert row.get_attribute("data-source") == "page"
    # The file's token is shown read-only.
    filed = page.locator("#tokens-table tbody tr[data-name=team-bot]")
    assert filed.locator("button[data-action=delete]").count() == 0

    # The person uses the copied token.
    status, _ = chat(server, copied)
    assert status == 200
    page.click("#tokens-refresh")
    expect(row.locator("td").nth(5)).not_to_have_text("never")
    screenshot(page, server, "admin-tokens.png")

    # The lead disables it, after a confirmation.
    row.locator("button[data-action=disable]").click()
    expect(page.locator("#console-confirm")).to_be_visible()
    expect(page.locator("#console-confirm-text")).to_contain_text("Disable dana?")
    page.click("#console-confirm-yes")
    expect(row.locator(".badge")).to_have_text("disabled")
    assert page.locator("#new-token").is_hidden() and page.locator("#new-token-value").text_content() == ""
    status, body = chat(server, copied)
    assert status == 403 and b"access_token_disabled" in body

    # The Requests tab finds the request, and the refusal.
    used, refused = request_ids(server, "dana")[::-1]
    page.click("#tab-requests-button")
    page.fill("#req-name", "dana")
    page.click("#req-show")
    found = page.locator("#requests-table tbody tr[data-request-id='%s']" % used)
    expect(found).to_be_visible()
    cells = found.locator("td").all_inner_texts()
    assert cells[1] == "dana" and cells[3] == "gpt-4o-mini" and cells[5] == "200" and cells[4] == "default"
    assert cells[9].startswith("$") and cells[10].endswith(" ms")
    denied = page.locator("#requests-table tbody tr[data-request-id='%s']" % refused)
    expect(denied.locator(".refusal")).to_have_text("access_token_disabled")
    assert page.locator("#requests-table tbody tr").count() == 2
    assert "hello from the browser test" not in page.content()
    with page.expect_download(timeout=TIMEOUT_MS) as download:
        page.click("#req-csv")
    with open(download.value.path(), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("time,token,route,model,upstream,status") and len(lines) == 3
    screenshot(page, server, "admin-requests.png")

    # That person's own view: spend by model and by day, refusals by kind.
    page.click("#tab-tokens-button")
    page.click("#tokens-table tbody tr[data-name=dana] button[data-action=view]")
    expect(page.locator("#person-title")).to_have_text("dana")
    expect(page.locator("#person-models tbody th")).to_have_text("gpt-4o-mini")
    expect(page.locator("#person-refusals tbody th")).to_have_text("access_token_disabled")
    assert page.locator("#person-days tbody tr").count() == 1
    screenshot(page, server, "admin-person.png")
    page.click("#person-back")
    expect(page.locator("#tokens-list")).to_be_visible()

    # The audit says who did what.
    page.click("#tab-audit-button")
    expect(page.locator("#audit-table tbody tr").first).to_be_visible()
    actions = page.locator("#audit-table tbody tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].slice(1, 4).map(c => c.textContent))"
    )
    assert actions[:2] == [["ADMIN_TOKEN", "disabled", "dana"], ["ADMIN_TOKEN", "created", "dana"]]
    assert value not in page.content()
    screenshot(page, server, "admin-audit.png")

    assert not any(ADMIN_TOKEN in url or value in url for url in page.requests)
    only_this_server(page, server.url)
    assert page.problems == [] and page.evaluate("window.__csp") == []


def test_rotate_and_delete_ask_first_and_errors_name_the_field(page, server):
    page.fill("#admin-token", ADMIN_TOKEN)
    page.click("#tab-tokens-button")
    page.click("#add-person")
    page.fill("#tf-name", "eve")
    page.fill("#tf-budget_usd", "-3")
    page.click("#token-form-submit")
    expect(page.locator("#token-form-error")).to_contain_text("budget_usd must be a number")
    assert page.get_attribute("#tf-budget_usd", "aria-invalid") == "true"
    page.fill("#tf-budget_usd", "3")
    page.click("#token-form-submit")
    expect(page.locator("#new-token")).to_be_visible()
    first = page.locator("#new-token-value").text_content()
    row = page.locator("#tokens-table tbody tr[data-name=eve]")
    expect(row.locator("td.spend")).to_contain_text("of $3.00")

    # Cancelled: nothing changes.
    row.locator("button[data-action=rotate]").click()
    page.click("#console-confirm-no")
    assert chat(server, first)[0] == 200
    row.locator("button[data-action=rotate]").click()
    page.click("#console-confirm-yes")
    expect(page.locator("#new-token-value")).not_to_have_text(first)
    second = page.locator("#new-token-value").text_content()
    assert chat(server, first)[0] == 403 and chat(server, second)[0] == 200

    # Edit: the form holds what was set; a change is saved.
    row.locator("button[data-action=edit]").click()
    assert page.input_value("#tf-budget_usd") == "3" and page.is_disabled("#tf-name")
    page.fill("#tf-budget_usd", "")
    page.fill("#tf-rate_limit_per_minute", "30")
    page.click("#token-form-submit")
    expect(row.locator("td").nth(3)).to_have_text("30/min")

    row.locator("button[data-action=delete]").click()
    expect(page.locator("#console-confirm-text")).to_contain_text("its spend stays in the ledger")
    page.click("#console-confirm-yes")
    expect(page.locator("#tokens-table tbody tr[data-name=eve]")).to_have_count(0)
    assert chat(server, second)[0] == 403
    # The one error in the console: Chromium's note of the 400 the bad budget got.
    assert failed_loads(page.problems, 400) == [] and page.evaluate("window.__csp") == []


def test_the_tabs_fit_a_phone(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url + "/admin#tokens")
        page.fill("#admin-token", ADMIN_TOKEN)
        page.click("#tokens-refresh")
        expect(page.locator("#tokens-table tbody tr").first).to_be_attached()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.click("#tab-requests-button")
        expect(page.locator("#requests-status")).not_to_have_text("Loading…")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        context.close()
