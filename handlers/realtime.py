"""/v1/realtime: OpenAI's Realtime API WebSocket, relayed.

Everything that can refuse the session is decided before the client's upgrade
is accepted, so each refusal is an ordinary HTTP status with a JSON error
(never accept-then-close): the access token, the key, ALLOWED_MODELS, the rate
limit, the concurrency cap, and the upstream's own handshake, which is opened
first so that its refusal (401, 403, 404, 429...) reaches the client with the
same status and body. The relay itself is chat_gpt_proxy/realtime/session.py.

Browsers cannot set headers on a WebSocket, so the tokens may also come as
subprotocols: ``access-token.<token>`` and ``openai-insecure-api-key.<key>``
(OpenAI's own form). Neither is selected in the answer nor sent upstream; the
key becomes the upstream ``Authorization`` header.
"""

from __future__ import annotations

import asyncio
import re
import time

import tornado.web
from tornado.websocket import WebSocketHandler, WebSocketProtocol13

from chat_gpt_proxy import tornado_internals as internals
from chat_gpt_proxy.formats.openai import openai_usage
from chat_gpt_proxy.observability import log_session, upstream_request_id
from chat_gpt_proxy.realtime.connect import UpstreamRefused, connect_upstream
from chat_gpt_proxy.realtime.session import CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT, RealtimeSession
from chat_gpt_proxy.request.model import models_in_query, query_pairs
from chat_gpt_proxy.request.strict_json import loads
from chat_gpt_proxy.upstream.errors import UpstreamError
from chat_gpt_proxy.upstream.routing import FAILOVER_STATUSES, KEY_REFUSED_STATUSES
from chat_gpt_proxy.upstream.urls import SAFE_QUERY_RE

from .admission import check_model_allowed, elapsed_ms, take_upstream_slot
from .base import ApiMixin
from .errors import ApiError, mirrored_error
from .openai_style import OpenAIStyle

ACCESS_TOKEN_PROTOCOL = "access-token."  # noqa: S105 (a prefix, not a secret)
API_KEY_PROTOCOL = "openai-insecure-api-key."
# The one subprotocol selected in the answer, when the client offers it.
REALTIME_PROTOCOL = "realtime"
# Sec-WebSocket-Protocol values are HTTP tokens (RFC 6455 section 4.1, RFC 9110 section 5.6.2).
TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,1024}$")
# Request headers an OpenAI client may need upstream; OpenAI-Beta only when the
# client sent it (OpenAI answers the retired beta shape with an error and a close).
FORWARDED_HEADERS = ("OpenAI-Organization", "OpenAI-Project", "OpenAI-Beta")


class ClientProtocol(WebSocketProtocol13):
    """Tornado's protocol, noting the close frames each way, which Tornado does not keep:
    a close frame without a code (1005) and no close frame at all (1006) look alike to
    ``on_close``, yet they are mirrored upstream as 1000 and 1011."""

    close_frame_received = False
    sent_close_code: int | None = None

    # Overrides a private method of Tornado's: see chat_gpt_proxy/tornado_internals.py.
    def _handle_message(self, opcode: int, data: bytes):
        if opcode == 0x8:
            self.close_frame_received = True
        return super()._handle_message(opcode, data)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if not internals.closing_by_server(self) and self.sent_close_code is None:
            self.sent_close_code = code if code is not None else (1000 if reason is not None else 1005)
        super().close(code, reason)


class RealtimeHandler(OpenAIStyle, ApiMixin, WebSocketHandler):
    """GET /v1/realtime?model=...: a WebSocket relayed to OPENAI_BASE_URL/realtime (ws/wss)."""

    route_name = "realtime"

    def initialize(self) -> None:
        self.config = self.application.config
        self.subprotocols: list[str] = []
        self.upstream = None
        self.connecting: asyncio.Future | None = None
        self.client_protocol: ClientProtocol | None = None
        self.session: RealtimeSession | None = None
        # server.py's drain ends whatever a handler in the pool has in flight
        # through ``upstream_call.abort(reason)``: here, the session.
        self.upstream_call = None

    # Limits of the client's side, from the settings.
    @property
    def ping_interval(self) -> float | None:
        return self.config.ws_ping_interval or None

    @property
    def ping_timeout(self) -> float | None:
        return self.config.ws_ping_interval or None

    @property
    def max_message_size(self) -> int:
        return self.config.ws_max_message_bytes

    def get_websocket_protocol(self):
        base = super().get_websocket_protocol()
        if base is None:
            return None
        self.client_protocol = ClientProtocol(self, False, base.params)
        return self.client_protocol

    def check_origin(self, origin: str) -> bool:
        # Pages on any origin may connect: the session is authorised by the tokens
        # the page itself presents, never by cookies, so a foreign page gains
        # nothing it did not already hold (OpenAI accepts any origin the same way).
        return True

    def presented_access_token(self) -> str:
        # The header, else the subprotocol form, and only then the bearer as
        # the access token (an SDK given only base_url and api_key): a client
        # may send its own key as the bearer and the token as a subprotocol.
        if "access-token" not in self.request.headers:
            token = self._from_subprotocol(ACCESS_TOKEN_PROTOCOL)
            if token:
                return token
        return super().presented_access_token()

    def presented_key(self) -> str:
        return super().presented_key() or self._from_subprotocol(API_KEY_PROTOCOL)

    def _from_subprotocol(self, prefix: str) -> str:
        for protocol in self.subprotocols:
            if protocol.startswith(prefix):
                return protocol[len(prefix) :]
        return ""

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        # Browsers fail the handshake if a subprotocol they did not offer comes
        # back, and the tokens must never be echoed: only ``realtime``, if offered.
        return REALTIME_PROTOCOL if REALTIME_PROTOCOL in subprotocols else None

    @property
    def pool(self):
        return self.application.pool

    async def prepare(self) -> None:
        if self.request.method == "OPTIONS":
            return  # options() answers it, as on every route
        headers = self.request.headers
        connection = {item.strip().lower() for item in headers.get("Connection", "").split(",")}
        # Tornado checks "Connection: Upgrade" only after prepare(), with a text answer.
        if headers.get("Upgrade", "").lower() != "websocket" or "upgrade" not in connection:
            raise ApiError(
                400,
                "/v1/realtime is a WebSocket: open it with a WebSocket client (see docs/api.md, Realtime).",
                code="websocket_required",
            )
        if headers.get("Sec-WebSocket-Version") != "13" or not headers.get("Sec-WebSocket-Key"):
            raise ApiError(
                426,
                "WebSocket version 13 is required.",
                code="websocket_version",
                headers={"Sec-WebSocket-Version": "13"},
            )
        offered = headers.get("Sec-WebSocket-Protocol", "")
        self.subprotocols = [p.strip() for p in offered.split(",") if p.strip()]
        if not all(TOKEN_RE.match(p) for p in self.subprotocols):
            raise ApiError(400, "Malformed Sec-WebSocket-Protocol header.", code="invalid_subprotocol")
        pending = self.check_access_token()
        if pending is not None:
            await pending  # shared limits in Redis
        key = self.openai_key()
        # "model" in any letter case and spelling an upstream might accept
        # (";" separators too), as on /v1/*.
        pairs = query_pairs(self.request.query)
        models = models_in_query(pairs)
        self.access.model = models[0] if models else None
        allowed = self.allowed_models()
        if allowed and (len(models) != 1 or ("model", models[0]) not in pairs):
            # Without exactly one plain model=, the upstream would pick a model we did not check.
            raise ApiError(
                400,
                "ALLOWED_MODELS (or the token's allowed_models) is in force: name the model once, as ?model=<model>.",
                "invalid_request_error",
                "model_undetermined",
            )
        check_model_allowed(allowed, self.access.model)
        pending = self.check_budget(self.access.model)
        if pending is not None:
            await pending  # budget counters in Redis
        if not SAFE_QUERY_RE.match(self.request.query):
            raise ApiError(400, "Invalid query string.", "invalid_request_error", "invalid_path")
        # The token subprotocols stay here; the others (realtime, openai-beta.*,
        # openai-organization.*, openai-project.*) mean something to OpenAI.
        upstream_protocols = [
            p for p in self.subprotocols if not p.startswith((ACCESS_TOKEN_PROTOCOL, API_KEY_PROTOCOL))
        ]
        candidates = self.upstream_candidates(self.access.model, realtime=True)
        take_upstream_slot(self, self.pool)
        opened = time.monotonic()
        router = self.application.router
        for index, upstream in enumerate(candidates):
            last = index == len(candidates) - 1
            self.access.upstream = upstream.name
            attempt = router.started(
                upstream, own_key=self.used_server_key, tenant=self.route_tenant(), model=self.access.model
            )
            upstream_headers = upstream.auth_headers(self.upstream_key(upstream, key))
            for name in FORWARDED_HEADERS:
                value = headers.get(name)
                if value is not None:
                    upstream_headers[name] = value
            url = upstream.url("realtime", self.request.query, self.access.model)
            # A task, so that a client leaving meanwhile can cancel it (on_close).
            self.connecting = asyncio.ensure_future(
                connect_upstream(
                    "ws" + url[len("http") :],
                    upstream_headers,
                    upstream_protocols,
                    open_timeout=self.config.connect_timeout,
                    max_size=self.config.ws_max_message_bytes,
                    ping_interval=self.config.ws_ping_interval,
                    # The upstream's egress proxy and CA, as for its HTTP calls.
                    proxy=upstream.egress,
                    ca_file=upstream.ca_file,
                )
            )
            try:
                try:
                    self.upstream = await self.connecting
                except asyncio.CancelledError:
                    # The client left during the handshake: nothing to answer, nothing the upstream did wrong.
                    self.set_status(499, "Client Closed Request")
                    raise tornado.web.Finish() from None
                except UpstreamRefused as exc:
                    attempt.answered(exc.status, exc.headers)
                    failover = exc.status in FAILOVER_STATUSES or (
                        exc.status in KEY_REFUSED_STATUSES and self.used_server_key
                    )
                    if failover and not last:
                        self.note_failover(upstream, "status_%d" % exc.status)
                        continue
                    if exc.status == 401 and self.used_server_key:
                        raise self.server_key_refused() from None
                    try:
                        answer = loads(exc.body)
                    except (ValueError, RecursionError):
                        answer = None
                    raise mirrored_error(exc.status, answer, exc.headers) from None
                except UpstreamError as exc:
                    # A handshake no caller can make slow or break: whatever failed, it was the route.
                    attempt.fault(exc.kind)
                    # Whatever failed before the 101, no session ran: the next upstream may serve it.
                    if not last:
                        self.note_failover(upstream, exc.kind)
                        continue
                    self.note_fault(exc.kind, exc.detail)
                    raise ApiError.from_upstream(exc) from None
                attempt.ok()
                break
            finally:
                attempt.end()
        self.access.upstream_ms = round((time.monotonic() - opened) * 1000, 2)
        if self.access.client_gone:
            # The client left while the upstream was answering.
            await self.upstream.close(1001, "client left")
            self.set_status(499, "Client Closed Request")
            raise tornado.web.Finish()
        # While draining, Tornado closes each connection after its response
        # and says "Connection: close", which would replace the handshake's
        # "Connection: Upgrade" and void it (RFC 6455 section 4.2.2). A session
        # accepted now is ended with 1001 after SHUTDOWN_GRACE like the others.
        internals.close_after_response(self.request, False)

    def options(self, *args, **kwargs) -> None:
        """OPTIONS: 204 with Allow, as on every route (RFC 9110 section 9.3.7); a WebSocket needs no preflight."""
        self.set_status(204)
        self.set_header("Allow", "GET, OPTIONS")
        self.finish()

    def on_finish(self) -> None:
        # Called at the 101 too; only a request that never became a session ends here.
        if self.session is None and self.get_status() != 101:
            self.pool.handlers.discard(self)
            self.release_token()
            if self.upstream is not None:
                self.upstream.transport.abort()

    def open(self) -> None:
        self.set_nodelay(True)
        metrics = self.application.metrics
        if metrics is not None:
            metrics.realtime_sessions.inc()
        self.session = RealtimeSession(
            self, self.upstream, self.config, metrics, self._session_ended, self.allowed_models()
        )
        self.upstream_call = self.session
        self.session.start()

    def on_message(self, message: str | bytes):
        return self.session.from_client(message)

    def on_close(self) -> None:
        if self.session is None:
            # Before the upgrade: the client left while the upstream was connecting;
            # stop connecting (it holds a concurrency slot and a token's place).
            self.access.client_gone = True
            if self.connecting is not None and not self.connecting.done():
                self.connecting.cancel()
            return
        protocol = self.client_protocol
        if protocol.close_frame_received:
            self.session.client_closed(self.close_code or 1005, self.close_reason or "")
        elif protocol.sent_close_code == 1009:
            # Tornado refused a message over WS_MAX_MESSAGE_BYTES.
            self.session.client_closed(1009, "message too big", by="proxy")
        else:
            self.session.client_closed(None, "")

    # What RealtimeSession needs of its client side.

    def client_closing(self) -> bool:
        protocol = self.client_protocol
        return (
            protocol is not None and internals.closing_by_server(protocol) and not internals.closed_by_client(protocol)
        )

    def drop(self) -> None:
        protocol = self.client_protocol
        if protocol is not None and protocol.stream is not None:
            protocol.stream.close()

    def _session_ended(self, session: RealtimeSession) -> None:
        self.pool.handlers.discard(self)
        # A session counts against its token's max_concurrent until it ends.
        self.release_token()
        metrics = self.application.metrics
        if metrics is not None:
            metrics.realtime_sessions.dec()
        self.charge_session(session)
        log_session(self, session)

    def charge_session(self, session: RealtimeSession) -> None:
        """Charge the session's ``response.done`` usage; an estimate if the client sent
        something and no usage came back (it left mid-response, or the upstream failed)."""
        if not self.metered or self.charged:
            return
        self.charged = True
        usage = openai_usage(session.usage_object())
        # A response under way when the session ended ran on unseen: what was
        # reported, plus an estimate of it (chat_gpt_proxy/usage/meter.py).
        in_flight = session.responses_open > 0
        response = getattr(self.upstream, "response", None)
        self.application.spend.charge(
            token=self.access.token,
            route=self.access.route,
            model=self.access.model,
            usage=None if in_flight else usage,
            status=101,
            request_id=self.access.request_id,
            request_bytes=session.bytes[CLIENT_TO_UPSTREAM],
            events=session.in_flight_messages if in_flight else session.messages[UPSTREAM_TO_CLIENT],
            model_call=session.messages[CLIENT_TO_UPSTREAM] > 0,
            partial=usage,
            left_early=in_flight,
            upstream=self.access.upstream,
            latency_ms=elapsed_ms(self.access.started),
            upstream_request_id=upstream_request_id(response.headers) if response is not None else None,
        )
        self.check_alerts()


routes = [(r"/v1/realtime", RealtimeHandler)]
