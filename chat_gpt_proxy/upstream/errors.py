"""What can go wrong on the upstream leg, in one vocabulary: ``UpstreamError`` and its kinds,
and ``classify``, which reads a libcurl failure. Shared by the HTTP call, the tunnel and the realtime connect."""

from __future__ import annotations

import re
import urllib.parse

# libcurl error codes (curl/curl.h) that mean something to a client.
CURLE_COULDNT_RESOLVE_PROXY = 5

CURLE_COULDNT_RESOLVE_HOST = 6

CURLE_COULDNT_CONNECT = 7

CURLE_WRITE_ERROR = 23

CURLE_OPERATION_TIMEDOUT = 28

CURLE_SSL_CONNECT_ERROR = 35

CURLE_ABORTED_BY_CALLBACK = 42

CURLE_PEER_FAILED_VERIFICATION = 60

CURLE_PROXY = 97  # any SOCKS failure (libcurl >= 7.73)

# How libcurl 8 words the failures that tell a proxy's fault from the
# upstream's (measured against tinyproxy and microsocks, see
# tests/test_egress_proxies.py): the CONNECT answer's status, a SOCKS5
# server refusing our credentials, and timeouts before a connection existed.
CONNECT_FAILED_RE = re.compile(r"CONNECT tunnel failed, response (\d+)")

SOCKS_AUTH_RE = re.compile(r"rejected by the SOCKS5 server|No authentication method was acceptable", re.I)

CONNECT_PHASE_TIMEOUT_RE = re.compile(r"^(Resolving|Connection) timed out", re.I)

PROXY_MESSAGES = {
    "proxy_unreachable": "could not connect to the egress proxy (%s): check that it is running and reachable",
    "proxy_timeout": (
        "the egress proxy (%s) did not open the connection in time: check that it is running and reachable"
    ),
    "proxy_tls": (
        "the egress proxy's TLS certificate could not be verified: check the proxy's name in %s and UPSTREAM_CA_FILE"
    ),
    "proxy_auth": "the egress proxy (%s) refused its credentials: check the user and password in the setting",
    "proxy_failed": "the egress proxy (%s) could not connect to the upstream: check the proxy's own access",
}

# What to try when this machine has no direct route to the upstream: the first error a newcomer
# behind a firewall meets, so it says what to do.
NO_ROUTE_HINT = (
    "if this machine cannot reach it directly, set UPSTREAM_PROXY to an egress proxy; "
    "to try the proxy without OpenAI, run make demo"
)


def upstream_address(url: str) -> str:
    """``host:port`` of an upstream URL, for messages (an upstream's URL holds no credentials)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = "[%s]" % host
    try:
        port = parts.port
    except ValueError:
        port = None
    return "%s:%d" % (host, port or (443 if parts.scheme in ("https", "wss") else 80)) if host else ""


def no_route(kind: str, problem: str, retry_reason: str | None, address: str, direct: bool) -> UpstreamError:
    """A connection to ``address`` (``host:port``) that could not be made; ``direct``: not through a proxy,
    so the message says what to try."""
    message = problem % (" " + address if address else "")
    return UpstreamError(kind, message + (": " + NO_ROUTE_HINT if direct else ""), retry_reason)


class UpstreamError(Exception):
    """The upstream could not give a usable answer.

    ``kind`` is one of: ``connect`` (refused or unresolvable), ``timeout``
    (connect or total timeout), ``idle`` (stream went silent), ``broken``
    (connection failed mid-response), ``aborted`` (we aborted it: client left
    or shutdown), ``tls`` (the upstream's certificate was not trusted),
    ``proxy_unreachable``, ``proxy_auth``, ``proxy_failed``, ``proxy_tls``
    (the egress proxy). The message never contains request data or secrets.

    ``retry_reason`` is set when the request cannot have reached the upstream
    (nothing was sent), so that trying again is safe; ``detail`` is for the
    operator's log line (the masked proxy address and libcurl's words).
    """

    def __init__(self, kind: str, message: str, retry_reason: str | None = None, detail: str = ""):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_reason = retry_reason
        self.detail = detail

    def error_object(self) -> dict:
        """What the client is told, as a JSON error or as a stream's final event."""
        return {"message": self.message, "type": "upstream_error", "code": "upstream_" + self.kind}


def classify(
    errno: int, message: str, status: int, proxy, *, past_proxy: bool = False, address: str = ""
) -> UpstreamError:
    """The ``UpstreamError`` for a libcurl failure.

    ``proxy``: the egress proxy in use, or None; ``past_proxy``: whether the
    connection had got through it to the upstream (see ``past_proxy()``);
    ``address``: the upstream's ``host:port``, named in the message.
    """
    if proxy is not None:
        where = "%s from %s" % (proxy.masked(), proxy.source)
        detail = "proxy=%s curl=%r" % (where, message[:200])
        kind = None
        connect_status = CONNECT_FAILED_RE.search(message)
        if connect_status:
            code = int(connect_status.group(1))
            # tinyproxy answers a refused Proxy-Authorization with 401, not 407.
            kind = "proxy_auth" if code in (401, 407) else "proxy_failed"
            retry = "proxy_failed" if code >= 500 else None
        elif errno == CURLE_PROXY:
            kind = "proxy_auth" if SOCKS_AUTH_RE.search(message) else "proxy_failed"
            retry = "proxy_failed" if kind == "proxy_failed" else None
        elif errno in (CURLE_COULDNT_CONNECT, CURLE_COULDNT_RESOLVE_PROXY):
            # With a proxy, libcurl opens TCP connections only to the proxy.
            kind, retry = "proxy_unreachable", "proxy_unreachable"
        elif past_proxy or status:
            pass  # the upstream's own failure, classified below
        elif errno == CURLE_OPERATION_TIMEDOUT and CONNECT_PHASE_TIMEOUT_RE.search(message):
            # The proxy accepted TCP but did not finish its handshake (CONNECT
            # answer, SOCKS5 reply, TLS): nothing reached the upstream.
            return UpstreamError(
                "proxy_unreachable", PROXY_MESSAGES["proxy_timeout"] % proxy.source, "proxy_unreachable", detail
            )
        elif errno in (CURLE_PEER_FAILED_VERIFICATION, CURLE_SSL_CONNECT_ERROR) and proxy.scheme == "https":
            kind, retry = "proxy_tls", None  # a certificate does not fix itself
        if kind is not None:
            return UpstreamError(kind, PROXY_MESSAGES[kind] % proxy.source, retry, detail)
    direct = proxy is None
    if errno == CURLE_COULDNT_CONNECT:
        return no_route("connect", "could not connect to the upstream%s", "connect_refused", address, direct)
    if errno == CURLE_COULDNT_RESOLVE_HOST:
        host = address.rpartition(":")[0]
        return no_route("connect", "could not resolve the upstream's host name%s", "dns", host, direct)
    if errno == CURLE_OPERATION_TIMEDOUT:
        if status:
            return UpstreamError("timeout", "the upstream did not finish its answer in time")
        if CONNECT_PHASE_TIMEOUT_RE.search(message):
            problem = "could not connect to the upstream%s in time"
            return no_route("timeout", problem, "connect_timeout", address, direct)
        return UpstreamError("timeout", "the upstream did not answer in time")
    if errno == CURLE_PEER_FAILED_VERIFICATION:
        return UpstreamError(
            "tls",
            "the upstream's TLS certificate could not be verified: check OPENAI_BASE_URL and UPSTREAM_CA_FILE",
            detail="curl=%r" % message[:200],
        )
    if errno == CURLE_SSL_CONNECT_ERROR:
        return UpstreamError("tls", "the TLS handshake with the upstream failed", detail="curl=%r" % message[:200])
    return UpstreamError("broken", "the upstream connection failed (curl error %d)" % errno)
