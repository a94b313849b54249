"""What one request costs, counted rather than timed: Python function calls per request, two commits.

    python bench/calls.py --before HEAD~3            # calls per /chat_complete request, before and after
    python bench/calls.py --before HEAD~3 --top 25   # and where the profiled time goes
    python bench/calls.py --before HEAD~3 --budgets  # after: a budgeted token and the SQLite ledger
    python bench/calls.py --before HEAD~3 --upstreams 4  # after: UPSTREAMS_FILE with 4 upstreams
    python bench/calls.py --before HEAD~3 --budgets --both --stream  # both with the ledger, streamed
    python bench/calls.py --before HEAD~3 --env LOG_LEVEL=INFO  # both with the access log on (the default)

Wall-clock and even CPU-second figures on this shared machine move by ±10 %
between rounds (bench/results/compare-*.md), which hides a change of a few per
cent. The number of Python function calls a request makes does not move with
the neighbours: each commit's proxy runs under cProfile behind Debian's nginx
as the fixed upstream (bench/run.py's layout), wrk sends ``/chat_complete`` at
c=16 for a short and a longer run, and the difference between the two runs
divides out start-up and shutdown, leaving the calls per request. cProfile
slows everything several-fold, so the profiled microseconds are only for
comparing the two commits with each other.
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.compare import budget_tokens_file, proxy_env, upstreams_file  # noqa: E402
from bench.profile import env_pair  # noqa: E402
from bench.run import MODEL, TOKEN, Processes, free_port, start_fixed_upstream, wait_port, wrk  # noqa: E402


def profiled_run(
    procs: Processes,
    tree: str,
    upstream: str,
    seconds: float,
    out: str,
    budgets: bool = False,
    upstreams: int = 0,
    extra_env: dict | None = None,
    stream: bool = False,
) -> tuple[int, pstats.Stats]:
    port = free_port()
    files = {}
    token = TOKEN
    if budgets:
        # A budget it never reaches, so that every request is checked and charged, and the ledger on.
        files["tokens"] = os.path.join(procs.workdir, "budgets.toml")
        budget_tokens_file(files["tokens"])
        files["ledger"] = os.path.join(procs.workdir, "usage-%s.sqlite3" % seconds)
        token = TOKEN + "-named"
    if upstreams:
        files["upstreams"] = os.path.join(procs.workdir, "upstreams.toml")
        upstreams_file(files["upstreams"], upstreams, upstream)
    env = proxy_env(port, upstream, **files, **(extra_env or {}))
    proxy = procs.start([sys.executable, "-m", "cProfile", "-o", out, os.path.join(tree, "server.py")], 0, env)
    wait_port(port)
    body = {"prompt": "Hello!", "generate_params": {"model_name": MODEL, **({"stream": True} if stream else {})}}
    result = wrk("http://127.0.0.1:%d/chat_complete" % port, body, 16, seconds, procs.workdir, token=token)
    proxy.send_signal(signal.SIGTERM)  # drains and exits; cProfile writes its file on the way out
    proxy.wait(30)
    return result["requests"], pstats.Stats(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="HEAD~1", help="git ref to compare the working tree with")
    parser.add_argument("--top", type=int, default=0, help="also print the N functions with the most own time")
    parser.add_argument("--budgets", action="store_true", help="after: a budgeted token and the SQLite ledger")
    parser.add_argument("--upstreams", type=int, default=0, help="after: UPSTREAMS_FILE with this many upstreams")
    parser.add_argument("--both", action="store_true", help="--budgets and --upstreams for the before commit too")
    parser.add_argument("--stream", action="store_true", help="streamed requests (20 SSE events each)")
    parser.add_argument(
        "--env", action="append", default=[], type=env_pair, help="NAME=VALUE for both proxies, e.g. LOG_LEVEL=INFO"
    )
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="chat_gpt_proxy-profile-")
    before_tree = os.path.join(workdir, "before")
    os.makedirs(before_tree)
    archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", before_tree], input=archive, check=True)
    procs = Processes(workdir)
    try:
        upstream = "http://127.0.0.1:%d/%s/v1" % (start_fixed_upstream(procs), "sse" if args.stream else "json")
        rows = []
        after = "after (working tree)" + (", a budgeted token and the ledger" if args.budgets else "")
        after += ", UPSTREAMS_FILE with %d upstreams" % args.upstreams if args.upstreams else ""
        before = "before (%s)" % args.before + (", the same" if args.both else "")
        subjects = (
            (before, before_tree, args.both and args.budgets, args.both and args.upstreams),
            (after, ROOT, args.budgets, args.upstreams),
        )
        extra = dict(e.split("=", 1) for e in args.env)
        for label, tree, budgets, several in subjects:
            short_n, short = profiled_run(
                procs, tree, upstream, 2, os.path.join(workdir, "short.prof"), budgets, several, extra, args.stream
            )
            long_n, long = profiled_run(
                procs, tree, upstream, 6, os.path.join(workdir, "long.prof"), budgets, several, extra, args.stream
            )
            requests = long_n - short_n
            calls = (long.total_calls - short.total_calls) / requests
            micros = (long.total_tt - short.total_tt) / requests * 1e6
            rows.append((label, calls, micros))
            if args.top:
                print("\n== %s: the longer run, by own time" % label)
                long.sort_stats("tottime").print_stats(args.top)
        print("\n| subject | Python calls per request | profiled µs per request |\n|---|---:|---:|")
        for label, calls, micros in rows:
            print("| %s | %.0f (%.1f %%) | %.0f |" % (label, calls, 100 * calls / rows[0][1], micros))
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
