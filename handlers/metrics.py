"""GET /metrics: Prometheus text format (chat_gpt_proxy/observability.py keeps the registry)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST

from .base import BaseHandler


class MetricsHandler(BaseHandler):
    requires_access_token = False

    def get(self) -> None:
        """GET /metrics: Prometheus text format."""
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.application.metrics.render())


routes = [(r"/metrics", MetricsHandler)]
