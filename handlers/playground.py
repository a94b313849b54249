"""GET /: the playground page for browsers; other clients get the usage text."""

from __future__ import annotations

import uuid

from tornado.web import StaticFileHandler

from chat_gpt_proxy import tornado_internals as internals
from chat_gpt_proxy.request.strict_json import dumps

from .base import BaseHandler
from .pages import PAGE_HEADERS, render_page
from .pages import STATIC_DIR as STATIC_DIR  # where server.py finds the templates and static files
from .usage_page import UsagePageMixin


class PlaygroundHandler(UsagePageMixin, BaseHandler):
    requires_access_token = False

    def get(self) -> None:
        """GET /: the playground for a browser (Accept: text/html), the usage text for anything else."""
        if "text/html" not in self.request.headers.get("Accept", ""):
            super().get()
            return
        render_page(
            self,
            "playground.html",
            ("playground",),
            demo=self.config.demo_upstream,
            default_token=self.config.default_token_in_use,
        )


class StaticHandler(StaticFileHandler):
    """The page's CSS and JS: versioned URLs (?v=<content hash>) cached for a year by Tornado."""

    def set_default_headers(self) -> None:
        for name, value in PAGE_HEADERS.items():
            self.set_header(name, value)
        # Every response carries a request id, static files too.
        request_id = uuid.uuid4().hex
        self.set_header("x-request-id", request_id)
        self.set_header("x-proxy-request-id", request_id)

    def options(self, *args, **kwargs) -> None:
        """204 with Allow, as on every route."""
        self.set_status(204)
        self.set_header("Allow", "GET, HEAD, OPTIONS")
        self.finish()

    def write_error(self, status_code: int, **kwargs) -> None:
        """Errors as JSON, as everywhere else; a 405 names what is allowed (RFC 9110 section 15.5.6)."""
        if status_code == 405:
            self.set_header("Allow", "GET, HEAD, OPTIONS")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        message = (
            "Method %s is not allowed here." % self.request.method if status_code == 405 else internals.reason(self)
        )
        code = "method_not_allowed" if status_code == 405 else None
        error = {"message": message, "type": "invalid_request_error", "code": code, "param": None}
        self.finish(dumps({"status": "error", "text": message, "error": error}))


routes = [(r"/", PlaygroundHandler)]
