"""CORS in a real browser: Debian's Chromium (through Playwright) calls the proxy from pages on two other
loopback origins, one listed in CORS_ALLOW_ORIGINS and one not."""

import json

import pytest
import tornado.httpserver
import tornado.web
from playwright.sync_api import sync_playwright
from tornado.testing import bind_unused_port

from tests.test_browser import ARGS, CHROMIUM
from tests.threaded import BackgroundStack

TOKEN = "browser-access-token"
KEY = "sk-browser-test"
PAGE = b"<!doctype html><html><head><title>another origin</title></head><body>an app on another origin</body></html>"

# Runs in the page: a fetch, and everything the page can see of its answer (or the error that blocked it).
FETCH = """async ([url, init]) => {
  try {
    const r = await fetch(url, init);
    return {status: r.status, requestId: r.headers.get('x-request-id'), retryAfter: r.headers.get('retry-after'),
            text: await r.text()};
  } catch (e) {
    return {blocked: String(e)};
  }
}"""


class PageHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(PAGE)


@pytest.fixture(scope="module")
def origins():
    """Two page servers on their own loopback ports: (listed origin, unlisted origin); the proxy lists the first."""
    sockets = [bind_unused_port() for _ in range(2)]
    listed, unlisted = ("http://127.0.0.1:%d" % port for _, port in sockets)
    stack = BackgroundStack(access_tokens=(TOKEN,), cors_allow_origins=(listed,)).start()
    servers = []

    async def serve_pages() -> None:
        for sock, _ in sockets:
            server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/", PageHandler)]))
            server.add_sockets([sock])
            servers.append(server)

    async def stop_pages() -> None:
        for server in servers:
            server.stop()
            await server.close_all_connections()

    stack.call(serve_pages)
    try:
        yield stack, listed, unlisted
    finally:
        stack.call(stop_pages)
        stack.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield instance
        instance.close()


def page_on(browser, origin: str):
    context = browser.new_context()
    page = context.new_page()
    page.goto(origin + "/")
    assert page.title() == "another origin"
    return context, page


def chat_init(body: dict, token: str = TOKEN) -> dict:
    return {
        "method": "POST",
        "headers": {"access-token": token, "openai-token": KEY, "content-type": "application/json"},
        "body": json.dumps(body),
    }


def test_a_listed_origin_can_call_both_surfaces(browser, origins):
    stack, listed, _ = origins
    context, page = page_on(browser, listed)
    try:
        answer = page.evaluate(FETCH, [stack.url + "/chat_complete", chat_init({"prompt": "from the browser"})])
        assert answer.get("status") == 200, answer
        assert json.loads(answer["text"])["text"] == "Echo: from the browser"
        assert answer["requestId"], "x-request-id is exposed to the page"

        streamed = page.evaluate(
            FETCH, [stack.url + "/chat_complete", chat_init({"prompt": "a b c", "generate_params": {"stream": True}})]
        )
        assert streamed.get("status") == 200 and streamed["text"].rstrip().endswith("data: [DONE]"), streamed

        refused = page.evaluate(FETCH, [stack.url + "/chat_complete", chat_init({"prompt": "x"}, token="wrong")])
        assert refused.get("status") == 403, "an error is readable too: %r" % refused
        assert json.loads(refused["text"])["error"]["code"] == "invalid_access_token"

        sdk_headers = {
            "access-token": TOKEN,
            "authorization": "Bearer " + KEY,
            "content-type": "application/json",
            "openai-organization": "org-x",
            "x-stainless-os": "Linux",
            "x-stainless-lang": "js",
            "x-stainless-retry-count": "0",
        }
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "sdk-like"}]}
        v1 = page.evaluate(
            FETCH,
            [stack.url + "/v1/chat/completions", {"method": "POST", "headers": sdk_headers, "body": json.dumps(body)}],
        )
        assert v1.get("status") == 200, v1
        assert json.loads(v1["text"])["choices"][0]["message"]["content"] == "Echo: sdk-like"
        assert stack.fake.received[-1].headers["Openai-Organization"] == "org-x"
    finally:
        context.close()


def test_an_unlisted_origin_is_blocked_by_the_browser(browser, origins):
    stack, _, unlisted = origins
    before = len(stack.fake.received)
    context, page = page_on(browser, unlisted)
    try:
        for path, init in [
            ("/chat_complete", chat_init({"prompt": "from elsewhere"})),
            ("/v1/models", {"headers": {"access-token": TOKEN, "authorization": "Bearer " + KEY}}),
        ]:
            answer = page.evaluate(FETCH, [stack.url + path, init])
            assert "blocked" in answer and "Failed to fetch" in answer["blocked"], answer
    finally:
        context.close()
    assert len(stack.fake.received) == before, "the preflight failed, so the call itself was never sent"
