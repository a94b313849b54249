"""Logging and Prometheus metrics; /metrics is served by handlers/metrics.py.

One access line per request, never with a prompt, an answer, a token or a key.
Every log line is one line whatever a caller sends: text that comes from a
request or from the upstream is escaped. Metrics live in a
registry per application, so tests see only their own.
Usage per token: the ``token`` field and label carry the token's
name from ACCESS_TOKENS_FILE, or ``-``, so label values stay bounded.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import re
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .access.tokens import UNNAMED
from .formats.usage import Usage

access_log = logging.getLogger("chat_gpt_proxy.access")

# The longest text kept from one caller-controlled field (a model name can be
# megabytes of JSON string).
MAX_FIELD_CHARS = 200
# Characters of an access-log field that are printable but would let a value
# pass for several key=value fields, or make the escaping ambiguous.
_FIELD_SPECIALS = re.compile(r'[ ="\\]')

# Distinct ``model`` labels on proxy_tokens_total before the rest become OTHER_MODELS.
MAX_MODEL_LABELS = 100
OTHER_MODELS = "(other)"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


# A caller's x-request-id is logged (as client_request_id) only if it cannot
# smuggle anything into a log line.
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclasses.dataclass
class AccessRecord:
    """One request as its access line and metrics report it: owned by its handler, filled as the
    request goes, written once when it ends (``log_request``, ``log_session``)."""

    route: str = "other"
    request_id: str = "-"
    started: float = dataclasses.field(default_factory=time.monotonic)
    # The access token's name (UNNAMED: a token of ACCESS_TOKEN, or none).
    token: str = UNNAMED
    model: str | None = None
    # What the upstream reported (chat_gpt_proxy/formats), and the model it says ran.
    usage: Usage | None = None
    ran_model: str | None = None
    # The model as the upstream that took the request calls it (an alias resolved).
    upstream_model: str | None = None
    bytes_out: int = 0
    first_byte_at: float | None = None
    # The realtime handshake's duration (an HTTP call's comes from ``call``).
    upstream_ms: float | None = None
    upstream_failure: str | None = None
    # The limit that refused the request, if any.
    limited: str | None = None
    client_gone: bool = False
    # The client left before our status line went out: logged and counted as 499.
    left_before_headers: bool = False
    # The upstream HTTP call, for its timings, its request id and why it was aborted.
    call: object | None = None
    # SSE data events relayed (the output estimate of chat_gpt_proxy/usage/meter.py).
    events: int = 0
    # The name of the upstream that answered (routing.py; "default" without UPSTREAMS_FILE).
    upstream: str | None = None
    # The response cache: "hit", "miss", or None (not used).
    cache: str | None = None
    # The code of the error answered (handlers/errors.py), if one was.
    error_code: str | None = None
    logged: bool = False


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
        self._model_labels: set[str] = set()
        self.limited = Counter("proxy_limited", "Requests refused by a limit", ["limit", "token"], registry=r)
        self.upstream_errors = Counter("proxy_upstream_errors", "Upstream failures", ["kind"], registry=r)
        # Realtime WebSocket sessions; direction is client_to_upstream or upstream_to_client.
        self.realtime_sessions = Gauge("proxy_realtime_open_sessions", "Realtime sessions being relayed", registry=r)
        self.realtime_messages = Counter(
            "proxy_realtime_messages", "Realtime messages relayed", ["direction"], registry=r
        )
        self.realtime_bytes = Counter(
            "proxy_realtime_bytes", "Realtime message bytes relayed", ["direction"], registry=r
        )
        self.realtime_closes = Counter(
            "proxy_realtime_closes",
            "Realtime sessions ended: who closed first (client, upstream, proxy) and the close code",
            ["by", "code"],
            registry=r,
        )
        # Shared limits: failed or skipped Redis calls, by operation.
        self.redis_errors = Counter(
            "proxy_redis_errors",
            "Redis calls of the shared limits that failed or were skipped (fallback to REDIS_FAILURE_MODE)",
            ["op"],
            registry=r,
        )
        self.upstream_retries = Counter("proxy_upstream_retries", "Upstream attempts retried", ["reason"], registry=r)
        # Several upstreams (chat_gpt_proxy/upstream/routing.py), by upstream name.
        self.upstream_requests = Counter(
            "proxy_upstream_requests", "Requests answered, by the upstream that answered", ["upstream"], registry=r
        )
        self.upstream_failures = Counter(
            "proxy_upstream_failures", "Upstream failures counted by its health", ["upstream", "kind"], registry=r
        )
        self._children: dict = {}
        self.upstream_failovers = Counter(
            "proxy_upstream_failovers", "Requests moved on to the next upstream", ["upstream", "reason"], registry=r
        )
        self.upstream_up = Gauge(
            "proxy_upstream_up", "1 while an upstream is in use, 0 while it cools down", ["upstream"], registry=r
        )
        # The response cache (chat_gpt_proxy/cache.py): hits and misses, and what the hits saved.
        self.cache = Counter("proxy_cache", "Requests that used the response cache", ["result", "token"], registry=r)
        self.cache_saved_tokens = Counter(
            "proxy_cache_saved_tokens", "Tokens answered from the cache instead of the upstream", ["token"], registry=r
        )
        self.cache_saved_usd = Counter(
            "proxy_cache_saved_usd", "US dollars the cache's answers would have cost", ["token"], registry=r
        )
        # Spend (chat_gpt_proxy/usage/): money charged per token, and the ledger's write queue.
        self.spend = Counter("proxy_spend_usd", "US dollars charged, by token", ["token"], registry=r)
        self.ledger_queue = Gauge("proxy_usage_queue_rows", "Usage rows waiting for the database", registry=r)
        # Wrong admin tokens (answer "wrong", 403) and attempts refused once an address had too many ("limited", 429).
        self.admin_token_failures = Counter(
            "proxy_admin_token_failures", "Admin requests refused for their token", ["answer"], registry=r
        )
        # Budget alerts (chat_gpt_proxy/console/alerts.py): sent, an attempt that failed and is retried, given up.
        self.budget_alerts = Counter(
            "proxy_budget_alerts", "Budget alerts to ALERT_WEBHOOK_URL, by result", ["result"], registry=r
        )
        self.ledger_dropped = Counter(
            "proxy_usage_rows_dropped", "Usage rows dropped because the ledger's queue was full", registry=r
        )

    def upstream_request(self, name: str):
        """proxy_upstream_requests_total's child for ``name``."""
        return self.child(self.upstream_requests, name)

    def child(self, metric, *labels: str):
        """``metric.labels(*labels)``, looked up once: labels() costs a lock and ~10 calls, and the
        access path asks for four or five children per request (bench/profile.py). Label values are
        bounded as prometheus_client's own children are (routes, statuses, named tokens, model_label)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def model_label(self, model: str) -> str:
        """The ``model`` label of proxy_tokens_total. The caller names the model, so it is
        escaped as in the access log and cut to 100 characters, and without an allow-list
        an upstream that accepts any name would let callers add series at will:
        after MAX_MODEL_LABELS distinct models, the others are counted as ``(other)``."""
        label = escape_field(model[:100])
        if label in self._model_labels:
            return label
        if len(self._model_labels) >= MAX_MODEL_LABELS:
            return OTHER_MODELS
        self._model_labels.add(label)
        return label

    def render(self) -> bytes:
        return generate_latest(self.registry)


def peer_is_trusted(handler, trusted) -> bool:
    """Whether the connection comes from a TRUSTED_PROXIES address (whose X-Forwarded-* headers count)."""
    try:
        peer = ipaddress.ip_address(handler.request.remote_ip)
    except ValueError:
        return False
    return any(peer in net for net in trusted)


def client_address(handler, trusted) -> str:
    """The caller's address; X-Forwarded-For counts only when the peer is a trusted proxy."""
    peer = handler.request.remote_ip or "-"
    forwarded = handler.request.headers.get("X-Forwarded-For")
    if not forwarded or not trusted or not peer_is_trusted(handler, trusted):
        return peer
    try:
        # The right-most address not belonging to a trusted proxy is the client.
        for hop in reversed([h.strip() for h in forwarded.split(",")]):
            address = ipaddress.ip_address(hop)
            if not any(address in net for net in trusted):
                return str(address)
    except ValueError:
        return peer
    return peer


def _escape_char(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return "\\x%02x" % code
    return "\\u%04x" % code if code < 0x10000 else "\\U%08x" % code


def escape_message(text: str) -> str:
    """``text`` on one line: every character ``str.isprintable`` refuses is escaped.

    That is C0 (CR, LF, ...), DEL, C1 (NEL U+0085 too), U+2028/U+2029,
    format characters (bidi overrides) and lone surrogates.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def escape_field(value: str) -> str:
    """One access-log value: one line, and one ``key=value`` field (spaces, ``=``, quotes escaped)."""
    value = value[:MAX_FIELD_CHARS]
    if value.isprintable() and not _FIELD_SPECIALS.search(value):
        return value
    return "".join(c if c.isprintable() and c not in ' ="\\' else _escape_char(c) for c in value)


def _json_escape_char(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return "\\u%04x" % code
    code -= 0x10000
    return "\\u%04x\\u%04x" % (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF))


def json_line(obj) -> str:
    """JSON on one line, readable UTF-8, but with no character that could break or garble a line.

    ``json.dumps`` escapes C0 but, with ``ensure_ascii=False``, leaves DEL, C1,
    U+2028/U+2029 and lone surrogates raw; they can only occur inside strings,
    where ``\\uXXXX`` is their JSON spelling.
    """
    text = json.dumps(obj, ensure_ascii=False, default=str)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _json_escape_char(c) for c in text)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger message``, the message escaped onto one line.

    A record may carry ``traceback_text`` (our own stack frames, never request
    data), which follows on its own lines.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_message(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        trace = getattr(record, "traceback_text", None)
        return text + "\n" + trace.rstrip("\n") if trace else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access lines become objects of their own fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name}
        message = record.getMessage()
        if record.name == access_log.name and message.startswith("{"):
            entry.update(json.loads(message))
        else:
            entry["message"] = message
        trace = getattr(record, "traceback_text", None)
        if trace:
            entry["traceback"] = trace
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json_line(entry)


def _ms(seconds) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _field(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return str(value)
    return escape_field(str(value))


# nginx's status for "client closed request": what the access log and the
# metrics show for a request whose client left before the status line.
CLIENT_CLOSED_STATUS = 499


def how_it_ended(access: AccessRecord) -> str:
    """Why the response ended: ok, client_closed, client_stall, upstream_error or shutdown."""
    reason = access.call.abort_reason if access.call is not None else None
    if reason in ("client_stall", "shutdown"):
        return reason
    if access.client_gone or reason == "client_closed":
        return "client_closed"
    if access.upstream_failure:
        return "upstream_error"
    return "ok"


def client_request_id(request) -> str | None:
    """The caller's own ``x-request-id``, if well formed."""
    given = request.headers.get("x-request-id", "")
    return given if REQUEST_ID_RE.fullmatch(given) else None


def token_counts(usage: Usage | None) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens of a reported usage; None where there is none."""
    return (usage.input_tokens, usage.output_tokens) if usage is not None else (None, None)


def _access_line(config, record: dict) -> None:
    if access_log.isEnabledFor(logging.INFO):  # formatting costs time on every request
        if config.log_format == "json":
            access_log.info(json_line(record))
        else:
            access_log.info(" ".join("%s=%s" % (k, _field(v)) for k, v in record.items()))


def upstream_request_id(headers) -> str | None:
    """The upstream's own id of a request (OpenAI's x-request-id, Anthropic's request-id), cut to a log field."""
    found = headers.get("x-request-id") or headers.get("request-id")
    return found[:MAX_FIELD_CHARS] if found else None


def log_request(handler) -> None:
    """Tornado's ``log_function``: the access log line and the request metrics."""
    # Handlers of Tornado's own (static files) carry no record: an empty one.
    access: AccessRecord = getattr(handler, "access", None) or AccessRecord()
    if access.logged:
        return
    access.logged = True
    status = handler.get_status()
    if status == 101:
        return  # a WebSocket session: logged when it ends (log_session)
    config = handler.application.config
    now = time.monotonic()
    call = access.call
    if access.left_before_headers:
        status = CLIENT_CLOSED_STATUS
    upstream_s = call.headers_at - call.started_at if call is not None and call.headers_at else None
    ttfb_s = access.first_byte_at - access.started if access.first_byte_at else None
    prompt_tokens, completion_tokens = token_counts(access.usage)
    model = access.model[:MAX_FIELD_CHARS] if isinstance(access.model, str) else None
    upstream_id = upstream_request_id(call.headers) if call is not None else None
    token = access.token
    record = {
        "request_id": access.request_id,
        # The upstream's id for the same request (what its support asks for).
        "upstream_request_id": upstream_id,
        "client_request_id": client_request_id(handler.request),
        "client": client_address(handler, config.trusted_proxies),
        "token": token,
        "method": handler.request.method,
        "path": handler.request.path[:MAX_FIELD_CHARS],
        "status": status,
        "ms": _ms(now - access.started),
        "upstream_ms": _ms(upstream_s),
        "ttfb_ms": _ms(ttfb_s),
        "model": model,
        "upstream": access.upstream,
        "cache": access.cache,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "bytes": access.bytes_out,
        "end": how_it_ended(access),
    }
    _access_line(config, record)

    metrics: Metrics | None = handler.application.metrics
    if metrics is None:
        return
    route = access.route
    metrics.child(metrics.requests, route, str(status), token).inc()
    if upstream_s is not None:
        metrics.child(metrics.upstream_latency, route).observe(upstream_s)
    if ttfb_s is not None:
        metrics.child(metrics.ttft, route).observe(ttfb_s)
    elif call is not None and call.finished_at is not None and not call.stream:
        overhead = max(0.0, (now - access.started) - (call.finished_at - call.started_at))
        metrics.child(metrics.overhead, route).observe(overhead)
    if model is not None:
        for kind, count in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            if count is not None:
                metrics.child(metrics.tokens, metrics.model_label(model), kind, token).inc(count)
    if access.limited:
        metrics.limited.labels(access.limited, token).inc()
    if access.upstream_failure:
        metrics.upstream_errors.labels(access.upstream_failure).inc()
    if access.upstream is not None:
        metrics.upstream_request(access.upstream).inc()


def log_session(handler, session) -> None:
    """The access line of a realtime WebSocket session when it ends, and its metrics.

    ``ms`` is the session's whole duration, ``upstream_ms`` the upstream
    handshake, tokens the sums of the ``response.done`` events' usage.
    """
    access: AccessRecord = handler.access
    config = handler.application.config
    response = getattr(handler.upstream, "response", None)
    upstream_id = upstream_request_id(response.headers) if response is not None else None
    usage = session.usage if session.usage_seen else None
    token = access.token
    model = access.model[:MAX_FIELD_CHARS] if isinstance(access.model, str) else None
    record = {
        "request_id": access.request_id,
        "upstream_request_id": upstream_id,
        "client_request_id": client_request_id(handler.request),
        "client": client_address(handler, config.trusted_proxies),
        "token": token,
        "method": handler.request.method,
        "path": handler.request.path[:MAX_FIELD_CHARS],
        "status": 101,
        "ms": _ms(time.monotonic() - access.started),
        "upstream_ms": access.upstream_ms,
        "ttfb_ms": None,
        "model": model,
        "upstream": handler.access.upstream,
        "prompt_tokens": usage["input_tokens"] if usage else None,
        "completion_tokens": usage["output_tokens"] if usage else None,
        "bytes": session.bytes["upstream_to_client"],
        "bytes_in": session.bytes["client_to_upstream"],
        "messages_out": session.messages["upstream_to_client"],
        "messages_in": session.messages["client_to_upstream"],
        "closed_by": session.closed_by,
        "close_code": session.close_code,
        "proxy_reason": session.end_reason,
    }
    _access_line(config, record)
    metrics: Metrics | None = handler.application.metrics
    if metrics is None:
        return
    metrics.requests.labels(access.route, "101", token).inc()
    if usage and model is not None:
        label = metrics.model_label(model)
        metrics.tokens.labels(label, "prompt", token).inc(usage["input_tokens"])
        metrics.tokens.labels(label, "completion", token).inc(usage["output_tokens"])
