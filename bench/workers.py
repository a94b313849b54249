"""WORKERS=1 against WORKERS=2 (or more), side by side: requests per second for JSON and SSE.

    python bench/workers.py --workers 2 --rounds 3 --seconds 5

bench/run.py's fixed upstream (Debian's nginx) and wrk stay on CPU 1 as
there; the proxy is not pinned, so its workers may use every CPU, which on
a 2-core machine they share with the load generator and the upstream. The
report gives, per subject, the median requests per second (wall clock) and
per CPU-second the proxy's processes used (the supervisor and its workers,
from /proc), for ``/chat_complete`` at c=64, JSON and 20-event SSE.
Results: bench/results/workers.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.compare import cpu_seconds, proxy_env  # noqa: E402
from bench.run import MODEL, Processes, free_port, start_fixed_upstream, wait_port, write_result, wrk  # noqa: E402
from tests.procs import free_ports  # noqa: E402


def tree_cpu(pid: int) -> float:
    """CPU-seconds of ``pid`` and its children (the workers)."""
    total = cpu_seconds(pid)
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return total + sum(cpu_seconds(int(child)) for child in children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="chat_gpt_proxy-workers-")
    procs = Processes(workdir)
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    try:
        up_port = start_fixed_upstream(procs)
        for _ in range(args.rounds):
            for workers in (1, args.workers):
                for mode in ("json", "sse"):
                    port = free_port()
                    env = proxy_env(
                        port,
                        "http://127.0.0.1:%d/%s/v1" % (up_port, mode),
                        WORKERS=str(workers),
                        WORKER_METRICS_PORT=str(free_ports(workers)),
                    )
                    proxy = procs.start([sys.executable, "server.py"], None, env, name="proxy")
                    wait_port(port)
                    params = {"model_name": MODEL, "stream": mode == "sse"}
                    body = {"prompt": "Hello!", "generate_params": params}
                    url = "http://127.0.0.1:%d/chat_complete" % port
                    wrk(url, body, 64, 1, workdir)  # warm-up: every worker's pool
                    before = tree_cpu(proxy.pid)
                    result = wrk(url, body, 64, args.seconds, workdir)
                    used = tree_cpu(proxy.pid) - before
                    row = results.setdefault((mode, workers), {"rps": [], "per_cpu_s": [], "errors": []})
                    row["rps"].append(result["rps"])
                    row["per_cpu_s"].append(result["requests"] / used if used else 0.0)
                    row["errors"].append(result["errors"])
                    procs.stop(proxy)
    finally:
        procs.stop_all()
    lines = [
        "Command: `python bench/workers.py --workers %d --rounds %d --seconds %g` "
        "(%d CPUs; wrk and the upstream on CPU 1)" % (args.workers, args.rounds, args.seconds, os.cpu_count() or 0),
        "",
        "| mode | WORKERS | req/s c=64, median (each round) | vs WORKERS=1 "
        "| req per CPU-second of the proxy | errors |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for mode in ("json", "sse"):
        base = statistics.median(results[(mode, 1)]["rps"])
        for workers in (1, args.workers):
            row = results[(mode, workers)]
            rps = statistics.median(row["rps"])
            lines.append(
                "| %s | %d | %.0f (%s) | %.2fx | %.0f | %d |"
                % (
                    mode,
                    workers,
                    rps,
                    ", ".join("%.0f" % r for r in row["rps"]),
                    rps / base,
                    statistics.median(row["per_cpu_s"]),
                    sum(row["errors"]),
                )
            )
    write_result("workers.md", lines)


if __name__ == "__main__":
    main()
