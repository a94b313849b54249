"""GET /: the playground page for browsers (issue 7); other clients get the usage text."""

from __future__ import annotations

import os

from tornado.web import StaticFileHandler

from .info import UsageHandler

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")

# No inline script or style, nothing from other hosts, no framing (issue 7).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class PlaygroundHandler(UsageHandler):
    def get(self) -> None:
        """GET /: the playground for a browser (Accept: text/html), the usage text for anything else."""
        if "text/html" not in self.request.headers.get("Accept", ""):
            super().get()
            return
        for name, value in PAGE_HEADERS.items():
            self.set_header(name, value)
        self.set_header("Cache-Control", "no-cache")
        self.render("playground.html", demo=self.config.demo_upstream, default_token=self.config.default_token_in_use)


class StaticHandler(StaticFileHandler):
    """The page's CSS and JS: versioned URLs (?v=<content hash>) cached for a year by Tornado."""

    def set_default_headers(self) -> None:
        for name, value in PAGE_HEADERS.items():
            self.set_header(name, value)


routes = [(r"/", PlaygroundHandler)]
