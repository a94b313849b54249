"""The upstream URL of a /v1 path: one normalised path for every check and for the upstream."""

from __future__ import annotations

import re
import string
import urllib.parse

from .egress import valid_host

# Characters allowed in a relayed path or query (RFC 3986 pchar, '/', '?').
SAFE_PATH_RE = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")

SAFE_QUERY_RE = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*$")

_ESCAPE_RE = re.compile(r"%([0-9A-Fa-f]{2})")

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


def _normalise_escape(match: re.Match) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def normalised_path(raw_path: str) -> str | None:
    """The path after ``/v1/`` as both the allow-list check and the upstream see it, or None if refused.

    Escapes of unreserved characters are decoded and the others written in
    upper case (RFC 3986 section 6.2.2): the upstream decodes ``re%73ponses``
    to ``responses`` before routing, so the check must read it so too, and
    what is forwarded is the normalised path, never the raw one.
    Refused: characters outside RFC 3986 ``pchar``, a ``%`` that starts no
    escape, encoded slashes, backslashes and NUL, dot segments (also encoded)
    and empty segments; whatever the client sends, the request goes to
    ``OPENAI_BASE_URL``'s host and under its path (no SSRF).
    """
    if not SAFE_PATH_RE.match(raw_path):
        return None
    path = _ESCAPE_RE.sub(_normalise_escape, raw_path)
    if "%" in _ESCAPE_RE.sub("", path):
        return None
    if "%2F" in path or "%5C" in path or "%00" in path:
        return None
    if any(segment in ("", ".", "..") for segment in path.split("/")):
        return None
    return path


def upstream_url(base_url: str, path: str, query: str) -> str | None:
    """``base_url`` + the normalised ``path`` after ``/v1`` + the query, or None if either is refused."""
    path = normalised_path(path)
    return None if path is None else join_url(base_url, path, query)


def join_url(base_url: str, normalised: str, query: str) -> str | None:
    """``base_url`` + a path ``normalised_path`` returned + the query, or None if the query is refused."""
    if not SAFE_QUERY_RE.match(query):
        return None
    return base_url + "/" + normalised + ("?" + query if query else "")


def check_base_url(url: str, shown: str) -> str:
    """An upstream's base URL, ``http(s)://host[:port][/path]``, to which the API's paths are appended;
    ``ValueError`` with a message that quotes only ``shown`` (the URL with any password masked)."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"must start with http:// or https://, got {shown!r}")
    if re.search(r"[\x00-\x20\x7f]", url):
        raise ValueError(f"holds a space or a control character: {shown!r}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        # Python's message may quote a piece of a password: not shown.
        raise ValueError(f"not a valid URL (its port?): {shown!r}") from None
    if "@" in parts.netloc:
        # Keys go in each request's header; credentials here would be sent
        # with every request and printed in the startup line.
        raise ValueError("must not hold a user or password (the value is not shown)")
    if "?" in url or "#" in url:
        # The API's paths are appended: ".../v1?a=b" would become ".../v1?a=b/chat/completions".
        # Not quoted: a query is where a key would sit (?api-key=...).
        raise ValueError("must not hold a query or fragment ('?' or '#'; the value is not shown)")
    if not parts.hostname:
        raise ValueError(f"no host in {shown!r}")
    if not valid_host(parts.hostname):
        raise ValueError(f"{parts.hostname!r} is not a valid host name or IP address")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"the port must be between 1 and 65535, got {port}")
    return url


def mask_webhook(url: str) -> str:
    """A webhook URL for logs: its scheme and host; its path and query (often the secret) hidden."""
    if not url:
        return ""
    parts = urllib.parse.urlsplit(url)
    port = ":%d" % parts.port if parts.port else ""
    return "%s://%s%s/***" % (parts.scheme, parts.hostname or "", port)
