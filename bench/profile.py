"""Where the proxy's CPU goes per request: py-spy samples the running proxy under wrk load.

    python bench/profile.py                          # JSON /chat_complete at c=64, 10 s
    python bench/profile.py --mode sse --path /v1/chat/completions --connections 1
    python bench/profile.py --top 40 --tree ../before  # profile another checkout
    python bench/profile.py --env LOG_LEVEL=INFO       # with the access log on (the default level)

bench/run.py's layout: Debian's nginx as the fixed upstream and wrk on CPU 1,
the proxy alone on CPU 0. py-spy samples the proxy from outside (no tracing
overhead inside the process, unlike cProfile), and the report gives each
function's share of the samples: "self" where the CPU was in that function,
"total" where it was in that function or below it. Shares are what to read;
the sampled process runs at full speed, so the proportions hold on a noisy
machine. Writes bench/results/profile-<mode>-c<N>.md, and keeps the raw
collapsed stacks (which speedscope and flamegraph.pl read) in a temporary
directory it names: they are half a megabyte each.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.compare import proxy_env  # noqa: E402
from bench.run import MODEL, Processes, free_port, start_fixed_upstream, wait_port, write_result, wrk  # noqa: E402


def env_pair(text: str) -> str:
    """``NAME=VALUE`` (argparse type): a clear message for anything else."""
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name) or "/" in value:
        raise argparse.ArgumentTypeError("expected NAME=VALUE (no '/' in the value), got %r" % text)
    return text


def frame_name(frame: str) -> str:
    """``handle (tornado/web.py:123)`` -> ``handle (tornado/web.py)``: one row per function, not per line."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3", ROOT + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return "%s (%s)" % (name, path) if path else name


def summarise(collapsed: str, top: int) -> tuple[int, list, list]:
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        samples += n
        if frames:
            own[frames[-1]] += n
        for name in set(frames):
            total[name] += n
    return samples, own.most_common(top), total.most_common(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("json", "sse"), default="json")
    parser.add_argument("--path", default="/chat_complete", help="/chat_complete or /v1/chat/completions")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--tree", default=ROOT, help="the checkout whose server.py is profiled")
    parser.add_argument(
        "--env", action="append", default=[], type=env_pair, help="NAME=VALUE for the proxy, e.g. LOG_LEVEL=INFO"
    )
    args = parser.parse_args()
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")

    workdir = tempfile.mkdtemp(prefix="chat_gpt_proxy-profile-")
    procs = Processes(workdir)
    stacks = os.path.join(workdir, "stacks.txt")
    try:
        up_port = start_fixed_upstream(procs)
        upstream = "http://127.0.0.1:%d/%s/v1" % (up_port, args.mode)
        port = free_port()
        env = proxy_env(port, upstream, **dict(e.split("=", 1) for e in args.env))
        proxy = procs.start([sys.executable, os.path.join(args.tree, "server.py")], 0, env)
        wait_port(port)
        stream = args.mode == "sse"
        if args.path == "/chat_complete":
            body = {"prompt": "Hello!", "generate_params": {"model_name": MODEL, "stream": stream}}
        else:
            body = {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "Hello!"}]}
        url = "http://127.0.0.1:%d%s" % (port, args.path)
        wrk(url, body, args.connections, 1, workdir)  # warm-up: upstream pool, caches
        record = [spy, "record", "--pid", str(proxy.pid), "--rate", "500", "--duration", str(args.seconds)]
        record += ["--format", "raw", "--output", stacks]
        spied: list = []
        sampler = threading.Thread(
            target=lambda: spied.append(subprocess.run(record, capture_output=True, text=True)), daemon=True
        )
        sampler.start()
        load = wrk(url, body, args.connections, args.seconds + 1, workdir)
        sampler.join(args.seconds + 30)
    finally:
        procs.stop_all()

    if not os.path.exists(stacks):
        sys.exit("py-spy recorded nothing: %s" % (spied[0].stderr.strip()[-2000:] if spied else "it did not finish"))
    with open(stacks) as f:
        collapsed = f.read()
    samples, own, total = summarise(collapsed, args.top)
    name = "profile-%s-c%d%s%s" % (
        args.mode,
        args.connections,
        "-v1" if args.path != "/chat_complete" else "",
        "".join("-" + e.split("=", 1)[1].lower() for e in args.env),
    )
    lines = [
        "Command: `python bench/profile.py --mode %s --path %s --connections %d --seconds %d%s` "
        "(py-spy at 500 Hz; %d samples; wrk: %.0f req/s, %d errors)"
        % (
            args.mode,
            args.path,
            args.connections,
            args.seconds,
            "".join(" --env " + e for e in args.env),
            samples,
            load["rps"],
            load["errors"],
        ),
        "",
        "| self % | function | | total % | function |",
        "|---:|---|---|---:|---|",
    ]
    for (own_name, own_n), (total_name, total_n) in zip(own, total, strict=False):
        lines.append(
            "| %.1f | `%s` | | %.1f | `%s` |" % (100 * own_n / samples, own_name, 100 * total_n / samples, total_name)
        )
    write_result(name + ".md", lines)
    print("raw stacks: %s" % stacks)


if __name__ == "__main__":
    main()
