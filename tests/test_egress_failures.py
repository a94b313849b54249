"""Egress proxy failures, the environment fallback, socks5h and the private CA.

With real proxy servers (tinyproxy, microsocks) on loopback. Failures are a
502 with a code naming the fault, a message that tells the operator what to
check, one warning line, and never the proxy's credentials.
"""

import dataclasses
import logging
import os
import socket

import pytest

from chat_gpt_proxy.upstream.egress import EgressProxy
from settings import Settings
from tests.conftest import ACCESS_TOKEN, OTHER_SECRETS, ProxyClient
from tests.egress_servers import (
    SOCKS_PASSWORD,
    TINYPROXY_PASSWORD,
    MicroSocks,
    TinyProxy,
    TlsFront,
    make_tls_files,
    serving,
    tls_fake,
)
from tests.procs import ServerProcess, free_port

PASSWORDS = [s for s in OTHER_SECRETS if "PASS" in s or "P@ss" in s or "P%40ss" in s]


@pytest.fixture
def workdir(tmp_path):
    return str(tmp_path)


@pytest.fixture
def servers(workdir):
    started = []

    def start(cls, **kwargs):
        server = cls(workdir, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def warnings(caplog):
    records = [r for r in caplog.records if r.name.startswith("chat_gpt_proxy") and r.levelno >= logging.WARNING]
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info]
    return [r.getMessage() for r in records]


def assert_no_password(*texts):
    for text in texts:
        for password in PASSWORDS:
            assert password not in text


def retries_metric(app, reason) -> float:
    metrics = app.metrics
    return metrics.registry.get_sample_value("proxy_upstream_retries_total", {"reason": reason}) or 0


@pytest.mark.parametrize("scheme", ["http", "socks5h"])
@pytest.mark.gen_test(timeout=30)
async def test_proxy_down_is_unreachable_after_retries(config, caplog, scheme):
    down = EgressProxy(scheme, "127.0.0.1", free_port(), "proxyuser", TINYPROXY_PASSWORD)
    async with serving(dataclasses.replace(config, upstream_proxy=down)) as (client, app):
        response, body = await client.chat({"prompt": "x"})
    assert response.code == 502 and body["error"]["code"] == "upstream_proxy_unreachable"
    assert "UPSTREAM_PROXY" in body["text"] and "check" in body["text"]
    lines = warnings(caplog)
    assert [line for line in lines if "upstream retry" in line and "reason=proxy_unreachable" in line] == [
        line for line in lines if "upstream retry" in line
    ]
    assert len([line for line in lines if "upstream retry" in line]) == 2
    faults = [line for line in lines if "upstream fault" in line]
    assert len(faults) == 1 and "kind=proxy_unreachable" in faults[0]
    assert "%s://***:***@127.0.0.1:%d" % (scheme, down.port) in faults[0]
    assert retries_metric(app, "proxy_unreachable") == 2
    assert_no_password(response.body.decode(), *lines)


@pytest.mark.parametrize(
    "kind,password",
    [("tinyproxy", "wrong"), ("tinyproxy", ""), ("microsocks", "wrong"), ("microsocks", "")],
)
@pytest.mark.gen_test(timeout=30)
async def test_refused_credentials_are_proxy_auth(config, fake_openai, servers, caplog, kind, password):
    server = servers(TinyProxy if kind == "tinyproxy" else MicroSocks, auth=True)
    proxy = dataclasses.replace(server.proxy(), password=password, username="proxyuser" if password else "")
    async with serving(dataclasses.replace(config, upstream_proxy=proxy)) as (client, app):
        response, body = await client.chat({"prompt": "x"})
    assert response.code == 502 and body["error"]["code"] == "upstream_proxy_auth", body
    assert "credentials" in body["text"]
    lines = warnings(caplog)
    assert len(lines) == 1 and "kind=proxy_auth" in lines[0], lines  # not retried
    assert fake_openai.received == []


@pytest.mark.parametrize("kind", ["tinyproxy", "microsocks"])
@pytest.mark.gen_test(timeout=30)
async def test_proxy_that_cannot_reach_the_upstream_is_proxy_failed(config, servers, caplog, kind):
    server = servers(TinyProxy if kind == "tinyproxy" else MicroSocks, auth=True)
    settings = dataclasses.replace(
        config, upstream_proxy=server.proxy(), openai_base_url="http://127.0.0.1:%d/v1" % free_port()
    )
    async with serving(settings) as (client, app):
        response, body = await client.chat({"prompt": "x"})
    assert response.code == 502 and body["error"]["code"] == "upstream_proxy_failed", body
    lines = warnings(caplog)
    # Nothing reached the upstream: retried like a refused connection.
    assert len([line for line in lines if "upstream retry" in line and "reason=proxy_failed" in line]) == 2
    assert len([line for line in lines if "kind=proxy_failed" in line]) == 1
    assert_no_password(response.body.decode(), *lines)


@pytest.mark.gen_test(timeout=30)
async def test_socks5h_resolves_the_name_at_the_proxy(config, fake_openai, servers):
    # The SOCKS server alone knows this name (its own /etc/hosts); this
    # process could not resolve it.
    name = "upstream.socks-only.test"
    server = servers(MicroSocks, hosts="127.0.0.1 %s\n" % name)
    base = "http://%s:%d/v1" % (name, fake_openai.port)
    settings = dataclasses.replace(config, upstream_proxy=server.proxy("socks5h"), openai_base_url=base)
    async with serving(settings) as (client, _):
        response, body = await client.chat({"prompt": "resolved there"})
    assert response.code == 200 and body["text"] == "Echo: resolved there"
    assert server.targets() == ["%s:%d" % (name, fake_openai.port)]


@pytest.mark.gen_test(timeout=30)
async def test_percent_encoded_credentials_from_the_environment(fake_openai, servers):
    server = servers(MicroSocks, auth=True)
    url = "socks5h://proxyuser:sox-P%40ss%3Aw%2Frd-3b7d@127.0.0.1:" + str(server.port)
    settings = Settings.from_env({"ALL_PROXY": url, "OPENAI_BASE_URL": fake_openai.url, "ACCESS_TOKEN": ACCESS_TOKEN})
    assert settings.upstream_proxy.password == SOCKS_PASSWORD and settings.upstream_proxy.source == "ALL_PROXY"
    assert settings.upstream_proxy.url == url
    async with serving(settings) as (client, _):
        response, body = await client.chat({"prompt": "via env"})
    assert response.code == 200 and body["text"] == "Echo: via env"
    assert server.connections() == 1


@pytest.mark.gen_test(timeout=30)
async def test_explicit_setting_wins_and_no_proxy_goes_direct(fake_openai, servers):
    tiny, socks = servers(TinyProxy), servers(MicroSocks)
    env = {
        "UPSTREAM_PROXY": "http://127.0.0.1:%d" % tiny.port,
        "HTTPS_PROXY": "socks5://127.0.0.1:%d" % socks.port,
        "ALL_PROXY": "socks5://127.0.0.1:%d" % socks.port,
        "http_proxy": "socks5://127.0.0.1:%d" % socks.port,
        "OPENAI_BASE_URL": fake_openai.url,
        "ACCESS_TOKEN": ACCESS_TOKEN,
    }
    async with serving(Settings.from_env(env)) as (client, _):
        assert (await client.chat({"prompt": "x"}))[0].code == 200
    assert (tiny.connections(), socks.connections()) == (1, 0)
    async with serving(Settings.from_env({**env, "NO_PROXY": "example.com,127.0.0.0/8"})) as (client, _):
        assert (await client.chat({"prompt": "x"}))[0].code == 200
    assert (tiny.connections(), socks.connections()) == (1, 0)
    assert fake_openai.connections == 2


@pytest.mark.gen_test(timeout=30)
async def test_proxy_variables_are_not_read_behind_the_settings_back(proxy, fake_openai, monkeypatch):
    """libcurl reads http_proxy/ALL_PROXY by itself when no proxy is set on the handle: we always set one."""
    dead = "socks5h://127.0.0.1:%d" % free_port()
    for name in ("http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead)
    response, body = await proxy.chat({"prompt": "direct"})
    assert response.code == 200 and body["text"] == "Echo: direct"


@pytest.mark.gen_test(timeout=60)
async def test_private_ca_is_trusted_and_verification_stays_on(config, workdir, io_loop):
    tls = make_tls_files(workdir)
    fake = tls_fake(tls, host_name="localhost")
    try:
        settings = dataclasses.replace(config, openai_base_url=fake.url, upstream_ca_file=tls["ca.pem"])
        async with serving(settings) as (client, _):
            response, body = await client.chat({"prompt": "tls"})
        assert response.code == 200 and body["text"] == "Echo: tls"
        # Without the CA file the same upstream is refused, never trusted blindly.
        async with serving(dataclasses.replace(settings, upstream_ca_file="")) as (client, _):
            response, body = await client.chat({"prompt": "tls"})
        assert response.code == 502 and body["error"]["code"] == "upstream_tls"
        assert "UPSTREAM_CA_FILE" in body["text"]
        assert len(fake.received) == 1
    finally:
        await fake.stop()


@pytest.mark.gen_test(timeout=30)
async def test_startup_line_names_the_proxy_and_its_source_masked(fake_openai, tmp_path):
    port = free_port()  # nothing needs to listen: the line is written at startup
    env = {
        "OPENAI_BASE_URL": fake_openai.url,
        "ACCESS_TOKEN": "proc-ACCESS-TOKEN-91c2",
        "ALL_PROXY": "socks5h://proxyuser:sox-P%40ss%3Aw%2Frd-3b7d@127.0.0.1:" + str(port),
        "NO_PROXY": "",
    }
    server = ServerProcess(env, str(tmp_path / "server.log"))
    try:
        await server.wait_ready()
        output = server.output()
    finally:
        server.stop()
    line = next(line for line in output.splitlines() if "configuration, upstream:" in line)
    assert '"upstream_proxy": "socks5h://***:***@127.0.0.1:%d (from ALL_PROXY)"' % port in line
    assert_no_password(output)


@pytest.mark.parametrize(
    "env,message",
    [
        ({"UPSTREAM_CA_FILE": "/nonexistent/ca.pem"}, "UPSTREAM_CA_FILE: no such file"),
        ({"UPSTREAM_CA_FILE": "README.md"}, "UPSTREAM_CA_FILE: 'README.md' holds no PEM certificate"),
        ({"UPSTREAM_PROXY": "ftp://proxy:21"}, "UPSTREAM_PROXY: the scheme must be one of"),
        ({"HTTPS_PROXY": "http://proxy.corp"}, "HTTPS_PROXY: give the proxy's port"),
        (
            {"UPSTREAM_PROXY": "http://al%%00ice:%s@proxy:3128" % TINYPROXY_PASSWORD},
            "UPSTREAM_PROXY: the user or password holds a control character",
        ),
        ({"UPSTREAM_PROXY": "http://proxy:0"}, "UPSTREAM_PROXY: the proxy's port must be between 1 and 65535"),
        ({"UPSTREAM_PROXY": "http://u:%s@pro xy:3128" % TINYPROXY_PASSWORD}, "UPSTREAM_PROXY: holds a space"),
        (
            {"OPENAI_BASE_URL": "http://u:%s@api.example/v1" % TINYPROXY_PASSWORD},
            "OPENAI_BASE_URL: must not hold a user or password",
        ),
        ({"OPENAI_BASE_URL": "http://api.example/v1?a=b"}, "OPENAI_BASE_URL: must not hold a query or fragment"),
        ({"OPENAI_BASE_URL": "http://api example/v1"}, "OPENAI_BASE_URL: holds a space"),
    ],
)
@pytest.mark.gen_test(timeout=30)
async def test_bad_egress_settings_stop_the_process_with_one_line(tmp_path, env, message):
    server = ServerProcess({"ACCESS_TOKEN": "proc-ACCESS-TOKEN-91c2", **env}, str(tmp_path / "server.log"))
    try:
        code = await server.wait_exit(15)
        lines = [line for line in server.output().splitlines() if line.strip()]
    finally:
        server.stop()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert_no_password(*lines)


@pytest.mark.gen_test(timeout=60)
async def test_https_proxy_with_a_private_ca(config, servers, workdir):
    """TLS to the proxy itself (``https://``), its certificate trusted through UPSTREAM_CA_FILE."""
    tls = make_tls_files(workdir)
    tiny = servers(TinyProxy, auth=True)
    front = await TlsFront(tiny.port, tls["server.pem"], tls["server.key"]).start()
    fake = tls_fake(tls)
    try:
        proxy = dataclasses.replace(tiny.proxy("https"), host="localhost", port=front.port)
        settings = dataclasses.replace(
            config, upstream_proxy=proxy, openai_base_url=fake.url, upstream_ca_file=tls["ca.pem"]
        )
        async with serving(settings) as (client, _):
            for i in range(3):
                response, body = await client.chat({"prompt": "tls in tls %d" % i})
                assert response.code == 200 and body["text"] == "Echo: tls in tls %d" % i
        assert tiny.connections() == 1 and fake.connections == 1
    finally:
        await fake.stop()
        await front.stop()


@pytest.mark.gen_test(timeout=30)
async def test_demo_mode_ignores_an_egress_proxy(tmp_path):
    """DEMO_UPSTREAM's fake runs on loopback: an operator's ALL_PROXY must not break the demo."""
    env = {"DEMO_UPSTREAM": "true", "ACCESS_TOKEN": ACCESS_TOKEN, "ALL_PROXY": "socks5h://127.0.0.1:%d" % free_port()}
    server = ServerProcess(env, str(tmp_path / "server.log"))
    try:
        await server.wait_ready()
        client = ProxyClient(server.url)
        try:
            response, body = await client.chat({"prompt": "demo"})
        finally:
            client.close()
    finally:
        server.stop()
    assert response.code == 200 and body["text"].startswith("Echo: demo")


@pytest.fixture
def silent_port():
    """A port that accepts TCP connections (the kernel completes them) and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


@pytest.mark.parametrize("scheme", ["http", "https", "socks5", "socks5h"])
@pytest.mark.settings(connect_timeout=0.5)
@pytest.mark.gen_test(timeout=30)
async def test_a_proxy_that_never_answers_its_handshake_is_unreachable(
    config, fake_openai, caplog, silent_port, scheme
):
    """Not the upstream's timeout: the CONNECT, SOCKS5 or TLS handshake with the proxy never completed."""
    proxy = EgressProxy(scheme, "127.0.0.1", silent_port, "proxyuser", TINYPROXY_PASSWORD)
    async with serving(dataclasses.replace(config, upstream_proxy=proxy)) as (client, app):
        response, body = await client.chat({"prompt": "x"})
    assert response.code == 502 and body["error"]["code"] == "upstream_proxy_unreachable", body
    assert "egress proxy (UPSTREAM_PROXY) did not open the connection in time" in body["text"]
    lines = warnings(caplog)
    retries = [line for line in lines if "upstream retry" in line]
    assert len(retries) == 2 and all("reason=proxy_unreachable" in line for line in retries), lines
    faults = [line for line in lines if "upstream fault" in line]
    assert len(faults) == 1 and "kind=proxy_unreachable" in faults[0]
    assert "proxy=%s://***:***@127.0.0.1:%d" % (scheme, silent_port) in faults[0]
    assert retries_metric(app, "proxy_unreachable") == 2
    assert fake_openai.received == []
    assert_no_password(response.body.decode(), *lines)


@pytest.mark.parametrize("kind", ["tinyproxy", "microsocks"])
# A generous CONNECT_TIMEOUT: the tunnel through the real proxy must be open
# before it fires (0.5 s was once too short for tinyproxy on a loaded machine,
# and the stall was then rightly blamed on the proxy).
@pytest.mark.settings(connect_timeout=3, upstream_retries=0)
@pytest.mark.gen_test(timeout=30)
async def test_an_upstream_that_stalls_its_tls_handshake_through_the_proxy_is_the_upstreams_timeout(
    config, servers, caplog, silent_port, kind
):
    server = servers(TinyProxy if kind == "tinyproxy" else MicroSocks)
    settings = dataclasses.replace(
        config, upstream_proxy=server.proxy(), openai_base_url="https://127.0.0.1:%d/v1" % silent_port
    )
    async with serving(settings) as (client, _):
        response, body = await client.chat({"prompt": "x"})
    assert response.code == 504 and body["error"]["code"] == "upstream_timeout", body
    assert body["text"] == "could not connect to the upstream 127.0.0.1:%d in time" % silent_port


@pytest.mark.parametrize("untrusted", ["proxy", "upstream"])
@pytest.mark.gen_test(timeout=60)
async def test_an_untrusted_https_proxy_certificate_is_the_proxys_fault(config, servers, workdir, caplog, untrusted):
    """Two CAs: UPSTREAM_CA_FILE trusts one; the proxy's or the upstream's certificate comes from the other."""
    trusted, other = (os.path.join(workdir, name) for name in ("trusted", "other"))
    os.mkdir(trusted)
    os.mkdir(other)
    trusted_tls, other_tls = make_tls_files(trusted), make_tls_files(other)
    proxy_tls, upstream_tls = (other_tls, trusted_tls) if untrusted == "proxy" else (trusted_tls, other_tls)
    tiny = servers(TinyProxy, auth=True)
    front = await TlsFront(tiny.port, proxy_tls["server.pem"], proxy_tls["server.key"]).start()
    fake = tls_fake(upstream_tls)
    try:
        proxy = dataclasses.replace(tiny.proxy("https"), host="localhost", port=front.port)
        settings = dataclasses.replace(
            config, upstream_proxy=proxy, openai_base_url=fake.url, upstream_ca_file=trusted_tls["ca.pem"]
        )
        async with serving(settings) as (client, app):
            response, body = await client.chat({"prompt": "x"})
        lines = warnings(caplog)
    finally:
        await fake.stop()
        await front.stop()
    assert response.code == 502 and fake.received == []
    assert not [line for line in lines if "upstream retry" in line]  # a certificate does not fix itself
    assert len(lines) == 1
    if untrusted == "proxy":
        assert body["error"]["code"] == "upstream_proxy_tls", body
        assert (
            "egress proxy's TLS certificate" in body["text"] and "UPSTREAM_PROXY and UPSTREAM_CA_FILE" in body["text"]
        )
        assert "kind=proxy_tls proxy=https://***:***@localhost:%d" % front.port in lines[0]
    else:
        assert body["error"]["code"] == "upstream_tls", body
        assert "OPENAI_BASE_URL" in body["text"] and "kind=tls" in lines[0]
    assert_no_password(response.body.decode(), *lines)
