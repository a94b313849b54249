"""Readiness apart from liveness, for restarts behind a load balancer.

/readyz turns 503 as soon as SIGTERM arrives; /healthz stays 200; the process
keeps accepting and serving for SHUTDOWN_DELAY seconds before it stops listening.
"""

import asyncio
import json
import re
import signal
import time

import pytest
import tornado.httpclient

from settings import Settings, SettingsError
from tests.conftest import AUTH, DEFAULT_UPSTREAM
from tests.procs import ServerProcess

TOKEN = "proc-ACCESS-TOKEN-91c2"


@pytest.mark.gen_test
async def test_readyz_is_200_while_serving_and_503_draining_once_shutdown_began(proxy, app):
    response = await proxy.request("/readyz", method="GET", auth=False)
    assert response.code == 200 and json.loads(response.body) == {"status": "ready"}

    # A method the route does not have is a 405 like anywhere else, not a readiness answer.
    response = await proxy.request("/readyz", method="PUT", body=b"", auth=False)
    assert response.code == 405 and json.loads(response.body)["status"] == "error"

    app.draining = True
    response = await proxy.request("/readyz", method="GET", auth=False)
    assert response.code == 503
    body = json.loads(response.body)
    assert body["status"] == "draining" and body["error"]["code"] == "draining"
    assert "shutting down" in body["text"].lower()
    # Liveness is another question: the process is alive and finishing its work.
    response = await proxy.request("/healthz", method="GET", auth=False)
    assert response.code == 200 and json.loads(response.body) == {"status": "ok", "upstreams": DEFAULT_UPSTREAM}


def test_shutdown_delay_setting():
    assert Settings.from_env({}).shutdown_delay == 0
    assert Settings.from_env({"SHUTDOWN_DELAY": "5"}).shutdown_delay == 5
    with pytest.raises(SettingsError, match="^SHUTDOWN_DELAY: "):
        Settings.from_env({"SHUTDOWN_DELAY": "-1"})


async def fetch(url, path, **kwargs):
    """One request on a new connection (the simple client does not keep connections)."""
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    try:
        return await client.fetch(url + path, raise_error=False, request_timeout=10, **kwargs)
    finally:
        client.close()


async def get_on(reader, writer, path):
    """A GET on an open HTTP/1.1 connection (keep-alive unless the server says otherwise); its head."""
    writer.write(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode())
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
    length = int(re.search(r"(?im)^content-length: (\d+)", head).group(1))
    await asyncio.wait_for(reader.readexactly(length), 5)
    return head


@pytest.mark.slow
@pytest.mark.gen_test(timeout=40)
async def test_sigterm_turns_readyz_503_and_serves_new_requests_for_the_delay(fake_openai, tmp_path):
    delay = 2.5
    server = ServerProcess(
        {"ACCESS_TOKEN": TOKEN, "OPENAI_BASE_URL": fake_openai.url, "SHUTDOWN_DELAY": str(delay)},
        str(tmp_path / "server.log"),
    )
    try:
        await server.wait_ready()
        assert (await fetch(server.url, "/readyz")).code == 200
        # A keep-alive connection opened before the signal, as a balancer keeps them.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        head = await get_on(reader, writer, "/healthz")
        assert head.startswith("HTTP/1.1 200") and "connection: close" not in head.lower()
        server.signal(signal.SIGTERM)
        signalled = time.monotonic()
        for _ in range(100):
            ready = await fetch(server.url, "/readyz")
            if ready.code == 503:
                break
            await asyncio.sleep(0.02)
        assert ready.code == 503 and json.loads(ready.body)["status"] == "draining"
        became_unready = time.monotonic()
        assert became_unready - signalled < 1.5
        assert (await fetch(server.url, "/healthz")).code == 200
        # Served on the old connection too, and closed after that answer, so
        # that the balancer opens a new one (refused once listening stops).
        head = await get_on(reader, writer, "/healthz")
        assert head.startswith("HTTP/1.1 200") and "connection: close" in head.lower()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

        # Still accepting and serving new connections well after readiness went.
        await asyncio.sleep(0.5)
        response = await fetch(
            server.url,
            "/chat_complete",
            method="POST",
            headers={**AUTH, "access-token": TOKEN},
            body=json.dumps({"prompt": "after SIGTERM"}),
        )
        assert time.monotonic() - signalled < delay
        assert response.code == 200 and json.loads(response.body)["text"] == "Echo: after SIGTERM"

        # Then it stops listening and exits.
        assert await server.wait_exit(delay + 10) == 0
        assert time.monotonic() - signalled >= delay
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", server.port)
        assert "still serving for SHUTDOWN_DELAY=2.5s" in server.output()
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=40)
async def test_a_request_whose_body_is_still_arriving_at_sigterm_is_answered(fake_openai, tmp_path):
    """It has no upstream call yet: the drain must wait for it all the same, not close its connection."""
    server = ServerProcess(
        {"ACCESS_TOKEN": TOKEN, "OPENAI_BASE_URL": fake_openai.url, "SHUTDOWN_GRACE": "10"},
        str(tmp_path / "server.log"),
    )
    try:
        await server.wait_ready()
        body = json.dumps({"prompt": "slow body"}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /chat_complete HTTP/1.1\r\nHost: 127.0.0.1\r\naccess-token: %s\r\nopenai-token: %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (TOKEN.encode(), AUTH["openai-token"].encode(), len(body))
            + body[:5]
        )
        await writer.drain()
        await asyncio.sleep(0.3)
        server.signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        writer.write(body[5:])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b'"text":"Echo: slow body"' in answer
        assert await server.wait_exit(10) == 0
    finally:
        server.stop()
