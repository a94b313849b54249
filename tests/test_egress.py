"""Unit tests of the egress pieces: proxy URLs, the environment, NO_PROXY, failure kinds, retry waits."""

import email.utils
import socket
import time

import pytest
from tornado.httputil import HTTPHeaders

from chat_gpt_proxy.upstream.call import connected_socket, readable
from chat_gpt_proxy.upstream.egress import (
    EgressConfigError,
    EgressProxy,
    bypasses,
    describe,
    parse_proxy_url,
    proxy_for,
    proxy_from_env,
)
from chat_gpt_proxy.upstream.errors import classify, upstream_address
from chat_gpt_proxy.upstream.retry import RetryPolicy, backoff, retry_after_seconds
from settings import Settings, SettingsError

HTTPS_UPSTREAM = "https://api.openai.com/v1"


def test_proxy_url_with_percent_encoded_credentials():
    proxy = parse_proxy_url("socks5h://us%40er:p%40ss%3Aw@proxy.corp:1080", "UPSTREAM_PROXY")
    assert (proxy.scheme, proxy.host, proxy.port) == ("socks5h", "proxy.corp", 1080)
    assert (proxy.username, proxy.password) == ("us@er", "p@ss:w")
    assert proxy.address == "socks5h://proxy.corp:1080"
    assert proxy.url == "socks5h://us%40er:p%40ss%3Aw@proxy.corp:1080"
    assert proxy.masked() == "socks5h://***:***@proxy.corp:1080"
    assert "p@ss" not in repr(proxy) and "p@ss" not in str(proxy)


@pytest.mark.parametrize("value", ["http://proxy:3128", "https://proxy:3128", "proxy:3128", "HTTP://proxy:3128/"])
def test_http_proxy_forms(value):
    proxy = parse_proxy_url(value, "UPSTREAM_PROXY")
    assert proxy.port == 3128 and proxy.tunnels and proxy.url == proxy.address


@pytest.mark.parametrize(
    "value,message",
    [
        ("ftp://proxy:21", "UPSTREAM_PROXY: the scheme must be one of"),
        ("socks4://proxy:1080", "UPSTREAM_PROXY: the scheme must be one of"),
        ("http://proxy", "UPSTREAM_PROXY: give the proxy's port"),
        ("http://:3128", "UPSTREAM_PROXY: no host"),
        ("http://proxy:99999", "UPSTREAM_PROXY: not a valid proxy URL"),
        ("http://proxy:3128/path", "UPSTREAM_PROXY: a proxy URL has no path"),
    ],
)
def test_bad_proxy_urls(value, message):
    with pytest.raises(EgressConfigError) as error:
        parse_proxy_url(value, "UPSTREAM_PROXY")
    assert str(error.value).startswith(message)


def test_environment_order_like_curl():
    env = {
        "https_proxy": "http://lower:1",
        "HTTPS_PROXY": "http://upper:2",
        "all_proxy": "http://all:3",
        "ALL_PROXY": "http://ALL:4",
        "http_proxy": "http://plain:5",
        "HTTP_PROXY": "http://cgi:6",
    }
    assert proxy_from_env({**env, "UPSTREAM_PROXY": "socks5://mine:7"}, HTTPS_UPSTREAM).source == "UPSTREAM_PROXY"
    assert proxy_from_env(env, HTTPS_UPSTREAM).host == "lower"
    assert proxy_from_env({k: v for k, v in env.items() if k != "https_proxy"}, HTTPS_UPSTREAM).host == "upper"
    assert proxy_from_env({"ALL_PROXY": "http://ALL:4"}, HTTPS_UPSTREAM).source == "ALL_PROXY"
    # An http upstream: lower-case http_proxy only (HTTP_PROXY is CGI's "httpoxy").
    assert proxy_from_env(env, "http://local:8000/v1").host == "plain"
    assert proxy_from_env({"HTTP_PROXY": "http://cgi:6"}, "http://local:8000/v1") is None
    assert proxy_from_env({}, HTTPS_UPSTREAM) is None


@pytest.mark.parametrize(
    "host,no_proxy,expected",
    [
        ("api.openai.com", ("*",), True),
        ("api.openai.com", ("openai.com",), True),
        ("api.openai.com", (".openai.com",), True),
        ("openai.com", (".openai.com",), True),
        ("notopenai.com", ("openai.com",), False),
        ("api.openai.com", ("example.com", "localhost"), False),
        ("10.1.2.3", ("10.0.0.0/8",), True),
        ("10.1.2.3", ("10.1.2.3",), True),
        ("11.1.2.3", ("10.0.0.0/8",), False),
        ("::1", ("::1",), True),
        ("API.OpenAI.com.", ("openai.com",), True),
    ],
)
def test_no_proxy_matching(host, no_proxy, expected):
    assert bypasses(host, no_proxy) is expected


def test_no_proxy_from_settings_and_the_startup_description():
    env = {"HTTPS_PROXY": "http://u:secret-pw@proxy:3128", "NO_PROXY": "localhost, .internal"}
    settings = Settings.from_env(env)
    assert settings.no_proxy == ("localhost", ".internal")
    assert settings.upstream_egress == settings.upstream_proxy
    assert settings.masked()["upstream_proxy"] == "http://***:***@proxy:3128 (from HTTPS_PROXY)"
    internal = Settings.from_env({**env, "OPENAI_BASE_URL": "https://llm.internal/v1"})
    assert internal.upstream_egress is None
    assert internal.masked()["upstream_proxy"].startswith("direct (the upstream's host is in NO_PROXY")
    assert "secret-pw" not in str(internal.masked())
    assert Settings.from_env({}).masked()["upstream_proxy"] == "direct"
    # For another upstream leg (a WebSocket relay): the same decision from the plain URL.
    assert proxy_for("wss://api.openai.com/v1/realtime", settings.upstream_proxy, settings.no_proxy).url == (
        "http://u:secret-pw@proxy:3128"
    )
    assert describe("https://x.internal", None, ()) == "direct"


@pytest.mark.parametrize(
    "env,message",
    [
        ({"UPSTREAM_RETRIES": "-1"}, "UPSTREAM_RETRIES: must be between 0 and 10"),
        ({"RETRY_ON_STATUS": "429,200"}, "RETRY_ON_STATUS: must list HTTP error statuses"),
        ({"RETRY_ON_STATUS": "abc"}, "RETRY_ON_STATUS: must list HTTP error statuses"),
        ({"RETRY_MAX_WAIT": "soon"}, "RETRY_MAX_WAIT: must be a number"),
        ({"ALL_PROXY": "gopher://x:70"}, "ALL_PROXY: the scheme must be one of"),
        ({"UPSTREAM_CA_FILE": "/"}, "UPSTREAM_CA_FILE: no such file"),
        # Control characters once percent-decoded: libcurl would cut the
        # credentials at a NUL, or send a newline inside Proxy-Authorization.
        ({"UPSTREAM_PROXY": "http://al%00ice:pw-unit-secret@h:3128"}, "UPSTREAM_PROXY: the user or password holds"),
        ({"UPSTREAM_PROXY": "http://alice:pw-unit%0Asecret@h:3128"}, "UPSTREAM_PROXY: the user or password holds"),
        ({"HTTPS_PROXY": "socks5h://alice:pw-unit%7Fsecret@h:1080"}, "HTTPS_PROXY: the user or password holds"),
        ({"UPSTREAM_PROXY": "http://alice:pw-unit-secret\t@h:3128"}, "UPSTREAM_PROXY: holds a space or a control"),
        ({"UPSTREAM_PROXY": "http://alice:pw-unit-secret@pro\nxy:3128"}, "UPSTREAM_PROXY: holds a space or a control"),
        ({"UPSTREAM_PROXY": "http://alice:pw-unit-secret@pro xy:3128"}, "UPSTREAM_PROXY: holds a space or a control"),
        ({"UPSTREAM_PROXY": "http://proxy:0"}, "UPSTREAM_PROXY: the proxy's port must be between 1 and 65535, got 0"),
        ({"UPSTREAM_PROXY": "http://pro%20xy:3128"}, "UPSTREAM_PROXY: 'pro%20xy' is not a valid host"),
        ({"UPSTREAM_PROXY": "http://u:pw-unit-secret@a..b:3128"}, "UPSTREAM_PROXY: 'a..b' is not a valid host"),
        ({"UPSTREAM_PROXY": "http://-proxy:3128"}, "UPSTREAM_PROXY: '-proxy' is not a valid host"),
        ({"UPSTREAM_PROXY": "http://999.1.1.1:3128"}, "UPSTREAM_PROXY: '999.1.1.1' is not a valid host"),
        ({"UPSTREAM_PROXY": "http://pro!xy:3128"}, "UPSTREAM_PROXY: 'pro!xy' is not a valid host"),
    ],
)
def test_bad_egress_settings(env, message):
    with pytest.raises(SettingsError) as error:
        Settings.from_env(env)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert "pw-unit" not in str(error.value) and "secret" not in str(error.value)


@pytest.mark.parametrize(
    "value,host",
    [
        ("http://proxy.corp:3128", "proxy.corp"),
        ("http://squid_proxy:3128", "squid_proxy"),  # a Compose service name
        ("socks5h://127.0.0.1:1080", "127.0.0.1"),
        ("http://[::1]:3128", "::1"),
        ("http://proxy.corp.:3128", "proxy.corp."),
        ("http://PROXY-1.corp:65535", "proxy-1.corp"),
    ],
)
def test_good_proxy_hosts(value, host):
    assert Settings.from_env({"UPSTREAM_PROXY": value}).upstream_proxy.host == host


def test_retry_settings():
    settings = Settings.from_env({"RETRY_ON_STATUS": "429, 503", "RETRY_MAX_WAIT": "5", "UPSTREAM_RETRIES": "0"})
    assert (settings.retry_on_status, settings.retry_max_wait, settings.upstream_retries) == ((429, 503), 5.0, 0)
    defaults = Settings.from_env({})
    assert (defaults.retry_on_status, defaults.retry_max_wait, defaults.upstream_retries) == ((), 10.0, 2)


PROXY = EgressProxy("http", "127.0.0.1", 3128, "user", "pw-unit-secret")


# The messages libcurl 8.23 gave against tinyproxy and microsocks (see
# docs/architecture.md and tests/test_egress_failures.py).
@pytest.mark.parametrize(
    "errno,message,proxy,kind,retry",
    [
        (7, "CONNECT tunnel failed, response 407", PROXY, "proxy_auth", None),
        (7, "CONNECT tunnel failed, response 401", PROXY, "proxy_auth", None),
        (7, "CONNECT tunnel failed, response 403", PROXY, "proxy_failed", None),
        (7, "CONNECT tunnel failed, response 500", PROXY, "proxy_failed", "proxy_failed"),
        (
            7,
            "Failed to connect to h:1 over proxy 127.0.0.1 after 0 ms: Could not connect",
            PROXY,
            "proxy_unreachable",
            "proxy_unreachable",
        ),
        (5, "Could not resolve proxy: proxy.corp", PROXY, "proxy_unreachable", "proxy_unreachable"),
        (97, "User was rejected by the SOCKS5 server (1 2).", PROXY, "proxy_auth", None),
        (97, "No authentication method was acceptable.", PROXY, "proxy_auth", None),
        (97, "cannot complete SOCKS5 connection to 127.0.0.1. (5)", PROXY, "proxy_failed", "proxy_failed"),
        (6, "Could not resolve host: api.openai.com", PROXY, "connect", "dns"),
        (
            7,
            "Failed to connect to h port 1 after 0 ms: Could not connect to server",
            None,
            "connect",
            "connect_refused",
        ),
        (6, "Could not resolve host: api.openai.com", None, "connect", "dns"),
        (28, "Connection timed out after 300 milliseconds", None, "timeout", "connect_timeout"),
        (28, "Resolving timed out after 300 milliseconds", None, "timeout", "connect_timeout"),
        (28, "Operation timed out after 500 milliseconds with 0 bytes received", None, "timeout", None),
        (56, "Recv failure: Connection reset by peer", None, "broken", None),
        (60, "SSL certificate problem: unable to get local issuer certificate", None, "tls", None),
    ],
)
def test_classify_libcurl_failures(errno, message, proxy, kind, retry):
    error = classify(errno, message, 0, proxy)
    assert (error.kind, error.retry_reason) == (kind, retry)
    assert "pw-unit-secret" not in error.message + error.detail
    if kind.startswith("proxy_"):
        assert "http://***:***@127.0.0.1:3128" in error.detail and "UPSTREAM_PROXY" in error.message


@pytest.mark.parametrize(
    "errno,message,named",
    [
        (6, "Could not resolve host: api.openai.com", "could not resolve the upstream's host name api.openai.com: "),
        (7, "Failed to connect to api.openai.com port 443", "could not connect to the upstream api.openai.com:443: "),
        (28, "Connection timed out after 300 milliseconds", "could not connect to the upstream api.openai.com:443 in"),
    ],
)
def test_no_route_names_the_upstream_and_says_what_to_try(errno, message, named):
    """Without a proxy, a connection the upstream never saw names its address and suggests an egress
    proxy or the demo; through a proxy, the proxy's settings are the place to look, and no such hint."""
    address = upstream_address("https://api.openai.com/v1")
    assert address == "api.openai.com:443"
    direct = classify(errno, message, 0, None, address=address)
    assert direct.message.startswith(named), direct.message
    assert "set UPSTREAM_PROXY to an egress proxy" in direct.message and "run make demo" in direct.message
    if errno != 7:  # through a proxy, a refused TCP connection is the proxy's (tested above)
        through = classify(errno, message, 0, PROXY, past_proxy=True, address=address)
        assert "api.openai.com" in through.message and "make demo" not in through.message


@pytest.mark.parametrize(
    "url,where",
    [
        ("http://127.0.0.1:1/v1", "the server on this machine is not answering"),
        ("http://localhost:11434/v1", "the server on this machine is not answering"),
        ("http://[::1]:8000/v1", "the server on this machine is not answering"),
        ("http://10.0.0.5:8000/v1", "the server on the local network is not answering"),
        ("http://192.168.1.20/v1", "the server on the local network is not answering"),
        ("http://[fe80::1]:8000/v1", "the server on the local network is not answering"),
        ("https://api.openai.com/v1", "set UPSTREAM_PROXY to an egress proxy"),
        ("http://8.8.8.8:8000/v1", "set UPSTREAM_PROXY to an egress proxy"),
    ],
)
def test_a_local_upstream_that_is_down_is_said_to_be_down(url, where):
    """A server on this machine or its network that does not answer is not started: no egress proxy or
    demo would help. The log's detail names the upstream's address, never more of its URL."""
    address = upstream_address(url)
    for errno, message in ((7, "Failed to connect"), (28, "Connection timed out after 300 milliseconds")):
        error = classify(errno, message, 0, None, address=address)
        assert error.message.startswith("could not connect to the upstream %s" % address), error.message
        assert where in error.message, error.message
        assert ("make demo" in error.message) == (where.startswith("set UPSTREAM_PROXY")), error.message
        assert error.detail == "upstream=%s" % address
    resolve = classify(6, "Could not resolve host: x", 0, None, address=address)
    assert resolve.detail == "upstream=%s" % address.rpartition(":")[0] and "set UPSTREAM_PROXY" in resolve.message


def test_every_fault_names_its_upstream_in_the_log_detail():
    address = "api.openai.com:443"
    for errno, message, proxy in ((56, "Recv failure", None), (60, "SSL certificate problem", None), (7, "x", PROXY)):
        error = classify(errno, message, 0, proxy, address=address)
        assert error.detail.split()[-1] == "upstream=api.openai.com:443", error.detail
        assert "pw-unit-secret" not in error.detail


def test_upstream_address():
    assert upstream_address("http://127.0.0.1:8080/v1") == "127.0.0.1:8080"
    assert upstream_address("http://[::1]/v1") == "[::1]:80"
    assert upstream_address("wss://api.openai.com/v1/realtime") == "api.openai.com:443"


HTTPS_PROXY = EgressProxy("https", "127.0.0.1", 3129, "u", "pw-unit-secret")
TIMED_OUT = "Connection timed out after 1001 milliseconds"
UNTRUSTED = "SSL certificate OpenSSL verify result: unable to get local issuer certificate (20)"


# libcurl 8.23 words a connect-phase timeout and a certificate failure the
# same whether the proxy or the upstream is at fault (measured against a
# silent listener, tinyproxy, microsocks and a TLS front): only how far the
# connection got tells them apart (``past_proxy``, from HTTP_CONNECTCODE and
# SSL_VERIFYRESULT; see tests/test_egress_failures.py).
@pytest.mark.parametrize(
    "errno,message,proxy,past_proxy,kind,retry",
    [
        (28, TIMED_OUT, PROXY, False, "proxy_unreachable", "proxy_unreachable"),
        (28, TIMED_OUT, HTTPS_PROXY, False, "proxy_unreachable", "proxy_unreachable"),
        (28, TIMED_OUT, PROXY, True, "timeout", "connect_timeout"),
        (28, TIMED_OUT, None, False, "timeout", "connect_timeout"),
        (60, UNTRUSTED, HTTPS_PROXY, False, "proxy_tls", None),
        (35, "TLS connect error: error:0A000410:SSL routines::ssl/tls alert handshake failure", HTTPS_PROXY, False,
         "proxy_tls", None),
        (60, UNTRUSTED, HTTPS_PROXY, True, "tls", None),
        (60, UNTRUSTED, PROXY, False, "tls", None),  # no TLS with an http:// proxy itself
        (60, UNTRUSTED, None, False, "tls", None),
    ],
)  # fmt: skip
def test_classify_by_how_far_the_connection_got(errno, message, proxy, past_proxy, kind, retry):
    error = classify(errno, message, 0, proxy, past_proxy=past_proxy)
    assert (error.kind, error.retry_reason) == (kind, retry)
    if kind.startswith("proxy_"):
        assert "UPSTREAM_PROXY" in error.message and "OPENAI_BASE_URL" not in error.message
        assert "://***:***@127.0.0.1:" in error.detail and "pw-unit-secret" not in error.detail
    if kind == "proxy_tls":
        assert "UPSTREAM_CA_FILE" in error.message and error.error_object()["code"] == "upstream_proxy_tls"


def test_timeout_after_the_status_is_never_retried():
    assert classify(28, "Connection timed out after 1 ms", 200, None).retry_reason is None


def test_retry_after_forms():
    assert retry_after_seconds(HTTPHeaders({"Retry-After": "3"})) == 3
    assert retry_after_seconds(HTTPHeaders({"retry-after-ms": "250", "Retry-After": "3"})) == 0.25
    date = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3 < retry_after_seconds(HTTPHeaders({"Retry-After": date})) <= 5
    assert retry_after_seconds(HTTPHeaders({"Retry-After": "soon"})) is None
    assert retry_after_seconds(HTTPHeaders({"Retry-After": "\u00b2"})) is None
    assert retry_after_seconds(HTTPHeaders()) is None


def test_backoff_is_short_jittered_and_grows():
    first = [backoff(1) for _ in range(200)]
    assert all(0.1 <= w <= 0.2 for w in first) and len(set(first)) > 100
    assert all(0.2 <= backoff(2) <= 0.4 for _ in range(50))


def test_retry_policy_limits():
    settings = Settings.from_env({"RETRY_ON_STATUS": "429", "REQUEST_TIMEOUT": "5", "RETRY_MAX_WAIT": "3"})
    policy = RetryPolicy(settings)
    headers = HTTPHeaders({"Retry-After": "2"})
    assert policy.after_status(429, headers, 1, 0) == 2
    assert policy.after_status(500, headers, 1, 0) is None  # not listed
    assert policy.after_status(429, HTTPHeaders({"Retry-After": "4"}), 1, 0) is None  # > RETRY_MAX_WAIT
    assert policy.after_status(429, headers, 1, 3.5) is None  # past the request's timeout
    assert policy.after_status(429, headers, 3, 0) is None  # UPSTREAM_RETRIES=2 used up
    refused = classify(7, "Failed to connect", 0, None)
    assert 0.1 <= policy.after_error(refused, 1, 0) <= 0.2
    assert policy.after_error(classify(56, "Recv failure", 0, None), 1, 0) is None


def test_the_socket_of_a_connection_is_found_by_its_local_address():
    """libcurl may open several sockets for one connection (addresses in turn, happy eyeballs)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    lost, won = socket.create_connection(listener.getsockname()), socket.create_connection(listener.getsockname())
    closed = socket.socket()
    closed_fd = closed.fileno()
    closed.close()
    try:
        ip, port = won.getsockname()
        assert connected_socket([lost.fileno(), won.fileno()], ip, port) == won.fileno()
        assert connected_socket([closed_fd, won.fileno()], ip, port) == won.fileno()
        assert connected_socket([lost.fileno(), closed_fd], ip, port) == -1
        assert connected_socket([won.fileno()], ip, port) == won.fileno()
        assert won.fileno() >= 0 and lost.fileno() >= 0  # looked at, never closed
        peer, _ = listener.accept()  # lost's other end
        assert not readable(lost.fileno())  # idle and open
        peer.close()
        time.sleep(0.05)
        assert readable(lost.fileno()) and not readable(won.fileno())  # closed by its peer
        assert lost.recv(1) == b""  # readable() read nothing: the end of file is still there
    finally:
        for sock in (listener, lost, won):
            sock.close()
