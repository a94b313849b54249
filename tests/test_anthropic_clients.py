"""The official Anthropic clients through the proxy to the fake Anthropic: the Python SDK (PyPI
``anthropic``), the Node SDK (``@anthropic-ai/sdk``) and Claude Code itself (``@anthropic-ai/claude-code``,
its binary run offline as ``claude -p``), each with a named proxy token as its key."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import sqlite3

import anthropic
import pytest

from chat_gpt_proxy.fake_anthropic import Behaviour
from tests import test_anthropic
from tests.test_anthropic import KEY_A, MODEL, TEAM
from tests.test_readme import JS_DIR

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


@pytest.mark.parametrize("variable", ["ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY"])
@pytest.mark.gen_test(timeout=120)
async def test_claude_code_completes_a_turn_with_a_tool_call_through_the_proxy(
    proxy, app, base_url, claude, config, tmp_path, variable
):
    home = tmp_path / "home"
    home.mkdir()
    note = home / "note.txt"
    note.write_text("the secret word is pumpkin\n")
    # The model asks Claude Code to read the file; Claude Code reads it and sends the result back.
    claude.push(Behaviour(tool={"name": "Read", "input": {"file_path": str(note)}}), Behaviour())
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        # The three variables of the README's example.
        "ANTHROPIC_BASE_URL": base_url,
        variable: TEAM,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        # Offline and quick: no telemetry, no update check, one retry at most.
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_MAX_RETRIES": "1",
    }
    code, out, err = await run(
        [claude_code_binary(), "-p", "What is the secret word in note.txt?", "--output-format", "json"],
        env,
        str(home),
    )
    assert code == 0, err[-2000:]
    result = json.loads(out)
    assert result["is_error"] is False and result["num_turns"] == 2
    assert "pumpkin" in result["result"]
    sent = list(claude.received)
    assert [(r.method, r.path, r.query) for r in sent] == [("POST", "/v1/messages", "beta=true")] * 2
    assert "tool_result" in json.dumps(sent[1].json["messages"][-1])
    for request in sent:
        assert request.headers["x-api-key"] == KEY_A and "Authorization" not in request.headers
        assert request.headers["anthropic-beta"].startswith("claude-code-")
        assert not any(TEAM in value for value in request.headers.values())
    await app.spend.ledger.flush()
    with sqlite3.connect(config.usage_database) as db:
        rows = db.execute("SELECT token, route, status, estimated, output_tokens FROM usage").fetchall()
    assert [row[:4] for row in rows] == [("team", "messages", 200, 0)] * 2
