"""chat_gpt_proxy: a fast, safe proxy for the OpenAI chat API.

``make_app(settings)`` builds the Tornado application (tests and benchmarks
import it); ``main()`` reads the settings from the environment and serves
until SIGTERM or SIGINT, then shuts down gracefully.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import resource
import signal
import ssl
import sys
import time
import weakref

import tornado.httpserver
import tornado.web

from chat_gpt_proxy.limits import RateLimiter
from chat_gpt_proxy.observability import Metrics, log_request
from chat_gpt_proxy.upstream import UpstreamPool
from handlers import routes
from handlers.base import ApiError, BaseHandler
from handlers.metrics import routes as metrics_routes
from handlers.playground import STATIC_DIR, StaticHandler
from settings import Settings, SettingsError

log = logging.getLogger("chat_gpt_proxy")

WANTED_OPEN_FILES = 65536


class NotFoundHandler(BaseHandler):
    """Any other path: a JSON 404, never Tornado's HTML page."""

    requires_access_token = False

    def prepare(self) -> None:
        raise ApiError(404, "No such route: %s. See GET / for usage." % self.request.path[:200], code="not_found")


def make_app(settings: Settings) -> tornado.web.Application:
    pool = UpstreamPool(settings)
    metrics = None
    all_routes = list(routes)
    if settings.metrics_enabled:
        metrics = Metrics()
        metrics.in_flight.set_function(lambda: len(pool.handlers))
        metrics.streams.set_function(lambda: pool.streams)
        all_routes += metrics_routes
    return tornado.web.Application(
        all_routes,
        default_handler_class=NotFoundHandler,
        config=settings,
        pool=pool,
        metrics=metrics,
        rate_limiter=RateLimiter(settings.rate_limit_per_token) if settings.rate_limit_per_token else None,
        # Set on SIGTERM/SIGINT: /readyz answers 503 from then on (issue 14).
        draining=False,
        # Every request handler while it lives, for the drain (weak: nothing to clean up).
        requests=weakref.WeakSet(),
        # Our access log replaces Tornado's: one line, no secrets (issue 3).
        log_function=log_request,
        template_path=STATIC_DIR,
        static_path=STATIC_DIR,
        static_handler_class=StaticHandler,
    )


def make_server(app: tornado.web.Application, settings: Settings) -> tornado.httpserver.HTTPServer:
    ssl_options = None
    if settings.tls_certfile:
        ssl_options = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_options.load_cert_chain(settings.tls_certfile, settings.tls_keyfile)
    return tornado.httpserver.HTTPServer(
        app,
        ssl_options=ssl_options,
        max_body_size=settings.max_body_bytes + 1,
        # A larger header block closes the connection unanswered (Tornado has
        # no 431); 64 KiB is far above any real client's.
        max_header_size=64 * 1024,
        # Bounds for slow or idle clients (slowloris): the body must arrive
        # within BODY_TIMEOUT; headers, and the next request on a keep-alive
        # connection, within CLIENT_IDLE_TIMEOUT.
        body_timeout=settings.body_timeout,
        idle_connection_timeout=settings.client_idle_timeout,
    )


async def stop_being_ready(app: tornado.web.Application, server: tornado.httpserver.HTTPServer, delay: float) -> None:
    """/readyz turns 503 at once; requests are still accepted and served for ``delay`` seconds.

    A load balancer that polls /readyz (Kubernetes, HAProxy, a cloud LB) or an
    endpoint list that updates late needs that time to stop sending new
    requests here before this instance stops listening (issue 14). Every
    request read from now on is answered with ``Connection: close``: a
    balancer that keeps connections alive (nginx's upstream keepalive) would
    otherwise go on sending requests over them, and the last ones would meet
    the close at the end of the drain and fail (seen under load in
    tests/test_load_balancing.py); instead it opens new connections, which
    are refused once this instance stops listening, and it moves on.
    """
    app.settings["draining"] = True
    server.conn_params.no_keep_alive = True
    if delay:
        log.info("shutdown: /readyz answers 503; still serving for SHUTDOWN_DELAY=%gs", delay)
        await asyncio.sleep(delay)


def requests_in_progress(app: tornado.web.Application) -> int:
    """Requests begun and not answered yet, with or without an upstream call.

    ``pool.handlers`` holds only those whose upstream call began; the drain
    waits for the others too (body still arriving, being checked): one that
    came on a kept-alive connection just before the end of the drain was
    otherwise cut by the closing of all connections (nginx: "upstream
    prematurely closed connection", a 502 it must not retry; issue 14).
    """
    return sum(1 for handler in app.settings["requests"] if handler.in_progress())


async def drain(app: tornado.web.Application, grace: float) -> None:
    """Let in-flight requests finish for ``grace`` seconds, then end the rest (issue 3)."""
    pool: UpstreamPool = app.settings["pool"]
    deadline = time.monotonic() + grace
    while (pool.handlers or requests_in_progress(app)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if pool.handlers:
        log.warning("shutdown: ending %d requests still in flight after %gs", len(pool.handlers), grace)
        for handler in list(pool.handlers):
            if handler.upstream_call is not None:
                handler.upstream_call.abort("shutdown")
        deadline = time.monotonic() + 3
        while pool.handlers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name}
        message = record.getMessage()
        if record.name == "chat_gpt_proxy.access":
            entry.update(json.loads(message))
        else:
            entry["message"] = message
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)


def raise_fd_limit() -> None:
    """Thousands of streams need two descriptors each (client and upstream).

    The soft limit is often 1024: raise it to the hard limit. A privileged
    process may raise the hard limit too, so it asks for at least 65,536.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        wanted = [(1 << 20, hard)]
    else:
        wanted = [(max(hard, WANTED_OPEN_FILES), max(hard, WANTED_OPEN_FILES)), (hard, hard)]
    for limits in wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        except (ValueError, OSError):
            continue
        if limits[0] != soft:
            log.info("open-files limit raised from %d to %d", soft, limits[0])
        return
    log.warning("could not raise the open-files limit from %d", soft)


async def start_demo_upstream(settings: Settings) -> Settings:
    """DEMO_UPSTREAM=true: answers come from the built-in fake OpenAI (issue 7)."""
    from chat_gpt_proxy.fake_openai import FakeOpenAI

    fake = FakeOpenAI(default_delay=0.08)
    fake.start()
    log.warning(
        "DEMO MODE: requests go to the built-in fake OpenAI at %s, not to %s", fake.url, settings.openai_base_url
    )
    return dataclasses.replace(settings, openai_base_url=fake.url)


async def serve(settings: Settings) -> None:
    if settings.demo_upstream:
        settings = await start_demo_upstream(settings)
    app = make_app(settings)
    server = make_server(app, settings)
    # A burst of new streams must not overflow the accept queue (default 128):
    # a dropped SYN costs the client a one-second retransmit.
    server.listen(settings.port, settings.host, backlog=4096)
    scheme = "https" if settings.tls_certfile else "http"
    log.info("listening on %s://%s:%d", scheme, settings.host, settings.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await stop_being_ready(app, server, settings.shutdown_delay)
    pool: UpstreamPool = app.settings["pool"]
    log.info("shutdown: no new connections; %d requests in flight", len(pool.handlers))
    server.stop()
    await drain(app, settings.shutdown_grace)
    await server.close_all_connections()
    pool.close()
    log.info("shutdown complete")


def main() -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print("chat_gpt_proxy: invalid setting %s" % exc, file=sys.stderr)
        sys.exit(2)
    setup_logging(settings)
    if settings.default_token_in_use:
        log.warning("ACCESS_TOKEN is not set: the default access token 123456 is in use; set ACCESS_TOKEN!")
    log.info("configuration: %s", json.dumps(settings.masked(), default=str))
    raise_fd_limit()
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
