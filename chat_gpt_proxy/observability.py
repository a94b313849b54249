"""Access log and Prometheus metrics (issue 3); /metrics is served by handlers/metrics.py.

One log line per request, never with a prompt, an answer, a token or a key.
Metrics live in a registry per application, so tests see only their own.
Usage per token (issue 13): the ``token`` field and label carry the token's
name from ACCESS_TOKENS_FILE, or ``-``, so label values stay bounded.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

access_log = logging.getLogger("chat_gpt_proxy.access")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("proxy_requests", "Requests answered", ["route", "status", "token"], registry=r)
        self.in_flight = Gauge("proxy_in_flight_requests", "Requests being served", registry=r)
        self.streams = Gauge("proxy_open_streams", "SSE streams being relayed", registry=r)
        self.upstream_latency = Histogram(
            "proxy_upstream_response_seconds",
            "Time until the upstream's headers",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "proxy_stream_first_byte_seconds",
            "Time to the first streamed byte sent to the client",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "proxy_added_seconds",
            "Time the proxy adds to a JSON request (total minus upstream)",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("proxy_tokens", "Tokens reported by the upstream", ["model", "kind", "token"], registry=r)
        self.limited = Counter("proxy_limited", "Requests refused by a limit", ["limit", "token"], registry=r)
        self.upstream_errors = Counter("proxy_upstream_errors", "Upstream failures", ["kind"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def client_address(handler, trusted) -> str:
    """The caller's address; X-Forwarded-For counts only when the peer is a trusted proxy."""
    peer = handler.request.remote_ip or "-"
    forwarded = handler.request.headers.get("X-Forwarded-For")
    if not forwarded or not trusted:
        return peer
    try:
        if not any(ipaddress.ip_address(peer) in net for net in trusted):
            return peer
        # The right-most address not belonging to a trusted proxy is the client.
        for hop in reversed([h.strip() for h in forwarded.split(",")]):
            address = ipaddress.ip_address(hop)
            if not any(address in net for net in trusted):
                return str(address)
    except ValueError:
        return peer
    return peer


def _ms(seconds) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def log_request(handler) -> None:
    """Tornado's ``log_function``: the access log line and the request metrics."""
    config = handler.settings["config"]
    now = time.monotonic()
    started = getattr(handler, "started", now)
    call = getattr(handler, "upstream_call", None)
    status = handler.get_status()
    route = getattr(handler, "route_name", "other")
    upstream_s = call.headers_at - call.started_at if call is not None and call.headers_at else None
    first_byte = getattr(handler, "first_byte_at", None)
    ttfb_s = first_byte - started if first_byte else None
    usage = getattr(handler, "usage", None)
    model = getattr(handler, "model", None)
    entry = getattr(handler, "token", None)
    token = entry.name if entry is not None else "-"
    record = {
        "request_id": getattr(handler, "request_id", "-"),
        # OpenAI's id for the same request (what its support asks for).
        "upstream_request_id": call.headers.get("x-request-id") if call is not None else None,
        "client": client_address(handler, config.trusted_proxies),
        "token": token,
        "method": handler.request.method,
        "path": handler.request.path[:200],
        "status": status,
        "ms": _ms(now - started),
        "upstream_ms": _ms(upstream_s),
        "ttfb_ms": _ms(ttfb_s),
        "model": model,
        "prompt_tokens": usage.get("prompt_tokens") if isinstance(usage, dict) else None,
        "completion_tokens": usage.get("completion_tokens") if isinstance(usage, dict) else None,
        "bytes": getattr(handler, "bytes_out", 0),
    }
    if access_log.isEnabledFor(logging.INFO):  # formatting costs time on every request
        if config.log_format == "json":
            access_log.info(json.dumps(record, ensure_ascii=False))
        else:
            access_log.info(" ".join("%s=%s" % (k, "-" if v is None else v) for k, v in record.items()))

    metrics: Metrics | None = handler.settings.get("metrics")
    if metrics is None:
        return
    metrics.requests.labels(route, str(status), token).inc()
    if upstream_s is not None:
        metrics.upstream_latency.labels(route).observe(upstream_s)
    if ttfb_s is not None:
        metrics.ttft.labels(route).observe(ttfb_s)
    elif call is not None and call.finished_at is not None and not call.stream:
        metrics.overhead.labels(route).observe(max(0.0, (now - started) - (call.finished_at - call.started_at)))
    if isinstance(usage, dict) and isinstance(model, str):
        for kind in ("prompt_tokens", "completion_tokens"):
            if isinstance(usage.get(kind), int):
                metrics.tokens.labels(model, kind.split("_")[0], token).inc(usage[kind])
    limited = getattr(handler, "limited", None)
    if limited:
        metrics.limited.labels(limited, token).inc()
    kind = getattr(handler, "upstream_failure", None)
    if kind:
        metrics.upstream_errors.labels(kind).inc()
