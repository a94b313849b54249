"""CORS: which browser origins may call the proxy directly, and the headers that tell the browser so.

The policy follows the Fetch standard's CORS protocol
(https://fetch.spec.whatwg.org/#http-cors-protocol):

- ``CORS_ALLOW_ORIGINS`` empty (the default): no CORS header at all, so a
  browser page on another origin cannot read any answer, and its preflights
  fail (they are still answered 204, without the headers).
- an origin listed: that origin is echoed in ``Access-Control-Allow-Origin``
  with ``Vary: Origin``; preflights name the methods, the request headers the
  proxy and the OpenAI SDKs send, and a ``Max-Age``.
- ``*``: any origin, answered with ``*``. Credentials (cookies) are never
  allowed: the proxy authenticates by headers, and ``*`` forbids them anyway.

A preflight never needs the access token: browsers send it without the
request's headers.
"""

from __future__ import annotations

import re

# What a page may read from an answer besides the CORS-safelisted headers:
# the request id for support, and what a client needs to back off.
EXPOSED_HEADERS = (
    "x-request-id",
    "x-proxy-request-id",
    "retry-after",
    "openai-processing-ms",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)
EXPOSED_PREFIX = "x-ratelimit-"

# Request headers a page may send: the proxy's own, those /v1/* forwards, and
# the OpenAI SDKs' x-stainless-* telemetry headers (matched by prefix).
ALLOWED_REQUEST_HEADERS = (
    "access-token",
    "openai-token",
    "authorization",
    "content-type",
    "accept",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "idempotency-key",
    "x-request-id",
)
ALLOWED_HEADER_PATTERN = re.compile(r"x-stainless-[a-z0-9-]{1,64}")

# Chromium caps a cached preflight at 2 hours, Firefox at 24.
MAX_AGE = 7200

# An origin as a browser serialises it: scheme://host[:port], nothing after.
ORIGIN_RE = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


def parse_origins(value: str) -> tuple[str, ...]:
    """The origins of CORS_ALLOW_ORIGINS (comma list); ValueError naming a bad item."""
    origins = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if item != "*":
            item = item.rstrip("/").lower()
            if not ORIGIN_RE.match(item):
                raise ValueError("%r is not an origin like https://app.example.com or *" % item)
        origins.append(item)
    return tuple(origins)


class CorsPolicy:
    def __init__(self, origins: tuple[str, ...]):
        self.any_origin = "*" in origins
        self.origins = frozenset(origins) - {"*"}

    @property
    def enabled(self) -> bool:
        return self.any_origin or bool(self.origins)

    def allowed_origin(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for a request from ``origin``, or None."""
        if not origin:
            return None
        if self.any_origin:
            return "*"
        return origin if origin in self.origins else None

    def response_headers(self, origin: str | None, header_names) -> list[tuple[str, str]]:
        """CORS headers of an actual answer (also errors and streams) that carries ``header_names``."""
        if not self.enabled:
            return []
        # The answer depends on Origin whenever an origin is echoed: caches must know.
        headers = [] if self.any_origin else [("Vary", "Origin")]
        allowed = self.allowed_origin(origin)
        if allowed is None:
            return headers
        exposed = list(EXPOSED_HEADERS)
        for name in header_names:
            lowered = name.lower()
            if lowered.startswith(EXPOSED_PREFIX) and lowered not in exposed:
                exposed.append(lowered)
        headers += [("Access-Control-Allow-Origin", allowed), ("Access-Control-Expose-Headers", ", ".join(exposed))]
        return headers

    def preflight_headers(
        self, origin: str | None, requested_headers: str, methods: list[str]
    ) -> list[tuple[str, str]]:
        """CORS headers of a preflight answer; none (the browser then blocks the call) for an origin not allowed."""
        headers = self.response_headers(origin, ())
        allowed = self.allowed_origin(origin)
        if allowed is None:
            return headers
        allow_headers = list(ALLOWED_REQUEST_HEADERS)
        for name in requested_headers.split(","):
            lowered = name.strip().lower()
            if ALLOWED_HEADER_PATTERN.fullmatch(lowered) and lowered not in allow_headers:
                allow_headers.append(lowered)
        return [
            *(h for h in headers if h[0] != "Access-Control-Expose-Headers"),
            ("Access-Control-Allow-Methods", ", ".join(methods)),
            ("Access-Control-Allow-Headers", ", ".join(allow_headers)),
            ("Access-Control-Max-Age", str(MAX_AGE)),
        ]
