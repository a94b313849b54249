"""The realtime relay's upstream leg goes through the egress proxy.

UPSTREAM_PROXY (or the proxy of the environment) and UPSTREAM_CA_FILE apply to
the WebSocket relay as to the HTTP routes: against the real proxy servers
(tinyproxy without and with BasicAuth, microsocks as socks5 and as socks5h
with user/password, tinyproxy behind TLS as an https:// proxy) in front of the
fake realtime upstream over ws:// and wss:// (a throwaway CA). Proxy failures
refuse the upgrade with the HTTP routes' 502 codes and one warning line.
"""

import asyncio
import dataclasses
import json
import logging
import socket
import time

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from chat_gpt_proxy.fake_openai.app import FakeOpenAI
from chat_gpt_proxy.fake_openai.behaviours import RealtimeBehaviour
from chat_gpt_proxy.upstream.egress import EgressProxy
from settings import Settings
from tests.conftest import ACCESS_TOKEN, OPENAI_KEY, OTHER_SECRETS
from tests.egress_servers import (
    TINYPROXY_PASSWORD,
    MicroSocks,
    TinyProxy,
    TlsFront,
    make_tls_files,
    serving,
    tls_fake,
)

HEADERS = {"access-token": ACCESS_TOKEN, "Authorization": "Bearer " + OPENAI_KEY}
PASSWORDS = [s for s in OTHER_SECRETS if "PASS" in s or "P@ss" in s or "P%40ss" in s]
PROXIES = ["http", "http-auth", "socks5", "socks5h-auth"]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_tls_files(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def fake_openai(request, io_loop, tls_files):
    """The fake upstream over plain HTTP/ws (default) or, parametrized with "https", over TLS/wss."""
    if getattr(request, "param", "http") == "https":
        fake = tls_fake(tls_files)
    else:
        fake = FakeOpenAI()
        fake.start()
    yield fake
    io_loop.run_sync(fake.stop)


@pytest.fixture
def servers(tmp_path):
    started = []

    def start(kind: str, **kwargs):
        """``kind``: one of PROXIES (the scheme, then "-auth" for credentials)."""
        cls = TinyProxy if kind.startswith("http") else MicroSocks
        server = cls(str(tmp_path), auth=kind.endswith("-auth"), **kwargs)
        server.scheme = kind.split("-")[0]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def refused_port():
    """A loopback port bound but not listening, for as long as the test runs: connects to it are refused.

    (A port merely free when chosen could be taken meanwhile, e.g. by the proxy under test.)
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def ws_url(client) -> str:
    return "ws" + client.base_url[len("http") :] + "/v1/realtime?model=gpt-realtime"


def user_message(text: str) -> dict:
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
    }


async def refusal(client):
    """Open a session that must be refused; returns (status, parsed body)."""
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(ws_url(client), additional_headers=HEADERS, open_timeout=15)
    response = info.value.response
    return response.status_code, json.loads(bytes(response.body))


async def sessions_end(app) -> None:
    pool = app.pool
    for _ in range(250):
        if not pool.handlers:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("a realtime session outlived its test")


def warnings(caplog) -> list[str]:
    """The proxy's warning lines; no error of any logger (a traceback, an asyncio callback failure)."""
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    return [
        r.getMessage() for r in caplog.records if r.name.startswith("chat_gpt_proxy") and r.levelno >= logging.WARNING
    ]


def assert_no_password(*texts: str) -> None:
    for text in texts:
        for password in PASSWORDS:
            assert password not in text


async def live_session(client, fake) -> None:
    """A session relays the fake's deltas as they come, and the upstream sees the client's close within 1 s."""
    gap = 0.2
    fake.push_realtime(RealtimeBehaviour(delay=gap))
    async with websockets.connect(ws_url(client), additional_headers=HEADERS, open_timeout=15) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps(user_message("через прокси")))
        await ws.send(json.dumps({"type": "response.create"}))
        types, arrivals = [], []
        while not types or types[-1] != "response.done":
            types.append(json.loads(await asyncio.wait_for(ws.recv(), 10))["type"])
            arrivals.append(time.monotonic())
        seen = await fake.wait_realtime_session()
        closing = time.monotonic()
        await ws.close(4000, "bye")
    assert types.count("response.output_text.delta") == 3 and types.count("response.output_audio.delta") == 2
    deltas = [at for at, kind in zip(arrivals, types, strict=True) if kind.endswith(".delta")]
    gaps = [b - a for a, b in zip(deltas, deltas[1:], strict=False)]
    assert min(gaps) > gap / 2, gaps  # each delta arrived when the fake sent it, not all at the end
    closed_at = await seen.wait_closed(timeout=1)
    assert closed_at - closing < 1 and (seen.close_code, seen.close_reason) == (4000, "bye")
    assert seen.headers["Authorization"] == "Bearer " + OPENAI_KEY
    # A tunnel: the proxy's credentials never reach the upstream.
    assert "Proxy-Authorization" not in seen.headers


@pytest.mark.parametrize("fake_openai", ["http", "https"], indirect=True)
@pytest.mark.parametrize("kind", PROXIES)
@pytest.mark.gen_test(timeout=40)
async def test_session_through_each_proxy_is_live_and_closes_within_a_second(
    config, fake_openai, servers, tls_files, caplog, kind
):
    server = servers(kind)
    settings = dataclasses.replace(config, upstream_proxy=server.proxy(), upstream_ca_file=tls_files["ca.pem"])
    async with serving(settings) as (client, app):
        await live_session(client, fake_openai)
        await sessions_end(app)
    assert server.connections() == 1  # the session's one connection went through the proxy
    if kind.startswith("socks"):
        assert server.targets() == ["127.0.0.1:%d" % fake_openai.port]
    assert warnings(caplog) == []
    assert_no_password(caplog.text)


@pytest.mark.gen_test(timeout=60)
async def test_https_proxy_verified_with_the_private_ca(config, servers, tls_files, caplog):
    """TLS to the proxy, then TLS to the upstream inside the tunnel (wss://), both trusted via UPSTREAM_CA_FILE."""
    tiny = servers("http-auth")
    front = await TlsFront(tiny.port, tls_files["server.pem"], tls_files["server.key"]).start()
    fake = tls_fake(tls_files)
    try:
        proxy = dataclasses.replace(tiny.proxy("https"), host="localhost", port=front.port)
        settings = dataclasses.replace(
            config, upstream_proxy=proxy, openai_base_url=fake.url, upstream_ca_file=tls_files["ca.pem"]
        )
        async with serving(settings) as (client, app):
            await live_session(client, fake)
            await sessions_end(app)
        assert tiny.connections() == 1
        # Without the CA the proxy's certificate is refused, never trusted blindly.
        async with serving(dataclasses.replace(settings, upstream_ca_file="")) as (client, _):
            status, body = await refusal(client)
        assert status == 502 and body["error"]["code"] == "upstream_tls"
        assert "egress proxy" in body["error"]["message"] and "UPSTREAM_CA_FILE" in body["error"]["message"]
        assert tiny.connections() == 1 and len(fake.realtime_sessions) == 1
        lines = warnings(caplog)
        assert len(lines) == 1 and "kind=tls" in lines[0] and "https://***:***@localhost" in lines[0], lines
        assert_no_password(caplog.text, json.dumps(body))
    finally:
        await fake.stop()
        await front.stop()


@pytest.mark.gen_test(timeout=30)
async def test_socks5h_resolves_at_the_proxy_and_socks5_here(config, fake_openai, servers, caplog):
    # The SOCKS server alone knows this name (its own /etc/hosts).
    name = "realtime.socks-only.test"
    server = servers("socks5h-auth", hosts="127.0.0.1 %s\n" % name)
    base = "http://%s:%d/v1" % (name, fake_openai.port)
    settings = dataclasses.replace(config, upstream_proxy=server.proxy(), openai_base_url=base)
    async with serving(settings) as (client, app):
        async with websockets.connect(ws_url(client), additional_headers=HEADERS, open_timeout=15) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        await sessions_end(app)
    assert server.targets() == ["%s:%d" % (name, fake_openai.port)]
    # socks5://: this process resolves the name, and cannot.
    settings = dataclasses.replace(settings, upstream_proxy=server.proxy("socks5"))
    async with serving(settings) as (client, _):
        status, body = await refusal(client)
    assert status == 502 and body["error"]["code"] == "upstream_connect"
    assert "resolve" in body["error"]["message"]
    assert server.targets() == ["%s:%d" % (name, fake_openai.port)]  # nothing more reached the proxy's far side
    assert len(fake_openai.realtime_sessions) == 1


@pytest.mark.parametrize("scheme", ["http", "https", "socks5", "socks5h"])
@pytest.mark.gen_test(timeout=30)
async def test_proxy_down_is_unreachable(config, fake_openai, caplog, refused_port, scheme):
    down = EgressProxy(scheme, "127.0.0.1", refused_port, "proxyuser", TINYPROXY_PASSWORD)
    async with serving(dataclasses.replace(config, upstream_proxy=down)) as (client, _):
        status, body = await refusal(client)
    assert status == 502 and body["error"]["code"] == "upstream_proxy_unreachable"
    assert "UPSTREAM_PROXY" in body["error"]["message"] and "check" in body["error"]["message"]
    lines = warnings(caplog)
    assert len(lines) == 1 and "kind=proxy_unreachable" in lines[0], lines
    assert "%s://***:***@127.0.0.1:%d" % (scheme, down.port) in lines[0]
    assert_no_password(caplog.text, json.dumps(body))
    assert fake_openai.realtime_sessions == []


@pytest.mark.parametrize("scheme", ["http", "socks5h"])
@pytest.mark.settings(connect_timeout=0.5)
@pytest.mark.gen_test(timeout=30)
async def test_a_proxy_that_never_answers_its_handshake_is_unreachable(config, fake_openai, caplog, scheme):
    """As on the HTTP routes: the proxy's silence is the proxy's fault (502), not the upstream's timeout (504)."""
    listener = socket.socket()  # the kernel completes connections to it; nothing ever answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        silent = EgressProxy(scheme, "127.0.0.1", listener.getsockname()[1], "proxyuser", TINYPROXY_PASSWORD)
        async with serving(dataclasses.replace(config, upstream_proxy=silent)) as (client, _):
            status, body = await refusal(client)
    finally:
        listener.close()
    assert status == 502 and body["error"]["code"] == "upstream_proxy_unreachable", body
    lines = warnings(caplog)
    assert len(lines) == 1 and "kind=proxy_unreachable" in lines[0] and "***:***@127.0.0.1" in lines[0], lines
    assert_no_password(caplog.text, json.dumps(body))


@pytest.mark.parametrize("kind", ["http-auth", "socks5h-auth"])
@pytest.mark.parametrize("password", ["wrong", ""])
@pytest.mark.gen_test(timeout=30)
async def test_refused_credentials_are_proxy_auth(config, fake_openai, servers, caplog, kind, password):
    server = servers(kind)
    proxy = dataclasses.replace(server.proxy(), password=password, username="proxyuser" if password else "")
    async with serving(dataclasses.replace(config, upstream_proxy=proxy)) as (client, _):
        status, body = await refusal(client)
    assert status == 502 and body["error"]["code"] == "upstream_proxy_auth", body
    assert "credentials" in body["error"]["message"]
    lines = warnings(caplog)
    assert len(lines) == 1 and "kind=proxy_auth" in lines[0], lines
    assert_no_password(caplog.text, json.dumps(body))
    assert fake_openai.realtime_sessions == []


@pytest.mark.parametrize("kind", ["http-auth", "socks5-auth", "socks5h-auth"])
@pytest.mark.gen_test(timeout=30)
async def test_proxy_that_cannot_reach_the_upstream_is_proxy_failed(config, servers, caplog, refused_port, kind):
    server = servers(kind)
    settings = dataclasses.replace(
        config, upstream_proxy=server.proxy(), openai_base_url="http://127.0.0.1:%d/v1" % refused_port
    )
    async with serving(settings) as (client, _):
        status, body = await refusal(client)
    assert status == 502 and body["error"]["code"] == "upstream_proxy_failed", body
    assert "could not connect to the upstream" in body["error"]["message"]
    lines = warnings(caplog)
    assert len(lines) == 1 and "kind=proxy_failed" in lines[0], lines
    assert_no_password(caplog.text, json.dumps(body))


@pytest.mark.gen_test(timeout=30)
async def test_proxy_from_the_environment_applies_to_the_relay(fake_openai, servers):
    server = servers("socks5h-auth")
    url = "socks5h://proxyuser:sox-P%40ss%3Aw%2Frd-3b7d@127.0.0.1:" + str(server.port)
    settings = Settings.from_env({"ALL_PROXY": url, "OPENAI_BASE_URL": fake_openai.url, "ACCESS_TOKEN": ACCESS_TOKEN})
    async with serving(settings) as (client, app):
        async with websockets.connect(ws_url(client), additional_headers=HEADERS, open_timeout=15) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        await sessions_end(app)
    assert server.connections() == 1
    # NO_PROXY naming the upstream's host: the relay connects directly.
    settings = Settings.from_env(
        {"ALL_PROXY": url, "NO_PROXY": "127.0.0.1", "OPENAI_BASE_URL": fake_openai.url, "ACCESS_TOKEN": ACCESS_TOKEN}
    )
    async with serving(settings) as (client, app):
        async with websockets.connect(ws_url(client), additional_headers=HEADERS, open_timeout=15) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        await sessions_end(app)
    assert server.connections() == 1 and len(fake_openai.realtime_sessions) == 2


@pytest.mark.parametrize("fake_openai", ["https"], indirect=True)
@pytest.mark.gen_test(timeout=30)
async def test_direct_wss_upstream_trusted_via_the_private_ca(config, fake_openai, tls_files, caplog):
    settings = dataclasses.replace(config, upstream_ca_file=tls_files["ca.pem"])
    async with serving(settings) as (client, app):
        async with websockets.connect(ws_url(client), additional_headers=HEADERS, open_timeout=15) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        await sessions_end(app)
    # Without the CA file the same upstream is refused, never trusted blindly.
    async with serving(dataclasses.replace(settings, upstream_ca_file="")) as (client, _):
        status, body = await refusal(client)
    assert status == 502 and body["error"]["code"] == "upstream_tls"
    assert "UPSTREAM_CA_FILE" in body["error"]["message"]
    lines = warnings(caplog)
    assert len(lines) == 1 and "kind=tls" in lines[0], lines
    assert len(fake_openai.realtime_sessions) == 1
