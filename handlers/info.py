"""Public pages: the usage page and the health check (no access token needed)."""

from __future__ import annotations

from .base import ApiError, BaseHandler, dumps

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

GET /healthz: {"status": "ok"} while the process runs
GET /readyz:  {"status": "ready"}, or 503 {"status": "draining", ...} once it is shutting down
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


class ReadyHandler(BaseHandler):
    """GET /readyz: whether a load balancer should send this instance new requests (issue 14).

    Liveness (/healthz) stays 200 until the process exits, so nothing restarts
    an instance that is finishing its streams; readiness turns 503 as soon as
    SIGTERM or SIGINT arrives (server.py sets ``draining``), while the process
    still serves for SHUTDOWN_DELAY seconds, so that the balancer stops sending
    requests before the instance stops accepting them.
    """

    requires_access_token = False

    def get(self) -> None:
        if self.settings.get("draining"):
            raise ApiError(503, "Shutting down: this instance takes no new requests.", "server_error", code="draining")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps({"status": "ready"}))

    def error_body(self, status: int, message: str, error: dict) -> dict:
        return {**super().error_body(status, message, error), "status": "draining"}


routes = [
    (r"/usage", UsageHandler),
    (r"/healthz", HealthHandler),
    (r"/readyz", ReadyHandler),
]
