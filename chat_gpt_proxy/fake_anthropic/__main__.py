"""``python -m chat_gpt_proxy.fake_anthropic``: the fake Anthropic API on a port of its own (benchmarks)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from chat_gpt_proxy.fake_anthropic.app import FakeAnthropic


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m chat_gpt_proxy.fake_anthropic", description="A fake Anthropic API for tests and benchmarks."
    )
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between streamed deltas")
    args = parser.parse_args()

    async def serve() -> None:
        fake = FakeAnthropic(default_delay=args.delay, host_name=args.host)
        fake.start(args.port, args.host)
        print("fake Anthropic listening on %s" % fake.url, flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
