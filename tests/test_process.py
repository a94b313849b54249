"""The real process: startup log, graceful shutdown on real signals."""

import asyncio
import json
import signal
import time

import pytest
import tornado.httpclient

from chat_gpt_proxy.fake_openai import Behaviour
from tests.conftest import OPENAI_KEY
from tests.procs import ServerProcess

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
