"""The usage page: plain text saying how to call the proxy, at the address the caller used
(GET /usage, GET /chat_complete as the old service did, GET / for anything but a browser)."""

from __future__ import annotations

import re

from chat_gpt_proxy.observability import peer_is_trusted

from .pages import STRINGS, language_of, set_language_headers

# What a Host header may be for the page to show it: a DNS name or an IP
# literal, and a port. Anything else is not reflected.
HOST_RE = re.compile(r"^(?:[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")


def base_url(handler) -> str:
    """The address the caller used: scheme and Host, or X-Forwarded-Proto/Host from a trusted proxy."""
    request = handler.request
    scheme, host = request.protocol, request.headers.get("Host", "")
    if handler.config.trusted_proxies and peer_is_trusted(handler, handler.config.trusted_proxies):
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        if proto in ("http", "https"):
            scheme = proto
        host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip() or host
    if not HOST_RE.match(host) or len(host) > 260:
        host = "127.0.0.1:%d" % handler.config.port
    return "%s://%s" % (scheme if scheme in ("http", "https") else "http", host)


class UsagePageMixin:
    def get(self) -> None:
        """GET /chat_complete: the usage page (the old service showed its README here), in the language
        of ``Accept-Language`` (static/i18n/*.json, "usage.text")."""
        language = language_of(self.request)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        set_language_headers(self, language)
        self.finish(usage_text(language, base_url(self)))


def usage_text(language: str, url: str) -> str:
    return "\n".join(STRINGS[language]["usage.text"]).replace("{base_url}", url) + "\n"
