"""Benchmark suite: the upstream directly, nginx, and this proxy, side by side in one run.

    make bench                    # full run (each measurement <= 20 s), ~5 minutes
    python bench/run.py --before v1.0   # and a previous release beside the proxy, in the same run
    python bench/run.py --short   # a few seconds per measurement: proves the suite works (CI)

Everything runs on loopback and is stopped by PID at the end. Layout on the
2-core machine: every subject under test (nginx as a reverse proxy, this
proxy) is one process pinned to CPU 0 with taskset; the upstreams and the
load generators run on CPU 1.

- Throughput upstream: Debian's nginx returning a fixed ~650-byte
  chat.completion JSON and a fixed 20-event SSE body.
- Timed-stream upstream: the project's fake OpenAI (chat_gpt_proxy/fake_openai/),
  dripping 20 chunks 50 ms apart.
- Load: wrk with a Lua script (POST bodies and headers); an asyncio client for
  stream timing and for holding many open streams.

Writes bench/results/latest.md, latest.json and latest.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOKEN = "bench-access-token"
KEY = "sk-bench"
MODEL = "gpt-4o-mini"

CHAT_JSON = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I assist you today? If you have any questions about the weather, "
                "code, travel or anything else, just ask and I will do my best to help you with a clear answer.",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 40,
        "total_tokens": 59,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_06737a9306",
}


# The same answer as Anthropic's Messages API writes it (bench/compare.py --surfaces).
MESSAGE_JSON = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": CHAT_JSON["choices"][0]["message"]["content"]}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 19,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 40,
        "service_tier": "standard",
    },
}


def sse_body(events: int = 20) -> str:
    out = []
    for i in range(events):
        delta = {"role": "assistant", "content": ""} if i == 0 else {"content": "tok%d " % i}
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1741569952,
            "model": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_06737a9306",
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": "stop" if i == events - 1 else None}
            ],
        }
        out.append("data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n")
    return "".join(out) + "data: [DONE]\n\n"


def write_result(name: str, lines: list[str]) -> None:
    """Print a report's lines and keep them as bench/results/<name>."""
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.path.join(ROOT, "bench", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        f.write(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def rss_kb(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


class Processes:
    """Every process the bench starts; all stopped by PID at the end."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], cpu: int | None, env: dict | None = None, name: str = "proc"):
        if cpu is not None and shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        log = open(os.path.join(self.workdir, name + ".log"), "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        proc.log = log
        self.procs.append(proc)
        return proc

    def stop(self, proc) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        proc.log.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


NGINX_MAIN = """
worker_processes 1;
daemon off;
pid {dir}/{name}.pid;
error_log {dir}/{name}-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {dir}/{name}-body;
    proxy_temp_path {dir}/{name}-proxy;
    fastcgi_temp_path {dir}/{name}-fastcgi;
    uwsgi_temp_path {dir}/{name}-uwsgi;
    scgi_temp_path {dir}/{name}-scgi;
    keepalive_requests 1000000;
    {body}
}}
"""

UPSTREAM_SERVER = """
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /json/v1/chat/completions {{ default_type application/json; return 200 '{json}'; }}
        location = /anthropic/v1/messages {{ default_type application/json; return 200 '{message}'; }}
        # Too long for `return`: a file, and the classic redirect that lets a POST read it.
        location = /sse/v1/chat/completions {{
            default_type text/event-stream; alias {sse_file}; error_page 405 =200 $uri;
        }}
        location = /nginx_status {{ stub_status; }}
    }}
"""

PROXY_SERVER = """
    upstream backend {{ server 127.0.0.1:{upstream}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
"""


def start_nginx(procs: Processes, name: str, body: str, cpu: int) -> subprocess.Popen:
    conf = os.path.join(procs.workdir, name + ".conf")
    user = "user root;\n" if os.geteuid() == 0 else ""
    with open(conf, "w") as f:
        f.write(user + NGINX_MAIN.format(dir=procs.workdir, name=name, body=body))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return procs.start([nginx, "-p", procs.workdir, "-c", conf], cpu, name=name)


def start_fixed_upstream(procs: Processes, cpu: int = 1) -> int:
    """Debian's nginx answering the fixed chat.completion and SSE bodies; returns its port once it listens."""
    port = free_port()
    sse_file = os.path.join(procs.workdir, "sse.txt")
    with open(sse_file, "w") as f:
        f.write(sse_body())
    body = UPSTREAM_SERVER.format(
        port=port,
        json=json.dumps(CHAT_JSON, separators=(",", ":")),
        message=json.dumps(MESSAGE_JSON, separators=(",", ":")),
        sse_file=sse_file,
    )
    start_nginx(procs, "upstream", body, cpu=cpu)
    wait_port(port)
    return port


def start_proxy(procs: Processes, base_url: str, name: str, tree: str = ROOT, **env) -> tuple[subprocess.Popen, int]:
    port = free_port()
    full_env = dict(
        os.environ,
        PORT=str(port),
        HOST="127.0.0.1",
        ACCESS_TOKEN=TOKEN,
        OPENAI_BASE_URL=base_url,
        LOG_LEVEL="WARNING",
        **{k: str(v) for k, v in env.items()},
    )
    proc = procs.start([sys.executable, os.path.join(tree, "server.py")], 0, full_env, name=name)
    wait_port(port)
    return proc, port


# -- wrk

WRK_LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["access-token"] = "{token}"
wrk.headers["openai-token"] = "{key}"
wrk.headers["Authorization"] = "Bearer {key}"
{extra}"""


def lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_duration(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s|m)", text)
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]


def wrk(
    url: str,
    body: dict,
    connections: int,
    seconds: float,
    workdir: str,
    rss_pid: int | None = None,
    token: str = TOKEN,
    headers: dict[str, str] | None = None,
) -> dict:
    script = os.path.join(workdir, "post.lua")
    extra = "".join("wrk.headers[%s] = %s\n" % (lua_string(k), lua_string(v)) for k, v in (headers or {}).items())
    with open(script, "w") as f:
        f.write(WRK_LUA.format(body=lua_string(json.dumps(body)), token=token, key=KEY, extra=extra))
    cmd = ["wrk", "-t1", "-c%d" % connections, "-d%ds" % max(1, round(seconds)), "--latency", "-s", script, url]
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        cmd = ["taskset", "-c", "1", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        if rss_pid:
            with contextlib.suppress(OSError, StopIteration):
                peak = max(peak, rss_kb(rss_pid))
        time.sleep(0.2)
    out = proc.stdout.read()
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rate is None:
        raise RuntimeError("wrk against %s gave no figure (exit %s):\n%s" % (url, proc.returncode, out[-2000:]))
    result = {"rps": float(rate.group(1)), "raw": out}
    for pct in ("50", "99"):
        match = re.search(r"^\s+%s(?:\.000)?%%\s+(\S+)" % pct, out, re.M)
        result["p%s_ms" % pct] = parse_duration(match.group(1)) if match else None
    requests_match = re.search(r"(\d+) requests in", out)
    result["requests"] = int(requests_match.group(1)) if requests_match else 0
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["errors"] = (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0)
    if rss_pid:
        result["peak_rss_mb"] = round(peak / 1024, 1)
    return result


async def prime(port: int, body: dict, concurrency: int) -> None:
    payload = json.dumps(body).encode()
    headers = "access-token: %s\r\nopenai-token: %s\r\nConnection: close\r\n" % (TOKEN, KEY)

    async def one():
        reader, writer = await open_stream(port, "/chat_complete", payload, headers)
        await reader.read()  # to EOF: the whole answer
        writer.close()

    await asyncio.gather(*(one() for _ in range(concurrency)))


def nginx_accepted(port: int) -> int:
    import urllib.request

    text = urllib.request.urlopen("http://127.0.0.1:%d/nginx_status" % port, timeout=5).read().decode()
    return int(text.splitlines()[2].split()[0])


# -- streams with an asyncio client


async def open_stream(port: int, path: str, body: bytes, headers: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%s"
            "Content-Length: %d\r\n\r\n" % (path, headers, len(body))
        ).encode()
        + body
    )
    await writer.drain()
    return reader, writer


async def time_to_first_token(port: int, path: str, body: bytes, headers: str) -> float:
    started = time.perf_counter()
    reader, writer = await open_stream(port, path, body, headers)
    try:
        await reader.readuntil(b'"content":"tok')
        elapsed = time.perf_counter() - started
        await reader.readuntil(b"data: [DONE]")
        return elapsed
    finally:
        writer.close()


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


async def ttft(port: int, path: str, body: bytes, headers: str, concurrency: int) -> dict:
    results = await asyncio.gather(
        *(time_to_first_token(port, path, body, headers) for _ in range(concurrency)), return_exceptions=True
    )
    times = [r * 1000 for r in results if isinstance(r, float)]
    failed = len(results) - len(times)
    return {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99), "failed": failed}


async def hold_streams(port: int, count: int, proxy_pid: int) -> dict:
    """Open ``count`` streams through the proxy, keep them open, measure its RSS per stream."""
    body = json.dumps({"prompt": "hold", "generate_params": {"stream": True, "model_name": "hold"}}).encode()
    headers = "access-token: %s\r\nopenai-token: %s\r\n" % (TOKEN, KEY)
    before = rss_kb(proxy_pid)
    streams = []
    failed = 0

    async def one():
        nonlocal failed
        try:
            reader, writer = await open_stream(port, "/chat_complete", body, headers)
            await asyncio.wait_for(reader.readuntil(b"data: "), 60)
            streams.append(writer)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            failed += 1

    for start in range(0, count, 500):
        await asyncio.gather(*(one() for _ in range(min(500, count - start))))
    await asyncio.sleep(1.0)
    during = rss_kb(proxy_pid)
    for writer in streams:
        writer.close()
    return {
        "open": len(streams),
        "failed": failed,
        "rss_before_mb": round(before / 1024, 1),
        "rss_with_streams_mb": round(during / 1024, 1),
        "kb_per_stream": round((during - before) / max(1, len(streams)), 1),
    }


# -- the run


def run(args) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    secs = args.seconds
    workdir = tempfile.mkdtemp(prefix="chat_gpt_proxy-bench-")
    procs = Processes(workdir)
    results: dict = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": "%s, %d cores, %s" % (platform.machine(), os.cpu_count() or 0, platform.python_version()),
        "seconds": secs,
        "json": {},
        "sse": {},
        "trees": args.trees,
    }
    try:
        up_port = start_fixed_upstream(procs)
        ng_port = free_port()
        start_nginx(procs, "nginx_proxy", PROXY_SERVER.format(upstream=up_port, port=ng_port), cpu=0)
        wait_port(ng_port)
        chat_body = {"prompt": "Hello!", "generate_params": {"model_name": MODEL}}
        openai_body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}]}
        results["json_response_bytes"] = len(json.dumps(CHAT_JSON, separators=(",", ":")))

        # Non-streaming and SSE throughput, each proxy on CPU 0 alone.
        for mode in ("json", "sse"):
            stream = mode == "sse"
            path = "/%s/v1/chat/completions" % mode
            cb = (
                dict(chat_body, generate_params=dict(chat_body["generate_params"], stream=True))
                if stream
                else chat_body
            )
            ob = dict(openai_body, stream=True) if stream else openai_body
            levels = (64,) if stream else (1, 64)
            for c in levels:
                row = results[mode].setdefault("c%d" % c, {})
                row["direct"] = wrk("http://127.0.0.1:%d%s" % (up_port, path), ob, c, secs, workdir)
                row["nginx"] = wrk("http://127.0.0.1:%d%s" % (ng_port, path), ob, c, secs, workdir)
            # Calibration: what Tornado itself serves on CPU 0 with no upstream call at all.
            body_file = os.path.join(workdir, mode + ".body")
            with open(body_file, "w") as f:
                f.write(sse_body() if stream else json.dumps(CHAT_JSON, separators=(",", ":")))
            hello_port = free_port()
            content_type = "text/event-stream" if stream else "application/json"
            hello = procs.start(
                [sys.executable, "bench/tornado_hello.py", str(hello_port), body_file, content_type],
                0,
                name="tornado_" + mode,
            )
            wait_port(hello_port)
            for c in levels:
                results[mode]["c%d" % c]["tornado, no upstream"] = wrk(
                    "http://127.0.0.1:%d%s" % (hello_port, path), ob, c, secs, workdir
                )
            procs.stop(hello)
            for label, tree in args.trees:
                proxy, port = start_proxy(
                    procs, "http://127.0.0.1:%d/%s/v1" % (up_port, mode), "proxy_" + mode, tree=tree
                )
                results[mode].setdefault("idle_rss_mb", round(rss_kb(proxy.pid) / 1024, 1))
                for c in levels:
                    row = results[mode]["c%d" % c]
                    wrk("http://127.0.0.1:%d/chat_complete" % port, cb, c, 1, workdir)  # warm-up: pool, caches
                    # wrk ends by dropping the requests in flight, and each dropped
                    # stream's upstream connection is closed (an abort): refill the
                    # pool with c complete requests so the count below is steady state.
                    asyncio.run(prime(port, cb, c))
                    accepted = nginx_accepted(up_port)
                    chat = row[label + " /chat_complete"] = wrk(
                        "http://127.0.0.1:%d/chat_complete" % port, cb, c, secs, workdir, rss_pid=proxy.pid
                    )
                    opened = nginx_accepted(up_port) - accepted - 1  # minus the status request itself
                    chat["upstream_conns_per_1000"] = round(1000 * opened / max(1, chat["requests"]), 2)
                    row[label + " /v1/chat/completions"] = wrk(
                        "http://127.0.0.1:%d/v1/chat/completions" % port, ob, c, secs, workdir, rss_pid=proxy.pid
                    )
                procs.stop(proxy)

        # Time to first token through a dripping upstream (the fake: 20 chunks, 50 ms apart).
        fake_port = free_port()
        env = dict(os.environ, PYTHONPATH=ROOT)
        fake = procs.start(
            [sys.executable, "-m", "chat_gpt_proxy.fake_openai", "--port", str(fake_port), "--delay", "0.05"],
            1,
            env,
            name="fake",
        )
        wait_port(fake_port)
        words = " ".join("tok%d" % i for i in range(19))
        direct_body = json.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": words}]})
        proxy_body = json.dumps({"prompt": words, "generate_params": {"stream": True}})
        auth = "access-token: %s\r\nopenai-token: %s\r\n" % (TOKEN, KEY)
        results["ttft"] = {}
        for label, tree in args.trees:
            proxy, port = start_proxy(
                procs,
                "http://127.0.0.1:%d/v1" % fake_port,
                "proxy_ttft",
                tree=tree,
                MAX_CONCURRENT_UPSTREAM=args.max_streams + 1000,
            )
            for concurrency in args.ttft_streams:
                # Once cold (no upstream connection yet), then measured warm,
                # as a proxy that has served before meets a burst.
                asyncio.run(ttft(port, "/chat_complete", proxy_body.encode(), auth, concurrency))
                direct = asyncio.run(ttft(fake_port, "/v1/chat/completions", direct_body.encode(), "", concurrency))
                via = asyncio.run(ttft(port, "/chat_complete", proxy_body.encode(), auth, concurrency))
                results["ttft"].setdefault(str(concurrency), {})[label] = {
                    "direct": direct,
                    "proxy": via,
                    "overhead_p50_ms": round(via["p50_ms"] - direct["p50_ms"], 2),
                    "overhead_p99_ms": round(via["p99_ms"] - direct["p99_ms"], 2),
                }
            if label != "proxy":
                procs.stop(proxy)

        # How many open streams one process holds, and what each costs.
        import urllib.request

        hold = {"chunks": ["tok "] * 1000, "delay": 5.0}
        urllib.request.urlopen(
            urllib.request.Request(
                "http://127.0.0.1:%d/_fake/script?model=hold" % fake_port, data=json.dumps(hold).encode(), method="POST"
            ),
            timeout=5,
        ).read()
        results["streams"] = asyncio.run(hold_streams(port, args.max_streams, proxy.pid))
        procs.stop(proxy)
        procs.stop(fake)
    finally:
        procs.stop_all()
    return results


def fmt(value, digits=2):
    return "-" if value is None else ("%.*f" % (digits, value))


def report(results: dict, command: str) -> str:
    lines = [
        "Run: %s, %s, %s s per measurement, command `%s`."
        % (results["date"], results["machine"], results["seconds"], command),
        "",
    ]
    lines.append("| scenario | subject | req/s | p50 ms | p99 ms | errors | vs direct |")
    lines.append("|---|---|---:|---:|---:|---:|---|")
    for mode, title in (("json", "JSON"), ("sse", "SSE 20 events")):
        for level, row in results[mode].items():
            if not level.startswith("c"):
                continue
            direct = row["direct"]
            for subject, r in row.items():
                extra = ""
                if subject != "direct":
                    extra = "%.1f %% of req/s" % (100 * r["rps"] / direct["rps"])
                    if level == "c1" and r["p50_ms"] is not None:
                        extra += ", +%.3f ms p50" % (r["p50_ms"] - direct["p50_ms"])
                lines.append(
                    "| %s %s | %s | %.0f | %s | %s | %d | %s |"
                    % (
                        title,
                        level.replace("c", "c="),
                        subject,
                        r["rps"],
                        fmt(r["p50_ms"], 3),
                        fmt(r["p99_ms"], 3),
                        r["errors"],
                        extra,
                    )
                )
    lines.append("")
    lines.append("| measure | value |")
    lines.append("|---|---|")
    for mode in ("json", "sse"):
        r = results[mode]["c64"]["proxy /chat_complete"]
        lines.append(
            "| proxy RSS idle / peak under c=64 (%s) | %s MB / %s MB |"
            % (mode, results[mode]["idle_rss_mb"], r.get("peak_rss_mb"))
        )
        for level, row in results[mode].items():
            if level.startswith("c"):
                lines.append(
                    "| new upstream connections per 1,000 requests (%s %s) | %s |"
                    % (mode, level.replace("c", "c="), row["proxy /chat_complete"]["upstream_conns_per_1000"])
                )
    for concurrency, by_tree in results["ttft"].items():
        for label, t in by_tree.items():
            lines.append(
                "| time to first token, %s concurrent streams: direct p50/p99 (beside %s) | %s / %s ms |"
                % (concurrency, label, fmt(t["direct"]["p50_ms"]), fmt(t["direct"]["p99_ms"]))
            )
            lines.append(
                "| time to first token, %s concurrent streams: %s p50/p99 (overhead) | %s / %s ms (+%s / +%s) |"
                % (
                    concurrency,
                    label,
                    fmt(t["proxy"]["p50_ms"]),
                    fmt(t["proxy"]["p99_ms"]),
                    t["overhead_p50_ms"],
                    t["overhead_p99_ms"],
                )
            )
    for mode in ("json", "sse"):
        row = results[mode]["c64"]
        ceiling = row["tornado, no upstream"]["rps"]
        for label, _tree in results["trees"]:
            for path in ("/chat_complete", "/v1/chat/completions"):
                r = row[label + " " + path]["rps"]
                text = "%.1f %% of Tornado's no-upstream ceiling" % (100 * r / ceiling)
                if label != "proxy":
                    text += "; the proxy does %.2fx" % (row["proxy " + path]["rps"] / r)
                lines.append("| %s %s at c=64 (%s) | %s |" % (label, path, mode, text))
    s = results["streams"]
    lines.append("| concurrent open streams held (failed) | %d (%d) |" % (s["open"], s["failed"]))
    lines.append(
        "| proxy RSS before / with them; per stream | %s MB / %s MB; %s KB |"
        % (s["rss_before_mb"], s["rss_with_streams_mb"], s["kb_per_stream"])
    )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    panels = [
        ("json", "c1", "JSON, 1 connection"),
        ("json", "c64", "JSON, 64 connections"),
        ("sse", "c64", "SSE (20 events), 64 connections"),
    ]
    for ax, (mode, level, title) in zip(axes, panels, strict=True):
        row = results[mode][level]
        names = list(row)
        values = [row[n]["rps"] for n in names]
        colors = ["#888888", "#2b8a3e", "#e8a33d", "#c2c2c2", "#d9d9d9", "#1c7ed6", "#4dabf7"]
        if len(names) == 5:  # no previous release in this run
            colors = colors[:3] + colors[5:]
        bars = ax.bar(range(len(names)), values, color=colors)
        short = {
            "proxy /chat_complete": "proxy\n/chat_complete",
            "proxy /v1/chat/completions": "proxy\n/v1/chat/…",
            "tornado, no upstream": "tornado\n(no upstream)",
        }
        ax.set_xticks(range(len(names)), [short.get(n, n.replace(" /", "\n/")) for n in names], fontsize=7)
        ax.set_title(title)
        ax.set_ylabel("requests/s")
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(
                "%.0f" % value, (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8
            )
    fig.suptitle("chat_gpt_proxy vs nginx vs the upstream directly (%s)" % results["date"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description="chat_gpt_proxy benchmark suite")
    parser.add_argument("--short", action="store_true", help="seconds, not minutes: proves the suite works")
    parser.add_argument("--seconds", type=float, default=10, help="duration of each wrk run (<= 20)")
    parser.add_argument("--max-streams", type=int, default=10_000)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--before", default="", help="git ref of a previous release, measured beside the proxy")
    args = parser.parse_args()
    args.seconds = min(args.seconds, 20)
    args.ttft_streams = (100, 1000)
    if args.short:
        args.seconds, args.max_streams, args.ttft_streams = 1, 300, (20, 100)
    # "proxy" is the working tree; --before adds another commit beside it, in the same run.
    args.trees = [("proxy", ROOT)]
    if args.before:
        tree = tempfile.mkdtemp(prefix="chat_gpt_proxy-before-")
        archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        args.trees.insert(0, ("previous (%s)" % args.before, tree))
    for tool in ("wrk", "nginx"):
        if not (shutil.which(tool) or os.path.exists("/usr/sbin/" + tool)):
            sys.exit("bench: %s is not installed (Debian: apt-get install -y %s)" % (tool, tool))
    results = run(args)
    command = "python bench/run.py" + (" --short" if args.short else "")
    command += " --before " + args.before if args.before else ""
    text = report(results, command)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    name = "short" if args.short else "latest"
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump({k: v for k, v in results.items()}, f, indent=1, default=str)
    plot(results, os.path.join(args.out, name + ".png"))
    print("wrote %s/%s.{md,json,png}" % (args.out, name))


if __name__ == "__main__":
    main()
