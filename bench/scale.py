"""Scale out: throughput of two proxy instances behind nginx against one, in the same run.

    python bench/scale.py            # 10 s per measurement
    python bench/scale.py --short    # 1 s per measurement: proves it runs (CI)

nginx runs deploy/nginx/chat_gpt_proxy.conf's upstream and location settings
(without TLS, on loopback) in front of one, then two, ``python server.py``
instances; the upstream is bench/run.py's fixed-answer nginx; the load is wrk
with bench/run.py's request bodies. Layout on the 2-core machine: the first
instance has CPU 0 to itself; nginx (front and upstream) and wrk run on CPU 1,
and so does the second instance, so the ratio is what a second process adds
when the load generator shares its core, less than a spare core would give.

Writes bench/results/scale-latest.{md,json} (``--short``: scale-short.*).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile

from run import (
    MODEL,
    ROOT,
    Processes,
    free_port,
    prime,
    start_fixed_upstream,
    start_nginx,
    start_proxy,
    wait_port,
    wrk,
)

EXAMPLE_CONFIG = os.path.join(ROOT, "deploy", "nginx", "chat_gpt_proxy.conf")


def front_config(port: int, instance_ports: list[int]) -> str:
    """The example config's upstream, map and location blocks on a plain-HTTP loopback port."""
    with open(EXAMPLE_CONFIG) as f:
        site = f.read()
    servers = re.findall(r"^\s*server 127\.0\.0\.1:\d+.*$", site, re.M)
    lines = [re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:%d" % p, servers[0]) for p in instance_ports]
    site = site.replace(servers[0], "\n".join(lines), 1)
    for other in servers[1:]:
        site = site.replace(other + "\n", "", 1)
    site = re.sub(r"^\s*listen 443 .*$", "    listen 127.0.0.1:%d backlog=4096;" % port, site, flags=re.M)
    return re.sub(r"^\s*ssl_.*\n", "", site, flags=re.M)


def measure(procs, up_port, mode, instances, secs, connections):
    """wrk through nginx in front of ``instances`` proxies (CPU 0, then CPU 1)."""
    stream = mode == "sse"
    body = {"prompt": "Hello!", "generate_params": {"model_name": MODEL, **({"stream": True} if stream else {})}}
    started = []
    for i in range(instances):
        proc, port = start_proxy(procs, "http://127.0.0.1:%d/%s/v1" % (up_port, mode), "proxy_%s_%d" % (mode, i))
        started.append((proc, port))
    # start_proxy pins every proxy on CPU 0: move the second one to CPU 1.
    if instances > 1 and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        for cpu, (proc, _) in enumerate(started):
            subprocess.run(
                ["taskset", "-a", "-p", "-c", str(cpu % 2), str(proc.pid)], stdout=subprocess.DEVNULL, check=True
            )
    front_port = free_port()
    front = start_nginx(
        procs, "front_%s_%d" % (mode, instances), front_config(front_port, [p for _, p in started]), cpu=1
    )
    wait_port(front_port)
    url = "http://127.0.0.1:%d/chat_complete" % front_port
    wrk(url, body, connections, 1, procs.workdir)  # warm-up: pools, caches
    for _, port in started:
        asyncio.run(prime(port, body, connections // instances))
    result = wrk(url, body, connections, secs, procs.workdir)
    result.pop("raw")
    procs.stop(front)
    for proc, _ in started:
        procs.stop(proc)
    return result


def run(args) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    procs = Processes(tempfile.mkdtemp(prefix="chat_gpt_proxy-scale-"))
    results: dict = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": "%s, %d cores, %s" % (platform.machine(), os.cpu_count() or 0, platform.python_version()),
        "seconds": args.seconds,
        "connections": args.connections,
    }
    try:
        up_port = start_fixed_upstream(procs)
        for mode in ("json", "sse"):
            # One and two in turn, several rounds: a change in the machine's
            # other load hits both alike; the median of each is reported.
            runs: dict = {"one": [], "two": []}
            for _ in range(args.rounds):
                runs["one"].append(measure(procs, up_port, mode, 1, args.seconds, args.connections))
                runs["two"].append(measure(procs, up_port, mode, 2, args.seconds, args.connections))
            median = {k: sorted(v, key=lambda r: r["rps"])[len(v) // 2] for k, v in runs.items()}
            results[mode] = {
                **median,
                "ratio": round(median["two"]["rps"] / median["one"]["rps"], 2),
                "all_rps": {k: [r["rps"] for r in v] for k, v in runs.items()},
                "errors": sum(r["errors"] for v in runs.values() for r in v),
            }
    finally:
        procs.stop_all()
    return results


def report(results: dict, command: str) -> str:
    lines = [
        "Run: %s, %s, %s s per measurement, %d connections, command `%s`."
        % (results["date"], results["machine"], results["seconds"], results["connections"], command),
        "",
        "| scenario | instances behind nginx | req/s (median of %d) | p50 ms | p99 ms | errors | two / one |"
        % len(results["json"]["all_rps"]["one"]),
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for mode, title in (("json", "JSON"), ("sse", "SSE 20 events")):
        r = results[mode]
        for name, count in (("one", 1), ("two", 2)):
            m = r[name]
            lines.append(
                "| %s | %d | %.0f | %s | %s | %d | %s |"
                % (
                    title,
                    count,
                    m["rps"],
                    m["p50_ms"],
                    m["p99_ms"],
                    m["errors"],
                    "%.2f" % r["ratio"] if count == 2 else "",
                )
            )
    lines.append("")
    for mode in ("json", "sse"):
        rounds = results[mode]["all_rps"]
        lines.append(
            "%s req/s per round: one %s; two %s."
            % (mode.upper(), ", ".join("%.0f" % r for r in rounds["one"]), ", ".join("%.0f" % r for r in rounds["two"]))
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="two proxy instances behind nginx against one")
    parser.add_argument("--short", action="store_true", help="1 s per measurement: proves it runs")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="one/two measurements in turn (median reported)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = parser.parse_args()
    args.seconds = 1 if args.short else min(args.seconds, 20)
    if args.short:
        args.rounds = 1
    for name in ("wrk", "nginx"):
        if not (shutil.which(name) or os.path.exists("/usr/sbin/" + name)):
            sys.exit("bench: %s is not installed (Debian: apt-get install -y %s)" % (name, name))
    results = run(args)
    text = report(results, "python bench/scale.py" + (" --short" if args.short else ""))
    print(text)
    os.makedirs(args.out, exist_ok=True)
    name = "scale-short" if args.short else "scale-latest"
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    print("wrote %s/%s.{md,json}" % (args.out, name))


if __name__ == "__main__":
    main()
