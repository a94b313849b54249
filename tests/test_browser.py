"""The playground in a real headless Chromium (Debian's), driven by Playwright, against the fake upstream."""

import os
import re
import shutil
import time

import pytest
from playwright.sync_api import expect, sync_playwright

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from handlers.pages import STRINGS
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
# The widths a page must fit, from a small phone to a large monitor.
WIDTHS = [360, 390, 768, 1024, 1200, 1440, 1920]
LOCALES = {"en": "en-US", "ru": "ru-RU"}
# What the body's background is in each theme (static/*.css, --bg).
BACKGROUNDS = {"light": "rgb(246, 247, 251)", "dark": "rgb(15, 19, 26)"}
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "screenshots")
# Everything on the page that does not fit: the page wider than the window, an element outside it,
# a field, button or placeholder whose text is cut, a chart's text outside its chart. Tables scroll
# in their own box (.table-wrap) and are left out.
CLIPPED = """() => {
  const problems = [];
  const width = document.documentElement.clientWidth;
  const scrolled = document.documentElement.scrollWidth;
  if (scrolled > width) problems.push("the page is " + scrolled + " px wide in a " + width + " px window");
  const name = (el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") + " " +
    JSON.stringify((el.value || el.placeholder || el.textContent || "").trim().slice(0, 40));
  const context = document.createElement("canvas").getContext("2d");
  const textWidth = (el, text) => {
    const style = getComputedStyle(el);
    context.font = style.fontStyle + " " + style.fontWeight + " " + style.fontSize + " " + style.fontFamily;
    return context.measureText(text).width;
  };
  const room = (el) => {
    const style = getComputedStyle(el);
    return el.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  };
  for (const el of document.querySelectorAll("body *")) {
    if (!el.getClientRects().length || el.closest("svg, .table-wrap")) continue;
    const box = el.getBoundingClientRect();
    if (box.left < -0.5 || box.right > width + 0.5) problems.push("outside the window: " + name(el));
    // A password field shows dots, as many as the secret is long: no width fits every secret.
    if (el.matches("input:not([type=password]), textarea, button, select") && el.scrollWidth > el.clientWidth + 1) {
      problems.push("clipped: " + name(el));
    }
    if (el.matches("input[placeholder]") && textWidth(el, el.placeholder) > room(el)) {
      problems.push("clipped placeholder: " + name(el));
    }
    if (el.matches("input[type=number]") && textWidth(el, el.value) + 20 > room(el)) {
      problems.push("clipped number: " + name(el));
    }
  }
  for (const text of document.querySelectorAll("svg text")) {
    const box = text.getBoundingClientRect();
    const frame = text.ownerSVGElement.getBoundingClientRect();
    if (box.left < frame.left - 1 || box.right > frame.right + 1) problems.push("outside its chart: " + name(text));
  }
  return problems;
}"""


def clipped_at_widths(page, widths=WIDTHS) -> dict:
    """{width: what does not fit} for each width of ``widths`` where something does not fit."""
    found = {}
    for width in widths:
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(250)  # a page that redraws on resize waits 150 ms for the resizing to end
        problems = page.evaluate(CLIPPED)
        if problems:
            found[width] = problems
    return found


def background(page) -> str:
    return page.evaluate("getComputedStyle(document.body).backgroundColor")


def save_screenshot(page, name: str, tmp_path) -> None:
    """A screenshot that must show something; with UPDATE_SCREENSHOTS=1 also docs/screenshots/<name>.png."""
    path = tmp_path / (name + ".png")
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOTS"):
        shutil.copy(path, os.path.join(DOCS, name + ".png"))


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
    # A failed fetch (a 403 the test asked for) is no problem of the page.
    page.on("console", lambda m: m.type == "error" and "status of" not in m.text and page.problems.append(m.text))
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


SPENT = "browser-spent-token-5c1e"
BUDGETED = "browser-budgeted-token-8a2d"


@pytest.fixture(scope="module")
def budget_stack(tmp_path_factory):
    """A proxy whose tokens have budgets: one already spent (a budget of $0), one of $5."""
    tokens = tmp_path_factory.mktemp("budgets") / "tokens.toml"
    tokens.write_text(
        '[spent]\ntoken = "%s"\nbudget_usd = 0.0\n\n[budgeted]\ntoken = "%s"\nbudget_usd = 5.0\n' % (SPENT, BUDGETED)
    )
    background = BackgroundStack(access_tokens_file=str(tokens), demo_upstream=True).start()
    yield background
    background.stop()


def test_each_refusal_is_explained_by_its_code(browser, budget_stack):
    """A spent budget (429 budget_exceeded) is no rate limit and a model without a price (403
    model_not_priced) no wrong token: each is told as what it is, in the page's language."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    try:
        page = context.new_page()
        page.problems = []
        page.on("console", lambda m: m.type == "error" and "status of" not in m.text and page.problems.append(m.text))
        page.on("pageerror", lambda e: page.problems.append(str(e)))
        page.goto(budget_stack.url + "/")
        page.fill("#openai-key", "sk-browser-test")
        errors = page.locator("#history li.error .text")
        page.fill("#access-token", SPENT)
        page.fill("#prompt", "one")
        page.click("#send")
        expect(errors.nth(0)).to_contain_text("The budget of this access token is spent; it renews in ")
        assert "of its $0.00 budget" in errors.nth(0).inner_text(), "the server's own words follow"
        page.fill("#access-token", BUDGETED)
        page.fill("#model", "a-model-without-a-price")
        page.fill("#prompt", "two")
        page.click("#send")
        expect(errors.nth(1)).to_contain_text("This model has no price on this proxy")
        assert "a-model-without-a-price" in errors.nth(1).inner_text()
        for text in errors.all_inner_texts():
            assert "Rate limited" not in text and "Wrong access token" not in text, text
        english = errors.nth(0).inner_text()
        page.click("button[data-lang=ru]")
        assert errors.nth(0).inner_text().startswith("Бюджет этого токена доступа исчерпан; он обновится через ")
        if english_days := re.search(r"renews in ([0-9]+) d ", english):
            assert "через %s дн. " % english_days.group(1) in errors.nth(0).inner_text()
        assert errors.nth(1).inner_text().startswith("У этой модели нет цены на этом прокси")
        assert page.problems == []
    finally:
        context.close()


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


@pytest.mark.parametrize("theme", ["light", "dark"])
@pytest.mark.parametrize("language", ["en", "ru"])
def test_each_language_and_theme(browser, stack, language, theme, tmp_path):
    """The page in the browser's language (Accept-Language) and colour scheme, every field whole from a
    phone to a large monitor; its screenshot is docs/screenshots/playground-<language>-<theme>.png."""
    strings = STRINGS[language]
    context = browser.new_context(viewport={"width": 1100, "height": 760}, locale=LOCALES[language], color_scheme=theme)
    try:
        page = context.new_page()
        page.problems = []
        page.on("pageerror", lambda e: page.problems.append(str(e)))
        page.add_init_script(CSP_RECORDER)
        response = page.goto(stack.url + "/")
        assert response.headers["content-language"] == language
        assert page.get_attribute("html", "lang") == language
        assert page.title() == strings["playground.title"]
        assert page.inner_text("#demo-banner") == strings["playground.demo"]
        assert page.inner_text("#send") == strings["playground.send"]
        assert page.get_attribute("#prompt", "placeholder") == strings["playground.prompt.placeholder"]
        assert page.get_attribute("button[data-lang=%s]" % language, "aria-pressed") == "true"
        assert background(page) == BACKGROUNDS[theme]
        assert page.evaluate("getComputedStyle(document.getElementById('model')).backgroundColor") != (
            "rgb(255, 255, 255)" if theme == "dark" else "rgb(17, 21, 28)"
        )
        assert clipped_at_widths(page) == {}
        page.set_viewport_size({"width": 1100, "height": 760})
        page.fill("#access-token", TOKEN)
        page.fill("#system", strings["playground.system.placeholder"])
        page.fill("#prompt", "Привет! Какая ты модель?" if language == "ru" else "Hello! Which model are you?")
        page.click("#send")
        expect(page.locator("#status")).to_have_text(strings["playground.status.done"], timeout=10_000)
        assert page.inner_text("#history li.user .who") == strings["playground.who.user"]
        assert assistant_text(page).startswith("Echo: ")
        save_screenshot(page, "playground-%s-%s" % (language, theme), tmp_path)
        assert page.problems == [] and page.evaluate("window.__csp") == []
    finally:
        context.close()


def test_the_switch_changes_the_language_in_place_and_is_remembered(page, stack):
    """English from the browser; the switch turns the page, and what it already said, into Russian
    without a reload (what was typed stays), and the next visit keeps it."""
    assert page.get_attribute("html", "lang") == "en"
    page.fill("#access-token", "not-the-token")
    page.fill("#prompt", "hello")
    page.click("#send")
    error = page.locator("#history li.error .text")
    expect(error).to_contain_text("Wrong access token")
    page.fill("#prompt", "a draft")
    page.click("button[data-lang=ru]")
    ru = STRINGS["ru"]
    assert page.get_attribute("html", "lang") == "ru"
    assert page.title() == ru["playground.title"]
    assert page.inner_text("#send") == ru["playground.send"]
    assert page.get_attribute("#max-tokens", "placeholder") == ru["playground.max_tokens.placeholder"]
    assert page.get_attribute("section.settings", "aria-label") == ru["playground.settings"]
    assert error.inner_text().startswith("Неверный токен доступа")
    assert page.inner_text("#history li.error .who") == ru["playground.who.error"]
    assert page.get_attribute("button[data-lang=ru]", "aria-pressed") == "true"
    assert page.input_value("#prompt") == "a draft" and page.input_value("#access-token") == "not-the-token"
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    assert cookies["chat_gpt_proxy_lang"] == "ru"
    page.reload()
    assert page.get_attribute("html", "lang") == "ru" and page.title() == ru["playground.title"]
    page.click("button[data-lang=en]")
    assert page.title() == "chat_gpt_proxy playground"
    assert page.problems == [] and page.evaluate("window.__csp") == []
