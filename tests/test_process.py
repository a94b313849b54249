"""The real process: startup log, graceful shutdown on real signals."""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import tornado.httpclient

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.conftest import OPENAI_KEY
from tests.procs import ROOT, ServerProcess, free_port, free_ports

TOKEN = "proc-ACCESS-TOKEN-91c2"


@pytest.fixture
def start_server(fake_openai, tmp_path):
    servers = []

    async def start(**env):
        env = {"OPENAI_BASE_URL": fake_openai.url, **{k: str(v) for k, v in env.items()}}
        server = ServerProcess(env, str(tmp_path / ("server%d.log" % len(servers))))
        servers.append(server)
        await server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


async def stream_request(url, chunks, token=TOKEN):
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    body = json.dumps({"prompt": "x", "generate_params": {"stream": True}})
    try:
        response = await client.fetch(
            url + "/chat_complete",
            method="POST",
            body=body,
            raise_error=False,
            request_timeout=30,
            headers={"access-token": token, "openai-token": OPENAI_KEY},
            streaming_callback=lambda c: chunks.append((time.monotonic(), c)),
        )
    finally:
        client.close()
    return response


async def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.mark.gen_test(timeout=30)
async def test_startup_warns_about_default_token_and_masks_config(start_server):
    server = await start_server()  # neither ACCESS_TOKEN nor ACCESS_KEY in its environment
    server.signal(signal.SIGINT)
    assert await server.wait_exit(10) == 0
    out = server.output()
    assert "default access token 123456 is in use" in out
    assert '"access_tokens": ["***"]' in out


@pytest.mark.gen_test(timeout=30)
async def test_sigterm_lets_a_stream_finish_then_exits_0(start_server, fake_openai):
    server = await start_server(ACCESS_TOKEN=TOKEN, SHUTDOWN_GRACE=10)
    fake_openai.push(Behaviour(chunks=["a ", "b ", "c ", "d ", "e "], delay=0.3))
    chunks = []
    request = asyncio.ensure_future(stream_request(server.url, chunks))
    await wait_for(lambda: any(b'"content":"a "' in c for _, c in chunks))
    server.signal(signal.SIGTERM)
    await asyncio.sleep(0.2)
    # No new connections once shutdown began.
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", server.port)
    response = await request
    body = b"".join(c for _, c in chunks)
    assert response.code == 200 and body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
    assert b'"content":"e "' in body
    assert await server.wait_exit(10) == 0
    assert "shutdown complete" in server.output()
    assert OPENAI_KEY not in server.output() and TOKEN not in server.output()


@pytest.mark.gen_test(timeout=30)
async def test_sigterm_ends_streams_past_the_grace_with_error_event(start_server, fake_openai):
    server = await start_server(ACCESS_TOKEN=TOKEN, SHUTDOWN_GRACE=0.5)
    fake_openai.push(Behaviour(chunks=["tok "] * 100, delay=0.2))
    chunks = []
    request = asyncio.ensure_future(stream_request(server.url, chunks))
    await wait_for(lambda: any(b'"content":"tok "' in c for _, c in chunks))
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    response = await request
    ended = time.monotonic()
    body = b"".join(c for _, c in chunks)
    assert response.code == 200
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: ") :])["error"]["code"] == "upstream_aborted"
    assert 0.4 < ended - signalled < 5
    assert await server.wait_exit(10) == 0
    await fake_openai.wait_abort(timeout=3)


# -- operator mistakes: one line naming the variable and the cause, exit 2, no traceback


def refused_start(env: dict, wrapper: tuple = ()) -> str:
    """Run ``python server.py`` expecting it to refuse to start; returns its one line of output."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("ACCESS_TOKEN", "ACCESS_KEY")}
    full_env.update({"ACCESS_TOKEN": TOKEN, "HOST": "127.0.0.1", "PORT": str(free_port()), **env})
    proc = subprocess.run(
        [*wrapper, sys.executable, "server.py"], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=30
    )
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, output
    assert len(output.splitlines()) == 1 and "Traceback" not in output, output
    return output


@pytest.fixture(scope="module")
def two_certificates(tmp_path_factory):
    """Two self-signed certificates and their keys, made by the project's own script."""
    pairs = []
    for name in ("a", "b"):
        directory = tmp_path_factory.mktemp("tls-" + name)
        result = subprocess.run(
            ["bash", "deploy/nginx/make-cert.sh", str(directory), "127.0.0.1"], cwd=ROOT, capture_output=True
        )
        assert result.returncode == 0, result.stderr
        pairs.append((str(directory / "chat_gpt_proxy.crt"), str(directory / "chat_gpt_proxy.key")))
    return pairs


def test_port_already_in_use():
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = refused_start({"PORT": str(port)})
    finally:
        taken.close()
    assert line.startswith("chat_gpt_proxy: invalid setting PORT: %d is already in use" % port), line


@pytest.mark.parametrize(
    "host,cause",
    [("no-such-host.invalid", "cannot resolve"), ("203.0.113.7", "not an address of this machine")],
)
def test_host_that_cannot_be_listened_on(host, cause):
    line = refused_start({"HOST": host})
    assert "invalid setting HOST: " in line and cause in line, line


@pytest.mark.parametrize(
    "problem,variable,cause",
    [
        ("key of another certificate", "TLS_KEYFILE", "is not the key of the certificate"),
        ("garbage certificate", "TLS_CERTFILE", "no PEM certificate"),
        ("garbage key", "TLS_KEYFILE", "no PEM private key"),
        ("certificate as key", "TLS_KEYFILE", "no PEM private key"),
        ("encrypted key", "TLS_KEYFILE", "is encrypted"),
    ],
)
def test_unusable_tls_files(two_certificates, tmp_path, problem, variable, cause):
    (cert_a, key_a), (cert_b, key_b) = two_certificates
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", key_a, "-aes256", "-passout", "pass:secret1", "-out", str(encrypted)], check=True
    )
    cert, key = {
        "key of another certificate": (cert_a, key_b),
        "garbage certificate": (str(garbage), key_a),
        "garbage key": (cert_a, str(garbage)),
        "certificate as key": (cert_a, cert_a),
        "encrypted key": (cert_a, str(encrypted)),
    }[problem]
    line = refused_start({"TLS_CERTFILE": cert, "TLS_KEYFILE": key})
    assert "invalid setting %s: " % variable in line and cause in line, line


def test_unreadable_tls_key(two_certificates, tmp_path):
    (cert, key), _ = two_certificates
    unreadable = tmp_path / "unreadable.key"
    shutil.copy(key, unreadable)
    unreadable.chmod(0)
    # root reads any file: run the server without the capabilities that allow it.
    wrapper = ("setpriv", "--bounding-set=-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
    line = refused_start({"TLS_CERTFILE": cert, "TLS_KEYFILE": str(unreadable)}, wrapper)
    assert "invalid setting TLS_KEYFILE: cannot read" in line and "Permission denied" in line, line


# -- shutdown: a second signal ends the drain at once; Connection: close while draining


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.gen_test(timeout=30)
async def test_second_signal_ends_the_drain_at_once(start_server, fake_openai, second):
    server = await start_server(ACCESS_TOKEN=TOKEN, SHUTDOWN_GRACE=60)
    fake_openai.push(Behaviour(chunks=["tok "] * 200, delay=0.2))
    chunks = []
    request = asyncio.ensure_future(stream_request(server.url, chunks))
    await wait_for(lambda: any(b'"content":"tok "' in c for _, c in chunks))
    server.signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    assert server.proc.poll() is None, "still draining: the grace is 60 s"
    signalled = time.monotonic()
    server.signal(second)
    assert await server.wait_exit(10) == 0
    assert time.monotonic() - signalled < 5
    await fake_openai.wait_abort(timeout=3)
    # Within that moment the stream still gets its final error event: the client knows the answer is incomplete.
    await asyncio.wait([request], timeout=5)
    assert request.done()
    request.exception()  # retrieved, whether the client saw the end or the close first
    streamed = b"".join(c for _, c in chunks)
    assert b'"code":"upstream_aborted"' in streamed and streamed.endswith(b"data: [DONE]\n\n")
    output = server.output()
    assert "second signal, ending 1 request in flight now" in output and "shutdown complete" in output
    assert "Traceback" not in output and "Error" not in output


@pytest.mark.gen_test(timeout=30)
async def test_answers_during_the_drain_close_the_connection(start_server, fake_openai):
    server = await start_server(ACCESS_TOKEN=TOKEN, SHUTDOWN_GRACE=10)
    fake_openai.push(Behaviour(first_delay=1.0))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        body = b'{"prompt": "x"}'
        writer.write(
            b"POST /chat_complete HTTP/1.1\r\nHost: x\r\naccess-token: %s\r\nopenai-token: %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (TOKEN.encode(), OPENAI_KEY.encode(), len(body), body)
        )
        await writer.drain()
        await wait_for(lambda: fake_openai.received)
        server.signal(signal.SIGTERM)
        answer = await asyncio.wait_for(reader.read(), 10)  # to EOF: the proxy closes the connection
    finally:
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and json.loads(payload)["text"] == "Echo: x"
    assert b"\r\nConnection: close" in head
    assert await server.wait_exit(10) == 0


@pytest.mark.gen_test(timeout=30)
async def test_keep_alive_answers_before_shutdown_keep_the_connection(start_server, fake_openai):
    """The contrast to the test above: outside a drain, HTTP/1.1 connections stay open."""
    server = await start_server(ACCESS_TOKEN=TOKEN)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in head
    finally:
        writer.close()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.gen_test(timeout=30)
async def test_startup_says_where_to_look_and_keeps_a_pid_file(start_server, tmp_path, workers):
    """The PID file names the process `make reload` must signal: the server, or with WORKERS its supervisor."""
    pid_file = tmp_path / "proxy.pid"
    server = await start_server(
        ACCESS_TOKEN=TOKEN, PID_FILE=pid_file, WORKERS=workers, WORKER_METRICS_PORT=free_ports(workers)
    )
    assert int(pid_file.read_text()) == server.proc.pid
    url = "http://127.0.0.1:%d" % server.port
    where = "playground %s/ · how to call the API %s/usage · admin page off (set ADMIN_TOKEN_FILE or ADMIN_TOKEN)"
    # With workers, the supervisor says it once they all listen: a moment after the port answers.
    deadline = time.monotonic() + 10
    while where % (url, url) not in (out := server.output()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert where % (url, url) in out
    parts = [line.split("configuration, ")[1].split(":")[0] for line in out.splitlines() if "configuration, " in line]
    assert parts == ["listen", "access", "upstream", "sizes", "timeouts", "usage", "redis", "cache", "observability"]
    assert all(len(line) < 700 for line in out.splitlines()), "no line of the whole configuration"
    server.signal(signal.SIGTERM)
    assert await server.wait_exit(15) == 0
    assert not pid_file.exists(), "removed at exit"


@pytest.mark.gen_test(timeout=60)
async def test_a_second_proxy_with_the_same_pid_file_refuses_to_start(start_server, fake_openai, tmp_path):
    """The PID file keeps naming the first proxy: `make reload` signals it, and it is removed only
    when that proxy stops. A stale file (a dead process, or one that is no proxy) is taken over."""
    pid_file = tmp_path / "proxy.pid"
    first = await start_server(ACCESS_TOKEN=TOKEN, PID_FILE=pid_file)
    assert int(pid_file.read_text()) == first.proc.pid
    env = {"OPENAI_BASE_URL": fake_openai.url, "ACCESS_TOKEN": TOKEN, "PID_FILE": str(pid_file)}
    second = ServerProcess(env, str(tmp_path / "second.log"))
    try:
        assert await second.wait_exit(15) == 1
        lines = second.output().splitlines()
        assert lines == [
            "chat_gpt_proxy: a proxy is already running with PID_FILE %s (pid %d): stop it first (kill %d), "
            "or give this one another PID_FILE" % (pid_file, first.proc.pid, first.proc.pid)
        ]
    finally:
        second.stop()
    assert int(pid_file.read_text()) == first.proc.pid, "the first proxy's file, untouched"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("proxy.pid")) == ["proxy.pid"]
    first.signal(signal.SIGTERM)
    assert await first.wait_exit(15) == 0
    assert not pid_file.exists()
    # Stale files: this test's own process (no proxy) and an id no process has.
    for stale in (os.getpid(), 2**22 + 1):
        pid_file.write_text("%d\n" % stale)
        server = await start_server(ACCESS_TOKEN=TOKEN, PID_FILE=pid_file)
        assert int(pid_file.read_text()) == server.proc.pid
        server.signal(signal.SIGTERM)
        assert await server.wait_exit(15) == 0
        assert not pid_file.exists()
