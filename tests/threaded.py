"""The fake upstream and the proxy on their own IOLoop in a background thread.

For clients that block (hypothesis-driven tests, which cannot run inside
pytest-tornado's loop) and for scripts. ``stop()`` ends the thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

from tornado.testing import bind_unused_port

from chat_gpt_proxy.fake_openai.app import FakeOpenAI
from server import make_app, make_server
from settings import Settings


class BackgroundStack:
    def __init__(self, **overrides):
        self.overrides = overrides
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="background-stack", daemon=True)
        self.port = 0
        self.fake: FakeOpenAI | None = None

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.port

    def start(self) -> BackgroundStack:
        self.thread.start()
        self.call(self._setup)
        return self

    def call(self, coroutine_function, timeout: float = 30):
        """Run ``coroutine_function()`` on the stack's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine_function(), self.loop).result(timeout)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _setup(self) -> None:
        self.fake = FakeOpenAI()
        self.fake.start()
        self.settings = dataclasses.replace(
            Settings(), openai_base_url=self.fake.url, host="127.0.0.1", **self.overrides
        )
        self.app = make_app(self.settings)
        self.server = make_server(self.app, self.settings)
        sock, self.port = bind_unused_port()
        self.server.add_sockets([sock])

    async def _teardown(self) -> None:
        self.server.stop()
        await self.server.close_all_connections()
        await self.fake.stop()
        self.app.pool.close()

    def stop(self) -> None:
        self.call(self._teardown)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
