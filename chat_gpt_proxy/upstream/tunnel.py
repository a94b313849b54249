"""A TCP tunnel to an upstream host through the egress proxy, for upstream legs libcurl does not carry.

libcurl carries every HTTP call (chat_gpt_proxy/upstream/call.py); the realtime
relay's WebSocket (chat_gpt_proxy/realtime/session.py) is opened by the ``websockets``
library, which gets the byte pipe to the upstream's host and port from here,
opened through ``settings.upstream_egress``:

- ``http://`` and ``https://`` (TLS to the proxy itself, verified with the
  system's CAs or UPSTREAM_CA_FILE, as libcurl's PROXY_CAINFO does): a CONNECT
  tunnel (RFC 9110 section 9.3.6). Opened here rather than by websockets, whose
  strict parser refuses a CONNECT answered with "HTTP/1.0 200" (tinyproxy's);
- ``socks5://`` (the name resolved here) and ``socks5h://`` (resolved by the
  proxy): python-socks.

Failures are ``UpstreamError``s with the HTTP path's kinds, so a client sees
the same 502 codes: ``proxy_unreachable`` (no TCP or TLS connection to the
proxy), ``proxy_auth`` (credentials refused: HTTP 401/407, SOCKS5
authentication), ``proxy_failed`` (the proxy could not reach the upstream).
Messages name the setting the proxy came from; ``detail`` (for the operator's
log line) the masked address. Neither ever holds the credentials.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy as SocksProxy

from chat_gpt_proxy.upstream.egress import EgressProxy
from chat_gpt_proxy.upstream.errors import PROXY_MESSAGES, UpstreamError
from chat_gpt_proxy.upstream.headers import USER_AGENT

# A proxy's answer to CONNECT: the status line and headers, never a body on success.
MAX_CONNECT_ANSWER = 16384
STATUS_RE = re.compile(rb"^HTTP/1\.[01] ([0-9]{3})[ \r]")
# python-socks' wording of a SOCKS5 server refusing our credentials (or our lack of them).
SOCKS_AUTH_RE = re.compile(r"authentication", re.I)


def proxy_error(kind: str, proxy: EgressProxy, why: str) -> UpstreamError:
    """The ``UpstreamError`` for a fault of the egress proxy; ``why`` goes to the log line only."""
    detail = "proxy=%s from %s error=%r" % (proxy.masked(), proxy.source, why[:200])
    return UpstreamError(kind, PROXY_MESSAGES[kind] % proxy.source, detail=detail)


async def open_tunnel(proxy: EgressProxy, host: str, port: int, ca_file: str = "") -> asyncio.Transport:
    """A transport connected to ``host:port`` through ``proxy``, reading paused; raises ``UpstreamError``.

    The caller sets its own protocol on it (and starts TLS to the upstream if
    it needs to), then resumes reading. The caller bounds the time it takes.
    """
    if proxy.scheme in ("socks5", "socks5h"):
        return await _socks_tunnel(proxy, host, port)
    return await _connect_tunnel(proxy, host, port, ca_file)


class _Held(asyncio.Protocol):
    """Holds a tunnel until its user takes it over: reads nothing meanwhile."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()


class _ConnectAnswer(asyncio.Protocol):
    """Sends CONNECT and collects the proxy's answer head; then reads no further."""

    def __init__(self, request: bytes):
        self.request = request
        self.head = bytearray()
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end >= 0:
            self.transport.pause_reading()
            # The upstream speaks only after us (HTTP upgrade, TLS ClientHello):
            # bytes after the head are the proxy's own (an error page's body).
            self.answer.set_result(bytes(self.head[: end + 4]))
        elif len(self.head) > MAX_CONNECT_ANSWER:
            self.answer.set_exception(EOFError("answer head too long"))

    def eof_received(self) -> bool:
        self.connection_lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(EOFError("the proxy closed the connection"))


def connect_request(proxy: EgressProxy, host: str, port: int) -> bytes:
    authority = "%s:%d" % ("[%s]" % host if ":" in host else host, port)
    lines = ["CONNECT %s HTTP/1.1" % authority, "Host: %s" % authority, "User-Agent: %s" % USER_AGENT]
    if proxy.username or proxy.password:
        credentials = ("%s:%s" % (proxy.username, proxy.password)).encode("utf-8")
        lines.append("Proxy-Authorization: Basic %s" % base64.b64encode(credentials).decode("ascii"))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


async def _connect_tunnel(proxy: EgressProxy, host: str, port: int, ca_file: str) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    protocol = _ConnectAnswer(connect_request(proxy, host, port))
    tls = None
    if proxy.scheme == "https":
        tls = ssl.create_default_context(cafile=ca_file or None)
    try:
        transport, _ = await loop.create_connection(
            lambda: protocol, proxy.host, proxy.port, ssl=tls, server_hostname=proxy.host if tls else None
        )
    except ssl.SSLCertVerificationError as exc:
        raise UpstreamError(
            "tls",
            "the egress proxy's TLS certificate could not be verified: check %s and UPSTREAM_CA_FILE" % proxy.source,
            detail="proxy=%s from %s error=%r" % (proxy.masked(), proxy.source, exc.verify_message),
        ) from None
    except OSError as exc:  # ssl.SSLError included: no TLS connection to the proxy
        raise proxy_error("proxy_unreachable", proxy, str(exc)) from None
    try:
        head = await protocol.answer
    except EOFError as exc:
        transport.abort()
        raise proxy_error("proxy_failed", proxy, str(exc)) from None
    except BaseException:
        transport.abort()
        raise
    match = STATUS_RE.match(head)
    status = int(match.group(1)) if match else 0
    if not 200 <= status < 300:
        transport.abort()
        # tinyproxy answers a refused Proxy-Authorization with 401, not 407 (as on the HTTP path).
        kind = "proxy_auth" if status in (401, 407) else "proxy_failed"
        raise proxy_error(kind, proxy, "CONNECT answered %d" % status if status else "not an HTTP answer")
    return transport


async def _socks_tunnel(proxy: EgressProxy, host: str, port: int) -> asyncio.Transport:
    socks = SocksProxy(
        ProxyType.SOCKS5,
        proxy.host,
        proxy.port,
        proxy.username or None,
        proxy.password or None,
        # socks5h: the proxy resolves the name; socks5: we do, and send it the address.
        rdns=proxy.scheme == "socks5h",
    )
    try:
        sock = await socks.connect(host, port)
    except ProxyConnectionError as exc:
        raise proxy_error("proxy_unreachable", proxy, str(exc)) from None
    except ProxyTimeoutError:
        raise UpstreamError("timeout", "could not connect to the upstream in time") from None
    except ProxyError as exc:
        if exc.error_code is None and SOCKS_AUTH_RE.search(str(exc)):
            raise proxy_error("proxy_auth", proxy, str(exc)) from None
        # A SOCKS5 reply code (host unreachable, connection refused...) or a broken answer.
        raise proxy_error("proxy_failed", proxy, str(exc)) from None
    except OSError:
        # socks5: resolving the upstream's name here failed.
        raise UpstreamError(
            "connect",
            "could not resolve the upstream's host name %s here; with socks5h:// the SOCKS server resolves it" % host,
        ) from None
    try:
        transport, _ = await asyncio.get_running_loop().create_connection(_Held, sock=sock)
    except BaseException:
        sock.close()
        raise
    return transport
