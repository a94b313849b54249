"""Codex CLI (``@openai/codex`` from npm, its own binary, offline) through the proxy with the ledger on.

Codex speaks the Responses API as a stream and closes its connection the
moment ``response.completed`` arrives: its turn must be charged the usage
that event carried, not an estimate for a client that left.
"""

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import pytest

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.conftest import proxy_settings

CODEX = Path(__file__).parent / "js" / "node_modules" / "@openai" / "codex" / "bin" / "codex.js"
TOKEN = "codex-TOKEN-9f8e7d6c5b"


@pytest.fixture
def config(request, fake_openai, tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[codex]\ntoken = "{TOKEN}"\nbudget_tokens = 1000000\nuse_server_key = true\n')
    return proxy_settings(
        request,
        fake_openai,
        access_tokens_file=str(tokens),
        usage_database=str(tmp_path / "usage.sqlite3"),
        openai_api_key="sk-server-key-for-codex-0123",
    )


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_a_codex_turn_is_charged_the_usage_the_upstream_reported(proxy, app, fake_openai, base_url, tmp_path):
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        'model = "gpt-4o-mini"\nmodel_provider = "proxy"\n\n'
        "[model_providers.proxy]\n"
        'name = "proxy"\nbase_url = "%s/v1"\nenv_key = "PROXY_TOKEN"\nwire_api = "responses"\n' % base_url
    )
    fake_openai.by_model["gpt-4o-mini"] = Behaviour(usage={"input_tokens": 13, "output_tokens": 9})
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "CODEX_HOME": str(home),
        # The SDK-style credential: the proxy's named token as the API key.
        "PROXY_TOKEN": TOKEN,
    }
    process = await asyncio.create_subprocess_exec(
        "node",
        str(CODEX),
        "exec",
        "--skip-git-repo-check",
        "say hi",
        cwd=str(tmp_path),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 90)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()[-2000:]
    assert "Echo: say hi" in out.decode()
    responses = [r for r in fake_openai.received if r.path == "/v1/responses"]
    assert responses and all(r.headers["authorization"] == "Bearer sk-server-key-for-codex-0123" for r in responses)
    deadline = time.monotonic() + 5
    while True:
        await app.spend.ledger.flush()
        with sqlite3.connect(app.config.usage_database) as db:
            found = db.execute("SELECT token, route, input_tokens, output_tokens, estimated FROM usage").fetchall()
        if len(found) >= len(responses) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert found == [("codex", "v1", 13, 9, 0)] * len(responses)
    metrics = (await proxy.request("/metrics", method="GET", auth=False)).body.decode()
    assert (
        'proxy_tokens_total{kind="completion",model="gpt-4o-mini",token="codex"} %.1f' % (9 * len(responses)) in metrics
    )
