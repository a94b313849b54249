"""Limits (rate limit, open-files limit) and secrets: no token value ever leaves where it belongs."""

import asyncio
import hmac
import json
import re
import resource

import openai
import pytest

import handlers.relay
from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.conftest import ACCESS_TOKEN, AUTH, OPENAI_KEY
from tests.procs import ServerProcess


@pytest.mark.settings(rate_limit_per_token=3)
@pytest.mark.gen_test
async def test_rate_limit_per_access_token(proxy, fake_openai):
    for _ in range(3):
        response, _ = await proxy.chat({"prompt": "x"})
        assert response.code == 200
    response, body = await proxy.chat({"prompt": "x"})
    assert response.code == 429 and body["status"] == "error" and body["error"]["code"] == "proxy_rate_limited"
    assert int(response.headers["Retry-After"]) >= 1
    response = await proxy.request("/v1/models", method="GET")
    assert response.code == 429 and set(json.loads(response.body)) == {"error"}
    # Each request takes one unit, whatever the route.
    for _ in range(2):
        response = await proxy.request(
            "/v1/chat/completions",
            headers={"access-token": "second-token-abc"},
            json_body={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        )
        assert response.code == 200
    # Another token has its own budget.
    response, _ = await proxy.chat({"prompt": "x"}, headers={"access-token": "second-token-abc"})
    assert response.code == 200
    response, _ = await proxy.chat({"prompt": "x"}, headers={"access-token": "second-token-abc"})
    assert response.code == 429
    assert len(fake_openai.received) == 6


def test_access_tokens_compared_in_constant_time(monkeypatch):
    """Every configured token is compared with hmac.compare_digest, whichever matches."""
    import chat_gpt_proxy.access.tokens
    from settings import Settings

    registry = chat_gpt_proxy.access.tokens.TokenRegistry(
        Settings(access_tokens=("first-token", "second-token", "third"))
    )
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert registry.lookup("first-token").key == "-0"
    assert len(calls) == 3


@pytest.mark.gen_test(timeout=30)
async def test_open_files_limit_is_raised_at_startup(fake_openai, tmp_path):
    server = ServerProcess({"OPENAI_BASE_URL": fake_openai.url, "ACCESS_TOKEN": ACCESS_TOKEN}, str(tmp_path / "log"))
    try:
        await server.wait_ready()
        with open("/proc/%d/limits" % server.proc.pid) as f:
            line = next(line for line in f if line.startswith("Max open files"))
        soft, hard = re.findall(r"\d+|unlimited", line)[:2]
        assert soft == hard, line
        if soft != "unlimited":
            assert int(soft) >= resource.getrlimit(resource.RLIMIT_NOFILE)[1], line
    finally:
        server.stop()


class Exploding:
    """Stands in for UpstreamCall: fails deep in the upstream client with secrets in its message."""

    def __init__(self, client, config, method, url, headers, body, **kwargs):
        raise RuntimeError("deep failure with %s and %r" % (headers.get("Authorization"), headers))


@pytest.mark.gen_test(timeout=60)
async def test_no_secret_anywhere(proxy, fake_openai, base_url, caplog, monkeypatch):
    """Every route through success and every error path; then scan logs, bodies and headers."""
    seen = []

    async def call(*args, **kwargs):
        response = await proxy.request(*args, check=False, **kwargs)
        seen.append(response)
        return response

    stream = {"prompt": "s", "generate_params": {"stream": True}}
    await call(json_body={"prompt": "ok"})
    await call(json_body=stream)
    await call(json_body={"prompt": "x"}, headers={"access-token": "wrong"})
    await call(json_body={"prompt": "x"}, headers={"access-token": ACCESS_TOKEN}, auth=False)
    await call(json_body={"prompt": 5})
    await call(body=b"{bad")
    for behaviour in (
        Behaviour(kind="error", status=401, message="Incorrect API key provided: sk-TEST****"),
        Behaviour(kind="error", status=429, headers={"Retry-After": "1"}),
        Behaviour(kind="garbage"),
        Behaviour(kind="reset_headers"),
        Behaviour(kind="drop", chunks=["a ", "b "], after=1),
    ):
        fake_openai.push(behaviour)
        await call(json_body=stream if behaviour.kind == "drop" else {"prompt": "x"})
    for path, method in (("/v1/models", "GET"), ("/healthz", "GET"), ("/metrics", "GET"), ("/", "GET")):
        await call(path, method=method)
    await call(
        "/v1/chat/completions", json_body={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    await call("/v1/models", method="GET", headers={"access-token": "wrong"})

    def sdk_calls():
        client = openai.OpenAI(
            base_url=base_url + "/v1", api_key=OPENAI_KEY, max_retries=0, default_headers={"access-token": ACCESS_TOKEN}
        )
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        fake_openai.push(Behaviour(kind="error", status=401, message="bad key"))
        try:
            client.models.list()
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        except openai.AuthenticationError:
            pass

    await proxy.in_thread(sdk_calls)

    monkeypatch.setattr(handlers.relay, "UpstreamCall", Exploding)
    response = await call(json_body={"prompt": "x"})
    assert response.code == 500 and json.loads(response.body)["error"]["type"] == "server_error"
    assert any("unexpected error" in r.getMessage() for r in caplog.records), "the bug was logged"
    await asyncio.sleep(0.1)

    log_text = "\n".join(
        r.getMessage() + repr(r.args) + (repr(r.exc_info) if r.exc_info else "") for r in caplog.records
    )
    assert len(caplog.records) > 30
    assert len(seen) > 15
    for secret in (ACCESS_TOKEN, OPENAI_KEY):
        assert secret not in log_text, "secret in the logs"
        for response in seen:
            assert secret.encode() not in (response.body or b""), response.request.url
            for name, value in response.headers.get_all():
                assert secret not in value, name
    # The upstream got the key only where it belongs.
    for received in fake_openai.received:
        for name, value in received.headers.items():
            if OPENAI_KEY in value:
                assert name == "Authorization" and value == "Bearer " + OPENAI_KEY
            assert ACCESS_TOKEN not in value
        assert OPENAI_KEY.encode() not in received.body and ACCESS_TOKEN.encode() not in received.body
    assert AUTH  # the tokens above are the ones every request carried
