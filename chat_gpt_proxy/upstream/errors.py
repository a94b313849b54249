"""What can go wrong on the upstream leg, in one vocabulary: ``UpstreamError`` and its kinds,
and ``classify``, which reads a libcurl failure. Shared by the HTTP call, the tunnel and the realtime connect."""

from __future__ import annotations

import ipaddress
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


# An upstream on this machine or its network (a local model server) that does not answer is down:
# an egress proxy or the demo would not help.
LOCAL_HINTS = {
    "loopback": "the server on this machine is not answering: check that it is running and listens on that port",
    "private": (
        "the server on the local network is not answering: check that it is running, listens on that port "
        "and lets this machine in"
    ),
}


def locality(address: str) -> str:
    """``loopback``, ``private`` or ``""`` (elsewhere, or a name that only DNS can place) for ``host[:port]``."""
    if address.startswith("["):
        host = address[1 : address.find("]")]
    else:
        host = address.rpartition(":")[0] if ":" in address else address
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return "loopback"  # RFC 6761: always this machine
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return ""
    if ip.is_loopback:
        return "loopback"
    return "private" if ip.is_private or ip.is_link_local else ""


def no_route(
    kind: str, problem: str, retry_reason: str | None, address: str, direct: bool, *, resolving: bool = False
) -> UpstreamError:
    """A connection to ``address`` (``host:port``, or the host whose name did not resolve: ``resolving``)
    that could not be made; ``direct``: not through a proxy, so the message says what to try: start the
    local server, or reach a distant one another way. The log's detail names the address."""
    message = problem % (" " + address if address else "")
    if direct:
        local = "" if resolving else locality(address)
        message += ": " + (LOCAL_HINTS[local] if local else NO_ROUTE_HINT)
    return UpstreamError(kind, message, retry_reason, "upstream=%s" % address if address else "")


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
    ``address``: the upstream's ``host:port``, named in the message where it
    helps and always in the detail (the operator's log line: which upstream).
    """
    error = classify_failure(errno, message, status, proxy, past_proxy, address)
    if address and "upstream=" not in error.detail:
        error.detail = ("%s upstream=%s" % (error.detail, address)).lstrip()
    return error


def classify_failure(errno: int, message: str, status: int, proxy, past_proxy: bool, address: str) -> UpstreamError:
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
        return no_route("connect", "could not resolve the upstream's host name%s", "dns", host, direct, resolving=True)
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
