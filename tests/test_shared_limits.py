"""Per-token limits shared through Redis, against Debian's redis-server.

chat_gpt_proxy/access/shared_limits.py's script semantics with several ``SharedLimits``
(as several instances would hold) on one real server, then the proxy itself
with REDIS_URL: the failure modes, /healthz, the metrics, the startup line.
"""

import asyncio
import dataclasses
import json
import logging
import subprocess
import sys
import time

import pytest
import redis

from chat_gpt_proxy.access.shared_limits import SharedLimits
from chat_gpt_proxy.access.tokens import UNAVAILABLE, TokenEntry, TokenPolicy
from chat_gpt_proxy.observability import Metrics
from server import make_app
from settings import Settings, SettingsError
from tests.conftest import AUTH, DEFAULT_UPSTREAM, proxy_settings
from tests.procs import ROOT

PASSWORD = "redis-PASS-4c8e1a9f"


def entry(name="alice", rate=0, concurrent=0):
    return TokenEntry(name, name, b"x" * 32, TokenPolicy(rate_limit_per_minute=rate, max_concurrent=concurrent))


@pytest.fixture
def limits(redis_server, io_loop):
    """A factory of SharedLimits on the fixture's Redis, each as one instance would have; all closed at the end."""
    made = []

    def make(**overrides):
        settings = dataclasses.replace(Settings(), **{"redis_url": redis_server.url, **overrides})
        shared = SharedLimits(settings, Metrics().redis_errors)
        made.append(shared)
        return shared

    yield make
    for shared in made:
        io_loop.run_sync(shared.close)


@pytest.fixture
def inspect(redis_server):
    client = redis.Redis(port=redis_server.port, password=PASSWORD, decode_responses=True, socket_timeout=5)
    yield client
    client.close()


async def admit_all(instances, token, count):
    """``count`` admissions, round robin over ``instances``: the verdicts in order."""
    return [await instances[i % len(instances)].admit(token) for i in range(count)]


# -- the script's semantics


@pytest.mark.gen_test
async def test_a_rate_of_n_per_minute_admits_exactly_n_across_instances_then_says_when(limits):
    a, b, c = limits(), limits(), limits()
    token = entry(rate=5)
    verdicts = await admit_all([a, b, c], token, 12)
    assert verdicts[:5] == [None] * 5
    refusals = verdicts[5:]
    assert all(r is not None and r is not UNAVAILABLE and r.limit == "rate_limit_per_minute" for r in refusals)
    # One request every 60/5 = 12 s after the burst, as the in-process token bucket.
    assert {r.retry_after for r in refusals} == {12}
    # Another token has its own count.
    assert await a.admit(entry("bob", rate=5)) is None


@pytest.mark.gen_test(timeout=20)
async def test_retry_after_is_when_the_next_request_passes(limits):
    a, b = limits(), limits()
    token = entry(rate=30)  # one every 2 s after the burst
    assert await admit_all([a, b], token, 30) == [None] * 30
    refusal = await a.admit(token)
    assert refusal.retry_after == 2
    await asyncio.sleep(2.1)
    assert await b.admit(token) is None
    assert (await a.admit(token)).limit == "rate_limit_per_minute"


@pytest.mark.gen_test
async def test_max_concurrent_holds_across_instances_and_release_frees_a_place(limits, inspect):
    a, b = limits(), limits()
    token = entry(concurrent=3)
    assert await admit_all([a, b], token, 3) == [None] * 3
    refused = await b.admit(token)
    assert refused.limit == "max_concurrent" and refused.retry_after == 1
    a.release(token)
    await asyncio.gather(*a.pending)
    assert await b.admit(token) is None
    assert (await a.admit(token)).limit == "max_concurrent"
    counts = inspect.hgetall("{chat_gpt_proxy:alice}:inflight")
    assert counts == {a.instance: "1", b.instance: "2"}
    for shared, n in ((a, 1), (b, 2)):
        for _ in range(n):
            shared.release(token)
        await asyncio.gather(*shared.pending)
    # Nothing in flight, nothing left behind.
    assert inspect.keys("*alice*") == []


@pytest.mark.gen_test
async def test_keys_are_namespaced_and_hash_tagged_one_slot_per_token(limits, inspect):
    shared = limits(redis_prefix="team-a")
    assert await shared.admit(entry("alice", rate=10, concurrent=2)) is None
    assert await shared.admit(entry("-0", rate=10)) is None
    assert sorted(inspect.keys("*")) == [
        "{team-a:-0}:rate",
        "{team-a:alice}:alive",
        "{team-a:alice}:inflight",
        "{team-a:alice}:rate",
    ]
    # Every key expires by itself: an idle token leaves nothing behind.
    assert all(0 < inspect.pttl(key) <= 60_000 for key in inspect.keys("*"))


@pytest.mark.gen_test
async def test_a_limit_is_checked_before_anything_is_counted(limits, inspect):
    shared = limits()
    token = entry(rate=1, concurrent=5)
    assert await shared.admit(token) is None
    assert (await shared.admit(token)).limit == "rate_limit_per_minute"
    # The refused request holds no place in flight.
    assert inspect.hgetall("{chat_gpt_proxy:alice}:inflight") == {shared.instance: "1"}


@pytest.mark.gen_test(timeout=20)
async def test_an_instance_that_dies_leaves_no_count_after_its_ttl(limits):
    dead, alive = limits(redis_inflight_ttl=1.0), limits(redis_inflight_ttl=1.0)
    token = entry(concurrent=3)
    assert await admit_all([dead, dead, alive], token, 3) == [None, None, None]
    dead.heartbeat_task.cancel()  # as SIGKILL would: no heartbeat, no release
    assert (await alive.admit(token)).limit == "max_concurrent"
    # The living instance's heartbeat keeps the token's keys; only the dead one's count goes.
    await asyncio.sleep(1.5)
    assert await alive.admit(token) is None
    assert await alive.admit(token) is None
    assert (await alive.admit(token)).limit == "max_concurrent"


@pytest.mark.gen_test(timeout=20)
async def test_the_heartbeat_keeps_a_long_request_counted_and_restores_a_lost_count(limits, inspect):
    runner, other = limits(redis_inflight_ttl=1.0), limits(redis_inflight_ttl=1.0)
    token = entry(concurrent=1)
    assert await runner.admit(token) is None
    await asyncio.sleep(2.5)  # more than twice the TTL: alive only through the heartbeat
    assert (await other.admit(token)).limit == "max_concurrent"
    # Redis lost everything (restart without persistence): the next heartbeat puts the count back.
    inspect.flushall()
    await asyncio.sleep(0.8)
    assert inspect.hgetall("{chat_gpt_proxy:alice}:inflight") == {runner.instance: "1"}
    assert (await other.admit(token)).limit == "max_concurrent"


# -- failures


@pytest.mark.gen_test(timeout=20)
async def test_redis_down_is_unavailable_at_once_counted_and_warned_once(limits, redis_server, caplog):
    shared = limits()
    token = entry(rate=5)
    assert await shared.admit(token) is None
    redis_server.stop()
    caplog.clear()
    verdicts = [await shared.admit(token) for _ in range(20)]
    assert verdicts == [UNAVAILABLE] * 20
    assert shared.errors.labels("admit")._value.get() == 20
    warnings = [r.getMessage() for r in caplog.records if "shared limits" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "Redis admit failed (ConnectionError" in warnings[0]
    assert "each instance applies the limits on its own" in warnings[0]
    # Back on the same port: once the pause after a failure is over, admitted again, and said so.
    redis_server.start()
    deadline = time.monotonic() + 5
    while await shared.admit(token) is UNAVAILABLE:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    assert any("Redis answers again" in r.getMessage() for r in caplog.records)


@pytest.mark.gen_test(timeout=20)
async def test_a_redis_that_hangs_costs_redis_timeout_not_the_requests_timeout(limits, redis_server):
    shared = limits(redis_timeout=0.3)
    token = entry(concurrent=2)
    assert await shared.admit(token) is None
    redis_server.pause()
    try:
        started = time.monotonic()
        assert await shared.admit(token) is UNAVAILABLE
        # Generous margin: the bound is REDIS_TIMEOUT (0.3 s), not the client's 5 s default.
        assert time.monotonic() - started < 2
        assert shared.counts == {"alice": 1}  # the one admitted before; the failed one is not counted
        assert "alice" in shared.dirty  # its script may have run: the heartbeat sets the count
        assert await shared.state() == "down"
    finally:
        redis_server.resume()


@pytest.mark.gen_test
async def test_a_wrong_password_fails_without_showing_it(limits, redis_server, caplog):
    shared = limits(redis_url=redis_server.url.replace(PASSWORD, "wrong-REDIS-pass-77d1"))
    assert await shared.admit(entry(rate=5)) is UNAVAILABLE
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "AuthenticationError" in text
    assert "wrong-REDIS-pass-77d1" not in text and PASSWORD not in text


# -- settings


def test_redis_settings_are_validated_with_one_line_errors_that_hide_the_password():
    settings = Settings.from_env({"REDIS_URL": "rediss://user:s3cret-pw@redis.example:6380/2"})
    assert settings.redis_url == "rediss://user:s3cret-pw@redis.example:6380/2"
    assert settings.masked()["redis_url"] == "rediss://user:***@redis.example:6380/2"
    assert "s3cret" not in repr(settings)
    assert (settings.redis_failure_mode, settings.redis_timeout, settings.redis_prefix) == (
        "open",
        0.25,
        "chat_gpt_proxy",
    )
    bad = {
        "http://:s3cret-pw@host:6379": "REDIS_URL: must start with redis:// or rediss://",
        "redis://:s3cret-pw@:6379": "REDIS_URL: no host",
        "redis://:s3cret-pw@host:99999": "REDIS_URL: not a valid URL",
        "redis://:s3cret-pw@host:6379/zero": "REDIS_URL: the path must be a database number",
    }
    for url, message in bad.items():
        with pytest.raises(SettingsError) as caught:
            Settings.from_env({"REDIS_URL": url})
        assert str(caught.value).startswith(message) and "s3cret" not in str(caught.value)
        assert "\n" not in str(caught.value)
    for name, value, message in (
        ("REDIS_FAILURE_MODE", "maybe", "REDIS_FAILURE_MODE: must be 'open' or 'closed'"),
        ("REDIS_PREFIX", "a{b}", "REDIS_PREFIX: 1-64 letters"),
        ("REDIS_TIMEOUT", "0", "REDIS_TIMEOUT: must be a number"),
        ("REDIS_INFLIGHT_TTL", "0.1", "REDIS_INFLIGHT_TTL: must be a number"),
    ):
        with pytest.raises(SettingsError, match="^" + message):
            Settings.from_env({name: value})
    assert Settings.from_env({"REDIS_FAILURE_MODE": "CLOSED"}).redis_failure_mode == "closed"
    # The password wherever redis-py reads it: user part (also holding "/", "?" or "#"), query with or without a path.
    for url in ("redis://host/0?password=s3cret-pw&db=1", "redis://127.0.0.1:6379?password=s3cret-pw"):
        assert "s3cret" not in Settings.from_env({"REDIS_URL": url}).masked()["redis_url"], url
    # Not percent-encoded, such a password breaks the URL: refused, still without showing it.
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"REDIS_URL": "redis://:s3cret/pw?x@host:6379/0"})
    assert "s3cret" not in str(info.value)


def test_without_redis_url_the_redis_package_is_never_imported():
    script = (
        "import sys\n"
        "import server, settings\n"
        "app = server.make_app(settings.Settings())\n"
        "assert app.shared_limits is None\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'redis' or 'shared_limits' in m]\n"
        "print(sorted(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    # And with it, it is (the check above can fail).
    with_url = script.replace("settings.Settings()", "settings.Settings(redis_url='redis://127.0.0.1:1/0')")
    result = subprocess.run(
        [sys.executable, "-c", with_url.replace("assert app.shared_limits is None\n", "")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "'redis'" in result.stdout


# -- the proxy with REDIS_URL


@pytest.fixture
def config(request, fake_openai, redis_server, tmp_path):
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(
        '[alice]\ntoken = "alice-TOKEN-4b9e2f71c0"\nmax_concurrent = 1\n\n'
        '[bob]\ntoken = "bob-TOKEN-8d1c3a55e7f0"\nrate_limit_per_minute = 0\n'
    )
    return proxy_settings(
        request,
        fake_openai,
        access_tokens_file=str(tokens_file),
        rate_limit_per_token=2,
        redis_url=redis_server.url,
        redis_inflight_ttl=3.0,
    )


@pytest.fixture
def app(config, io_loop):
    application = make_app(config)
    yield application
    application.pool.close()
    io_loop.run_sync(application.shared_limits.close)


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.gen_test(timeout=30)
async def test_open_mode_serves_under_local_limits_while_redis_is_down(proxy, redis_server, app):
    health = json.loads((await proxy.request("/healthz", "GET")).body)
    assert health == {"status": "ok", "upstreams": DEFAULT_UPSTREAM, "redis": "up"}
    for expected in (200, 200, 429):  # RATE_LIMIT_PER_TOKEN=2, counted in Redis
        assert (await proxy.chat({"prompt": "hi"}))[0].code == expected
    redis_server.stop()
    # Local limits only: this instance's own bucket, which has seen nothing yet.
    statuses = [(await proxy.chat({"prompt": "hi"}))[0].code for _ in range(3)]
    assert statuses == [200, 200, 429]
    health = await proxy.request("/healthz", "GET")
    assert health.code == 200
    assert json.loads(health.body) == {"status": "ok", "upstreams": DEFAULT_UPSTREAM, "redis": "down"}
    assert (await proxy.request("/readyz", "GET")).code == 200
    metrics = (await proxy.request("/metrics", "GET")).body.decode()
    assert metric(metrics, 'proxy_redis_errors_total{op="admit"}') == 3
    # A token without limits never needs Redis.
    bob, _ = await proxy.chat({"prompt": "hi"}, headers={"access-token": "bob-TOKEN-8d1c3a55e7f0"})
    assert bob.code == 200
    metrics = (await proxy.request("/metrics", "GET")).body.decode()
    assert metric(metrics, 'proxy_redis_errors_total{op="admit"}') == 3


@pytest.mark.settings(redis_failure_mode="closed")
@pytest.mark.gen_test(timeout=30)
async def test_closed_mode_answers_503_limits_unavailable_while_redis_is_down_then_recovers(proxy, redis_server):
    assert (await proxy.chat({"prompt": "hi"}))[0].code == 200
    redis_server.stop()
    response, body = await proxy.chat({"prompt": "hi"})
    assert response.code == 503 and response.headers["Retry-After"] == "1"
    assert body["error"]["code"] == "limits_unavailable"
    health = await proxy.request("/healthz", "GET")
    assert health.code == 200 and json.loads(health.body)["redis"] == "down"
    redis_server.start()  # empty: the rate starts afresh
    deadline = time.monotonic() + 10
    statuses = []
    while not statuses or statuses[-1] == 503:
        assert time.monotonic() < deadline, statuses
        await asyncio.sleep(0.3)
        statuses.append((await proxy.chat({"prompt": "hi"}))[0].code)
    assert statuses[-1] == 200 and set(statuses) <= {200, 503}


@pytest.mark.gen_test(timeout=30)
async def test_a_streams_place_is_held_in_redis_until_it_ends(proxy, fake_openai, inspect):
    from chat_gpt_proxy.fake_openai.behaviours import Behaviour

    alice = {"access-token": "alice-TOKEN-4b9e2f71c0", "openai-token": AUTH["openai-token"]}
    fake_openai.by_model["slow"] = Behaviour(chunks=["a ", "b ", "c "], delay=0.4)
    first = asyncio.ensure_future(
        proxy.stream({"prompt": "x", "generate_params": {"stream": True, "model_name": "slow"}}, headers=alice)
    )
    deadline = time.monotonic() + 5
    while not inspect.hgetall("{chat_gpt_proxy:alice}:inflight"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    second, body = await proxy.chat({"prompt": "y"}, headers=alice)
    assert second.code == 429 and body["error"]["code"] == "proxy_concurrency_limited"
    assert (await first).response.code == 200
    deadline = time.monotonic() + 5
    while inspect.hgetall("{chat_gpt_proxy:alice}:inflight"):
        assert time.monotonic() < deadline, "the stream's place was not released"
        await asyncio.sleep(0.05)
    assert (await proxy.chat({"prompt": "z"}, headers=alice))[0].code == 200


def test_the_startup_line_names_the_mode_and_hides_the_password(config, caplog):
    caplog.set_level(logging.INFO)
    app = make_app(dataclasses.replace(config, redis_failure_mode="closed"))
    app.pool.close()
    lines = [r.getMessage() for r in caplog.records if "shared limits in Redis" in r.getMessage()]
    assert len(lines) == 1
    assert "REDIS_FAILURE_MODE=closed" in lines[0] and "redis://:***@127.0.0.1:" in lines[0]
    assert PASSWORD not in lines[0]
