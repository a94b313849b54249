"""Which headers cross between the two legs of a request, and the proxy's User-Agent."""

from __future__ import annotations

from tornado.httputil import HTTPHeaders

# Hop-by-hop headers (RFC 9110 section 7.6.1) and those libcurl computes
# itself: never copied between the two connections.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)


# Upstream response headers a client of the proxy may rely on:
# OpenAI's request id for support tickets, and rate-limit information.
RELAYED_RESPONSE_HEADERS = ("x-request-id", "retry-after", "openai-processing-ms")

RELAYED_RESPONSE_PREFIXES = ("x-ratelimit-",)

USER_AGENT = "chat_gpt_proxy/1.0"


def relayed_headers(headers: HTTPHeaders) -> list[tuple[str, str]]:
    return [
        (name, value)
        for name, value in headers.get_all()
        if name.lower() in RELAYED_RESPONSE_HEADERS or name.lower().startswith(RELAYED_RESPONSE_PREFIXES)
    ]


def media_type(headers) -> str:
    """An answer's media type, lower case without parameters: type and subtype are
    case-insensitive (RFC 9110 section 8.3.1), so ``Text/Event-Stream`` is a stream."""
    return headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def is_sse(headers) -> bool:
    return media_type(headers) == "text/event-stream"


def is_json(headers) -> bool:
    """A JSON answer as upstreams label them (application/json, a +json type, text/json)."""
    return "json" in media_type(headers)
