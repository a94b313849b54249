"""Three instances behind Debian's nginx sharing one Debian redis-server.

Real processes only: ``python server.py`` three times with REDIS_URL and a
tokens file, nginx with deploy/nginx/chat_gpt_proxy.conf in front, the fake
OpenAI behind.
"""

import asyncio
import json
import time

import pytest
import redis
import tornado.httpclient

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.conftest import DEFAULT_UPSTREAM, OPENAI_KEY
from tests.procs import Nginx, ServerProcess, example_site, free_port

TOKENS = {
    "alice": "alice-TOKEN-4b9e2f71c0",  # 10 requests per minute
    "carol": "carol-TOKEN-1f7a9c3e2b",  # 3 in flight
    "dave": "dave-TOKEN-6e0b4d8a1c",  # 3 in flight
    "erin": "erin-TOKEN-3a5c7e9b1d",  # limits that load never reaches: every request asks Redis
}
TOKENS_FILE = """
[alice]
token = "alice-TOKEN-4b9e2f71c0"
rate_limit_per_minute = 10

[carol]
token = "carol-TOKEN-1f7a9c3e2b"
max_concurrent = 3

[dave]
token = "dave-TOKEN-6e0b4d8a1c"
max_concurrent = 3

[erin]
token = "erin-TOKEN-3a5c7e9b1d"
rate_limit_per_minute = 1000000
max_concurrent = 10000
"""
SLOW_WORDS = ["s%d " % i for i in range(8)]
INFLIGHT_TTL = 2.0


@pytest.fixture
def cluster(tmp_path, redis_server, fake_openai, certificate):
    """``start(**env)``: three instances on the fixture's Redis behind nginx; everything stopped at the end."""
    fake_openai.by_model["slow"] = Behaviour(chunks=SLOW_WORDS, delay=0.3)
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(TOKENS_FILE)
    started = []

    async def start(**env):
        base = {
            "ACCESS_TOKENS_FILE": str(tokens_file),
            "OPENAI_BASE_URL": fake_openai.url,
            "REDIS_URL": redis_server.url,
            "REDIS_INFLIGHT_TTL": str(INFLIGHT_TTL),
            **env,
        }
        instances = []
        for i in range(3):
            server = ServerProcess(base, str(tmp_path / ("proxy%d.log" % i)))
            started.append(server)
            instances.append(server)
        for server in instances:
            await server.wait_ready()
        port = free_port()
        nginx = Nginx(example_site(port, [s.port for s in instances], certificate), tmp_path / "nginx", port)
        started.append(nginx)
        nginx.url = "https://127.0.0.1:%d" % port
        return instances, nginx

    yield start
    for process in started:
        process.stop()


async def call(url, certificate, name, prompt="hi", stream=False, model="slow"):
    """One /chat_complete with ``name``'s token; the response (never an exception), its body in ``.data``."""
    body = {"prompt": prompt}
    if stream:
        body["generate_params"] = {"stream": True, "model_name": model}
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    chunks = []
    try:
        response = await client.fetch(
            url + "/chat_complete",
            method="POST",
            body=json.dumps(body),
            headers={"access-token": TOKENS[name], "openai-token": OPENAI_KEY},
            ca_certs=certificate[0],
            raise_error=False,
            request_timeout=30,
            streaming_callback=chunks.append,
        )
    finally:
        client.close()
    response.data = b"".join(chunks)
    return response


def error_code(response) -> str | None:
    return json.loads(response.data)["error"]["code"] if response.code >= 400 else None


def served_by(instances) -> list[int]:
    return [server.output().count("path=/chat_complete") for server in instances]


@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_limits_hold_across_three_instances_behind_nginx(cluster, certificate):
    """5(a): 10 per minute lets exactly 10 through in all; 3 in flight means 3 in all."""
    instances, nginx = await cluster()
    responses = await asyncio.gather(*(call(nginx.url, certificate, "alice", "r%d" % i) for i in range(25)))
    statuses = sorted(r.code for r in responses)
    assert statuses == [200] * 10 + [429] * 15, statuses
    refused = [r for r in responses if r.code == 429]
    assert {error_code(r) for r in refused} == {"proxy_rate_limited"}
    # One more every 6 s: each refusal says when, at most that.
    assert all(1 <= int(r.headers["Retry-After"]) <= 6 for r in refused)
    # nginx spread them: every instance answered some, so no single process's count explains the 10.
    assert all(n > 0 for n in served_by(instances)), served_by(instances)

    streams = await asyncio.gather(*(call(nginx.url, certificate, "carol", "c%d" % i, stream=True) for i in range(8)))
    assert sorted(r.code for r in streams) == [200] * 3 + [429] * 5
    assert {error_code(r) for r in streams if r.code == 429} == {"proxy_concurrency_limited"}
    for response in streams:
        if response.code == 200:
            assert response.data.decode().endswith("data: [DONE]\n\n")
    # The three places are free again once the streams ended.
    again = await asyncio.gather(*(call(nginx.url, certificate, "carol", "again%d" % i) for i in range(3)))
    assert [r.code for r in again] == [200, 200, 200]


async def load_through_outage(nginx, certificate, redis_server, outcomes):
    """Continuous requests of a limited token while Redis is killed, then restarted on its port."""
    stop = False
    deadline = time.monotonic() + 60

    async def worker(w):
        n = 0
        while not stop and time.monotonic() < deadline and n < 2000:
            started = time.monotonic()
            response = await call(nginx.url, certificate, "erin", "w%d-%d" % (w, n), stream=n % 3 == 2)
            # By when it started: a stream admitted before the outage may end during it.
            outcomes.append((started, response.code, error_code(response), response.data[-200:]))
            n += 1
            await asyncio.sleep(0.02)

    async def wait_for(count):
        target = len(outcomes) + count
        limit = time.monotonic() + 30
        while len(outcomes) < target:
            assert time.monotonic() < limit, "the load stalled"
            await asyncio.sleep(0.05)

    workers = [asyncio.ensure_future(worker(w)) for w in range(4)]
    try:
        await wait_for(20)
        killed = time.monotonic()
        redis_server.stop()
        await asyncio.sleep(3)
        await wait_for(20)
        restarted = time.monotonic()
        redis_server.start()
        await asyncio.sleep(3)
        await wait_for(20)
    finally:
        stop = True
        await asyncio.gather(*workers)
    return killed, restarted


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["open", "closed"])
@pytest.mark.gen_test(timeout=120)
async def test_killing_redis_mid_load_gives_the_failure_mode_and_recovery(cluster, certificate, redis_server, mode):
    """5(c): open serves everything on local limits; closed answers only 503 limits_unavailable; both recover."""
    instances, nginx = await cluster(REDIS_FAILURE_MODE=mode)
    outcomes = []
    killed, restarted = await load_through_outage(nginx, certificate, redis_server, outcomes)
    # Margins at each edge: a request started just before the kill may reach Redis just after it.
    before = [o for o in outcomes if o[0] < killed - 0.5]
    during = [o for o in outcomes if killed + 0.5 < o[0] < restarted]
    after = [o for o in outcomes if o[0] > restarted + 2.5]  # the one-second pause after a failure, and margin
    assert before and during and after
    assert {o[1] for o in before} == {200}, [o for o in before if o[1] != 200][:5]
    if mode == "open":
        others = [o for o in outcomes if o[1] != 200]
        assert not others, others[:5]
    else:
        assert {(o[1], o[2]) for o in during} == {(503, "limits_unavailable")}
        assert {(o[1], o[2]) for o in outcomes} <= {(200, None), (503, "limits_unavailable")}
    assert {o[1] for o in after} == {200}, [o for o in after if o[1] != 200][:5]
    for server in instances:
        output = server.output()
        assert "Traceback" not in output and "unexpected error" not in output
        assert "REDIS_FAILURE_MODE=%s" % mode in output
        assert "shared limits: Redis answers again" in output
        # One warning line per 10 s at most, not one per request.
        assert output.count("shared limits: Redis admit failed") <= 2
        health = await call_health(server.url)
        assert health == {"status": "ok", "upstreams": DEFAULT_UPSTREAM, "redis": "up"}
    # Counting in Redis again after it came back (the restarted server's own statistics).
    client = redis.Redis(port=redis_server.port, password=redis_server.password, socket_timeout=5)
    try:
        stats = client.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] >= len(after), stats
    finally:
        client.close()


async def call_health(url):
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    try:
        return json.loads((await client.fetch(url + "/healthz", request_timeout=10)).body)
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_an_instance_killed_with_sigkill_leaves_no_in_flight_count_after_its_ttl(
    cluster, certificate, redis_server, fake_openai
):
    """5(d): dave may have 3 in flight; 2 are on an instance that dies, 1 on one that lives (and keeps
    the token's keys alive); after REDIS_INFLIGHT_TTL only the living one's counts."""
    (doomed, survivor, _), _ = await cluster()
    fake_openai.by_model["long"] = Behaviour(chunks=["l%d " % i for i in range(12)], delay=0.5)
    inspect = redis.Redis(port=redis_server.port, password=redis_server.password, socket_timeout=5)

    async def in_flight(count):
        deadline = time.monotonic() + 10
        while sum(int(v) for v in inspect.hvals("{chat_gpt_proxy:dave}:inflight")) < count:
            assert time.monotonic() < deadline, "the streams were not counted"
            await asyncio.sleep(0.05)

    try:
        streams = [asyncio.ensure_future(call(doomed.url, certificate, "dave", "d%d" % i, stream=True)) for i in (1, 2)]
        await in_flight(2)
        lasting = asyncio.ensure_future(call(survivor.url, certificate, "dave", "lasting", stream=True, model="long"))
        await in_flight(3)
        doomed.proc.kill()
        killed = time.monotonic()
        await asyncio.gather(*streams, return_exceptions=True)  # cut by the kill
        # Right after the kill, its two requests still count.
        response = await call(survivor.url, certificate, "dave", "right after")
        assert response.code == 429 and error_code(response) == "proxy_concurrency_limited"
        statuses = []
        while time.monotonic() < killed + INFLIGHT_TTL + 10:
            response = await call(survivor.url, certificate, "dave", "later")
            statuses.append(response.code)
            if response.code == 200:
                break
            await asyncio.sleep(0.25)
        assert statuses[-1] == 200 and set(statuses) <= {200, 429}, statuses
        assert time.monotonic() - killed >= INFLIGHT_TTL * 0.5
        assert not lasting.done(), "the living instance's stream must still hold its place here"
        # The dead instance's two places are free, the living one's stream still counts.
        both = await asyncio.gather(*(call(survivor.url, certificate, "dave", "both%d" % i) for i in (1, 2)))
        assert [r.code for r in both] == [200, 200]
        # Their releases are sent without waiting: give them a moment.
        deadline = time.monotonic() + 5
        while list(inspect.hgetall("{chat_gpt_proxy:dave}:inflight").values()) != [b"1"]:
            assert time.monotonic() < deadline, inspect.hgetall("{chat_gpt_proxy:dave}:inflight")
            await asyncio.sleep(0.05)
        assert (await lasting).code == 200
    finally:
        inspect.close()
