"""``python -m chat_gpt_proxy.fake_openai``: the fake on a port of its own (demo, benchmarks)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl

from chat_gpt_proxy.fake_openai.app import FakeOpenAI


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m chat_gpt_proxy.fake_openai", description="A fake OpenAI API for tests, benchmarks and demos."
    )
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between streamed chunks")
    parser.add_argument("--certfile", help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM)")
    args = parser.parse_args()
    context = None
    if args.certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.certfile, args.keyfile)

    async def serve() -> None:
        fake = FakeOpenAI(default_delay=args.delay, ssl_context=context, host_name=args.host)
        fake.start(args.port, args.host)
        print("fake OpenAI listening on %s" % fake.url, flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
