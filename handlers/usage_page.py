"""The usage page: plain text saying how to call the proxy, at the address the caller used
(GET /usage, GET /chat_complete as the old service did, GET / for anything but a browser)."""

from __future__ import annotations

import re

from chat_gpt_proxy.observability import peer_is_trusted

# What a Host header may be for the page to show it: a DNS name or an IP
# literal, and a port. Anything else is not reflected.
HOST_RE = re.compile(r"^(?:[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")


USAGE_TEXT = """chat_gpt_proxy: a proxy for the OpenAI chat API.

POST /chat_complete
  headers: access-token: <this proxy's access token>
           openai-token: <your OpenAI API key>
  body:    {"prompt": "Hello"}                      or
           {"messages": [{"role": "user", "content": "Hello"}]}
           optional "generate_params": {"model_name": "gpt-4o-mini", "max_tokens": 100,
                                        "temperature": 0.7, "stream": false, ...}
  answer:  OpenAI's JSON plus "text" (the reply) and "status": "ok";
           with "stream": true, a Server-Sent-Events stream relayed as it arrives.
  errors:  {"status": "error", "text": "...", "error": {"message", "type", "code"}}

Example:
  curl -s BASE_URL/chat_complete -H 'access-token: 123456' \\
       -H "openai-token: $OPENAI_API_KEY" -H 'Content-Type: application/json' \\
       -d '{"prompt": "Привет, какая ты версия модели?"}'

OpenAI SDKs: base_url="BASE_URL/v1", your OpenAI key as the API key,
  and the header access-token: <this proxy's access token>.

GET /healthz: {"status": "ok"} while the process runs (with REDIS_URL, also "redis": "up" or "down")
GET /readyz:  {"status": "ready"}, or 503 {"status": "draining", ...} once it is shutting down
"""


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
        """GET /chat_complete: the usage page (the old service showed its README here)."""
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(USAGE_TEXT.replace("BASE_URL", base_url(self)))
