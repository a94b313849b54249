"""The egress proxy: how upstream connections leave this machine.

Chosen once at startup: ``UPSTREAM_PROXY`` if set, otherwise the conventional
variables the way curl reads them (``https_proxy``/``HTTPS_PROXY`` for an
https upstream, lower-case ``http_proxy`` only for an http one, then
``all_proxy``/``ALL_PROXY``), and ``no_proxy``/``NO_PROXY`` for hosts that
are reached directly. libcurl would read those variables by itself whenever no
proxy is set on the handle; ``chat_gpt_proxy/upstream/call.py`` always sets one (or
the empty string, "direct"), so what is logged at startup is what is used.

``EgressProxy.url`` is the plain URL with its credentials, for any other
upstream leg (a WebSocket client) together with ``proxy_for``. Its ``repr``
and ``masked()`` never show the credentials.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import ssl
from collections.abc import Mapping
from urllib.parse import quote, unquote, urlsplit

PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")

# A DNS label (RFC 1123 section 2.1), also with "_", which Docker and
# Compose service names may hold and resolvers accept.
DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def valid_host(host: str) -> bool:
    """A DNS name, an IPv4 address or an IPv6 address (as ``urlsplit`` gives it, without brackets)."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    try:
        ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return False
    name = ascii_host[:-1] if ascii_host.endswith(".") else ascii_host
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        # All digits: an IPv4 address or nothing ("999.1.1.1", "1.2.3").
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return False
        return True
    return all(DNS_LABEL_RE.fullmatch(label) for label in labels)


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
        """HTTP(S) proxies are always asked for a CONNECT tunnel (see docs/deploy.md)."""
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
    if CONTROL_RE.search(value) or " " in value:
        # urlsplit would silently drop a tab or a newline (WHATWG URL rules).
        raise EgressConfigError("%s: holds a space or a control character (the value is not shown)" % name)
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
    if not valid_host(parts.hostname):
        # The host only: the URL may hold a password.
        raise EgressConfigError("%s: %r is not a valid host name or IP address" % (name, parts.hostname))
    if port is None:
        # curl's default proxy port is 1080 whatever the scheme: a surprise
        # for an HTTP proxy, so the port must be explicit.
        raise EgressConfigError("%s: give the proxy's port, e.g. %s://%s:3128" % (name, scheme, parts.hostname))
    if not 1 <= port <= 65535:
        raise EgressConfigError("%s: the proxy's port must be between 1 and 65535, got %d" % (name, port))
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EgressConfigError("%s: a proxy URL has no path or query" % name)
    username, password = unquote(parts.username or ""), unquote(parts.password or "")
    if CONTROL_RE.search(username) or CONTROL_RE.search(password):
        # libcurl would cut the credentials at a NUL or send the control
        # character in a header line. The value itself is never shown.
        raise EgressConfigError(
            "%s: the user or password holds a control character once percent-decoded (the value is not shown)" % name
        )
    return EgressProxy(
        scheme=scheme,
        host=parts.hostname,
        port=port,
        username=username,
        password=password,
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
