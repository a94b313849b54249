"""The admin page's Tokens, Requests and Audit tabs in a real headless Chromium (Debian's), driven by
Playwright, against ``python server.py`` with the demo upstream, a SQLite ledger, ADMIN_TOKEN and a tokens
file of one name.

A lead adds a person in three clicks (the Tokens tab, "Add a person", "Create", with the name typed),
copies the token from the page, the person uses it, the lead disables it, and finds the request (and
the refusal) in the Requests tab, that person's view and the audit; in English and in Russian, light and
dark, nothing clipped from a phone to a large monitor. ``UPDATE_SCREENSHOTS=1`` also copies the
screenshot of each tab to docs/screenshots/admin-<tab>-<language>-<theme>.png.
"""

from __future__ import annotations

import json

import pytest
from playwright.sync_api import expect, sync_playwright

from handlers.pages import STRINGS
from tests.test_admin_browser import (
    ADMIN_TOKEN,
    OPENAI_KEY,
    TIMEOUT_MS,
    failed_loads,
    http,
    only_this_server,
    start_server,
)
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


@pytest.fixture(params=["en", "ru"])
def language(request):
    return request.param


@pytest.fixture
def page(browser, server, language):
    context = browser.new_context(
        viewport={"width": 1280, "height": 900}, accept_downloads=True, locale=LOCALES[language]
    )
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


def request_ids(server, name: str) -> list[str]:
    status, body = http(server.url + "/admin/api/requests?name=" + name, {"admin-token": ADMIN_TOKEN})
    assert status == 200, body
    return [r["request_id"] for r in json.loads(body)["requests"]]


def test_add_a_person_copy_use_disable_and_find_the_request(page, server, language, tmp_path):
    strings = STRINGS[language]
    person = "dana-" + language
    page.fill("#admin-token", ADMIN_TOKEN)
    # Three clicks: the tab, "Add a person", "Create" (and the name typed).
    expect(page.locator("#tab-tokens-button")).to_have_text(strings["admin.console.tab.tokens"])
    page.click("#tab-tokens-button")
    expect(page.locator("#tokens-table tbody tr[data-name=team-bot]")).to_be_visible()
    expect(page.locator("#add-person")).to_have_text(strings["admin.console.tokens.add"])
    page.click("#add-person")
    page.fill("#tf-name", person)
    page.click("#token-form-submit")
    expect(page.locator("#new-token")).to_be_visible()
    expect(page.locator("#new-token-title")).to_contain_text(person)
    value = page.locator("#new-token-value").text_content()
    assert value.startswith("cgp_") and len(value) > 40
    page.click("#copy-token")
    expect(page.locator("#copy-status")).to_have_text(strings["admin.console.new.copied"])
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == value
    row = page.locator("#tokens-table tbody tr[data-name=%s]" % person)
    expect(row.locator(".badge")).to_have_text(strings["admin.console.status.active"])
    assert row.get_attribute("data-source") == "page"
    # The file's token is shown read-only.
    filed = page.locator("#tokens-table tbody tr[data-name=team-bot]")
    assert filed.locator("button[data-action=delete]").count() == 0

    # The person uses the copied token.
    status, _ = chat(server, copied)
    assert status == 200
    page.click("#tokens-refresh")
    expect(row.locator("td").nth(5)).not_to_have_text(strings["admin.console.never"])
    save_screenshot(page, "admin-tokens-%s-light" % language, tmp_path)

    # The lead disables it, after a confirmation.
    row.locator("button[data-action=disable]").click()
    expect(page.locator("#console-confirm")).to_be_visible()
    expect(page.locator("#console-confirm-text")).to_have_text(
        strings["admin.console.confirm.disable"].replace("{name}", person)
    )
    page.click("#console-confirm-yes")
    expect(row.locator(".badge")).to_have_text(strings["admin.console.status.disabled"])
    assert page.locator("#new-token").is_hidden() and page.locator("#new-token-value").text_content() == ""
    status, body = chat(server, copied)
    assert status == 403 and b"access_token_disabled" in body

    # The Requests tab finds the request, and the refusal.
    used, refused = request_ids(server, person)[::-1]
    page.click("#tab-requests-button")
    page.fill("#req-name", person)
    page.click("#req-show")
    found = page.locator("#requests-table tbody tr[data-request-id='%s']" % used)
    expect(found).to_be_visible()
    cells = found.locator("td").all_inner_texts()
    assert cells[1] == person and cells[3] == "gpt-4o-mini" and cells[5] == "200" and cells[4] == "default"
    assert "$" in cells[9] and cells[10].endswith(strings["admin.console.ms"].replace("{n}", "").strip())
    denied = page.locator("#requests-table tbody tr[data-request-id='%s']" % refused)
    expect(denied.locator(".refusal")).to_have_text("access_token_disabled")
    assert page.locator("#requests-table tbody tr").count() == 2
    assert "hello from the browser test" not in page.content()
    with page.expect_download(timeout=TIMEOUT_MS) as download:
        page.click("#req-csv")
    with open(download.value.path(), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("time,token,route,model,upstream,status") and len(lines) == 3
    save_screenshot(page, "admin-requests-%s-light" % language, tmp_path)
    # One request by its id: the proxy's, or the upstream's (the x-request-id a user's SDK reports).
    status, body = http(server.url + "/admin/api/requests?request_id=" + used, {"admin-token": ADMIN_TOKEN})
    upstream_id = json.loads(body)["requests"][0]["upstream_request_id"]
    page.fill("#req-name", "")
    for wanted in filter(None, (used, upstream_id)):
        page.fill("#req-id", wanted)
        page.click("#req-show")
        expect(page.locator("#requests-table tbody tr")).to_have_count(1)
        expect(found).to_be_visible()
    page.fill("#req-id", "")
    page.fill("#req-name", person)
    page.select_option("#req-status", "429")
    page.click("#req-show")
    expect(page.locator("#requests-table tbody tr")).to_have_count(0)
    page.select_option("#req-status", "")

    # That person's own view: spend by model and by day, refusals by kind.
    page.click("#tab-tokens-button")
    page.click("#tokens-table tbody tr[data-name=%s] button[data-action=view]" % person)
    expect(page.locator("#person-title")).to_have_text(person)
    expect(page.locator("#person-models tbody th")).to_have_text("gpt-4o-mini")
    expect(page.locator("#person-refusals tbody th")).to_have_text("access_token_disabled")
    assert page.locator("#person-days tbody tr").count() == 1
    save_screenshot(page, "admin-person-%s-light" % language, tmp_path)
    page.click("#person-back")
    expect(page.locator("#tokens-list")).to_be_visible()

    # The audit says who did what.
    page.click("#tab-audit-button")
    expect(page.locator("#audit-table tbody tr").first).to_be_visible()
    actions = page.locator("#audit-table tbody tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].slice(1, 4).map(c => c.textContent))"
    )
    assert actions[:2] == [
        ["ADMIN_TOKEN", strings["admin.console.audit.action.disable"], person],
        ["ADMIN_TOKEN", strings["admin.console.audit.action.create"], person],
    ]
    assert value not in page.content()
    save_screenshot(page, "admin-audit-%s-light" % language, tmp_path)

    assert not any(ADMIN_TOKEN in url or value in url for url in page.requests)
    only_this_server(page, server.url)
    assert page.problems == [] and page.evaluate("window.__csp") == []


@pytest.mark.parametrize("language", ["en"])
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


@pytest.mark.parametrize("language", ["en"])
def test_editing_keeps_the_expiry_time_and_refuses_numbers_json_cannot_carry(page, server):
    status, body = http(
        server.url + "/admin/api/tokens",
        {"admin-token": ADMIN_TOKEN, "Content-Type": "application/json"},
        {"name": "fay", "budget_usd": 5, "expires": "2030-06-15T18:30:00Z"},
    )
    assert status == 201, body
    page.fill("#admin-token", ADMIN_TOKEN)
    page.click("#tab-tokens-button")
    row = page.locator("#tokens-table tbody tr[data-name=fay]")
    row.locator("button[data-action=edit]").click()
    assert page.input_value("#tf-expires") == "2030-06-15"
    page.fill("#tf-rate_limit_per_minute", "30")
    page.click("#token-form-submit")
    expect(row.locator("td").nth(3)).to_have_text("30/min")

    def fay() -> dict:
        status, body = http(server.url + "/admin/api/tokens/fay", {"admin-token": ADMIN_TOKEN})
        assert status == 200, body
        return json.loads(body)

    assert fay()["expires"] == "2030-06-15T18:30:00Z"
    for typed in ("1e400", "-1e400"):
        row.locator("button[data-action=edit]").click()
        page.fill("#tf-budget_usd", typed)
        page.click("#token-form-submit")
        expect(page.locator("#token-form-error")).to_contain_text("type a number")
        assert page.get_attribute("#tf-budget_usd", "aria-invalid") == "true"
        page.click("#token-form-cancel")
        assert fay()["budget_usd"] == 5
    # A new day is sent as that day.
    row.locator("button[data-action=edit]").click()
    page.fill("#tf-expires", "2031-01-02")
    page.click("#token-form-submit")
    expect(page.locator("#token-form")).to_be_hidden()
    assert fay()["expires"] == "2031-01-02T00:00:00Z"
    assert page.problems == [] and page.evaluate("window.__csp") == []


@pytest.mark.parametrize("theme", ["light", "dark"])
@pytest.mark.parametrize("language", ["en", "ru"])
def test_each_language_and_theme_fits_every_width(browser, server, language, theme, tmp_path):
    """The Tokens and Requests tabs in the browser's language and colour scheme, nothing clipped or wider
    than the window from a phone to a large monitor (tables scroll in their own box)."""
    strings = STRINGS[language]
    context = browser.new_context(viewport={"width": 1200, "height": 900}, locale=LOCALES[language], color_scheme=theme)
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.problems = []
        page.on("pageerror", lambda e: page.problems.append(str(e)))
        page.add_init_script(CSP_RECORDER)
        page.goto(server.url + "/admin#tokens")
        assert background(page) == BACKGROUNDS[theme]
        page.fill("#admin-token", ADMIN_TOKEN)
        page.click("#tokens-refresh")
        expect(page.locator("#tokens-table tbody tr[data-name=team-bot]")).to_be_visible()
        expect(page.locator("#tokens-table thead th").first).to_have_text(strings["admin.console.col.name"])
        page.click("#add-person")
        assert clipped_at_widths(page) == {}
        page.click("#token-form-cancel")
        page.click("#tab-requests-button")
        expect(page.locator("#requests-status")).not_to_have_text(strings["admin.console.loading"])
        assert clipped_at_widths(page) == {}
        page.set_viewport_size({"width": 1200, "height": 900})
        page.click("#tab-tokens-button")
        expect(page.locator("#tokens-table tbody tr").first).to_be_visible()
        if theme == "dark":
            page.wait_for_timeout(250)
            save_screenshot(page, "admin-tokens-%s-dark" % language, tmp_path)
        assert page.problems == [] and page.evaluate("window.__csp") == []
    finally:
        context.close()


@pytest.mark.parametrize("language", ["en"])
def test_the_switch_rewords_the_tabs_in_place(page, server):
    page.fill("#admin-token", ADMIN_TOKEN)
    page.click("#tab-tokens-button")
    expect(page.locator("#tokens-table tbody tr[data-name=team-bot]")).to_be_visible()
    page.click("button[data-lang=ru]")
    russian = STRINGS["ru"]
    expect(page.locator("#tab-tokens-button")).to_have_text(russian["admin.console.tab.tokens"])
    expect(page.locator("#add-person")).to_have_text(russian["admin.console.tokens.add"])
    expect(page.locator("#tokens-table thead th").first).to_have_text(russian["admin.console.col.name"])
    row = page.locator("#tokens-table tbody tr[data-name=team-bot]")
    expect(row.locator(".badge")).to_have_text(russian["admin.console.status.active"])
    expect(row.locator("td").first).to_have_text(russian["admin.console.source.file"])
    expect(page.locator("#tokens-status")).to_contain_text(russian["admin.console.tokens.count"]["many"][5:12])
    page.click("#tab-requests-button")
    expect(page.locator("#req-show")).to_have_text(russian["admin.console.requests.show"])
    assert page.problems == [] and page.evaluate("window.__csp") == []
