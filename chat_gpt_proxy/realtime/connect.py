"""The realtime relay's upstream WebSocket: opened with the ``websockets`` library (the client the
official SDK uses), because Tornado's ``websocket_connect`` cannot go through an egress proxy; the tunnel
through UPSTREAM_PROXY comes from chat_gpt_proxy/upstream/tunnel.py."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from tornado.httputil import HTTPHeaders
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as _connect
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.uri import parse_uri

from chat_gpt_proxy.upstream.egress import EgressProxy
from chat_gpt_proxy.upstream.errors import PROXY_MESSAGES, UpstreamError, no_route, upstream_address
from chat_gpt_proxy.upstream.headers import USER_AGENT
from chat_gpt_proxy.upstream.tunnel import open_tunnel

# websockets traces every handshake header (the caller's Authorization) and
# every frame (prompts, answers) at DEBUG: our upstream leg logs through this
# logger, which never goes below WARNING whatever the root level.
wire_log = logging.getLogger("chat_gpt_proxy.realtime.wire")
wire_log.setLevel(logging.WARNING)


# Frames websockets buffers from the upstream before it stops reading its socket.
UPSTREAM_QUEUE = 4

# How long a close handshake may take before the connection is dropped.
CLOSE_TIMEOUT = 5.0


class UpstreamRefused(Exception):
    """The upstream answered the WebSocket handshake with an HTTP status instead of 101."""

    def __init__(self, status: int, headers: HTTPHeaders, body: bytes):
        super().__init__("the upstream refused the WebSocket with HTTP %d" % status)
        self.status = status
        self.headers = headers
        self.body = body


class _UpstreamConnect(_connect):
    """websockets' ``connect``, never following a redirect, over a tunnel through the egress proxy if given."""

    def __init__(self, uri: str, *, egress: EgressProxy | None, ca_file: str, **kwargs):
        # proxy=None: websockets would otherwise read the proxy variables of
        # the environment by itself; the egress proxy was decided at startup.
        super().__init__(uri, proxy=None, **kwargs)
        self.egress = egress
        self.ca_file = ca_file
        # Whether the tunnel through the egress proxy stands: a timeout before
        # it is the proxy's fault, not the upstream's.
        self.tunnel_open = False

    # A redirect would send the caller's key to wherever the upstream points:
    # never follow one; the client gets a 502 (connect_upstream).
    def process_redirect(self, exc: Exception) -> Exception:
        return exc

    async def create_connection(self) -> ClientConnection:
        if self.egress is None:
            return await super().create_connection()
        # As websockets itself does for its HTTP proxies (asyncio/client.py),
        # with our tunnel: the connection's protocol on the tunnel's transport,
        # TLS to the upstream started inside it for wss://.
        ws_uri = parse_uri(self.uri)
        transport = await open_tunnel(self.egress, ws_uri.host, ws_uri.port, self.ca_file)
        self.tunnel_open = True
        connection = self.protocol_factory(ws_uri)
        transport.set_protocol(connection)
        if ws_uri.secure:
            # On failure start_tls closes the tunnel itself.
            transport = await asyncio.get_running_loop().start_tls(
                transport, connection, self.connection_kwargs["ssl"], server_hostname=ws_uri.host
            )
            connection.connection_made(transport)
        else:
            connection.connection_made(transport)
            transport.resume_reading()
        return connection


async def connect_upstream(
    url: str,
    headers: dict[str, str],
    subprotocols: list[str],
    *,
    open_timeout: float,
    max_size: int,
    ping_interval: float | None,
    proxy: EgressProxy | None = None,
    ca_file: str = "",
) -> ClientConnection:
    """Open the upstream WebSocket; raises ``UpstreamRefused`` or ``UpstreamError``.

    ``proxy``: ``None`` connects directly; an ``EgressProxy`` (the settings'
    ``upstream_egress``) sends the connection through it. ``ca_file``
    (UPSTREAM_CA_FILE): the CA bundle that verifies a ``wss://`` upstream and
    an ``https://`` proxy, as on the HTTP path; empty: the system's CAs.
    """
    kwargs = {}
    if url.startswith("wss://"):
        kwargs["ssl"] = ssl.create_default_context(cafile=ca_file or None)
    connect = _UpstreamConnect(
        url,
        egress=proxy,
        ca_file=ca_file,
        additional_headers=headers,
        subprotocols=subprotocols or None,
        user_agent_header=USER_AGENT,
        # Messages are relayed as they are; compressing them again costs CPU for nothing.
        compression=None,
        open_timeout=open_timeout,
        max_size=max_size,
        max_queue=UPSTREAM_QUEUE,
        ping_interval=ping_interval or None,
        ping_timeout=ping_interval or None,
        close_timeout=CLOSE_TIMEOUT,
        logger=wire_log,
        **kwargs,
    )
    try:
        return await connect
    except InvalidStatus as exc:
        response = exc.response
        if response.status_code < 400:
            # A 2xx (or a 3xx, which is never followed) is no refusal the client
            # could act on, and relaying it would tell the client the upgrade
            # succeeded: the upstream broke the handshake.
            raise UpstreamError(
                "broken",
                "the upstream answered the WebSocket handshake with HTTP %d instead of 101" % response.status_code,
            ) from None
        relayed = HTTPHeaders()
        for name, value in response.headers.raw_items():
            relayed.add(name, value)
        raise UpstreamRefused(response.status_code, relayed, response.body or b"") from None
    except TimeoutError:
        if proxy is not None and not connect.tunnel_open:
            # As on the HTTP routes: a proxy that never completes its handshake is unreachable.
            raise UpstreamError(
                "proxy_unreachable",
                PROXY_MESSAGES["proxy_timeout"] % proxy.source,
                detail="proxy=%s from %s error='no tunnel within %gs'" % (proxy.masked(), proxy.source, open_timeout),
            ) from None
        raise UpstreamError("timeout", "the upstream did not accept the WebSocket in time") from None
    except ssl.SSLCertVerificationError as exc:
        raise UpstreamError(
            "tls",
            "the upstream's TLS certificate could not be verified: check OPENAI_BASE_URL and UPSTREAM_CA_FILE",
            detail="error=%r" % exc.verify_message,
        ) from None
    except socket.gaierror:
        host = upstream_address(url).rpartition(":")[0]
        problem = "could not resolve the upstream's host name%s"
        raise no_route("connect", problem, None, host, proxy is None, resolving=True) from None
    except OSError:
        address = upstream_address(url)
        raise no_route("connect", "could not connect to the upstream%s", None, address, proxy is None) from None
    except (WebSocketException, EOFError, ValueError):
        raise UpstreamError("broken", "the upstream's WebSocket handshake failed") from None
