"""How fast a client's disconnect reaches the upstream: close mid-stream, time until the fake upstream sees it.

    python bench/abort_latency.py [--streams 20]

Runs the fake upstream and the proxy in this process (tests/threaded.py), on loopback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.threaded import BackgroundStack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("chat_gpt_proxy").setLevel(logging.ERROR)  # one "client left" line per stream otherwise
    stack = BackgroundStack(access_tokens=("bench",)).start()
    delays = []
    body = json.dumps({"prompt": "x", "generate_params": {"stream": True}}).encode()
    head = b"POST /chat_complete HTTP/1.1\r\nHost: x\r\naccess-token: bench\r\nopenai-token: sk-bench\r\n"
    try:
        for _ in range(args.streams):
            stack.fake.push(Behaviour(chunks=["tok "] * 100, delay=0.1))
            before = len(stack.fake.aborts)
            sock = socket.create_connection(("127.0.0.1", stack.port))
            sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            received = b""
            while b'"content":"tok ' not in received:
                received += sock.recv(65536)
            closed = time.monotonic()
            sock.close()
            deadline = closed + 5
            while len(stack.fake.aborts) == before and time.monotonic() < deadline:
                time.sleep(0.0002)
            if len(stack.fake.aborts) == before:
                sys.exit("the upstream did not see the abort within 5 s")
            delays.append((stack.fake.aborts[-1] - closed) * 1000)
    finally:
        stack.stop()
    print(
        "client closes mid-stream -> upstream sees its connection closed: p50 %.2f ms, max %.2f ms (%d streams)"
        % (statistics.median(delays), max(delays), len(delays))
    )


if __name__ == "__main__":
    main()
