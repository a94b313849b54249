"""Helpers for tests that run real processes: the proxy as `python server.py`, nginx, redis-server."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import socket
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


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (WORKER_METRICS_PORT's), below the ephemeral
    range: a port in that range can be taken by any client connection between the check and the
    worker's bind, and a worker that cannot bind its port dies at start, taking the others with it."""
    for _ in range(100):
        base = random.randrange(20000, 32000 - count)
        if all(_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no run of %d free ports below 32000" % count)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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
            "ADMIN_TOKEN_FILE",
            "PID_FILE",
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
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


NGINX_MAIN = """
{user}
worker_processes 1;
daemon off;
pid {temp}/nginx.pid;
error_log {temp}/error.log {level};
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {temp}/site.conf;
}}
"""

UPSTREAM_SERVER_RE = re.compile(r"^\s*server 127\.0\.0\.1:\d+.*$", re.M)


def example_site(listen_port: int, upstream_ports: list[int], certificate: tuple[str, str]) -> str:
    """deploy/nginx/chat_gpt_proxy.conf on loopback: one upstream ``server`` line per port, with the
    parameters of the file's own lines, and a throwaway certificate."""
    with open(os.path.join(ROOT, "deploy/nginx/chat_gpt_proxy.conf")) as f:
        site = f.read()
    servers = UPSTREAM_SERVER_RE.findall(site)
    assert servers, "no upstream server lines in the example config"
    lines = [re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:%d" % port, servers[0]) for port in upstream_ports]
    site = site.replace(servers[0], "\n".join(lines), 1)
    for other in servers[1:]:
        site = site.replace(other + "\n", "", 1)
    site = site.replace("listen 443 ssl", "listen 127.0.0.1:%d ssl" % listen_port)
    cert, key = certificate
    site = site.replace("/etc/nginx/ssl/chat_gpt_proxy.crt", cert).replace("/etc/nginx/ssl/chat_gpt_proxy.key", key)
    assert "listen 127.0.0.1:%d" % listen_port in site and cert in site
    assert all("127.0.0.1:%d " % p in site for p in upstream_ports)
    return site


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


class Nginx:
    """Debian's nginx with a site config, in the foreground in ``temp``; checked with ``nginx -t`` first."""

    def __init__(self, site: str, temp, port: int, level: str = "warn"):
        self.temp, self.port, self.site = temp, port, site
        os.makedirs(temp, exist_ok=True)
        with open(os.path.join(temp, "site.conf"), "w") as f:
            f.write(site)
        user = "user root;" if os.geteuid() == 0 else ""
        self.conf = os.path.join(temp, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(NGINX_MAIN.format(user=user, temp=temp, level=level))
        check = subprocess.run(
            [nginx_binary(), "-t", "-p", str(temp), "-c", self.conf], capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen([nginx_binary(), "-p", str(temp), "-c", self.conf])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise AssertionError("nginx did not start: " + self.error_log()) from None
                time.sleep(0.05)

    def error_log(self) -> str:
        try:
            with open(os.path.join(self.temp, "error.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class RedisServer:
    """Debian's redis-server on a loopback port, nothing saved to disk; ``stop()``/``start()`` keep the port."""

    def __init__(self, temp, password: str = ""):
        self.temp, self.password = str(temp), password
        os.makedirs(self.temp, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = ":%s@" % self.password if self.password else ""
        return "redis://%s127.0.0.1:%d/0" % (auth, self.port)

    def start(self) -> None:
        args = [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(self.port)]
        args += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.temp]
        if self.password:
            args += ["--requirepass", self.password]
        self._log = open(os.path.join(self.temp, "redis.log"), "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while self.command("PING") != "+PONG":
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise AssertionError("redis-server did not start on port %d" % self.port)
            time.sleep(0.05)

    def command(self, *words: str) -> str:
        """One command in the inline protocol; its first reply line ("" if none)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                if self.password:
                    sock.sendall(b"AUTH %s\r\n" % self.password.encode())
                    sock.recv(100)
                sock.sendall(" ".join(words).encode() + b"\r\n")
                return sock.recv(65536).split(b"\r\n")[0].decode()
        except OSError:
            return ""

    def pause(self) -> None:
        """SIGSTOP: a Redis that hangs, connections open, no answer."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            self._log.close()
