"""Shared fixtures. Servers run on the test's IOLoop, on ephemeral loopback ports.

Fixtures:
- ``fake_openai``: a started ``FakeOpenAI`` (chat_gpt_proxy/fake_openai/); script it with ``push``.
- ``config``: the proxy's ``Settings`` pointing at the fake; adjust with
  ``@pytest.mark.settings(name=value, ...)``.
- ``app`` / ``http_server`` / ``base_url``: the proxy built by ``server.make_app`` and
  ``server.make_server`` exactly as ``main()`` does, on 127.0.0.1.
- ``proxy``: a ``ProxyClient`` for the running proxy; every response it returns
  has passed ``check_response`` (the invariants every response must hold).
- ``secrets_in_use``: the recognisable secret values the tests send.
- ``redis_server``: Debian's redis-server on an ephemeral loopback port with a password
  (tests/procs.py ``RedisServer``; ``.url`` for REDIS_URL), stopped at the end.
- ``certificate``: (cert, key) paths of a throwaway certificate for 127.0.0.1, made by
  deploy/nginx/make-cert.sh.

Sync clients (requests, the openai SDK) run in a thread through
``proxy.in_thread(...)`` so that the servers keep running on the IOLoop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import signal
import subprocess
import time

import pytest
import tornado.httpclient
from tornado.testing import bind_unused_port

from chat_gpt_proxy.fake_openai.app import FakeOpenAI
from server import make_app, make_server
from settings import Settings
from tests.postgres_server import postgres_server  # noqa: F401 (a fixture: one server per test session)
from tests.procs import ROOT, RedisServer, ServerProcess

ACCESS_TOKEN = "acc-TESTACCESS-7f3a9c"
OPENAI_KEY = "sk-TESTOPENAIKEY-5d2e8b1c"
# What /healthz lists without UPSTREAMS_FILE: the one upstream, closed.
DEFAULT_UPSTREAM = [{"name": "default", "kind": "openai", "state": "up", "priority": 0, "weight": 1}]
SECRETS = (ACCESS_TOKEN, OPENAI_KEY)
# Every token value any test sends (the modules that use others import them
# from here): the whole run's log output is scanned for them at the end.
OTHER_SECRETS = (
    "browser-access-token",
    "sk-browser-test",
    "hostile-access-token-77",
    "sk-hostile-key-12345",
    "proc-ACCESS-TOKEN-91c2",
    "second-token-abc",
    "rt-browser-access-7c1d",
    "sk-rt-browser-2b9e",
    "rt-proxy-pass-5e1",
    # Egress proxy passwords (tests/egress_servers.py), also percent-encoded.
    "tiny-PROXYPASS-8e1f",
    "sox-P@ss:w/rd-3b7d",
    "sox-P%40ss%3Aw%2Frd-3b7d",
    "pw-unit-secret",
    "secret-pw",
    # tests/test_tokens.py: named tokens, a too-short one, the server-held OpenAI key.
    "alice-TOKEN-4b9e2f71c0",
    "bob-TOKEN-8d1c3a55e7f0",
    "carol-TOKEN-1f7a9c3e2b",
    "dave-TOKEN-6e0b4d8a1c",
    "erin-TOKEN-3a5c7e9b1d",
    "grace-TOKEN-5d7f9b1e3a",
    "frank-TOKEN-9c2e4a6b8d",
    "short-tok-12",
    "sk-SERVERKEY-7e1d4c9a2b",
    "the-token-you-gave-alice",
    # The redis_server fixture's password (REDIS_URL), and a wrong one.
    "redis-PASS-4c8e1a9f",
    "wrong-REDIS-pass-77d1",
    # tests/test_anthropic*.py: named tokens and Anthropic keys (the server's and a caller's).
    "team-ANTHROPIC-TOKEN-4d2b7e",
    "ann-ANTHROPIC-TOKEN-8c1f3a",
    "budgeted-ANTHROPIC-TOKEN-2e9d5c",
    "haiku-ANTHROPIC-TOKEN-6a0b1d",
    "cached-ANTHROPIC-TOKEN-9f3e0a",
    "limited-ANTHROPIC-TOKEN-1b7c4d",
    "admin-ANTHROPIC-7e2f9c",
    "sk-ant-SERVERKEY-A-3f8e1c",
    "sk-ant-SERVERKEY-B-7b2d9a",
    "sk-ant-OWNKEY-5c4e2a",
    "sk-ant-FAKEKEY-0c9d2e",
    # tests/test_admin_api.py and the console's other tests: admins and a file-defined token.
    "admin-API-token-6c1e9a2f7b",
    "lead-ADMIN-token-3e8b1d7c52",
    "filed-USER-token-94a2c7e1d3",
)
AUTH = {"access-token": ACCESS_TOKEN, "openai-token": OPENAI_KEY}


class _RunLog(logging.Handler):
    """Keeps the text of every log record of the whole test run."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        text = record.getMessage() + getattr(record, "traceback_text", "")
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)


RUN_LOG = _RunLog()

# The test clients' own WebSocket handshake trace (their access-token and
# Authorization headers) is not the proxy's output; the proxy's upstream leg
# logs through chat_gpt_proxy.realtime.wire, which stays quiet at DEBUG by itself.
logging.getLogger("websockets.client").setLevel(logging.WARNING)


def pytest_configure(config):
    config.addinivalue_line("markers", "settings(**kw): override proxy Settings fields for this test")
    logging.getLogger().addHandler(RUN_LOG)


def pytest_sessionfinish(session, exitstatus):
    """The captured log output of a full run, errors included, holds no token value."""
    text = "\n".join(RUN_LOG.lines)
    leaked = [secret for secret in (*SECRETS, *OTHER_SECRETS) if secret in text]
    if leaked:
        session.exitstatus = 1
        print("\nSECRET LEAK: token values found in the log output of this run: %s" % leaked)
        for line in RUN_LOG.lines:
            if any(secret in line for secret in leaked):
                print("LEAKED IN:", line[:3000])
    elif RUN_LOG.lines:
        print("\nlog scan: %d log records of this run hold no token value" % len(RUN_LOG.lines))


@pytest.fixture
def secrets_in_use():
    return SECRETS


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    result = subprocess.run(
        ["bash", "deploy/nginx/make-cert.sh", str(directory), "127.0.0.1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return str(directory / "chat_gpt_proxy.crt"), str(directory / "chat_gpt_proxy.key")


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis", password="redis-PASS-4c8e1a9f")
    try:
        yield server
    finally:
        server.stop()


_databases = itertools.count()


def new_database(server) -> tuple[str, str]:
    """A new empty database of the session's PostgreSQL server: its name and URL."""
    name = "ledger_%d" % next(_databases)
    return name, server.create_database(name, icu_locale="en-US")


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    """USAGE_DATABASE for a new, empty ledger of each backend: a SQLite file, or a new database of
    the session's PostgreSQL server (dropped after the test)."""
    if request.param == "sqlite":
        yield str(tmp_path / "usage.sqlite3")
        return
    server = request.getfixturevalue("postgres_server")
    name, url = new_database(server)
    yield url
    server.drop_database(name)


def children(pid: int) -> list[int]:
    """The process ids of ``pid``'s children (a supervisor's workers)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in out)


@pytest.fixture
def start(tmp_path, fake_openai):
    """``start(**env)``: server.py as a process of its own (tests/procs.py), on the fake, with ACCESS_TOKEN
    and ``env``; every one started is stopped after the test, its workers first."""
    started = []

    def run(**env):
        server = ServerProcess(
            {"ACCESS_TOKEN": ACCESS_TOKEN, "OPENAI_BASE_URL": fake_openai.url, **env},
            str(tmp_path / ("server%d.log" % len(started))),
        )
        started.append(server)
        return server

    yield run
    for server in started:
        # The workers first: killing the supervisor alone would leave them serving.
        for pid in children(server.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.stop()


@pytest.fixture
def fake_openai(io_loop):
    fake = FakeOpenAI()
    fake.start()
    yield fake
    io_loop.run_sync(fake.stop)


@pytest.fixture
def config(request, fake_openai):
    return proxy_settings(request, fake_openai, access_tokens=(ACCESS_TOKEN, "second-token-abc"))


def file_upload(boundary: str, filename: str, content_type: str, payload: bytes) -> bytes:
    """A /v1/files body as the SDKs send it: multipart/form-data with ``purpose=batch`` and the file."""
    return (
        b'--%s\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--%s\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n'
        b"Content-Type: %s\r\n\r\n%s\r\n--%s--\r\n"
    ) % (boundary.encode(), boundary.encode(), filename.encode(), content_type.encode(), payload, boundary.encode())


def proxy_settings(request, fake_openai, **fields) -> Settings:
    """The in-process proxy's settings: on loopback, the fake as its upstream, one access token,
    then ``fields``, then the test's ``@pytest.mark.settings(...)`` over all of them."""
    marker = request.node.get_closest_marker("settings")
    overrides = dict(marker.kwargs) if marker else {}
    base = dict(access_tokens=(ACCESS_TOKEN,), openai_base_url=fake_openai.url, port=0, host="127.0.0.1")
    return dataclasses.replace(Settings(), **{**base, **fields, **overrides})


@pytest.fixture
def app(config, io_loop):
    application = make_app(config)
    io_loop.run_sync(lambda: application.spend.start(application.tokens.entries))
    if application.console is not None:
        io_loop.run_sync(application.console.start)
    if application.alerts is not None:

        async def start_alerts():
            application.alerts.start()  # its task runs on the test's loop

        io_loop.run_sync(start_alerts)
    yield application
    application.pool.close()
    if application.alerts is not None:
        io_loop.run_sync(application.alerts.close)
    if application.console is not None:
        io_loop.run_sync(application.console.close)
    io_loop.run_sync(application.spend.close)


@pytest.fixture
def _unused_port():
    return bind_unused_port()


@pytest.fixture
def base_url(http_port):
    return "http://127.0.0.1:%d" % http_port


@pytest.fixture
def http_server(app, config, io_loop, _unused_port):
    server = make_server(app, config)
    server.add_socket(_unused_port[0])
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=10)


def check_response(response, body: bytes | None = None) -> None:
    """The invariants every response of the proxy must hold (``body``: for streamed responses)."""
    # A 500 may only mirror an upstream 500, never be the proxy's own failure.
    assert b"Internal error in the proxy" not in (response.body or b"") + (body or b"")
    assert response.code != 599, "no HTTP answer at all: %r" % (response.error,)
    for name, value in response.headers.get_all():
        for secret in SECRETS:
            assert secret not in value, "secret in response header %s" % name
    body = (response.body or b"") if body is None else body
    for secret in SECRETS:
        assert secret.encode() not in body, "secret in response body"
    assert b"Traceback" not in body
    assert response.headers.get("x-request-id"), "every response carries x-request-id"
    if response.code >= 400:
        assert response.headers["Content-Type"].startswith("application/json"), response.headers
        parsed = json.loads(body)
        assert isinstance(parsed["error"], dict) and parsed["error"].get("message")


@dataclasses.dataclass
class Streamed:
    """A streamed response: its chunks with arrival times (monotonic)."""

    response: tornado.httpclient.HTTPResponse
    chunks: list[tuple[float, bytes]]

    @property
    def body(self) -> bytes:
        return b"".join(c for _, c in self.chunks)

    def events(self) -> list[str]:
        return [e[len("data: ") :] for e in self.body.decode().split("\n\n") if e.startswith("data: ")]


class ProxyClient:
    def __init__(self, base_url: str):
        self.base_url = base_url
        self.client = tornado.httpclient.AsyncHTTPClient(force_instance=True)

    async def request(
        self,
        path="/chat_complete",
        method="POST",
        json_body=None,
        body=None,
        headers=None,
        auth=True,
        check=True,
        **kwargs,
    ):
        all_headers = dict(AUTH) if auth else {}
        all_headers.update(headers or {})
        if json_body is not None:
            body = json.dumps(json_body, ensure_ascii=False).encode("utf-8")
            all_headers.setdefault("Content-Type", "application/json")
        response = await self.client.fetch(
            self.base_url + path,
            method=method,
            body=body,
            headers=all_headers,
            raise_error=False,
            allow_nonstandard_methods=True,
            request_timeout=kwargs.pop("request_timeout", 30),
            **kwargs,
        )
        if check:
            check_response(response)
        return response

    async def chat(self, json_body, **kwargs):
        response = await self.request(json_body=json_body, **kwargs)
        return response, json.loads(response.body)

    async def stream(self, json_body, **kwargs) -> Streamed:
        chunks: list[tuple[float, bytes]] = []
        response = await self.request(
            json_body=json_body,
            streaming_callback=lambda c: chunks.append((time.monotonic(), c)),
            check=False,
            **kwargs,
        )
        streamed = Streamed(response, chunks)
        check_response(response, streamed.body)
        return streamed

    async def in_thread(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def proxy(http_server, base_url):
    client = ProxyClient(base_url)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _capture_all_logs(caplog):
    """Every log record at DEBUG, so secret scans see everything that could be logged."""
    caplog.set_level(logging.DEBUG)
    yield


async def open_raw(base_url: str, body: dict, path: str = "/chat_complete", headers: dict | None = None):
    """Send a POST by hand and return (reader, writer) after the response headers.

    For tests that must control the client's socket: close it mid-stream, or
    stop reading from it.
    """
    host, port = base_url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    all_headers = {**AUTH, **(headers or {}), "Content-Type": "application/json", "Content-Length": str(len(payload))}
    head = "POST %s HTTP/1.1\r\nHost: %s\r\n" % (path, host)
    head += "".join("%s: %s\r\n" % item for item in all_headers.items()) + "\r\n"
    writer.write(head.encode() + payload)
    await writer.drain()
    status_and_headers = await reader.readuntil(b"\r\n\r\n")
    return status_and_headers.decode("latin-1"), reader, writer
