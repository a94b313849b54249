"""Retries of upstream attempts no client saw.

Retried: the connection was never made (refused, connect timeout, the egress
proxy unreachable: see tests/test_egress_failures.py), and, opted in with
RETRY_ON_STATUS, error statuses whose answer has not been relayed. Never
retried: anything after the request was sent, except a GET or HEAD whose
reused keep-alive connection closed before any answer byte.
"""

import asyncio
import dataclasses
import json
import logging
import socket
import time

import pytest
from tornado.httputil import HTTPHeaders

from chat_gpt_proxy.fake_openai.app import FakeOpenAI
from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from chat_gpt_proxy.upstream.retry import RetryPolicy
from settings import Settings
from tests.conftest import OPENAI_KEY
from tests.egress_servers import serving

STREAM = {"stream": True}


def retry_lines(caplog):
    return [r.getMessage() for r in caplog.records if "upstream retry" in r.getMessage()]


def retries_metric(app, reason) -> float:
    return app.metrics.registry.get_sample_value("proxy_upstream_retries_total", {"reason": reason}) or 0


class OnRetry(logging.Handler):
    """Runs ``action`` when the proxy logs its ``after``-th retry."""

    def __init__(self, after: int, action):
        super().__init__(logging.WARNING)
        self.after, self.action, self.seen = after, action, 0

    def emit(self, record):
        if "upstream retry" in record.getMessage():
            self.seen += 1
            if self.seen == self.after:
                self.action()


@pytest.fixture
def flaky_port(io_loop):
    """A port that refuses connections (bound, not listening) until ``open()`` starts a fake there."""

    class FlakyPort:
        def __init__(self):
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
            self.fake = FakeOpenAI()

        @property
        def url(self):
            return "http://127.0.0.1:%d/v1" % self.port

        def open(self):
            self.sock.listen(128)
            self.sock.setblocking(False)
            self.fake.start(sockets=[self.sock])

    flaky = FlakyPort()
    yield flaky
    if flaky.fake.port:
        io_loop.run_sync(flaky.fake.stop)
    else:
        flaky.sock.close()


@pytest.fixture
def on_retry():
    handlers = []

    def install(after, action):
        handler = OnRetry(after, action)
        logging.getLogger("chat_gpt_proxy").addHandler(handler)
        handlers.append(handler)

    yield install
    for handler in handlers:
        logging.getLogger("chat_gpt_proxy").removeHandler(handler)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.gen_test(timeout=30)
async def test_refused_connects_are_retried_until_the_port_accepts(config, flaky_port, on_retry, caplog, stream):
    on_retry(2, flaky_port.open)  # refuses the first two connects
    settings = dataclasses.replace(config, openai_base_url=flaky_port.url)
    async with serving(settings) as (client, app):
        if stream:
            streamed = await client.stream({"prompt": "third time", "generate_params": STREAM})
            assert streamed.response.code == 200 and streamed.events()[-1] == "[DONE]"
        else:
            response, body = await client.chat({"prompt": "third time"})
            assert response.code == 200 and body["text"] == "Echo: third time"
        assert retries_metric(app, "connect_refused") == 2
    lines = retry_lines(caplog)
    assert len(lines) == 2 and "attempt=1/2" in lines[0] and "attempt=2/2" in lines[1], lines
    assert all("reason=connect_refused" in line and "request_id=" in line for line in lines)
    assert flaky_port.fake.connections == 1 and len(flaky_port.fake.received) == 1


@pytest.mark.settings(upstream_retries=3)
@pytest.mark.gen_test(timeout=30)
async def test_a_port_that_keeps_refusing_fails_after_upstream_retries(config, flaky_port, caplog):
    async with serving(dataclasses.replace(config, openai_base_url=flaky_port.url)) as (client, app):
        response, body = await client.chat({"prompt": "x"})
        assert retries_metric(app, "connect_refused") == 3
    assert response.code == 502 and body["error"]["code"] == "upstream_connect"
    assert len(retry_lines(caplog)) == 3


@pytest.mark.settings(connect_timeout=0.3, upstream_retries=1)
@pytest.mark.gen_test(timeout=30)
async def test_connect_timeout_is_retried(config, caplog):
    # A listener whose accept queue is full: the kernel drops new SYNs, so a
    # connect times out instead of being refused.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        time.sleep(0.1)
        url = "http://127.0.0.1:%d/v1" % listener.getsockname()[1]
        async with serving(dataclasses.replace(config, openai_base_url=url)) as (client, app):
            response, body = await client.chat({"prompt": "x"})
            assert retries_metric(app, "connect_timeout") == 1
    finally:
        for sock in (listener, *fillers):
            sock.close()
    assert response.code == 504 and body["error"]["code"] == "upstream_timeout"
    lines = retry_lines(caplog)
    assert len(lines) == 1 and "reason=connect_timeout" in lines[0]


@pytest.mark.parametrize("behaviour", [Behaviour(kind="reset_body"), Behaviour(kind="drop"), Behaviour(kind="hang")])
@pytest.mark.settings(request_timeout=0.5, retry_on_status=(500, 502, 503))
@pytest.mark.gen_test(timeout=30)
async def test_nothing_is_retried_once_the_request_was_sent(proxy, fake_openai, caplog, behaviour):
    fake_openai.push(behaviour)
    response, body = await proxy.chat({"prompt": "x"})
    assert response.code in (502, 504)
    assert len(fake_openai.received) == 1
    assert retry_lines(caplog) == []


@pytest.mark.settings(retry_on_status=(429, 503))
@pytest.mark.gen_test(timeout=30)
async def test_retry_on_status_waits_retry_after(proxy, fake_openai, app, caplog):
    fake_openai.push(Behaviour(kind="error", status=429, headers={"Retry-After": "1"}))
    started = time.monotonic()
    response, body = await proxy.chat({"prompt": "later"})
    assert response.code == 200 and body["text"] == "Echo: later"
    assert time.monotonic() - started >= 0.9
    assert len(fake_openai.received) == 2
    lines = retry_lines(caplog)
    assert len(lines) == 1 and "reason=status_429" in lines[0] and "wait_ms=1000" in lines[0]
    assert retries_metric(app, "status_429") == 1


@pytest.mark.settings(retry_on_status=(503,))
@pytest.mark.gen_test(timeout=30)
async def test_retry_on_status_before_a_stream_starts(proxy, fake_openai, caplog):
    fake_openai.push(Behaviour(kind="error", status=503), Behaviour(kind="error", status=503))
    streamed = await proxy.stream({"prompt": "a b", "generate_params": STREAM})
    assert streamed.response.code == 200 and streamed.events()[-1] == "[DONE]"
    assert len(fake_openai.received) == 3 and len(retry_lines(caplog)) == 2
    # The upstream connection survived the error answers.
    assert fake_openai.connections == 1


@pytest.mark.parametrize(
    "settings,retry_after,received",
    [
        (dict(retry_on_status=(429,)), "30", 1),  # longer than RETRY_MAX_WAIT: answered at once
        (dict(retry_on_status=(429,), request_timeout=1.0), "2", 1),  # beyond the request's timeout
        (dict(), "0", 1),  # RETRY_ON_STATUS is empty by default
        (dict(retry_on_status=(429,)), "0", 3),  # retries exhausted: the upstream's answer
    ],
)
@pytest.mark.gen_test(timeout=30)
async def test_status_answered_at_once(config, fake_openai, caplog, settings, retry_after, received):
    for _ in range(3):
        fake_openai.push(Behaviour(kind="error", status=429, message="Slow down", headers={"Retry-After": retry_after}))
    started = time.monotonic()
    async with serving(dataclasses.replace(config, **settings)) as (client, _):
        response, body = await client.chat({"prompt": "x"})
    assert response.code == 429 and body["text"] == "Slow down"
    assert response.headers["Retry-After"] == retry_after
    assert len(fake_openai.received) == received
    if received == 1:
        assert time.monotonic() - started < 1.0


def fault_lines(caplog):
    return [r.getMessage() for r in caplog.records if "upstream fault" in r.getMessage()]


@pytest.mark.parametrize("reset", [True, False])
@pytest.mark.parametrize("path", ["/chat_complete", "/v1/chat/completions", "/chat_complete stream"])
@pytest.mark.gen_test(timeout=30)
async def test_a_post_is_never_sent_twice_when_its_kept_alive_connection_dies(
    proxy, fake_openai, app, caplog, path, reset
):
    """libcurl resends a request by itself when a reused connection closes before any answer byte
    (Curl_retry_request): the upstream got the first copy and may be processing it, so a POST is a 502."""
    warm, _ = await proxy.chat({"prompt": "warm"})
    assert warm.code == 200 and fake_openai.connections == 1
    fake_openai.push(Behaviour(kind="drop", after=0, reset=reset))
    if path == "/v1/chat/completions":
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
        response, answer = await proxy.chat(body, path=path, headers={"Authorization": "Bearer " + OPENAI_KEY})
    elif path == "/chat_complete":
        response, answer = await proxy.chat({"prompt": "x"})
    else:
        streamed = await proxy.stream({"prompt": "x", "generate_params": STREAM})
        response, answer = streamed.response, json.loads(streamed.body)
    assert response.code == 502 and answer["error"]["code"] == "upstream_broken", answer
    assert "not retried" in answer["error"]["message"]
    assert len(fake_openai.received) == 2  # the warm-up and the one copy of the request
    assert retry_lines(caplog) == [] and retries_metric(app, "reused_connection_closed") == 0
    faults = fault_lines(caplog)
    assert len(faults) == 1 and "kind=broken" in faults[0] and "reused connection closed" in faults[0], faults
    # The pool recovers: the next request goes out on a fresh connection.
    response, answer = await proxy.chat({"prompt": "after"})
    assert response.code == 200 and answer["text"] == "Echo: after"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.gen_test(timeout=30)
async def test_a_get_whose_kept_alive_connection_dies_is_retried_as_one_logged_retry(
    proxy, fake_openai, app, caplog, method
):
    """The same failure for a request that changes nothing: retried once, logged and counted, never hidden."""
    headers = {"Authorization": "Bearer " + OPENAI_KEY}
    warm = await proxy.request("/v1/raw/x", method=method, headers=headers)
    assert warm.code == 200 and fake_openai.connections == 1
    fake_openai.push(Behaviour(kind="raw", raw=""))  # closes the connection without a byte
    response = await proxy.request("/v1/raw/x", method=method, headers=headers)
    assert response.code == 200
    assert [r.method for r in fake_openai.received] == [method] * 3
    lines = retry_lines(caplog)
    assert len(lines) == 1 and "reason=reused_connection_closed attempt=1/2" in lines[0], lines
    assert retries_metric(app, "reused_connection_closed") == 1
    assert fault_lines(caplog) == []


@pytest.mark.settings(upstream_retries=0)
@pytest.mark.gen_test(timeout=30)
async def test_a_get_is_not_resent_with_upstream_retries_0(proxy, fake_openai, caplog):
    headers = {"Authorization": "Bearer " + OPENAI_KEY}
    assert (await proxy.request("/v1/raw/x", method="GET", headers=headers)).code == 200
    fake_openai.push(Behaviour(kind="raw", raw=""))
    response = await proxy.request("/v1/raw/x", method="GET", headers=headers, check=False)
    assert response.code == 502 and json.loads(response.body)["error"]["code"] == "upstream_broken"
    assert len(fake_openai.received) == 2 and retry_lines(caplog) == []


@pytest.mark.gen_test(timeout=30)
async def test_a_kept_alive_connection_the_upstream_closed_is_retried_before_sending(config, caplog):
    """The common case of a dead kept-alive connection: the upstream's idle timeout closed it. libcurl
    checks its pool for such connections only once a second and would send the request into the closed
    one (then resend it); it is found closed before anything is sent and the request retried at once."""
    fake = FakeOpenAI()
    fake.start(idle_connection_timeout=0.2)
    try:
        async with serving(dataclasses.replace(config, openai_base_url=fake.url)) as (client, proxy_app):
            for i in range(3):
                if i:
                    await asyncio.sleep(0.4)  # closed by the fake after 0.2 s; libcurl's check is 1 s apart
                response, body = await client.chat({"prompt": "idle %d" % i})
                assert response.code == 200 and body["text"] == "Echo: idle %d" % i
            assert retries_metric(proxy_app, "reused_connection_closed") == 2
    finally:
        await fake.stop()
    assert len(fake.received) == 3 and fake.connections == 3
    lines = retry_lines(caplog)
    assert len(lines) == 2 and all("reason=reused_connection_closed attempt=1/2 wait_ms=0" in x for x in lines)
    assert fault_lines(caplog) == []


@pytest.mark.settings(upstream_retries=0)
@pytest.mark.gen_test(timeout=30)
async def test_upstream_retries_0_also_turns_off_the_retry_of_a_closed_kept_alive_connection(config, caplog):
    fake = FakeOpenAI()
    fake.start(idle_connection_timeout=0.2)
    try:
        async with serving(dataclasses.replace(config, openai_base_url=fake.url)) as (client, _):
            assert (await client.chat({"prompt": "warm"}))[0].code == 200
            await asyncio.sleep(0.4)
            response, body = await client.chat({"prompt": "x"})
    finally:
        await fake.stop()
    assert response.code == 502 and body["error"]["code"] == "upstream_broken"
    assert len(fake.received) == 1 and retry_lines(caplog) == []


@pytest.mark.parametrize("wait_ms, expected", [("480", 0.48), ("489", 0.489), ("491", None), ("499.5", None)])
def test_a_retry_is_only_tried_with_time_left_for_it(wait_ms, expected):
    """A Retry-After landing within a millisecond of
    REQUEST_TIMEOUT left a 0 ms timeout, which libcurl reads as none (the retry ran unbounded), or a
    negative one. A retry now needs MIN_ATTEMPT_SECONDS (10 ms) left after its wait."""
    policy = RetryPolicy(Settings(request_timeout=0.5, retry_on_status=(429,)))
    headers = HTTPHeaders({"retry-after-ms": wait_ms})
    assert policy.after_status(429, headers, attempt=1, elapsed=0.0) == expected
