"""Soak test: mixed traffic against the real proxy process for a while; nothing lost, nothing leaked.

    python bench/soak.py --seconds 600         # ten minutes
    python bench/soak.py --short               # ~15 s, what CI runs
    python bench/soak.py --seconds 240 --warmup 60 --concurrency 50 --usage   # budgets, ledger, cache


Starts the fake upstream and ``server.py`` as processes on loopback, then
sends a bounded, seeded mix: JSON answers, streams, streams the client leaves
early, upstream errors (429, 503, a dropped stream), bad requests and wrong
tokens. Every outcome must be the expected one for its kind. After a warm-up
it records the proxy's RSS and open file descriptors and compares them with
the end of the run; the RSS is also sampled every ``--sample`` seconds for
the timeline. Exits 1 if anything unexpected happened, RSS grew by 10 %
or more, or descriptors were left open.

``--usage`` turns on what a team's deployment runs per request: a named
token with a budget (ACCESS_TOKENS_FILE, with a price for every model in
PRICES_FILE), the usage ledger (USAGE_DATABASE, SQLite in a temporary
folder) and the response cache (CACHE_TTL), with JSON prompts drawn from
``CACHE_PROMPTS`` different ones, so that the cache both hits and fills.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import tornado.httpclient
from tornado.simple_httpclient import HTTPTimeoutError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.procs import free_port  # noqa: E402

TOKEN = "soak-access-token"
KEY = "sk-soak-key"
HEADERS = {"access-token": TOKEN, "openai-token": KEY, "Content-Type": "application/json"}

# kind -> (weight, request body, expected status)
MIX = {
    "json": (40, {"prompt": "soak"}, 200),
    "stream": (25, {"prompt": "a b c d e f", "generate_params": {"stream": True}}, 200),
    "client_leaves": (5, {"prompt": "x", "generate_params": {"stream": True, "model_name": "slow"}}, None),
    "upstream_429": (5, {"prompt": "x", "generate_params": {"model_name": "fault-429"}}, 429),
    "upstream_503": (5, {"prompt": "x", "generate_params": {"model_name": "fault-503"}}, 503),
    "stream_dropped": (5, {"prompt": "x", "generate_params": {"stream": True, "model_name": "fault-drop"}}, 200),
    "bad_request": (10, {"prompt": 42}, 400),
    "wrong_token": (5, {"prompt": "x"}, 403),
}
# --usage: the soak's token is a named one with budgets far above what a run spends.
TOKENS_TOML = (
    """
[soak]
token = "%s"
budget_usd = 1000000.0
budget_tokens = 1000000000000
"""
    % TOKEN
)
# The fault models have no price; a money budget refuses a model without one.
PRICES_TOML = "[default]\ninput = 0.15\noutput = 0.6\n"
CACHE_PROMPTS = 2000
CACHE_TTL = 30

FAULTS = {
    "fault-429": {"kind": "error", "status": 429, "headers": {"Retry-After": "1"}},
    "fault-503": {"kind": "error", "status": 503},
    "fault-drop": {"kind": "drop", "chunks": ["a ", "b ", "c "], "after": 2},
    "slow": {"chunks": ["tok "] * 100, "delay": 0.05},
}


def rss_kb(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


def open_fds(pid: int, upstream_port: int) -> tuple[int, int]:
    """(descriptors, of which idle keep-alive connections to the upstream).

    The upstream pool grows with the concurrency the run reached, up to the
    number of concurrent requests; it is reuse, not a leak, so it is counted
    apart.
    """
    inodes = set()
    for table in ("/proc/%d/net/tcp" % pid, "/proc/%d/net/tcp6" % pid):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == upstream_port:
                    inodes.add(fields[9])
    fds = 0
    pooled = 0
    for name in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, name))
        except OSError:
            continue
        fds += 1
        if target.startswith("socket:[") and target[8:-1] in inodes:
            pooled += 1
    return fds, pooled


async def wait_http(url: str, timeout: float = 15) -> None:
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                await client.fetch(url)
                return
            except (OSError, tornado.httpclient.HTTPClientError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        client.close()


class Soak:
    def __init__(self, proxy_url: str, concurrency: int, seed: int, prompts: int = 0):
        self.url = proxy_url + "/chat_complete"
        self.concurrency = concurrency
        self.random = random.Random(seed)
        # 0: every JSON request asks the same; else one of this many different prompts.
        self.prompts = prompts
        self.streams = 0
        self.outcomes: collections.Counter = collections.Counter()
        self.unexpected: list[str] = []
        kinds, weights = zip(*((k, v[0]) for k, v in MIX.items()), strict=True)
        self.kinds, self.weights = kinds, weights

    async def one(self, client, kind: str) -> None:
        _, body, expected = MIX[kind]
        prompt = body.get("prompt")
        if kind == "json" and self.prompts:
            prompt = "soak %d" % self.random.randrange(self.prompts)
            body = dict(body, prompt=prompt)
        elif kind == "stream" and self.prompts:
            # Each stream asks something new: the cache keeps every one for its TTL.
            self.streams += 1
            prompt = "a b c d e f %d" % self.streams
            body = dict(body, prompt=prompt)
        headers = dict(HEADERS, **({"access-token": "wrong"} if kind == "wrong_token" else {}))
        chunks: list[bytes] = []
        try:
            response = await client.fetch(
                self.url,
                method="POST",
                body=json.dumps(body),
                headers=headers,
                raise_error=False,
                request_timeout=0.3 if kind == "client_leaves" else 30,
                streaming_callback=chunks.append if body.get("generate_params", {}).get("stream") else None,
            )
        except HTTPTimeoutError:
            if kind == "client_leaves":
                self.outcomes[kind + ":left"] += 1
                return
            raise
        data = b"".join(chunks) or response.body or b""
        ok = response.code == expected
        if ok and kind == "stream":
            ok = data.endswith(b"data: [DONE]\n\n") and b'"error"' not in data
        if ok and kind == "stream_dropped":
            ok = b'"code":"upstream_broken"' in data and data.endswith(b"data: [DONE]\n\n")
        if ok and kind == "json":
            ok = json.loads(data)["text"] == "Echo: " + prompt
        self.outcomes["%s:%s" % (kind, response.code)] += 1
        if not ok:
            self.unexpected.append("%s -> %s %r" % (kind, response.code, data[:200]))

    async def run(self, seconds: float) -> int:
        client = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=self.concurrency)
        deadline = time.monotonic() + seconds
        done = 0

        async def worker():
            nonlocal done
            while time.monotonic() < deadline:
                kind = self.random.choices(self.kinds, self.weights)[0]
                try:
                    await self.one(client, kind)
                except Exception as exc:  # noqa: BLE001 (every failure is counted, none stops the soak)
                    self.unexpected.append("%s -> %r" % (kind, exc))
                done += 1

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        client.close()
        return done


def usage_env(folder: str) -> dict[str, str]:
    """--usage: a budgeted named token, every model priced, the SQLite ledger and the cache."""
    tokens, prices = os.path.join(folder, "tokens.toml"), os.path.join(folder, "prices.toml")
    with open(tokens, "w") as f:
        f.write(TOKENS_TOML)
    with open(prices, "w") as f:
        f.write(PRICES_TOML)
    return {
        # The soak's token is the named one; ACCESS_TOKEN must be another.
        "ACCESS_TOKEN": "soak-unused-" + os.urandom(8).hex(),
        "ACCESS_TOKENS_FILE": tokens,
        "PRICES_FILE": prices,
        "USAGE_DATABASE": os.path.join(folder, "usage.sqlite3"),
        "CACHE_TTL": str(CACHE_TTL),
    }


async def usage_counters(url: str) -> dict[str, str]:
    """--usage: what the proxy's /metrics say the budget, the ledger and the cache did."""
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    try:
        text = (await client.fetch(url)).body.decode()
    finally:
        client.close()
    sums: collections.Counter = collections.Counter()
    for line in text.splitlines():
        for prefix, name in (
            ('proxy_cache_total{result="hit"', "cache hits"),
            ('proxy_cache_total{result="miss"', "cache misses"),
            ("proxy_spend_usd_total{", "USD charged to the budget"),
            ("proxy_usage_rows_dropped_total", "ledger rows dropped"),
        ):
            if line.startswith(prefix):
                sums[name] += float(line.rsplit(" ", 1)[1])
    return {
        "cache hits / misses": "%d / %d" % (sums["cache hits"], sums["cache misses"]),
        "USD charged to the budget": "%.4f" % sums["USD charged to the budget"],
        "ledger rows dropped": "%d" % sums["ledger rows dropped"],
    }


async def wait_log(path: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, encoding="utf-8", errors="replace") as f:
            if text in f.read():
                return
        await asyncio.sleep(0.5)


async def sample_rss(pid: int, every: float, samples: list[tuple[float, int]]) -> None:
    """The proxy's RSS every ``every`` seconds from now (seconds since the start, KiB), until cancelled."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(OSError, StopIteration):
            samples.append((time.monotonic() - started, rss_kb(pid)))
        await asyncio.sleep(every)


async def main_async(args) -> int:
    fake_port, proxy_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = []
    folder = tempfile.TemporaryDirectory(prefix="soak-")
    samples: list[tuple[float, int]] = []
    try:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "chat_gpt_proxy.fake_openai", "--port", str(fake_port)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
            )
        )
        proxy_env = dict(
            env,
            PORT=str(proxy_port),
            HOST="127.0.0.1",
            ACCESS_TOKEN=TOKEN,
            LOG_LEVEL="WARNING",
            OPENAI_BASE_URL="http://127.0.0.1:%d/v1" % fake_port,
        )
        if args.usage:
            proxy_env.update(usage_env(folder.name))
        command = [sys.executable, "server.py"]
        if args.tracemalloc:
            command = [sys.executable, "bench/traced_server.py", str(args.tracemalloc)]
        log_file = open(args.log, "wb")  # noqa: SIM115 (closed below)
        procs.append(subprocess.Popen(command, cwd=ROOT, env=proxy_env, stdout=log_file, stderr=subprocess.STDOUT))
        proxy = procs[1]
        await wait_http("http://127.0.0.1:%d/_fake/stats" % fake_port)
        await wait_http("http://127.0.0.1:%d/healthz" % proxy_port)
        client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        for model, behaviour in FAULTS.items():
            await client.fetch(
                "http://127.0.0.1:%d/_fake/script?model=%s" % (fake_port, model),
                method="POST",
                body=json.dumps(behaviour),
            )
        client.close()

        sampler = asyncio.ensure_future(sample_rss(proxy.pid, args.sample, samples))
        soak = Soak("http://127.0.0.1:%d" % proxy_port, args.concurrency, args.seed, CACHE_PROMPTS if args.usage else 0)
        warmup = args.warmup if args.warmup is not None else max(3.0, args.seconds * 0.2)
        warm_done = await soak.run(warmup)
        await asyncio.sleep(1.0)  # let closed connections settle
        rss_start, (fds_start, pool_start) = rss_kb(proxy.pid), open_fds(proxy.pid, fake_port)
        if args.tracemalloc:
            proxy.send_signal(signal.SIGUSR2)  # the baseline snapshot
        soak.outcomes.clear()
        started = time.monotonic()
        done = await soak.run(args.seconds)
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.0)
        rss_end, (fds_end, pool_end) = rss_kb(proxy.pid), open_fds(proxy.pid, fake_port)
        if args.tracemalloc:
            proxy.send_signal(signal.SIGUSR2)  # what grew since the baseline, in the log
            await wait_log(args.log, "tracemalloc: done", 300)
        sampler.cancel()
        alive = proxy.poll() is None
        counted = await usage_counters("http://127.0.0.1:%d/metrics" % proxy_port) if args.usage and alive else {}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        folder.cleanup()
    log_file.close()
    with open(args.log, encoding="utf-8", errors="replace") as f:
        tracebacks = f.read().count("Traceback")

    growth = (rss_end - rss_start) / rss_start
    failures = list(soak.unexpected)
    if growth >= 0.10:
        failures.append("RSS grew by %.1f %%" % (growth * 100))
    if fds_end - pool_end != fds_start - pool_start:
        failures.append(
            "open descriptors %d at start, %d at end (not counting the upstream pool)"
            % (fds_start - pool_start, fds_end - pool_end)
        )
    if pool_end > args.concurrency:
        failures.append("%d idle upstream connections for %d concurrent requests" % (pool_end, args.concurrency))
    if tracebacks:
        failures.append("%d tracebacks in the proxy log" % tracebacks)
    if not alive:
        failures.append("the proxy died")

    print(
        "## Soak: %.0f s of mixed traffic, concurrency %d (after %.0f s warm-up, %d requests)"
        % (elapsed, args.concurrency, warmup, warm_done)
    )
    print()
    print("| measure | value |\n|---|---|")
    print("| requests | %d (%.0f/s) |" % (done, done / elapsed))
    for outcome, count in sorted(soak.outcomes.items()):
        print("| %s | %d |" % (outcome, count))
    print("| unexpected outcomes | %d |" % len(soak.unexpected))
    print("| proxy RSS after warm-up / at end | %d KiB / %d KiB (%+.1f %%) |" % (rss_start, rss_end, growth * 100))
    print(
        "| proxy open descriptors (without the upstream pool) after warm-up / at end | %d / %d |"
        % (fds_start - pool_start, fds_end - pool_end)
    )
    print("| idle upstream keep-alive connections after warm-up / at end | %d / %d |" % (pool_start, pool_end))
    print("| tracebacks in the proxy log | %d |" % tracebacks)
    for name, value in counted.items():
        print("| %s (whole run) | %s |" % (name, value))
    print()
    print("RSS timeline (s since the start, MiB): " + ", ".join("%.0f: %.1f" % (t, kb / 1024) for t, kb in samples))
    for failure in failures[:20]:
        print("FAIL:", failure)
    print("result:", "FAIL" if failures else "PASS")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--short", action="store_true", help="about 15 s: proves the soak works (CI)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log", default="/tmp/chat_gpt_proxy-soak.log")
    parser.add_argument("--warmup", type=float, help="seconds before the first measure (default: 20 %% of --seconds)")
    parser.add_argument("--usage", action="store_true", help="with a budget, the usage ledger and the response cache")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples of the timeline")
    parser.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="FRAMES",
        help="run the proxy under tracemalloc; the log gets what grew between warm-up and end, by line",
    )
    args = parser.parse_args()
    if args.short:
        args.seconds = 10
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
