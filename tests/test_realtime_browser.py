"""/v1/realtime from a real browser (Debian's Chromium through Playwright): the subprotocol form of the tokens."""

import time

import pytest
from playwright.sync_api import sync_playwright

from chat_gpt_proxy.fake_openai.behaviours import RealtimeBehaviour
from tests.test_browser import ARGS, CHROMIUM
from tests.test_readme import snippet
from tests.threaded import BackgroundStack

TOKEN = "rt-browser-access-7c1d"
KEY = "sk-rt-browser-2b9e"

# Opens a session the way a browser application does, asks for one response,
# and closes with ws.close() (no code: 1005 at the proxy).
SESSION_JS = """
async ([url, protocols]) => {
  const out = {events: [], times: []};
  const ws = new WebSocket(url, protocols);
  const opened = await new Promise(resolve => {
    ws.onopen = () => resolve(true);
    ws.onclose = event => { out.closeCode = event.code; resolve(false); };
  });
  if (!opened) return out;
  out.protocol = ws.protocol;
  const done = new Promise(resolve => {
    ws.onmessage = message => {
      const event = JSON.parse(message.data);
      out.events.push(event.type === "response.output_text.delta" ? "delta:" + event.delta : event.type);
      out.times.push(performance.now());
      if (event.type === "response.done") resolve();
    };
  });
  ws.send(JSON.stringify({type: "conversation.item.create", item: {type: "message", role: "user",
    content: [{type: "input_text", text: "from the browser"}]}}));
  ws.send(JSON.stringify({type: "response.create"}));
  await done;
  const closed = new Promise(resolve => { ws.onclose = event => resolve(event.code); });
  ws.close();
  out.closeCode = await closed;
  return out;
}
"""


@pytest.fixture(scope="module")
def stack():
    background = BackgroundStack(access_tokens=(TOKEN,)).start()
    yield background
    background.stop()


@pytest.fixture(scope="module")
def page(stack):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        # A page of another origin on loopback (the fake's own JSON): browser
        # applications call the proxy from their own origin.
        page.goto(stack.fake.url + "/models")
        yield page
        browser.close()


def ws_url(stack) -> str:
    return "ws" + stack.url[len("http") :] + "/v1/realtime?model=gpt-realtime"


def test_browser_session_with_subprotocol_tokens(page, stack):
    stack.fake.push_realtime(RealtimeBehaviour(delay=0.2, audio_deltas=0))
    protocols = ["realtime", "access-token." + TOKEN, "openai-insecure-api-key." + KEY]
    result = page.evaluate(SESSION_JS, [ws_url(stack), protocols])
    ended = time.monotonic()
    assert result["protocol"] == "realtime"
    assert result["events"] == [
        "session.created",
        "response.created",
        "delta:Echo: ",
        "delta:from ",
        "delta:the ",
        "delta:browser ",
        "response.done",
    ]
    times = result["times"][2:6]  # the deltas, sent 0.2 s apart, arrive apart
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) > 100, times
    assert result["closeCode"] == 1005  # the browser sent no code
    seen = stack.fake.realtime_sessions[-1]
    while seen.closed_at is None and time.monotonic() - ended < 1:
        time.sleep(0.01)
    assert seen.closed_at is not None, "the upstream saw the browser's close within 1 s"
    assert seen.close_code == 1000  # 1005 may not be sent: mirrored as 1000
    assert seen.headers["Authorization"] == "Bearer " + KEY
    assert seen.subprotocols == ["realtime"]


def test_browser_refused_without_the_access_token(page, stack):
    before = len(stack.fake.realtime_sessions)
    result = page.evaluate(SESSION_JS, [ws_url(stack), ["realtime", "openai-insecure-api-key." + KEY]])
    # Browsers hide the refusal's status from pages: the socket just fails (1006).
    assert "protocol" not in result and result["closeCode"] == 1006
    assert len(stack.fake.realtime_sessions) == before, "no upstream session was opened"


def test_readme_browser_snippet(page, stack):
    language, code = snippet("browser-realtime")
    assert language == "javascript"
    code = code.replace("ws://127.0.0.1:9081", "ws" + stack.url[len("http") :]).replace("123456", TOKEN)
    script = "async (key) => { const output = {textContent: ''}; %s\n" % code
    script += "await new Promise(resolve => ws.addEventListener('close', resolve)); return output.textContent; }"
    assert page.evaluate(script, KEY) == "Echo: Привет! "
