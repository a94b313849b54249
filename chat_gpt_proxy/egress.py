"""The egress proxy: how upstream connections leave this machine (issue 11).

Chosen once at startup: ``UPSTREAM_PROXY`` if set, otherwise the conventional
variables the way curl reads them (``https_proxy``/``HTTPS_PROXY`` for an
https upstream, lower-case ``http_proxy`` only for an http one, then
``all_proxy``/``ALL_PROXY``), and ``no_proxy``/``NO_PROXY`` for hosts that
are reached directly. libcurl would read those variables by itself whenever no
proxy is set on the handle; ``chat_gpt_proxy/upstream.py`` always sets one (or
the empty string, "direct"), so what is logged at startup is what is used.

``EgressProxy.url`` is the plain URL with its credentials, for any other
upstream leg (a WebSocket client) together with ``proxy_for``. Its ``repr``
and ``masked()`` never show the credentials.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import ssl
from collections.abc import Mapping
from urllib.parse import quote, unquote, urlsplit

PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")


class EgressConfigError(ValueError):
    """A bad proxy or CA setting; the message is one line naming the variable."""


@dataclasses.dataclass(frozen=True, repr=False)
class EgressProxy:
    scheme: str
    host: str
    port: int
    username: str = ""
    password: str = ""
    # Where it came from: "UPSTREAM_PROXY" or the environment variable's name.
    source: str = "UPSTREAM_PROXY"

    @property
    def address(self) -> str:
        """The proxy URL without credentials (what libcurl's PROXY option gets)."""
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s:%d" % (self.scheme, host, self.port)

    @property
    def url(self) -> str:
        """The proxy URL with percent-encoded credentials, for other clients."""
        if not self.username and not self.password:
            return self.address
        userinfo = quote(self.username, safe="") + ":" + quote(self.password, safe="")
        return self.address.replace("://", "://" + userinfo + "@", 1)

    @property
    def tunnels(self) -> bool:
        """HTTP(S) proxies are always asked for a CONNECT tunnel (see README)."""
        return self.scheme in ("http", "https")

    def masked(self) -> str:
        """For logs: the credentials replaced by ``***``."""
        if not self.username and not self.password:
            return self.address
        return self.address.replace("://", "://***:***@", 1)

    def __repr__(self) -> str:
        return "EgressProxy(%s from %s)" % (self.masked(), self.source)

    __str__ = __repr__


def parse_proxy_url(value: str, name: str) -> EgressProxy:
    """``scheme://[user:pass@]host:port``; a URL without a scheme is http, as for curl."""
    if "://" not in value:
        value = "http://" + value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise EgressConfigError("%s: not a valid proxy URL (expected scheme://host:port)" % name) from None
    scheme = parts.scheme.lower()
    if scheme not in PROXY_SCHEMES:
        raise EgressConfigError(
            "%s: the scheme must be one of %s, got %r" % (name, ", ".join(s + "://" for s in PROXY_SCHEMES), scheme)
        )
    if not parts.hostname:
        raise EgressConfigError("%s: no host in the proxy URL" % name)
    if port is None:
        # curl's default proxy port is 1080 whatever the scheme: a surprise
        # for an HTTP proxy, so the port must be explicit.
        raise EgressConfigError("%s: give the proxy's port, e.g. %s://%s:3128" % (name, scheme, parts.hostname))
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EgressConfigError("%s: a proxy URL has no path or query" % name)
    return EgressProxy(
        scheme=scheme,
        host=parts.hostname,
        port=port,
        username=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        source=name,
    )


def proxy_from_env(environ: Mapping[str, str], upstream_url: str) -> EgressProxy | None:
    """The proxy for ``upstream_url``: ``UPSTREAM_PROXY``, else the variables curl reads."""
    names = ["UPSTREAM_PROXY"]
    if upstream_url.startswith("https://"):
        names += ["https_proxy", "HTTPS_PROXY"]
    else:
        # curl reads only the lower-case http_proxy (upper case is HTTP_PROXY
        # in CGI environments: "httpoxy").
        names += ["http_proxy"]
    names += ["all_proxy", "ALL_PROXY"]
    for name in names:
        value = (environ.get(name) or "").strip()
        if value:
            return parse_proxy_url(value, name)
    return None


def no_proxy_from_env(environ: Mapping[str, str]) -> tuple[str, ...]:
    for name in ("no_proxy", "NO_PROXY"):  # curl's order
        value = environ.get(name)
        if value is not None and value.strip():
            return tuple(item.strip() for item in value.replace(" ", ",").split(",") if item.strip())
    return ()


def bypasses(host: str, no_proxy: tuple[str, ...]) -> bool:
    """Whether ``host`` is reached directly under NO_PROXY, matched as curl does.

    ``*`` matches every host; a name matches itself and its subdomains (a
    leading dot is ignored); an IP address or CIDR network matches addresses.
    Ports are not compared.
    """
    host = host.lower().strip("[]").rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in no_proxy:
        entry = entry.lower().strip()
        if entry == "*":
            return True
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.lstrip(".").rstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


def proxy_for(url: str, proxy: EgressProxy | None, no_proxy: tuple[str, ...]) -> EgressProxy | None:
    """The proxy a connection to ``url`` goes through, or None for a direct one."""
    if proxy is None:
        return None
    host = urlsplit(url).hostname or ""
    return None if bypasses(host, no_proxy) else proxy


def describe(url: str, proxy: EgressProxy | None, no_proxy: tuple[str, ...]) -> str:
    """The startup log's account of the egress route, credentials masked."""
    if proxy is None:
        return "direct"
    if proxy_for(url, proxy, no_proxy) is None:
        return "direct (the upstream's host is in NO_PROXY; %s from %s not used)" % (proxy.masked(), proxy.source)
    return "%s (from %s)" % (proxy.masked(), proxy.source)


def check_ca_file(path: str, name: str = "UPSTREAM_CA_FILE") -> str:
    """A readable PEM bundle with at least one certificate, or a one-line error."""
    if not os.path.isfile(path):
        raise EgressConfigError("%s: no such file %r" % (name, path))
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise EgressConfigError("%s: cannot read %r (%s)" % (name, path, exc.strerror)) from None
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, ValueError):
        raise EgressConfigError("%s: %r holds no PEM certificate" % (name, path)) from None
    return path
