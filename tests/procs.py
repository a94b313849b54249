"""Helpers for tests that run real processes: the proxy as `python server.py`, nginx."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

from tornado.testing import bind_unused_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    sock, port = bind_unused_port()
    sock.close()
    return port


class ServerProcess:
    """``python server.py`` with the given environment; stopped by ``stop()`` whatever happens."""

    def __init__(self, env: dict[str, str], log_path: str, host: str | None = "127.0.0.1"):
        """``host``: the HOST variable (None: unset)."""
        self.port = int(env.get("PORT") or free_port())
        # Only what the test gives: never a developer's own token or OpenAI key.
        inherited = (
            "ACCESS_TOKEN",
            "ACCESS_KEY",
            "ACCESS_TOKENS_FILE",
            "OPENAI_API_KEY",
            "OPENAI_API_KEY_FILE",
            "HOST",
        )
        full_env = {k: v for k, v in os.environ.items() if k not in inherited}
        full_env.update(env, PORT=str(self.port))
        if host is not None:
            full_env["HOST"] = host
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "server.py"], cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.port

    async def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("server exited early:\n" + self.output())
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: urllib.request.urlopen(self.url + "/healthz", timeout=1).read()
                )
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise AssertionError("server did not become ready:\n" + self.output())

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.proc.poll()

    def output(self) -> str:
        self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
