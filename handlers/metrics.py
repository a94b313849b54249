"""GET /metrics: Prometheus text format (chat_gpt_proxy/observability.py keeps the registry)."""

from __future__ import annotations

import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST

from .base import BaseHandler
from .errors import ApiError


class MetricsHandler(BaseHandler):
    requires_access_token = False

    def get(self) -> None:
        """GET /metrics: Prometheus text format; with several workers, where each one's is."""
        config = self.config
        if config.workers > 1:
            # One worker's counters here would look like the whole's: never that.
            first, last = config.worker_metrics_port, config.worker_metrics_port + config.workers - 1
            raise ApiError(
                404,
                "With WORKERS=%d each worker serves its own /metrics on ports %d-%d (WORKER_METRICS_PORT): "
                "scrape those and sum them." % (config.workers, first, last),
                code="metrics_per_worker",
            )
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.application.metrics.render())


class WorkerMetricsHandler(tornado.web.RequestHandler):
    """GET /metrics on one worker's own port (WORKER_METRICS_PORT + its index)."""

    def initialize(self, metrics, worker: int) -> None:
        self.metrics = metrics
        self.worker = worker

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.set_header("x-proxy-worker", str(self.worker))
        self.finish(self.metrics.render())


routes = [(r"/metrics", MetricsHandler)]
