"""WORKERS: several processes on one port, supervised; limits shared in Redis; per-worker metrics."""

import asyncio
import collections
import json
import os
import re
import signal
import socket
import time

import pytest
import tornado.httpclient

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.conftest import ACCESS_TOKEN, OPENAI_KEY, children
from tests.procs import free_ports

NEW_TOKEN = "reloaded-TOKEN-8e6c4a2b0d"


async def both_workers(server) -> None:
    """Until the supervisor has its two workers (bounded)."""
    deadline = time.monotonic() + 15
    while len(children(server.proc.pid)) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


async def chat(client, server, token=ACCESS_TOKEN):
    return await client.fetch(
        server.url + "/chat_complete",
        method="POST",
        body=json.dumps({"prompt": "hi"}),
        headers={"access-token": token, "openai-token": OPENAI_KEY, "Connection": "close"},
        raise_error=False,
    )


async def worker_counts(client, base: int, workers: int) -> list[float]:
    counts = []
    for i in range(workers):
        response = await client.fetch("http://127.0.0.1:%d/metrics" % (base + i))
        assert response.headers["x-proxy-worker"] == str(i)
        total = 0.0
        for line in response.body.decode().splitlines():
            if line.startswith('proxy_requests_total{route="chat_complete",status="200"'):
                total += float(line.rsplit(" ", 1)[1])
        counts.append(total)
    return counts


@pytest.mark.gen_test(timeout=90)
async def test_two_workers_share_the_port_and_a_dead_one_is_replaced(start, tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[old]\ntoken = "old-TOKEN-1a2b3c4d5e6f"\n')
    base = free_ports(2)
    server = start(WORKERS="2", WORKER_METRICS_PORT=str(base), ACCESS_TOKENS_FILE=str(tokens))
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    try:
        await server.wait_ready()
        await both_workers(server)
        first = children(server.proc.pid)
        assert len(first) == 2
        results = await asyncio.gather(*(chat(client, server) for _ in range(60)))
        assert {r.code for r in results} == {200}
        counts = await worker_counts(client, base, 2)
        assert sum(counts) == 60 and all(c > 0 for c in counts), counts
        # The main port's /metrics never shows one random worker's counters.
        response = await client.fetch(server.url + "/metrics", raise_error=False)
        assert response.code == 404 and json.loads(response.body)["error"]["code"] == "metrics_per_worker"
        # A worker killed under load: only what it had in flight can fail (at most the 4
        # concurrent requests); the supervisor says so and starts another.
        codes = collections.Counter()

        async def load(until):
            while time.monotonic() < until:
                try:
                    codes[(await chat(client, server)).code] += 1
                except (tornado.httpclient.HTTPClientError, OSError):
                    codes["closed"] += 1  # a connection the killed worker held

        until = time.monotonic() + 3
        loaders = [asyncio.ensure_future(load(until)) for _ in range(4)]
        await asyncio.sleep(0.5)
        os.kill(first[0], signal.SIGKILL)
        await asyncio.gather(*loaders)
        assert sum(n for code, n in codes.items() if code != 200) <= 4, codes
        deadline = time.monotonic() + 15
        while (len(children(server.proc.pid)) < 2 or first[0] in children(server.proc.pid)) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.1)
        assert len(children(server.proc.pid)) == 2 and first[0] not in children(server.proc.pid)
        assert "worker 0 died pid=%d signal=9; starting a new one" % first[0] in server.output()
        # A rolling restart: SIGTERM one worker at a time; it drains while the other serves. Lossless.
        codes.clear()
        until = time.monotonic() + 4
        loaders = [asyncio.ensure_future(load(until)) for _ in range(4)]
        for pid in children(server.proc.pid):
            await asyncio.sleep(0.7)
            os.kill(pid, signal.SIGTERM)
        await asyncio.gather(*loaders)
        assert set(codes) == {200}, codes
        assert server.output().count("stopped pid=") >= 2
        # SIGHUP reaches every worker: the new token works whichever worker answers.
        tokens.write_text('[new]\ntoken = "%s"\n' % NEW_TOKEN)
        server.signal(signal.SIGHUP)
        await asyncio.sleep(1)
        results = await asyncio.gather(*(chat(client, server, NEW_TOKEN) for _ in range(30)))
        assert {r.code for r in results} == {200}
        # A worker started after the reload starts with the reloaded tokens: the revoked one stays revoked.
        victim = children(server.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while (len(children(server.proc.pid)) < 2 or victim in children(server.proc.pid)) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)
        results = await asyncio.gather(*(chat(client, server, "old-TOKEN-1a2b3c4d5e6f") for _ in range(30)))
        assert {r.code for r in results} == {403}
        # A reload that each worker would count on its own (a budget, no REDIS_URL) is refused, as at startup.
        rich = '[rich]\ntoken = "rich-TOKEN-9f8e7d6c5b"\nbudget_usd = 1.0\n'
        tokens.write_text('[new]\ntoken = "%s"\n' % NEW_TOKEN + rich)
        server.signal(signal.SIGHUP)
        await asyncio.sleep(1)
        results = await asyncio.gather(*(chat(client, server, "rich-TOKEN-9f8e7d6c5b") for _ in range(10)))
        assert {r.code for r in results} == {403}
        assert "tokens file refused" in server.output() and "would each count" in server.output()
        # SIGTERM: every worker drains and the supervisor exits 0.
        server.signal(signal.SIGTERM)
        assert await server.wait_exit(40) == 0
        # Every worker that ever ran drained: the two killed by the rolling restart, then the last two.
        assert server.output().count("shutdown complete") == 4
    finally:
        client.close()


@pytest.mark.gen_test(timeout=30)
async def test_limits_that_workers_would_multiply_are_refused_without_redis(start, tmp_path):
    server = start(WORKERS="2", RATE_LIMIT_PER_TOKEN="5")
    assert await server.wait_exit(20) == 2
    lines = [line for line in server.output().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("chat_gpt_proxy: invalid setting WORKERS:")
    assert "RATE_LIMIT_PER_TOKEN" in lines[0] and "REDIS_URL" in lines[0]
    tokens = tmp_path / "budget.toml"
    tokens.write_text('[ann]\ntoken = "ann-TOKEN-0a1b2c3d4e"\nbudget_usd = 5.0\n')
    server = start(WORKERS="2", ACCESS_TOKENS_FILE=str(tokens))
    assert await server.wait_exit(20) == 2
    assert "the limits or budget of token 'ann'" in server.output()


@pytest.mark.gen_test(timeout=60)
async def test_a_rate_limit_holds_exactly_across_workers_with_redis(start, redis_server):
    base = free_ports(2)
    server = start(WORKERS="2", WORKER_METRICS_PORT=str(base), RATE_LIMIT_PER_TOKEN="5", REDIS_URL=redis_server.url)
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    try:
        await server.wait_ready()
        await both_workers(server)
        await asyncio.sleep(0.5)
        results = await asyncio.gather(*(chat(client, server) for _ in range(12)))
        codes = sorted(r.code for r in results)
        assert codes == [200] * 5 + [429] * 7, codes
        counts = await worker_counts(client, base, 2)
        assert sum(counts) == 5
    finally:
        client.close()
        server.signal(signal.SIGTERM)
        await server.wait_exit(40)


def test_auto_is_the_cpus_this_process_may_use():
    from settings import Settings, usable_cpus

    assert Settings.from_env({"WORKERS": "auto"}).workers == usable_cpus() >= 1
    assert usable_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.gen_test(timeout=60)
async def test_a_worker_that_cannot_start_stops_the_supervisor_and_a_killed_supervisor_takes_its_workers(start):
    base = free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))  # worker 1's metrics port is someone else's
        taken.listen()
        server = start(WORKERS="2", WORKER_METRICS_PORT=str(base))
        assert await server.wait_exit(40) == 1
    output = server.output()
    assert "invalid setting WORKER_METRICS_PORT: worker 1 cannot listen" in output
    assert "worker 1 died 3 times within 5 s of its start; stopping all workers" in output
    assert "Traceback" not in output
    server = start(WORKERS="2", WORKER_METRICS_PORT=str(free_ports(2)))
    await server.wait_ready()
    await both_workers(server)
    workers = children(server.proc.pid)
    assert len(workers) == 2
    server.proc.kill()  # the supervisor, outright
    server.proc.wait(10)
    deadline = time.monotonic() + 30
    while any(os.path.exists("/proc/%d" % pid) for pid in workers) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not any(os.path.exists("/proc/%d" % pid) for pid in workers)  # they drained and left


@pytest.mark.gen_test(timeout=60)
async def test_a_signal_to_the_whole_group_drains_and_one_during_a_respawn_still_stops(start, fake_openai):
    server = start(WORKERS="2", WORKER_METRICS_PORT=str(free_ports(2)), SHUTDOWN_GRACE="20")
    await server.wait_ready()
    await both_workers(server)
    # A stream of about 2 s, then SIGTERM to the supervisor and to each worker, as systemd or
    # a terminal's Ctrl-C deliver it: one signal each, so the stream finishes.
    fake_openai.push(Behaviour(chunks=["tok "] * 10, delay=0.2))
    host, port = server.url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps({"prompt": "x", "generate_params": {"stream": True}}).encode()
    writer.write(
        b"POST /chat_complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"access-token: %s\r\nopenai-token: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (ACCESS_TOKEN.encode(), OPENAI_KEY.encode(), len(payload), payload)
    )
    await reader.readuntil(b'"content":"tok "')
    for pid in [server.proc.pid, *children(server.proc.pid)]:
        os.kill(pid, signal.SIGTERM)
    rest = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    assert b"data: [DONE]" in rest and b"upstream_aborted" not in rest
    assert await server.wait_exit(30) == 0
    # SIGTERM right after a worker died, while the supervisor waits to replace it: it still stops.
    server = start(WORKERS="2", WORKER_METRICS_PORT=str(free_ports(2)))
    await server.wait_ready()
    await both_workers(server)
    os.kill(children(server.proc.pid)[0], signal.SIGKILL)
    await asyncio.sleep(0.03)
    server.signal(signal.SIGTERM)
    assert await server.wait_exit(30) == 0


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORKERS": "2", "WORKER_METRICS_PORT": "65535"}, "goes past port 65535"),
        ({"WORKERS": "3", "WORKER_METRICS_PORT": "9080", "PORT": "9081"}, "hold PORT 9081"),
    ],
)
def test_the_workers_metrics_ports_are_checked_at_startup(env, message):
    from settings import Settings, SettingsError

    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def started_workers(output: str) -> dict[int, int]:
    """pid -> worker index, from the supervisor's log lines."""
    return {int(pid): int(index) for index, pid in re.findall(r"worker (\d+) started pid=(\d+)", output)}


def sighup_as_a_worker_starts(server, known: set[int], delay: float, timeout: float = 15) -> int:
    """Wait for the supervisor's next worker, reading /proc in a tight loop so as to see it as
    soon as it is forked; SIGHUP the supervisor ``delay`` seconds later. Returns the worker's pid.
    Blocks the event loop for the few milliseconds that takes: the moment is the point."""
    path = "/proc/%d/task/%d/children" % (server.proc.pid, server.proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            found = {int(p) for p in f.read().split()} - known
        if found:
            seen = time.monotonic()
            while time.monotonic() < seen + delay:
                pass
            server.signal(signal.SIGHUP)
            return found.pop()
    raise AssertionError("no new worker")


async def worker_403s(client, port: int) -> float:
    response = await client.fetch("http://127.0.0.1:%d/metrics" % port)
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in response.body.decode().splitlines()
        if line.startswith('proxy_requests_total{route="chat_complete",status="403"')
    )


@pytest.mark.gen_test(timeout=240)
async def test_a_sighup_while_a_worker_starts_never_revives_a_revoked_token(start, tmp_path):
    """Kill a worker, then SIGHUP while its replacement starts (at a different moment of its start
    each time): once the reload is done, every worker refuses the revoked token and takes the new one."""
    tokens = tmp_path / "tokens.toml"
    token = "gen0-TOKEN-0a1b2c3d4e5f"
    tokens.write_text('[gen]\ntoken = "%s"\n' % token)
    base = free_ports(2)
    server = start(WORKERS="2", WORKER_METRICS_PORT=str(base), ACCESS_TOKENS_FILE=str(tokens))
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=20)
    born: dict[int, float] = {}  # pid -> when the test first saw it
    try:
        await server.wait_ready()
        await both_workers(server)
        for pid in children(server.proc.pid):
            born[pid] = time.monotonic()
        for repetition in range(10):
            revoked, token = token, "gen%d-TOKEN-%s" % (repetition + 1, os.urandom(6).hex())
            tokens.write_text('[gen]\ntoken = "%s"\n' % token)
            # The oldest worker, once it is older than QUICK_DEATH (a younger one would count as
            # failing to start, and three of those in a row stop the supervisor).
            victim = min(children(server.proc.pid), key=lambda pid: born[pid])
            await asyncio.sleep(max(0.0, born[victim] + 5.5 - time.monotonic()))
            os.kill(victim, signal.SIGKILL)
            # A different moment of the replacement's start each time (it takes ~10 ms to serve).
            replacement = sighup_as_a_worker_starts(server, set(born), 0.001 * repetition)
            born[replacement] = time.monotonic()
            await asyncio.sleep(1.0)  # the reload is complete within a second
            index = started_workers(server.output())[replacement]
            port = base + index
            before = await worker_403s(client, port)
            sent = 0
            # Until the new worker has answered ten of them itself (bounded).
            while await worker_403s(client, port) - before < 10 and sent < 400:
                results = await asyncio.gather(*(chat(client, server, revoked) for _ in range(20)))
                sent += 20
                accepted = [r.code for r in results if r.code != 403]
                assert not accepted, "repetition %d: the revoked token was accepted %d times" % (
                    repetition,
                    len(accepted),
                )
            assert await worker_403s(client, port) - before >= 10, "the new worker answered too few"
            results = await asyncio.gather(*(chat(client, server, token) for _ in range(20)))
            assert {r.code for r in results} == {200}, repetition
        assert "Traceback" not in server.output()
    finally:
        client.close()
