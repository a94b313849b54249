"""A/B: the proxy's JSON throughput for two commits, and with a tokens file, interleaved in one run.

    python bench/compare.py --before HEAD~2 --tokens 100 --rounds 5 --seconds 5
    python bench/compare.py --redis --rounds 5 --seconds 5
    python bench/compare.py --before HEAD~2 --tokens 0 --budgets   # also: a budgeted token and the SQLite ledger, each
    python bench/compare.py --before HEAD~2 --tokens 0 --upstreams 4   # also: UPSTREAMS_FILE with 4 upstreams
    python bench/compare.py --before main --tokens 0 --surfaces   # also: /v1/chat/completions and /v1/messages
    python bench/compare.py --before HEAD~2 --tokens 100 --runtime-tokens   # the same tokens made on the admin page

``--redis`` compares instead the cost of shared limits: the same
token with a rate limit and a max_concurrent, counted in the process, then in
Debian's redis-server (REDIS_URL, on CPU 1 with wrk and the upstream): one
EVALSHA per request to admit it and one to release it.

``--surfaces`` adds the OpenAI passthrough (``POST /v1/chat/completions``,
before and after) and Anthropic's Messages API (``POST /v1/messages``, after,
to a ``kind = "anthropic"`` upstream answering the same text in Anthropic's
shape); each subject's ratio is to the first subject on its route.

Uses bench/run.py's layout: Debian's nginx as the fixed upstream on CPU 1, each
proxy one process on CPU 0, wrk on CPU 1, ``/chat_complete`` at c=64 and c=1.
The subjects run in turn, round after round (every other round in the
opposite order), so a noisy neighbour on this shared machine hits all of them alike. The main figure is per-core
throughput: requests served per CPU-second the proxy process used (from
/proc/<pid>/stat), which other processes on the same core barely disturb,
unlike wall-clock req/s; the report gives per-subject medians and each
one's ratio to the first subject. ``--runtime-tokens`` adds, with the SQLite ledger on (USAGE_DATABASE, each
subject its own file), the ``--tokens`` file's tokens against the same
tokens made through the admin API (chat_gpt_proxy/console/) and loaded from
the database. ``--before`` is exported with
``git archive`` into a temporary directory (the working tree is not touched).
Results: bench/results/compare.md (``--surfaces``: compare-surfaces.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.run import (  # noqa: E402
    MODEL,
    TOKEN,
    Processes,
    free_port,
    start_fixed_upstream,
    wait_port,
    write_result,
    wrk,
)


def tokens_file(path: str, count: int) -> None:
    """``count`` named tokens; the benchmark's own token is the last one, so a lookup scans them all."""
    with open(path, "w") as f:
        for i in range(count - 1):
            f.write('[user%d]\ntoken = "bench-named-token-%06d"\nrate_limit_per_minute = 0\n\n' % (i, i))
        f.write('[bench]\ntoken = "%s-named"\nmax_concurrent = 100000\n' % TOKEN)


def limited_tokens_file(path: str) -> None:
    """The benchmark's token with limits it never reaches, so that every request runs the limit code."""
    with open(path, "w") as f:
        f.write('[bench]\ntoken = "%s-named"\nrate_limit_per_minute = 1000000\nmax_concurrent = 100000\n' % TOKEN)


def start_redis(procs: Processes) -> str:
    port = free_port()
    procs.start(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        1,
        name="redis",
    )
    wait_port(port)
    return "redis://127.0.0.1:%d/0" % port


def budget_tokens_file(path: str) -> None:
    """The benchmark's token with budgets it never reaches: every request is checked, charged and written."""
    with open(path, "w") as f:
        f.write('[bench]\ntoken = "%s-named"\nbudget_usd = 1000000.0\nbudget_tokens = 1000000000000\n' % TOKEN)


BENCH_ADMIN = "bench-admin-token-0123456789"


def make_runtime_tokens(port: int, count: int) -> str:
    """The ``tokens_file`` tokens, made through the admin API instead; the value of the benchmark's own."""
    value = ""
    for i in range(count):
        body = {"name": "user%d" % i, "rate_limit_per_minute": 0} if i < count - 1 else {"name": "bench"}
        if i == count - 1:
            body["max_concurrent"] = 100000
        request = urllib.request.Request(
            "http://127.0.0.1:%d/admin/api/tokens" % port,
            data=json.dumps(body).encode(),
            headers={"admin-token": BENCH_ADMIN, "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            value = json.loads(response.read())["token"]
    return value


def upstreams_file(path: str, count: int, upstream: str) -> None:
    """``count`` upstreams of equal weight, all the benchmark's nginx: every request runs the choice."""
    with open(path, "w") as f:
        for i in range(count):
            f.write('[up%d]\nbase_url = "%s"\n\n' % (i, upstream))


HELLO = [{"role": "user", "content": "Hello!"}]
# (path, body, extra headers) of each route measured.
CHAT_COMPLETE = ("/chat_complete", {"prompt": "Hello!", "generate_params": {"model_name": MODEL}}, {})
V1_CHAT = ("/v1/chat/completions", {"model": MODEL, "messages": HELLO}, {})
MESSAGES = (
    "/v1/messages",
    {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": HELLO},
    {"anthropic-version": "2023-06-01"},
)


def anthropic_upstreams_file(path: str, port: int) -> None:
    """OpenAI and an Anthropic upstream, both the benchmark's nginx; callers bring their own keys."""
    with open(path, "w") as f:
        f.write('[openai]\nbase_url = "http://127.0.0.1:%d/json/v1"\n\n' % port)
        f.write('[claude]\nkind = "anthropic"\nbase_url = "http://127.0.0.1:%d/anthropic"\n' % port)


def proxy_env(
    port: int, upstream: str, tokens: str = "", redis_url: str = "", ledger: str = "", upstreams: str = "", **extra
):
    """The environment of a benchmarked proxy: the caller's, without its own files, keys and Redis."""
    skip = ("ACCESS_TOKENS_FILE", "OPENAI_API_KEY", "REDIS_URL", "USAGE_DATABASE", "UPSTREAMS_FILE")
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update(PORT=str(port), HOST="127.0.0.1", ACCESS_TOKEN=TOKEN, OPENAI_BASE_URL=upstream, LOG_LEVEL="WARNING")
    for name, value in (
        ("ACCESS_TOKENS_FILE", tokens),
        ("REDIS_URL", redis_url),
        ("USAGE_DATABASE", ledger),
        ("UPSTREAMS_FILE", upstreams),
    ):
        if value:
            env[name] = value
    env.update(extra)
    return env


def start(
    procs: Processes,
    tree: str,
    upstream: str,
    name: str,
    tokens: str | None,
    redis_url: str = "",
    ledger: str = "",
    upstreams: str = "",
    **extra,
):
    port = free_port()
    env = proxy_env(port, upstream, tokens or "", redis_url, ledger, upstreams, **extra)
    proc = procs.start([sys.executable, os.path.join(tree, "server.py")], 0, env, name=name)
    wait_port(port)
    return proc, port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: per-core throughput holds up on a machine others share."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="HEAD~1", help="git ref to compare the working tree with")
    parser.add_argument("--tokens", type=int, default=100, help="also measure with a file of this many tokens (0: no)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--redis", action="store_true", help="limits in the process against limits in Redis")
    parser.add_argument("--budgets", action="store_true", help="also: a budgeted token and the SQLite ledger")
    parser.add_argument("--upstreams", type=int, default=0, help="also: UPSTREAMS_FILE with this many upstreams")
    parser.add_argument(
        "--surfaces", action="store_true", help="also: /v1/chat/completions before and after, /v1/messages after"
    )
    parser.add_argument(
        "--runtime-tokens",
        action="store_true",
        help="also, with the SQLite ledger: the --tokens file against the same tokens made on the admin page",
    )
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="chat_gpt_proxy-compare-")
    before_tree = os.path.join(workdir, "before")
    os.makedirs(before_tree)
    archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", before_tree], input=archive, check=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", args.before], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    procs = Processes(workdir)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        up_port = start_fixed_upstream(procs)
        upstream = "http://127.0.0.1:%d/json/v1" % up_port
        subjects = [("before (%s), no tokens file" % commit, before_tree, None), ("after, no tokens file", ROOT, None)]
        redis_url = ""
        if args.redis:
            path = os.path.join(workdir, "limited.toml")
            limited_tokens_file(path)
            redis_url = start_redis(procs)
            subjects = [("limits in the process", ROOT, path), ("limits in Redis (REDIS_URL)", ROOT, path)]
        elif args.tokens:
            path = os.path.join(workdir, "tokens.toml")
            tokens_file(path, args.tokens)
            subjects.append(("after, %d named tokens" % args.tokens, ROOT, path))
        if args.runtime_tokens:
            count = args.tokens or 100
            path = os.path.join(workdir, "tokens.toml")
            tokens_file(path, count)
            subjects.append(("after, %d tokens in the tokens file, USAGE_DATABASE" % count, ROOT, path))
            subjects.append(("after, %d tokens made on the admin page, USAGE_DATABASE" % count, ROOT, None))
        runtime_token = ""
        if args.budgets:
            path = os.path.join(workdir, "budgets.toml")
            budget_tokens_file(path)
            subjects.append(
                ("before (%s), a budgeted token and the SQLite ledger (USAGE_DATABASE)" % commit, before_tree, path)
            )
            subjects.append(("after, a budgeted token and the SQLite ledger (USAGE_DATABASE)", ROOT, path))
        routes = {}
        anthropic_path = ""
        if args.surfaces:
            anthropic_path = os.path.join(workdir, "anthropic-upstreams.toml")
            anthropic_upstreams_file(anthropic_path, up_port)
            for label, tree, route in (
                ("before (%s), /v1/chat/completions" % commit, before_tree, V1_CHAT),
                ("after, /v1/chat/completions", ROOT, V1_CHAT),
                ("after, /v1/messages (Anthropic's Messages API)", ROOT, MESSAGES),
            ):
                subjects.append((label, tree, None))
                routes[label] = route
        upstreams_path = ""
        if args.upstreams:
            upstreams_path = os.path.join(workdir, "upstreams.toml")
            upstreams_file(upstreams_path, args.upstreams, upstream)
            subjects.append(("after, UPSTREAMS_FILE with %d upstreams" % args.upstreams, ROOT, None))
        for round_number in range(args.rounds):
            # Every other round in the opposite order: no subject always follows the same one.
            for label, tree, tokens in subjects if round_number % 2 == 0 else subjects[::-1]:
                in_redis = "REDIS_URL" in label
                # A ledger per subject: each release's own schema, and the page's tokens in theirs alone.
                ledger = os.path.join(workdir, "usage-%d.sqlite3" % subjects.index((label, tree, tokens)))
                ledger = ledger if "USAGE_DATABASE" in label else ""
                several = upstreams_path if "UPSTREAMS_FILE" in label else ""
                path, body, headers = routes.get(label, CHAT_COMPLETE)
                if path == "/v1/messages":
                    several = anthropic_path
                on_page = "admin page" in label
                proxy, port = start(
                    procs,
                    tree,
                    upstream,
                    "proxy",
                    tokens,
                    redis_url if in_redis else "",
                    ledger,
                    several,
                    **({"ADMIN_TOKEN": BENCH_ADMIN} if on_page else {}),
                )
                if on_page and not runtime_token:
                    runtime_token = make_runtime_tokens(port, args.tokens or 100)
                url = "http://127.0.0.1:%d%s" % (port, path)
                token = runtime_token if on_page else TOKEN + "-named" if tokens else TOKEN
                row = results.setdefault(label, {"per_cpu_s": [], "rps": [], "p50_c1": [], "errors": []})
                wrk(url, body, 64, 1, workdir, token=token, headers=headers)  # warm-up: upstream pool, caches
                cpu = cpu_seconds(proxy.pid)
                result = wrk(url, body, 64, args.seconds, workdir, token=token, headers=headers)
                row["per_cpu_s"].append(result["requests"] / (cpu_seconds(proxy.pid) - cpu))
                row["rps"].append(result["rps"])
                row["errors"].append(result["errors"])
                result = wrk(url, body, 1, args.seconds, workdir, token=token, headers=headers)
                row["p50_c1"].append(result["p50_ms"])
                row["errors"].append(result["errors"])
                procs.stop(proxy)
    finally:
        procs.stop_all()

    command = (
        "--redis --rounds %d --seconds %g" % (args.rounds, args.seconds)
        if args.redis
        else "--before %s --tokens %d%s%s%s%s --rounds %d --seconds %g"
        % (
            args.before,
            args.tokens,
            " --runtime-tokens" if args.runtime_tokens else "",
            " --budgets" if args.budgets else "",
            " --upstreams %d" % args.upstreams if args.upstreams else "",
            " --surfaces" if args.surfaces else "",
            args.rounds,
            args.seconds,
        )
    )
    lines = [
        "Command: `python bench/compare.py %s` (rounds interleaved)" % command,
        "",
        "| subject | route | requests per CPU-second of the proxy, c=64: median (each round) | vs first on its route "
        "| vs first on its route, median of each round's ratio "
        "| req/s c=64 (wall clock), median | p50 ms c=1, median | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    firsts: dict[str, list[float]] = {}
    for label, row in results.items():
        route = routes.get(label, CHAT_COMPLETE)[0]
        first = firsts.setdefault(route, row["per_cpu_s"])
        base = statistics.median(first)
        per_cpu = statistics.median(row["per_cpu_s"])
        # The subjects of one round run back to back, so they share that
        # moment's machine; the ratio within a round cancels most of the drift.
        paired = statistics.median(r / f if f else float("nan") for r, f in zip(row["per_cpu_s"], first, strict=True))
        lines.append(
            "| %s | `%s` | %.0f (%s) | %.1f %% | %.1f %% | %.0f (%s) | %.3f | %d |"
            % (
                label,
                route,
                per_cpu,
                ", ".join("%.0f" % r for r in row["per_cpu_s"]),
                100 * per_cpu / base,
                100 * paired,
                statistics.median(row["rps"]),
                ", ".join("%.0f" % r for r in row["rps"]),
                statistics.median(row["p50_c1"]),
                sum(row["errors"]),
            )
        )
    write_result("compare-redis.md" if args.redis else "compare-surfaces.md" if args.surfaces else "compare.md", lines)


if __name__ == "__main__":
    main()
