"""Does uvloop make the proxy faster here? asyncio's loop against uvloop's, side by side.

    pip install uvloop==0.21.0 && python bench/event_loop.py --rounds 4 --seconds 4

uvloop is not a dependency: this script installs its policy in a wrapper
process only. Same layout as bench/compare.py (nginx upstream and wrk on
CPU 1, the proxy on CPU 0, /chat_complete at c=64); the figure is requests
per CPU-second of the proxy process, rounds interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.compare import cpu_seconds, proxy_env  # noqa: E402
from bench.run import MODEL, Processes, free_port, start_fixed_upstream, wait_port, wrk  # noqa: E402

UVLOOP_SERVER = """
import asyncio, runpy, sys
import uvloop
asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
sys.path.insert(0, {root!r})
sys.argv = [{server!r}]
runpy.run_path({server!r}, run_name="__main__")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="chat_gpt_proxy-loop-")
    wrapper = os.path.join(workdir, "uvloop_server.py")
    with open(wrapper, "w") as f:
        f.write(UVLOOP_SERVER.format(server=os.path.join(ROOT, "server.py"), root=ROOT))
    procs = Processes(workdir)
    results: dict[str, list[float]] = {"asyncio": [], "uvloop": []}
    try:
        upstream = "http://127.0.0.1:%d/json/v1" % start_fixed_upstream(procs)
        for _ in range(args.rounds):
            for name, script in (("asyncio", os.path.join(ROOT, "server.py")), ("uvloop", wrapper)):
                port = free_port()
                env = proxy_env(port, upstream)
                proxy = procs.start([sys.executable, script], 0, env, name=name)
                wait_port(port)
                url = "http://127.0.0.1:%d/chat_complete" % port
                body = {"prompt": "Hello!", "generate_params": {"model_name": MODEL}}
                wrk(url, body, 64, 1, workdir)  # warm-up
                before = cpu_seconds(proxy.pid)
                result = wrk(url, body, 64, args.seconds, workdir)
                results[name].append(result["requests"] / (cpu_seconds(proxy.pid) - before))
                procs.stop(proxy)
    finally:
        procs.stop_all()
    base = statistics.median(results["asyncio"])
    for name, values in results.items():
        print(
            "| %s | %.0f (%s) | %.1f %% |"
            % (
                name,
                statistics.median(values),
                ", ".join("%.0f" % v for v in values),
                100 * statistics.median(values) / base,
            )
        )


if __name__ == "__main__":
    main()
