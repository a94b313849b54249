"""The playground in a real headless Chromium (Debian's), driven by Playwright, against the fake upstream."""

import os
import shutil
import time

import pytest
from playwright.sync_api import expect, sync_playwright

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.threaded import BackgroundStack

TOKEN = "browser-access-token"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# Records CSP violations in the page (the event does not reach the console in every case).
CSP_RECORDER = (
    "window.__csp = []; document.addEventListener('securitypolicyviolation', e => window.__csp.push("
    "e.violatedDirective + ' ' + e.blockedURI));"
)


@pytest.fixture(scope="module")
def stack():
    background = BackgroundStack(access_tokens=(TOKEN,), demo_upstream=True).start()
    yield background
    background.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser, stack):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.problems = []
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.add_init_script(CSP_RECORDER)
    page.goto(stack.url + "/")
    page.fill("#access-token", TOKEN)
    page.fill("#openai-key", "sk-browser-test")
    yield page
    context.close()


def assistant_text(page) -> str:
    items = page.locator("#history li.assistant .text")
    return items.last.inner_text() if items.count() else ""


def test_page_loads_clean_with_security_headers(page, stack):
    response = page.request.get(stack.url + "/", headers={"Accept": "text/html"})
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert page.title() == "chat_gpt_proxy playground"
    assert page.locator("#demo-banner").is_visible()
    assert "Demo upstream" in page.locator("#demo-banner").inner_text()
    assert page.evaluate("window.__csp") == [] and page.problems == []
    script = page.locator("script[src*='playground.js']").get_attribute("src")
    assert "?v=" in script, "static files carry a content hash in their URL"
    static = page.request.get(stack.url + script)
    assert static.ok and "max-age=" in static.headers["cache-control"]
    assert static.headers["x-content-type-options"] == "nosniff"
    # Nothing but this server is contacted.
    for resource in page.evaluate("performance.getEntriesByType('resource').map(e => e.name)"):
        assert resource.startswith(stack.url), resource


def test_streamed_answer_appears_progressively(page, stack, tmp_path):
    stack.fake.push(Behaviour(chunks=["Привет, ", "this ", "arrives ", "word ", "by ", "word."], delay=0.3))
    page.fill("#system", "Be brief.")
    page.fill("#prompt", "Скажи привет")
    page.click("#send")
    partial = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = assistant_text(page)
        if text and text != "Привет, this arrives word by word.":
            partial = text
            break
        time.sleep(0.05)
    assert partial and "Привет" in partial, "an incomplete answer was visible while streaming"
    expect(page.locator("#status")).to_have_text("Done.", timeout=10_000)
    assert assistant_text(page) == "Привет, this arrives word by word."
    received = stack.fake.received[-1].json
    assert received["messages"][0] == {"role": "system", "content": "Be brief."}
    assert received["messages"][-1] == {"role": "user", "content": "Скажи привет"}
    assert received["stream"] is True and received["temperature"] == 0.7
    path = tmp_path / "playground.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if os.environ.get("UPDATE_README_SCREENSHOT"):
        shutil.copy(path, os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "playground.png"))
    assert page.problems == [] and page.evaluate("window.__csp") == []


def test_stop_button_aborts_the_upstream(page, stack):
    aborts = len(stack.fake.aborts)
    stack.fake.push(Behaviour(chunks=["tok "] * 200, delay=0.1))
    page.fill("#prompt", "a long answer please")
    page.click("#send")
    # The page's CSP forbids eval, so waits use locators rather than wait_for_function.
    expect(page.locator("#history li.assistant .text").last).to_contain_text("tok", timeout=5000)
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("Stopped.", timeout=5000)
    deadline = time.monotonic() + 5
    while len(stack.fake.aborts) == aborts and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(stack.fake.aborts) > aborts, "the upstream saw the abort"
    assert page.locator("#send").is_enabled()


def test_wrong_access_token_is_explained(page, stack):
    page.fill("#access-token", "not-the-token")
    page.fill("#prompt", "hello")
    page.click("#send")
    error = page.locator("#history li.error .text")
    error.wait_for(timeout=5000)
    assert "Wrong access token" in error.inner_text()


def test_rate_limit_and_mid_stream_failure_are_explained(page, stack):
    stack.fake.push(Behaviour(kind="error", status=429, message="Rate limit reached", headers={"Retry-After": "20"}))
    page.fill("#prompt", "one")
    page.click("#send")
    page.locator("#history li.error").first.wait_for(timeout=5000)
    assert "retry in 20 s" in page.locator("#history li.error .text").first.inner_text()
    stack.fake.push(Behaviour(kind="drop", chunks=["partial ", "answer "], after=1))
    page.fill("#prompt", "two")
    page.click("#send")
    page.locator("#history li.error").nth(1).wait_for(timeout=5000)
    assert "broke off" in page.locator("#history li.error .text").nth(1).inner_text()


def test_keys_stay_out_of_storage_unless_remembered(page, stack):
    assert page.evaluate("sessionStorage.length") == 0
    page.fill("#prompt", "x")
    page.click("#send")
    expect(page.locator("#status")).to_have_text("Done.", timeout=10_000)
    assert page.evaluate("sessionStorage.length") == 0 and "sk-browser-test" not in page.url
    page.check("#remember")
    assert page.evaluate("sessionStorage.getItem('openai-key')") == "sk-browser-test"
    page.uncheck("#remember")
    assert page.evaluate("sessionStorage.length") == 0


def test_phone_width_layout(browser, stack):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    page.goto(stack.url + "/")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, "no horizontal scrolling on a phone"
    assert page.locator("#send").is_visible()
    context.close()
