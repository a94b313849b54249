"""The official Anthropic clients through the proxy to the fake Anthropic: the Python SDK (PyPI
``anthropic``), the Node SDK (``@anthropic-ai/sdk``) and Claude Code itself (``@anthropic-ai/claude-code``,
its binary run offline as ``claude -p``), each with a named proxy token as its key."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import io
import json
import os
import re
import sqlite3

import anthropic
import pytest

from chat_gpt_proxy.fake_anthropic import Behaviour
from tests import test_anthropic
from tests.test_anthropic import ANN, BUDGETED, KEY_A, MODEL, OWN, TEAM
from tests.test_readme import JS_DIR, snippet

# The fake Anthropic and the proxy's settings (upstreams, tokens, ledger) of tests/test_anthropic.py.
claude = test_anthropic.claude
config = test_anthropic.config

TOOL = {"name": "get_weather", "input": {"city": "Paris, France", "unit": "celsius"}}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def sdk(base_url: str, **kwargs) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base_url, max_retries=0, **kwargs)


@pytest.mark.parametrize("credential", ["api_key", "auth_token"])
@pytest.mark.gen_test(timeout=30)
async def test_the_python_sdk_creates_streams_calls_tools_and_counts(proxy, base_url, claude, credential):
    client = sdk(base_url, **{credential: TEAM})
    hello = [{"role": "user", "content": "hello from python"}]
    answer = await client.messages.create(model=MODEL, max_tokens=64, messages=hello)
    assert answer.content[0].text == "Echo: hello from python "
    async with client.messages.stream(model=MODEL, max_tokens=64, messages=hello) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Echo: hello from python " and final.usage.output_tokens == 4
    claude.push(Behaviour(tool=TOOL, thinking="Which city?"))
    async with client.messages.stream(model=MODEL, max_tokens=64, messages=hello, tools=[WEATHER_TOOL]) as stream:
        final = await stream.get_final_message()
    used = [block for block in final.content if block.type == "tool_use"]
    assert final.stop_reason == "tool_use" and used[0].input == TOOL["input"]
    assert final.content[0].type == "thinking" and final.content[0].signature
    counted = await client.messages.count_tokens(model=MODEL, messages=hello)
    assert counted.input_tokens > 0
    models = [m.id async for m in client.models.list(limit=2)]
    assert len(models) == 6 and models[0].startswith("claude-")
    await client.close()
    assert {r.headers["x-api-key"] for r in claude.received} == {KEY_A}
    assert {r.headers["anthropic-version"] for r in claude.received} == {"2026-10-21"}


@pytest.mark.gen_test(timeout=30)
async def test_the_python_sdk_raises_its_own_errors(proxy, base_url, claude):
    client = sdk(base_url, api_key="not-a-proxy-token")
    with pytest.raises(anthropic.PermissionDeniedError):
        await client.messages.create(model=MODEL, max_tokens=9, messages=[{"role": "user", "content": "hi"}])
    claude.by_key[KEY_A] = claude.by_key["sk-ant-SERVERKEY-B-7b2d9a"] = Behaviour(
        kind="error", error_type="overloaded_error", message="Overloaded"
    )
    with pytest.raises(anthropic.OverloadedError):
        await sdk(base_url, api_key=TEAM).messages.create(
            model=MODEL, max_tokens=9, messages=[{"role": "user", "content": "hi"}]
        )


@pytest.mark.gen_test(timeout=60)
async def test_the_python_sdk_raises_a_budget_refusal_at_once_instead_of_waiting_for_the_reset(proxy, base_url, claude):
    """The refusal's Retry-After is the time to the budget's reset; the SDK (default max_retries) would
    sleep that long between retries, were it not told x-should-retry: false."""
    client = anthropic.AsyncAnthropic(base_url=base_url, api_key=BUDGETED)
    hi = [{"role": "user", "content": "hi"}]
    await client.messages.create(model=MODEL, max_tokens=9, messages=hi)
    with pytest.raises(anthropic.RateLimitError) as refused:
        await asyncio.wait_for(client.messages.create(model=MODEL, max_tokens=9, messages=hi), 10)
    assert int(refused.value.response.headers["Retry-After"]) > 0
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert len(claude.received) == 1
    await client.close()


@pytest.mark.gen_test(timeout=30)
async def test_the_documented_python_sdk_snippet(proxy, base_url, claude):
    language, code = snippet("python-anthropic")
    assert language == "python"
    code = code.replace("http://127.0.0.1:9081", base_url).replace('"the-token-you-gave-alice"', repr(TEAM))
    out = io.StringIO()

    def run_snippet():
        with contextlib.redirect_stdout(out):
            exec(compile(code, "python-anthropic", "exec"), {})

    await proxy.in_thread(run_snippet)
    assert out.getvalue() == "Echo: Привет! \nEcho: Count to five \n"
    assert [r.json["model"] for r in claude.received] == ["claude-sonnet-4-5"] * 2


NODE_SCRIPT = """
import Anthropic from "@anthropic-ai/sdk";

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new Anthropic({ baseURL, apiKey, maxRetries: 0 });
const messages = [{ role: "user", content: "hello from node" }];
const out = {};
const created = await client.messages.create({ model, max_tokens: 64, messages });
out.create = created.content[0].text;
const stream = client.messages.stream({ model, max_tokens: 64, messages });
let text = "";
stream.on("text", (piece) => { text += piece; });
await stream.finalMessage();
out.stream = text;
const tools = [{ name: "get_weather", input_schema: { type: "object", properties: { city: { type: "string" } } } }];
const withTool = await client.messages.stream({ model, max_tokens: 64, messages, tools }).finalMessage();
out.tool = withTool.content.find((block) => block.type === "tool_use").input;
out.count = (await client.messages.countTokens({ model, messages })).input_tokens;
console.log(JSON.stringify(out));
"""


async def run(argv: list[str], env: dict | None = None, cwd: str | None = None, timeout: float = 60):
    """Run a client as a real process; it is killed if it outlives ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.gen_test(timeout=60)
async def test_the_node_sdk_creates_streams_calls_tools_and_counts(proxy, base_url, claude, tmp_path):
    script = os.path.join(JS_DIR, ".snippet-anthropic-sdk.mjs")
    with open(script, "w") as f:
        f.write(NODE_SCRIPT)
    claude.push(Behaviour(), Behaviour(), Behaviour(tool=TOOL))
    try:
        code, out, err = await run(["node", script, base_url, TEAM, MODEL])
    finally:
        os.unlink(script)
    assert code == 0, err
    assert json.loads(out) == {
        "create": "Echo: hello from node ",
        "stream": "Echo: hello from node ",
        "tool": TOOL["input"],
        "count": json.loads(out)["count"],
    }
    assert json.loads(out)["count"] > 0
    # The version the SDK sends (1.17.0: 2026-10-21, as the Python SDK) reaches the upstream as sent.
    assert {r.headers["anthropic-version"] for r in claude.received} == {"2026-10-21"}


def claude_code_binary() -> str:
    """The Claude Code binary of this platform's package (npm 11 runs no postinstall to link bin/claude)."""
    found = glob.glob(os.path.join(JS_DIR, "node_modules", "@anthropic-ai", "claude-code-*", "claude"))
    assert found, "tests/js/node_modules holds no @anthropic-ai/claude-code-<platform> package: run make test"
    return found[0]


def readme_environment(base_url: str) -> dict[str, str]:
    """The README's three variables for Claude Code, pointed at the test's proxy and token."""
    language, code = snippet("claude-code")
    assert language == "bash"
    found = dict(re.findall(r"^export (\w+)=(\S+)", code, re.M))
    assert set(found) == {"ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"}
    found["ANTHROPIC_BASE_URL"] = found["ANTHROPIC_BASE_URL"].replace("http://127.0.0.1:9081", base_url)
    found["ANTHROPIC_AUTH_TOKEN"] = found["ANTHROPIC_AUTH_TOKEN"].replace("the-token-you-gave-alice", TEAM)
    return found


@pytest.mark.parametrize("credentials", ["ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY", "own key"])
@pytest.mark.gen_test(timeout=120)
async def test_claude_code_completes_a_turn_with_a_tool_call_through_the_proxy(
    proxy, app, base_url, claude, config, tmp_path, credentials
):
    home = tmp_path / "home"
    home.mkdir()
    note = home / "note.txt"
    note.write_text("the secret word is pumpkin\n")
    # The model asks Claude Code to read the file; Claude Code reads it and sends the result back.
    claude.push(Behaviour(tool={"name": "Read", "input": {"file_path": str(note)}}), Behaviour())
    env = readme_environment(base_url)
    token, upstream_key = "team", KEY_A
    discovery = credentials == "ANTHROPIC_API_KEY"
    if discovery:
        env["ANTHROPIC_API_KEY"] = env.pop("ANTHROPIC_AUTH_TOKEN")
        # Claude Code asks the gateway for its models first (Anthropic's list shape).
        env["CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY"] = "1"
    elif credentials == "own key":
        # The caller's own Anthropic key, and the proxy's token in a header of its own.
        del env["ANTHROPIC_AUTH_TOKEN"]
        env.update(ANTHROPIC_API_KEY=OWN, ANTHROPIC_CUSTOM_HEADERS="access-token: " + ANN)
        token, upstream_key = "ann", OWN
    # A throwaway home; one retry at most, so that a refusal fails the test at once.
    env.update(PATH=os.environ.get("PATH", "/usr/bin:/bin"), HOME=str(home), CLAUDE_CODE_MAX_RETRIES="1")
    trace = tmp_path / "connect.trace"
    code, out, err = await run(
        ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace), claude_code_binary()]
        + ["-p", "What is the secret word in note.txt?", "--output-format", "json"],
        env,
        str(home),
    )
    assert code == 0, err[-2000:]
    result = json.loads(out)
    assert result["is_error"] is False and result["num_turns"] == 2
    assert "pumpkin" in result["result"]
    # Set up as the README says, it connects to the proxy and nowhere else (no DNS either).
    port = int(base_url.rsplit(":", 1)[1])
    connects = [line for line in trace.read_text().splitlines() if "AF_INET" in line]
    assert connects and all("htons(%d)" % port in line and '"127.0.0.1"' in line for line in connects), connects
    sent = list(claude.received)
    if discovery:
        listed, *sent = sent
        assert (listed.method, listed.path, listed.query) == ("GET", "/v1/models", "limit=1000")
        assert listed.headers["x-api-key"] == upstream_key
    assert [(r.method, r.path, r.query) for r in sent] == [("POST", "/v1/messages", "beta=true")] * 2
    assert "tool_result" in json.dumps(sent[1].json["messages"][-1])
    for request in sent:
        assert request.headers["x-api-key"] == upstream_key and "Authorization" not in request.headers
        assert request.headers["anthropic-beta"].startswith("claude-code-")
        assert not any(TEAM in value or ANN in value for value in request.headers.values())
    await app.spend.ledger.flush()
    with sqlite3.connect(config.usage_database) as db:
        rows = db.execute("SELECT token, route, status, estimated FROM usage").fetchall()
    assert rows == [(token, "messages", 200, 0)] * 2


@pytest.mark.parametrize(
    "token, status",
    [("not-a-proxy-token", 403), (ANN, 401)],  # unknown token; a token without use_server_key and no key
)
@pytest.mark.gen_test(timeout=120)
async def test_what_claude_code_shows_when_the_proxy_refuses_its_token(
    proxy, base_url, claude, tmp_path, token, status
):
    """docs/api.md says what Claude Code prints for the proxy's 401 and 403 and what to check."""
    home = tmp_path / "home"
    home.mkdir()
    env = readme_environment(base_url) | {"ANTHROPIC_AUTH_TOKEN": token}
    env.update(PATH=os.environ.get("PATH", "/usr/bin:/bin"), HOME=str(home), CLAUDE_CODE_MAX_RETRIES="1")
    code, out, err = await run([claude_code_binary(), "-p", "hi", "--output-format", "json"], env, str(home))
    result = json.loads(out)
    assert code == 1 and result["is_error"] is True
    # Claude Code shows neither the status nor the proxy's message, only its own words.
    assert result["result"] == "Not logged in · Please run /login"
    assert result["api_error_status"] == status
    assert claude.received == []
