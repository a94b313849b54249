"""Time to first token when many streams start at once: direct, through this proxy, and another commit.

    python bench/ttft.py                           # 100 streams, 5 rounds, the working tree only
    python bench/ttft.py --before HEAD~3 --streams 100 --rounds 7

bench/run.py's layout: the fake OpenAI on CPU 1 drips 20 chunks 50 ms apart,
each proxy alone on CPU 0, the asyncio client (bench/run.py's ``ttft``) on
CPU 1. Each round opens ``--streams`` streams at the same moment against
the fake directly, then through each proxy in turn, and takes the p50 and
p99 of the time to the first content chunk; the overhead is the proxy's
figure minus the direct one of the same round. The floor: Tornado alone on
CPU 0 (bench/tornado_hello.py) answering the same streams at once with the
whole SSE body and no upstream, i.e. what accepting and answering that many
requests at once costs on one core before any proxying. The first round meets each
proxy with no upstream connection yet (cold); the report gives it apart from
the medians of the others (warm: the pool kept the connections).
Results: bench/results/ttft.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.compare import proxy_env  # noqa: E402
from bench.run import KEY, MODEL, TOKEN, Processes, free_port, sse_body, ttft, wait_port, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="", help="git ref to measure beside the working tree")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="chat_gpt_proxy-ttft-")
    procs = Processes(workdir)
    trees = [("after (working tree)", ROOT)]
    if args.before:
        tree = os.path.join(workdir, "before")
        os.makedirs(tree)
        archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        trees.insert(0, ("before (%s)" % args.before, tree))
    words = " ".join("tok%d" % i for i in range(19))
    direct_body = json.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": words}]})
    proxy_body = json.dumps({"prompt": words, "generate_params": {"stream": True}})
    auth = "access-token: %s\r\nopenai-token: %s\r\n" % (TOKEN, KEY)
    rows: dict[str, list[dict]] = {"direct": [], "tornado, no upstream (floor)": []}
    try:
        body_file = os.path.join(workdir, "sse.txt")
        with open(body_file, "w") as f:
            f.write(sse_body())
        hello_port = free_port()
        cmd = [sys.executable, "bench/tornado_hello.py", str(hello_port), body_file, "text/event-stream"]
        procs.start(cmd, 0, name="tornado_hello")
        wait_port(hello_port)
        fake_port = free_port()
        env = dict(os.environ, PYTHONPATH=ROOT)
        cmd = [sys.executable, "-m", "chat_gpt_proxy.fake_openai", "--port", str(fake_port), "--delay", "0.05"]
        procs.start(cmd, 1, env, name="fake")
        wait_port(fake_port)
        proxies = []
        for label, tree in trees:
            port = free_port()
            upstream = "http://127.0.0.1:%d/v1" % fake_port
            env = proxy_env(port, upstream, MAX_CONCURRENT_UPSTREAM=str(args.streams + 100))
            procs.start([sys.executable, os.path.join(tree, "server.py")], 0, env, name=label.split()[0])
            wait_port(port)
            proxies.append((label, port))
            rows[label] = []
        for _ in range(args.rounds):
            direct = asyncio.run(ttft(fake_port, "/v1/chat/completions", direct_body.encode(), "", args.streams))
            rows["direct"].append(direct)
            floor = asyncio.run(ttft(hello_port, "/chat_complete", proxy_body.encode(), auth, args.streams))
            rows["tornado, no upstream (floor)"].append(floor)
            for label, port in proxies:
                via = asyncio.run(ttft(port, "/chat_complete", proxy_body.encode(), auth, args.streams))
                via["over_p50"] = via["p50_ms"] - direct["p50_ms"]
                via["over_p99"] = via["p99_ms"] - direct["p99_ms"]
                rows[label].append(via)
    finally:
        procs.stop_all()

    lines = [
        "Command: `python bench/ttft.py%s --streams %d --rounds %d`"
        % (" --before " + args.before if args.before else "", args.streams, args.rounds),
        "",
        "| subject | first round (cold) p50 / p99 ms | later rounds (warm), median p50 / p99 ms "
        "| warm overhead over direct, median p50 / p99 ms | failed |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, runs in rows.items():
        warm = runs[1:] or runs
        p50 = statistics.median(r["p50_ms"] for r in warm)
        p99 = statistics.median(r["p99_ms"] for r in warm)
        over = (
            "+%.1f / +%.1f"
            % (statistics.median(r["over_p50"] for r in warm), statistics.median(r["over_p99"] for r in warm))
            if "over_p50" in runs[0]
            else ""
        )
        lines.append(
            "| %s | %.1f / %.1f | %.1f / %.1f | %s | %d |"
            % (label, runs[0]["p50_ms"], runs[0]["p99_ms"], p50, p99, over, sum(r["failed"] for r in runs))
        )
    write_result("ttft.md", lines)


if __name__ == "__main__":
    main()
