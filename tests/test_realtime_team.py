"""Named tokens on /v1/realtime: the server-held key, each token's limits, usage per name.

The tokens file is tests/test_tokens.py's: alice may use the server's key,
bob is limited to gpt-4o, carol has max_concurrent = 1, dave is disabled,
erin may open 2 per minute. Sessions run against the fake realtime upstream.
"""

import asyncio
import json
import time

import openai
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from chat_gpt_proxy.fake_openai.behaviours import RealtimeBehaviour
from tests.conftest import OPENAI_KEY, proxy_settings
from tests.test_tokens import ALICE, BOB, CAROL, DAVE, ERIN, NAMED, SERVER_KEY, TOKENS_TOML


@pytest.fixture
def config(request, fake_openai, tmp_path):
    """One unnamed token, the named ones of tests/test_tokens.py, a server key."""
    path = tmp_path / "tokens.toml"
    path.write_text(TOKENS_TOML)
    return proxy_settings(request, fake_openai, access_tokens_file=str(path), openai_api_key=SERVER_KEY)


@pytest.fixture(autouse=True)
def _sessions_end(proxy, app, io_loop):
    """Every session a test opened has ended on both sides before the servers stop."""
    yield
    pool = app.pool

    async def ended():
        for _ in range(250):
            if not pool.handlers:
                return True
            await asyncio.sleep(0.02)
        return False

    assert io_loop.run_sync(ended), "a realtime session outlived its test"


def ws_url(base_url: str, model: str = "gpt-realtime") -> str:
    return "ws" + base_url[len("http") :] + "/v1/realtime?model=" + model


def connect(base_url, headers=None, subprotocols=None, model="gpt-realtime"):
    return websockets.connect(
        ws_url(base_url, model), additional_headers=headers, subprotocols=subprotocols, open_timeout=10
    )


async def refusal(base_url, **kwargs):
    """Open a session that must be refused; returns (status, parsed body, headers)."""
    with pytest.raises(InvalidStatus) as info:
        await connect(base_url, **kwargs)
    response = info.value.response
    return response.status_code, json.loads(bytes(response.body)), response.headers


async def opened(ws) -> None:
    assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "session.created"


@pytest.mark.gen_test(timeout=20)
async def test_browser_form_with_a_named_token_and_no_key_uses_the_server_key(proxy, fake_openai, base_url):
    async with connect(base_url, subprotocols=["realtime", "access-token." + ALICE]) as ws:
        assert ws.subprotocol == "realtime"
        await opened(ws)
    seen = await fake_openai.wait_realtime_session()
    assert seen.headers["Authorization"] == "Bearer " + SERVER_KEY
    assert seen.subprotocols == ["realtime"]


@pytest.mark.gen_test(timeout=20)
async def test_a_callers_own_key_wins_over_the_server_key(proxy, fake_openai, base_url):
    protocols = ["realtime", "access-token." + ALICE, "openai-insecure-api-key." + OPENAI_KEY]
    async with connect(base_url, subprotocols=protocols) as ws:
        await opened(ws)
    assert fake_openai.realtime_sessions[-1].headers["Authorization"] == "Bearer " + OPENAI_KEY
    async with connect(base_url, headers={"access-token": ALICE, "Authorization": "Bearer " + OPENAI_KEY}) as ws:
        await opened(ws)
    assert fake_openai.realtime_sessions[-1].headers["Authorization"] == "Bearer " + OPENAI_KEY
    # A client that sets headers (the key) may still give its access token as a subprotocol.
    async with connect(
        base_url, headers={"Authorization": "Bearer " + OPENAI_KEY}, subprotocols=["access-token." + ALICE]
    ) as ws:
        await opened(ws)
    assert fake_openai.realtime_sessions[-1].headers["Authorization"] == "Bearer " + OPENAI_KEY
    assert len(fake_openai.realtime_sessions) == 3


@pytest.mark.gen_test(timeout=20)
async def test_sdk_given_only_the_named_token_as_api_key_uses_the_server_key(proxy, fake_openai, base_url):
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=ALICE)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        assert (await connection.recv()).type == "session.created"
    await client.close()
    seen = await fake_openai.wait_realtime_session()
    assert seen.headers["Authorization"] == "Bearer " + SERVER_KEY


@pytest.mark.gen_test(timeout=20)
async def test_without_use_server_key_and_without_a_key_is_401(proxy, fake_openai, base_url):
    status, body, _ = await refusal(base_url, subprotocols=["access-token." + CAROL])
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    assert fake_openai.realtime_sessions == []


@pytest.mark.gen_test(timeout=20)
async def test_disabled_token_refused_before_the_upgrade(proxy, fake_openai, base_url):
    for kwargs in (
        {"subprotocols": ["access-token." + DAVE, "openai-insecure-api-key." + OPENAI_KEY]},
        {"headers": {"access-token": DAVE, "Authorization": "Bearer " + OPENAI_KEY}},
    ):
        status, body, _ = await refusal(base_url, **kwargs)
        assert status == 403 and body["error"]["code"] == "access_token_disabled"
    assert fake_openai.realtime_sessions == []


@pytest.mark.gen_test(timeout=20)
async def test_a_session_open_when_its_token_is_revoked_runs_to_its_end(proxy, app, fake_openai, base_url, config):
    """docs/team.md: revoking refuses sessions that start after it; one already open runs on
    (the tokens file's reload here; the admin page's changes swap the entries the same way)."""
    async with connect(base_url, subprotocols=["access-token." + ALICE]) as ws:
        await opened(ws)
        text = TOKENS_TOML.replace("use_server_key = true", "use_server_key = true\ndisabled = true", 1)
        with open(config.access_tokens_file, "w") as file:
            file.write(text)
        app.tokens.reload()
        status, body, _ = await refusal(base_url, subprotocols=["access-token." + ALICE])
        assert status == 403 and body["error"]["code"] == "access_token_disabled"
        await ws.send(json.dumps({"type": "response.create"}))
        for _ in range(100):  # bounded
            if json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "response.done":
                break
        else:
            raise AssertionError("no response.done on the open session")


@pytest.mark.gen_test(timeout=20)
async def test_token_allowed_models_apply_to_the_model_parameter(proxy, fake_openai, base_url):
    headers = {"access-token": BOB, "Authorization": "Bearer " + OPENAI_KEY}
    status, body, _ = await refusal(base_url, headers=headers)
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    async with connect(base_url, headers=headers, model="gpt-4o") as ws:
        await opened(ws)
    assert [s.query for s in fake_openai.realtime_sessions] == ["model=gpt-4o"]


@pytest.mark.gen_test(timeout=20)
async def test_token_rate_limit_refuses_the_upgrade(proxy, fake_openai, base_url):
    headers = {"access-token": ERIN, "Authorization": "Bearer " + OPENAI_KEY}
    for _ in range(2):
        async with connect(base_url, headers=headers) as ws:
            await opened(ws)
    status, body, response_headers = await refusal(base_url, headers=headers)
    assert status == 429 and body["error"]["code"] == "proxy_rate_limited"
    assert int(response_headers["Retry-After"]) >= 1
    assert len(fake_openai.realtime_sessions) == 2


async def admitted_again(base_url, headers, timeout: float = 3.0) -> float:
    """Seconds until a session with ``headers`` is admitted again (carol's one slot freed)."""
    started = time.monotonic()
    while True:
        try:
            async with connect(base_url, headers=headers) as ws:
                await opened(ws)
            return time.monotonic() - started
        except InvalidStatus as exc:
            assert exc.response.status_code == 429
            if time.monotonic() - started > timeout:
                raise AssertionError("the session's max_concurrent slot was never released") from None
            await asyncio.sleep(0.05)


@pytest.mark.gen_test(timeout=30)
async def test_max_concurrent_counts_an_open_session_until_it_ends(proxy, fake_openai, base_url, caplog):
    headers = {"access-token": CAROL, "Authorization": "Bearer " + OPENAI_KEY}
    async with connect(base_url, headers=headers) as ws:
        await opened(ws)
        status, body, response_headers = await refusal(base_url, headers=headers)
        assert status == 429 and body["error"]["code"] == "proxy_concurrency_limited"
        assert "max_concurrent" in body["error"]["message"] and response_headers["Retry-After"] == "1"
        # HTTP requests of the same token count against the same limit.
        response = await proxy.request("/v1/models", method="GET", headers=headers, auth=False)
        assert response.code == 429
    await admitted_again(base_url, headers)
    metrics = (await proxy.request("/metrics", method="GET", auth=False)).body.decode()
    assert 'proxy_limited_total{limit="max_concurrent",token="carol"} 2.0' in metrics


@pytest.mark.gen_test(timeout=30)
async def test_max_concurrent_released_when_the_client_vanishes(proxy, fake_openai, base_url):
    headers = {"access-token": CAROL, "Authorization": "Bearer " + OPENAI_KEY}
    ws = await connect(base_url, headers=headers)
    await opened(ws)
    seen = await fake_openai.wait_realtime_session()
    ws.transport.abort()  # TCP closed, no close frame
    await seen.wait_closed(timeout=2)
    assert await admitted_again(base_url, headers) < 2


@pytest.mark.settings(connect_timeout=5)
@pytest.mark.gen_test(timeout=30)
async def test_max_concurrent_released_when_the_client_leaves_during_the_upstream_handshake(
    proxy, fake_openai, base_url
):
    fake_openai.push_realtime(RealtimeBehaviour(kind="hang", delay=0.5))
    headers = {"access-token": CAROL, "Authorization": "Bearer " + OPENAI_KEY}
    with pytest.raises(TimeoutError):
        await websockets.connect(ws_url(base_url), additional_headers=headers, open_timeout=0.2)
    # The abandoned handshake is cancelled at once: the slot is free long before the upstream's 0.5 s.
    assert await admitted_again(base_url, headers) < 0.5


@pytest.mark.gen_test(timeout=20)
async def test_token_name_in_the_access_line_and_metrics(proxy, fake_openai, base_url, caplog):
    async with connect(base_url, subprotocols=["access-token." + ALICE]) as ws:
        await opened(ws)
        await ws.send(json.dumps({"type": "response.create"}))
        while json.loads(await ws.recv())["type"] != "response.done":
            pass
    await (await fake_openai.wait_realtime_session()).wait_closed(timeout=1)
    for _ in range(100):
        lines = [r.getMessage() for r in caplog.records if "status=101" in r.getMessage()]
        if lines:
            break
        await asyncio.sleep(0.02)
    assert len(lines) == 1 and " token=alice " in lines[0], lines
    metrics = (await proxy.request("/metrics", method="GET", auth=False)).body.decode()
    assert 'proxy_requests_total{route="realtime",status="101",token="alice"} 1.0' in metrics
    assert 'proxy_tokens_total{kind="completion",model="gpt-realtime",token="alice"}' in metrics
    for text in (caplog.text, metrics):
        for secret in NAMED:
            assert secret not in text


@pytest.mark.gen_test(timeout=30)
async def test_max_concurrent_released_when_the_upstream_ends_the_session(proxy, fake_openai, base_url):
    fake_openai.push_realtime(RealtimeBehaviour(kind="close", code=4002, reason="session expired", after=1))
    headers = {"access-token": CAROL, "Authorization": "Bearer " + OPENAI_KEY}
    async with connect(base_url, headers=headers) as ws:
        await opened(ws)
        await ws.send("{}")
        await ws.wait_closed()
    assert ws.close_code == 4002
    await admitted_again(base_url, headers)


@pytest.mark.settings(stream_idle_timeout=0.3)
@pytest.mark.gen_test(timeout=30)
async def test_max_concurrent_released_when_an_idle_session_times_out(proxy, fake_openai, base_url):
    headers = {"access-token": CAROL, "Authorization": "Bearer " + OPENAI_KEY}
    async with connect(base_url, headers=headers) as ws:
        await opened(ws)
        await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code == 1001
    await admitted_again(base_url, headers)
