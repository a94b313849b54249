"""``server.py`` under tracemalloc, for finding what holds memory (``bench/soak.py --tracemalloc N``).

    python bench/traced_server.py FRAMES     # the proxy, as server.py, with FRAMES frames per allocation

Each SIGUSR2 takes a snapshot; from the second on, the 25 places whose
allocations grew the most since the first one are written to stderr (the
proxy's log), each with its traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOP = 25
baseline: list[tracemalloc.Snapshot] = []


def snapshot(_signum, _frame) -> None:
    taken = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    if not baseline:
        baseline.append(taken)
        print(
            "tracemalloc: baseline taken, %d KiB traced" % (tracemalloc.get_traced_memory()[0] // 1024), file=sys.stderr
        )
        return
    for group in ("filename", "lineno"):
        print("tracemalloc: growth by %s:" % group, file=sys.stderr)
        for stat in taken.compare_to(baseline[0], group)[:TOP]:
            line = "  %+d KiB in %+d blocks: %s" % (stat.size_diff // 1024, stat.count_diff, stat.traceback[0])
            print(line, file=sys.stderr)
    stats = taken.compare_to(baseline[0], "traceback")
    print(
        "tracemalloc: %d KiB traced; the largest growths since the baseline:"
        % (tracemalloc.get_traced_memory()[0] // 1024),
        file=sys.stderr,
    )
    for stat in stats[:TOP]:
        print("  %+d KiB in %+d blocks" % (stat.size_diff // 1024, stat.count_diff), file=sys.stderr)
        for line in stat.traceback.format()[-2 * min(len(stat.traceback), 8) :]:
            print("    " + line, file=sys.stderr)
    print("tracemalloc: done", file=sys.stderr)
    sys.stderr.flush()


def main() -> None:
    tracemalloc.start(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
    del sys.argv[1:]
    signal.signal(signal.SIGUSR2, snapshot)
    os.chdir(ROOT)
    import server

    server.main()


if __name__ == "__main__":
    main()
