"""Real egress proxies for the tests: Debian's tinyproxy and microsocks.

Each runs in the foreground on an unused loopback port with a config written
here, logs every client connection (so the tests count connections at the
proxy itself), and is killed by ``stop()``. ``make_tls_files`` makes a
throwaway CA and a server certificate for ``localhost``/``127.0.0.1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import time

from tornado.testing import bind_unused_port

from chat_gpt_proxy.fake_openai import FakeOpenAI
from chat_gpt_proxy.upstream.egress import EgressProxy
from server import make_app, make_server
from tests.conftest import ProxyClient
from tests.procs import free_port

PROXY_USER = "proxyuser"
# Listed in tests/conftest.py OTHER_SECRETS: no log line may hold them.
# tinyproxy's config accepts only letters, digits, '-' and '_' in a password;
# microsocks takes any, so its password needs percent-encoding in a URL.
TINYPROXY_PASSWORD = "tiny-PROXYPASS-8e1f"
SOCKS_PASSWORD = "sox-P@ss:w/rd-3b7d"


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("proxy server exited with %s" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("proxy server did not listen on %d" % port)


class ProxyServer:
    """A proxy server process; ``proxy()`` is the ``EgressProxy`` that reaches it."""

    scheme = "http"
    connect_marker = ""

    def __init__(self, workdir: str, name: str, user: str = "", password: str = ""):
        self.port = free_port()
        self.user, self.password = user, password
        self.log_path = os.path.join(workdir, name + ".log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.argv(workdir, name), stdout=self._log, stderr=subprocess.STDOUT)
        self._base = 0
        try:
            wait_port(self.port, self.proc)
            # wait_port's own probe connection is not a client's.
            time.sleep(0.1)
            self._base = self.connections()
        except BaseException:
            self.stop()
            raise

    def argv(self, workdir: str, name: str) -> list[str]:
        raise NotImplementedError

    def proxy(self, scheme: str | None = None, password: str | None = None) -> EgressProxy:
        return EgressProxy(
            scheme or self.scheme,
            "127.0.0.1",
            self.port,
            self.user,
            self.password if password is None else password,
        )

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def connections(self) -> int:
        """Client connections the proxy accepted (and logged) so far."""
        return self.log().count(self.connect_marker) - self._base

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


class TinyProxy(ProxyServer):
    """tinyproxy: an HTTP proxy with CONNECT tunnels, optionally with BasicAuth."""

    connect_marker = "Connect (file descriptor"

    def __init__(self, workdir: str, auth: bool = False):
        self.auth = auth
        super().__init__(
            workdir,
            "tinyproxy-auth" if auth else "tinyproxy",
            PROXY_USER if auth else "",
            TINYPROXY_PASSWORD if auth else "",
        )

    def argv(self, workdir: str, name: str) -> list[str]:
        lines = [
            "Port %d" % self.port,
            "Listen 127.0.0.1",
            "Timeout 600",
            # One "Connect (file descriptor N)" line per client connection.
            "LogLevel Connect",
            "MaxClients 200",
            "Allow 127.0.0.1",
        ]
        if self.auth:
            lines.append("BasicAuth %s %s" % (PROXY_USER, TINYPROXY_PASSWORD))
        conf = os.path.join(workdir, name + ".conf")
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        return ["tinyproxy", "-d", "-c", conf]


class MicroSocks(ProxyServer):
    """microsocks: a SOCKS5 server, optionally with user and password."""

    scheme = "socks5"
    # One "client[N] <ip>: connected to <target>" line per connection it relays.
    connect_marker = "connected to"

    def __init__(self, workdir: str, auth: bool = False, hosts: str = ""):
        self.auth = auth
        self.hosts = hosts
        super().__init__(
            workdir,
            "microsocks-auth" if auth else "microsocks",
            PROXY_USER if auth else "",
            SOCKS_PASSWORD if auth else "",
        )

    def argv(self, workdir: str, name: str) -> list[str]:
        argv = ["microsocks", "-i", "127.0.0.1", "-p", str(self.port)]
        if self.auth:
            argv += ["-u", PROXY_USER, "-P", SOCKS_PASSWORD]
        if self.hosts:
            # Its own /etc/hosts, in a private mount namespace: names that
            # only the SOCKS side can resolve (for socks5h).
            hosts = os.path.join(workdir, name + ".hosts")
            with open(hosts, "w") as f:
                f.write(self.hosts)
            script = 'mount --bind "$0" /etc/hosts && exec "$@"'
            argv = ["unshare", "--mount", "--map-root-user", "sh", "-c", script, hosts, *argv]
        return argv

    def targets(self) -> list[str]:
        """The ``host:port`` each client asked for, as the SOCKS server logged it."""
        return [
            line.rsplit("connected to ", 1)[1].strip() for line in self.log().splitlines() if "connected to" in line
        ]


def make_tls_files(workdir: str) -> dict[str, str]:
    """A throwaway CA (``ca.pem``) and a certificate it signed for localhost and 127.0.0.1."""
    paths = {name: os.path.join(workdir, name) for name in ("ca.pem", "ca.key", "server.pem", "server.key", "csr")}
    ext = os.path.join(workdir, "san.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=chat_gpt_proxy test CA",
        "-keyout",
        paths["ca.key"],
        "-out",
        paths["ca.pem"],
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        paths["server.key"],
        "-out",
        paths["csr"],
    )
    openssl(
        "x509",
        "-req",
        "-in",
        paths["csr"],
        "-CA",
        paths["ca.pem"],
        "-CAkey",
        paths["ca.key"],
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        ext,
        "-out",
        paths["server.pem"],
    )
    return paths


def server_tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server's TLS context with this certificate chain and key (make_tls_files's)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


def tls_fake(tls: dict[str, str], host_name: str = "127.0.0.1") -> FakeOpenAI:
    """A started fake OpenAI serving HTTPS with ``tls``'s server certificate; the caller stops it."""
    fake = FakeOpenAI(ssl_context=server_tls_context(tls["server.pem"], tls["server.key"]), host_name=host_name)
    fake.start()
    return fake


@contextlib.asynccontextmanager
async def serving(settings):
    """The proxy app with ``settings`` on an unused loopback port; yields (ProxyClient, app)."""
    app = make_app(settings)
    server = make_server(app, settings)
    sock, port = bind_unused_port()
    server.add_sockets([sock])
    client = ProxyClient("http://127.0.0.1:%d" % port)
    try:
        yield client, app
    finally:
        client.close()
        server.stop()
        await server.close_all_connections()
        app.pool.close()


class TlsFront:
    """TLS in front of a plain proxy server: an ``https://`` egress proxy for the tests.

    Runs on the test's IOLoop; each TLS connection is relayed byte for byte to
    ``127.0.0.1:target_port`` (tinyproxy does not speak TLS itself).
    """

    def __init__(self, target_port: int, certfile: str, keyfile: str):
        self.target_port = target_port
        self.context = server_tls_context(certfile, keyfile)
        self.server = None
        self.port = 0

    async def start(self) -> TlsFront:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _relay(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        self.server.close()
        if hasattr(self.server, "close_clients"):
            self.server.close_clients()
