"""Public pages: the usage page and the health check (no access token needed)."""

from __future__ import annotations

from .base import BaseHandler, dumps

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
  curl -s http://HOST:9081/chat_complete -H 'access-token: 123456' \\
       -H "openai-token: $OPENAI_API_KEY" -H 'Content-Type: application/json' \\
       -d '{"prompt": "Привет, какая ты версия модели?"}'

GET /healthz: {"status": "ok"}
"""


class UsagePageMixin:
    def get(self) -> None:
        """GET /chat_complete: the usage page (the old service showed its README here)."""
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(USAGE_TEXT)


class UsageHandler(UsagePageMixin, BaseHandler):
    """GET /usage: the usage page."""

    requires_access_token = False


class HealthHandler(BaseHandler):
    requires_access_token = False

    def get(self) -> None:
        """GET /healthz: 200 while the process serves requests."""
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps({"status": "ok"}))


routes = [
    (r"/usage", UsageHandler),
    (r"/healthz", HealthHandler),
]
