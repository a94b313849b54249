"""chat_gpt_proxy: a fast, safe proxy for the OpenAI chat API.

``make_app(settings)`` builds the Tornado application (tests and benchmarks
import it); ``main()`` reads the settings from the environment and serves
until SIGTERM or SIGINT, then shuts down gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import time

import tornado.httpserver
import tornado.netutil
import tornado.web

from chat_gpt_proxy import human
from chat_gpt_proxy.access.tokens import UNNAMED, TokenRegistry, TokensFileError
from chat_gpt_proxy.application import ProxyApplication
from chat_gpt_proxy.cache import ResponseCache
from chat_gpt_proxy.observability import JsonFormatter, Metrics, TextFormatter, log_request
from chat_gpt_proxy.request.cors import CorsPolicy
from chat_gpt_proxy.tornado_internals import stop_keep_alive
from chat_gpt_proxy.upstream.pool import UpstreamPool
from chat_gpt_proxy.upstream.routing import Router, UpstreamsFileError
from chat_gpt_proxy.usage.spend import Spend
from handlers import routes
from handlers.base import BaseHandler
from handlers.errors import ApiError
from handlers.metrics import WorkerMetricsHandler
from handlers.metrics import routes as metrics_routes
from handlers.playground import STATIC_DIR, StaticHandler
from handlers.private import private_path
from settings import Settings, SettingsError, mask_url

log = logging.getLogger("chat_gpt_proxy")

WANTED_OPEN_FILES = 65536


class NotFoundHandler(BaseHandler):
    """Any other path: a JSON 404, never Tornado's HTML page."""

    requires_access_token = False

    def prepare(self) -> None:
        raise ApiError(404, "No such route: %s. See GET / for usage." % self.request.path[:200], code="not_found")

    def flush(self, include_footers: bool = False):
        # Under /admin and /usage no answer is kept by a cache, not even a 404 or a 405.
        if private_path(self.request.path):
            self.set_header("Cache-Control", "no-store")
        return super().flush(include_footers)


def make_app(settings: Settings, tokens: TokenRegistry | None = None, router: Router | None = None) -> ProxyApplication:
    """The application; ``tokens`` and ``router`` default to what ``settings`` names
    (TokensFileError, UpstreamsFileError if a file is broken)."""
    if tokens is None:
        tokens = TokenRegistry(settings)
    pool = UpstreamPool(settings)
    metrics = None
    all_routes = list(routes)
    if settings.metrics_enabled:
        metrics = Metrics()
        metrics.in_flight.set_function(lambda: len(pool.handlers))
        metrics.streams.set_function(lambda: pool.streams)
        all_routes += metrics_routes
    shared_limits = None
    if settings.redis_url:
        # Imported only here: without REDIS_URL the redis package is never loaded.
        from chat_gpt_proxy.access.shared_limits import SharedLimits

        shared_limits = SharedLimits(settings, metrics.redis_errors if metrics is not None else None)
        log.info("%s", shared_limits.describe())
    if router is None:
        router = Router(settings)
    if metrics is not None:
        # main() reads UPSTREAMS_FILE before any worker has its metrics: each process reports its own.
        router.use_metrics(metrics)
    spend = Spend(settings, metrics, shared_limits)
    console = None
    if settings.usage_database:
        from chat_gpt_proxy.console.runtime import RuntimeTokens

        console = RuntimeTokens(settings, tokens, spend, reload_check(settings))
    alerts = None
    if settings.alert_webhook_url:
        from chat_gpt_proxy.console.alerts import BudgetAlerts

        alerts = BudgetAlerts(settings, spend.book, metrics, console.store if console is not None else None)
    return ProxyApplication(
        all_routes,
        config=settings,
        pool=pool,
        router=router,
        tokens=tokens,
        cors=CorsPolicy(settings.cors_allow_origins),
        spend=spend,
        cache=ResponseCache(settings, shared_limits, metrics),
        console=console,
        alerts=alerts,
        metrics=metrics,
        shared_limits=shared_limits,
        default_handler_class=NotFoundHandler,
        # Our access log replaces Tornado's: one line, no secrets.
        log_function=log_request,
        template_path=STATIC_DIR,
        static_path=STATIC_DIR,
        static_handler_class=StaticHandler,
    )


class _EncryptedKey(Exception):
    pass


def _refuse_password():
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise _EncryptedKey


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context (TLS_CERTFILE/TLS_KEYFILE), or None for plain HTTP.

    A file it cannot use is a ``SettingsError`` naming the variable and the
    cause, not an OpenSSL traceback.
    """
    if not settings.tls_certfile:
        return None
    certfile, keyfile = settings.tls_certfile, settings.tls_keyfile
    for name, path in (("TLS_CERTFILE", certfile), ("TLS_KEYFILE", keyfile)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise SettingsError(f"{name}: cannot read {path!r}: {exc.strerror}") from None
    try:
        # Parses the certificate file alone, so that a bad one is told apart from a bad key.
        ssl.create_default_context().load_verify_locations(cafile=certfile)
    except ssl.SSLError:
        raise SettingsError(f"TLS_CERTFILE: no PEM certificate in {certfile!r}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile, password=_refuse_password)
    except _EncryptedKey:
        raise SettingsError(f"TLS_KEYFILE: {keyfile!r} is encrypted; give an unencrypted key") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise SettingsError(f"TLS_KEYFILE: {keyfile!r} is not the key of the certificate in TLS_CERTFILE") from None
        raise SettingsError(f"TLS_KEYFILE: no PEM private key in {keyfile!r}") from None
    return context


def listen_sockets(settings: Settings) -> list[socket.socket]:
    """The listening sockets for HOST and PORT; a ``SettingsError`` naming the variable if impossible."""
    host, port = settings.host, settings.port
    try:
        # A burst of new streams must not overflow the accept queue (default
        # 128): a dropped SYN costs the client a one-second retransmit.
        return tornado.netutil.bind_sockets(port, host, backlog=4096)
    except socket.gaierror as exc:
        raise SettingsError(f"HOST: cannot resolve {host!r} ({exc.strerror})") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SettingsError(f"PORT: {port} is already in use on {host}") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise SettingsError(f"HOST: {host!r} is not an address of this machine") from None
        if exc.errno == errno.EACCES:
            raise SettingsError(f"PORT: no permission to listen on port {port} (below 1024 needs privileges)") from None
        raise SettingsError(f"PORT: cannot listen on {host}:{port} ({exc.strerror})") from None


def make_server(
    app: ProxyApplication, settings: Settings, ssl_context: ssl.SSLContext | None = None
) -> tornado.httpserver.HTTPServer:
    return tornado.httpserver.HTTPServer(
        app,
        ssl_options=ssl_context or tls_context(settings),
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


async def stop_being_ready(app: ProxyApplication, server: tornado.httpserver.HTTPServer, delay: float) -> None:
    """/readyz turns 503 at once; requests are still accepted and served for ``delay`` seconds.

    A load balancer that polls /readyz (Kubernetes, HAProxy, a cloud LB) or an
    endpoint list that updates late needs that time to stop sending new
    requests here before this instance stops listening. Every
    request read from now on is answered with ``Connection: close``: a
    balancer that keeps connections alive (nginx's upstream keepalive) would
    otherwise go on sending requests over them, and the last ones would meet
    the close at the end of the drain and fail (seen under load in
    tests/test_load_balancing.py); instead it opens new connections, which
    are refused once this instance stops listening, and it moves on.
    """
    app.draining = True
    stop_keep_alive(server)
    if delay:
        log.info("shutdown: /readyz answers 503; still serving for SHUTDOWN_DELAY=%gs", delay)
        await asyncio.sleep(delay)


def requests_in_progress(app: ProxyApplication) -> int:
    """Requests begun and not answered yet, with or without an upstream call.

    ``pool.handlers`` holds only those whose upstream call began; the drain
    waits for the others too (body still arriving, being checked): one that
    came on a kept-alive connection just before the end of the drain was
    otherwise cut by the closing of all connections (nginx: "upstream
    prematurely closed connection", a 502 it must not retry).
    """
    return sum(1 for handler in app.requests if handler.in_progress())


async def drain(app: ProxyApplication, grace: float, now: asyncio.Event | None = None) -> None:
    """Let in-flight requests finish for ``grace`` seconds, then end the rest.

    Responses from now on carry ``Connection: close`` (handlers/base.py), so
    keep-alive clients move to another instance. ``now`` set (a second
    signal) ends everything at once.
    """
    app.draining = True
    pool: UpstreamPool = app.pool
    deadline = time.monotonic() + grace
    while (pool.handlers or requests_in_progress(app)) and time.monotonic() < deadline and not (now and now.is_set()):
        await asyncio.sleep(0.05)
    if not pool.handlers:
        return
    if now and now.is_set():
        log.warning("shutdown: second signal, ending %s in flight now", human.count(len(pool.handlers), "request"))
    else:
        log.warning("shutdown: ending %s still in flight after %gs", human.count(len(pool.handlers), "request"), grace)
    for handler in list(pool.handlers):
        if handler.upstream_call is not None:
            handler.upstream_call.abort("shutdown")
    # Streams get their final error event and realtime sessions their 1001;
    # after a second signal only a moment, enough for each to end, log its
    # line and give back its shared (Redis) counts.
    deadline = time.monotonic() + (0.5 if now and now.is_set() else 3)
    while pool.handlers and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    # Neither format prints where a call was made from, nor thread or process
    # ids: the logging HOWTO's "Optimization" switches stop collecting them
    # for every record, i.e. for the access line of every request (a stack
    # walk and four lookups each, measured with bench/profile.py).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


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
    """DEMO_UPSTREAM=true: answers come from the built-in fake OpenAI."""
    from chat_gpt_proxy.fake_openai.app import FakeOpenAI

    fake = FakeOpenAI(default_delay=0.08)
    fake.start()
    log.warning(
        "DEMO MODE: requests go to the built-in fake OpenAI at %s, not to %s", fake.url, settings.openai_base_url
    )
    # The fake runs on loopback: an egress proxy from the environment must not apply.
    # UPSTREAMS_FILE's upstreams are real ones: the demo talks to the fake alone.
    return dataclasses.replace(settings, openai_base_url=fake.url, upstream_proxy=None, upstreams_file="")


def reload_tokens(app: ProxyApplication) -> None:
    """SIGHUP: read ACCESS_TOKENS_FILE again; a broken file leaves the tokens in force."""
    tokens: TokenRegistry = app.tokens
    if not tokens.settings.access_tokens_file:
        log.warning("SIGHUP: ACCESS_TOKENS_FILE is not set; nothing to reload")
        return
    try:
        tokens.reload(reload_check(app.config))
    except TokensFileError as exc:
        log.error("SIGHUP: tokens file refused, the previous tokens stay in force: %s", exc)
        return
    log.info("SIGHUP: reloaded %s: %d named tokens", tokens.settings.access_tokens_file, tokens.named)
    # A token new to this process starts from what the ledger says it spent.
    asyncio.ensure_future(app.spend.rebuild(tokens.entries))


def reload_upstreams(app: ProxyApplication) -> None:
    """SIGHUP: read UPSTREAMS_FILE again; a broken file leaves the upstreams in force (and their health)."""
    router: Router = app.router
    try:
        router.reload()
    except UpstreamsFileError as exc:
        log.error("SIGHUP: upstreams file refused, the previous upstreams stay in force: %s", exc)
        return
    log.info("SIGHUP: reloaded %s: %s", app.config.upstreams_file, ", ".join(u.describe() for u in router.upstreams))


def on_sighup(app: ProxyApplication) -> None:
    if app.config.upstreams_file:
        reload_upstreams(app)
    if app.config.access_tokens_file or not app.config.upstreams_file:
        reload_tokens(app)


def take_pending_reload(app: ProxyApplication) -> None:
    """A worker starts with SIGHUP blocked (``supervise``): one sent while it started is pending,
    not lost. Taken here, before the worker accepts its first request; from now on the
    event loop's handler takes them."""
    if signal.sigtimedwait([signal.SIGHUP], 0) is not None:
        log.info("SIGHUP arrived while this worker started: reloading now")
        on_sighup(app)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGHUP])


async def serve(
    settings: Settings,
    tokens: TokenRegistry,
    sockets: list[socket.socket],
    ssl_context: ssl.SSLContext | None,
    router: Router | None = None,
    worker: int | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain. ``worker``: this process's index among WORKERS."""
    if settings.demo_upstream:
        settings = await start_demo_upstream(settings)
    app = make_app(settings, tokens, router)
    try:
        # Before the first request: budgets must start from what the ledger says was spent,
        # and the tokens made on the admin page must be in force.
        await app.spend.start(tokens.entries)
        if app.console is not None:
            await app.console.start()
        if app.alerts is not None:
            app.alerts.start()
    except Exception as exc:  # any driver's error: one line, exit 2, as for a setting
        print(
            "chat_gpt_proxy: invalid setting USAGE_DATABASE: cannot open the usage ledger %s: %s"
            % (mask_url(settings.usage_database), (str(exc) or type(exc).__name__).replace("\n", " ")[:300]),
            file=sys.stderr,
        )
        # Whatever did open (a database thread, a pool) would keep the process from exiting.
        with contextlib.suppress(Exception):
            await app.spend.close()
        sys.exit(2)
    server = make_server(app, settings, ssl_context)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, on_sighup, app)
    if worker is not None:
        take_pending_reload(app)
    server.add_sockets(sockets)
    scheme = "https" if settings.tls_certfile else "http"
    log.info("listening on %s://%s:%d", scheme, settings.host, settings.port)
    if worker in (None, 0):
        log.info("%s", where_to_look(settings))
    metrics_server = None
    if worker is not None and app.metrics is not None:
        metrics_app = tornado.web.Application(
            [(r"/metrics", WorkerMetricsHandler, {"metrics": app.metrics, "worker": worker})],
            log_function=lambda handler: None,
        )
        metrics_server = tornado.httpserver.HTTPServer(metrics_app)
        port = settings.worker_metrics_port + worker
        try:
            metrics_server.listen(port, settings.host)
        except OSError as exc:
            print(
                "chat_gpt_proxy: invalid setting WORKER_METRICS_PORT: worker %d cannot listen on %s:%d (%s)"
                % (worker, settings.host, port, exc.strerror),
                file=sys.stderr,
            )
            sys.exit(2)
    stop, now = asyncio.Event(), asyncio.Event()

    first_signal_at = 0.0

    def on_signal() -> None:
        nonlocal first_signal_at
        if not stop.is_set():
            first_signal_at = time.monotonic()
            stop.set()
        elif worker is None or time.monotonic() - first_signal_at > DUPLICATE_SIGNAL:
            # A worker hears a Ctrl-C or a group-wide SIGTERM twice: from the
            # terminal or systemd, and from its supervisor. That is one signal.
            now.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    await stop_being_ready(app, server, settings.shutdown_delay)
    pool: UpstreamPool = app.pool
    log.info(
        "shutdown: no new connections; %s in flight (a second SIGTERM or SIGINT ends them now)",
        human.count(len(pool.handlers), "request"),
    )
    server.stop()
    if metrics_server is not None:
        metrics_server.stop()
    if worker is not None:
        # A worker shares the port with its siblings, which take the new
        # connections from now on; one it accepted a moment ago may not have
        # sent its request yet: give it the time to, so that the drain waits
        # for that request instead of closing its connection unanswered.
        await asyncio.sleep(WORKER_ACCEPT_GRACE)
    await drain(app, settings.shutdown_grace, now)
    try:
        await asyncio.wait_for(server.close_all_connections(), 5)
    except TimeoutError:
        log.warning("shutdown: connections still open after 5 s; exiting anyway")
    pool.close()
    if app.alerts is not None:
        await app.alerts.close()
    if app.console is not None:
        await app.console.close()
    await app.spend.close()
    if app.shared_limits is not None:
        await app.shared_limits.close()
    log.info("shutdown complete")


def main() -> None:
    try:
        settings = Settings.from_env()
        # Operator mistakes found before anything runs: one line naming the
        # variable, exit 2, never a traceback.
        ssl_context = tls_context(settings)
        # Before the port: a second start in the same folder is told why, not "address in use".
        refuse_a_second_proxy(settings.pid_file)
        sockets = listen_sockets(settings)
    except SettingsError as exc:
        print("chat_gpt_proxy: invalid setting %s" % exc, file=sys.stderr)
        sys.exit(2)
    try:
        tokens = TokenRegistry(settings)
    except TokensFileError as exc:
        print("chat_gpt_proxy: invalid setting ACCESS_TOKENS_FILE: %s" % exc, file=sys.stderr)
        sys.exit(2)
    problem = multiplied_by_workers(settings, tokens.entries) if settings.workers > 1 else ""
    if problem:
        print("chat_gpt_proxy: invalid setting WORKERS: %s" % problem, file=sys.stderr)
        sys.exit(2)
    router = None
    if settings.upstreams_file and not settings.demo_upstream:
        try:
            router = Router(settings)
        except UpstreamsFileError as exc:
            print("chat_gpt_proxy: invalid setting UPSTREAMS_FILE: %s" % exc, file=sys.stderr)
            sys.exit(2)
    setup_logging(settings)
    if settings.default_token_in_use:
        log.warning("ACCESS_TOKEN is not set: the default access token 123456 is in use; set ACCESS_TOKEN!")
    # A line per part: one line of every setting was too long to read.
    for part, values in settings.masked_parts():
        log.info("configuration, %s: %s", part, json.dumps(values, default=str))
    if settings.admin_token_generated:
        log.info(
            "ADMIN_TOKEN_FILE: wrote a new admin token to %s (read it there: cat %s); later starts use it",
            settings.admin_token_file,
            settings.admin_token_file,
        )
    if settings.access_tokens_file:
        log.info("access tokens: %d named from %s", tokens.named, settings.access_tokens_file)
    raise_fd_limit()
    if router is not None:
        log.info("upstreams: %s", ", ".join(u.describe() for u in router.upstreams))
    write_pid_file(settings.pid_file)
    try:
        if settings.workers > 1:
            sys.exit(supervise(settings, tokens, sockets, ssl_context, router))
        asyncio.run(serve(settings, tokens, sockets, ssl_context, router))
    finally:
        remove_pid_file(settings.pid_file)


def where_to_look(settings: Settings) -> str:
    """The startup line a person reads first: where the playground, the usage text and the admin page are."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    scheme = "https" if settings.tls_certfile else "http"
    base = "%s://%s:%d" % (scheme, "[%s]" % host if ":" in host else host, settings.port)
    admin = base + "/admin" if settings.admin_token else "off (set ADMIN_TOKEN_FILE or ADMIN_TOKEN)"
    return "playground %s/ · how to call the API %s/usage · admin page %s" % (base, base, admin)


def running_proxy(path: str) -> int | None:
    """The id of another running proxy that ``path`` names, or None (no file, or a stale one)."""
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            # An id is reused once its process has gone: only a server.py is this proxy (as in make reload).
            return pid if b"server.py" in f.read() else None
    except FileNotFoundError:
        if os.path.isdir("/proc"):
            return None  # no such process
    except OSError:
        pass
    try:
        os.kill(pid, 0)  # without /proc: whether the process exists at all
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it exists, under another user
    return pid


def refuse_a_second_proxy(path: str) -> None:
    """A second proxy started with the same PID_FILE would take the file over: `make reload` would
    signal it instead of the first, and its exit would remove the file the first still needs."""
    pid = running_proxy(path) if path else None
    if pid is not None:
        print(
            "chat_gpt_proxy: a proxy is already running with PID_FILE %s (pid %d): stop it first "
            "(kill %d), or give this one another PID_FILE" % (path, pid, pid),
            file=sys.stderr,
        )
        sys.exit(1)


def write_pid_file(path: str) -> None:
    """PID_FILE: this process's id, for `make reload` (kill -HUP); written whole or not at all, and never
    over the file of another running proxy (two starting at once: one of them claims it)."""
    if not path:
        return
    temporary = "%s.%d.tmp" % (path, os.getpid())
    try:
        with open(temporary, "w") as f:
            f.write("%d\n" % os.getpid())
        for _ in range(3):
            try:
                os.link(temporary, path)  # fails if the file exists: an atomic claim
                break
            except FileExistsError:
                refuse_a_second_proxy(path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # a stale file, from a proxy that was killed
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                os.replace(temporary, path)  # a file system without hard links: checked, then replaced
                break
        else:
            refuse_a_second_proxy(path)
            os.replace(temporary, path)
    except OSError as exc:
        print("chat_gpt_proxy: invalid setting PID_FILE: cannot write %r: %s" % (path, exc.strerror), file=sys.stderr)
        sys.exit(2)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def remove_pid_file(path: str) -> None:
    """At exit, the PID file if it still names this process (a newer start may have replaced it)."""
    if not path:
        return
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            written = int(f.read().strip())
        if written == os.getpid():
            os.unlink(path)


def reload_check(settings: Settings):
    """What a reloaded tokens file must pass besides its own rules: with several workers, the startup check."""
    return (lambda entries: multiplied_by_workers(settings, entries)) if settings.workers > 1 else None


def multiplied_by_workers(settings: Settings, entries) -> str:
    """Why WORKERS > 1 would silently multiply a limit or a budget (each worker counting on its own), if it would."""
    if settings.redis_url:
        return ""  # every worker counts in the same Redis, as instances do
    counted = []
    if settings.rate_limit_per_token:
        counted.append("RATE_LIMIT_PER_TOKEN")
    for entry in entries:
        policy = entry.policy
        if entry.name == UNNAMED:
            continue  # ACCESS_TOKEN's carry RATE_LIMIT_PER_TOKEN, named above
        if policy.rate_limit_per_minute or policy.max_concurrent or policy.budget:
            counted.append("the limits or budget of token %r" % entry.name)
            break
    if not counted:
        return ""
    return "%d workers would each count %s on their own (%dx the limit); set REDIS_URL to share them, or WORKERS=1" % (
        settings.workers,
        " and ".join(counted),
        settings.workers,
    )


# Seconds a stopping worker keeps its just-accepted connections before the drain.
WORKER_ACCEPT_GRACE = 0.5
# Seconds within which a worker takes a second SIGTERM or SIGINT for the same one (see serve).
DUPLICATE_SIGNAL = 1.0
# A worker that dies this soon after its start this many times in a row cannot start: give up.
QUICK_DEATH = 5.0
QUICK_DEATHS_TO_GIVE_UP = 3
# linux/prctl.h
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when its parent (the supervisor) dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def reload_for_new_workers(settings: Settings, tokens: TokenRegistry, router: Router | None) -> None:
    """SIGHUP in the supervisor: the tokens and upstreams its next workers start with (each worker reloads its own)."""
    if settings.access_tokens_file:
        # A refused file: the workers log why; the tokens in force stay.
        with contextlib.suppress(TokensFileError):
            tokens.reload(reload_check(settings))
    if router is not None and settings.upstreams_file:
        with contextlib.suppress(UpstreamsFileError):
            router.reload()


def supervise(settings, tokens, sockets, ssl_context, router) -> int:
    """WORKERS > 1: fork that many workers on the listening sockets, replace one that dies,
    pass SIGTERM, SIGINT and SIGHUP on to all of them; exits once they have all drained."""
    children: dict[int, int] = {}  # pid -> worker index
    started: dict[int, float] = {}  # worker index -> when its process started (monotonic)
    quick_deaths: dict[int, int] = {}  # worker index -> deaths in a row within QUICK_DEATH seconds
    stopping = False
    supervisor = os.getpid()
    reloads = 0  # SIGHUPs taken so far

    def spawn(index: int) -> None:
        if stopping:
            return
        seen = reloads
        # SIGHUP is blocked from before the fork until the new worker can take it
        # (take_pending_reload): one sent meanwhile waits, pending, where an ignored
        # one was lost and left the worker serving the tokens of before the reload.
        # In the supervisor it stays blocked until the child is in ``children``.
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGHUP])
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGHUP])
            raise
        if pid == 0:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            # A supervisor killed outright (SIGKILL, OOM) must not leave its
            # workers serving with nobody to stop them: they get SIGTERM and drain.
            die_with_parent()
            if os.getppid() != supervisor:
                os._exit(0)
            code = 0
            try:
                asyncio.run(serve(settings, tokens, sockets, ssl_context, router, worker=index))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # a bug: logged by the worker's last words, replaced by the supervisor
                log.exception("worker %d failed", index)
                code = 1
            logging.shutdown()
            os._exit(code)
        children[pid] = index
        started[index] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGHUP])
        if reloads != seen:
            # A SIGHUP that came just before the block had its handler run after
            # the fork, before the worker was in ``children``: it gets it now.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        log.info("worker %d started pid=%d", index, pid)

    def forward(sig, _frame) -> None:
        nonlocal stopping, reloads
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        elif sig == signal.SIGHUP:
            # The supervisor reads the files too: a worker it starts later must
            # not bring back a token the reload revoked.
            reload_for_new_workers(settings, tokens, router)
            reloads += 1
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    exit_code = 0
    for index in range(settings.workers):
        spawn(index)
    log.info("supervising %d workers on port %d", settings.workers, settings.port)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None:
            continue
        if stopping:
            log.info("worker %d stopped pid=%d", index, pid)
            continue
        # Killed or failed: a warning; stopped on its own (its own SIGTERM, a rolling restart): news.
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        (log.info if clean else log.warning)(
            "worker %d %s pid=%d %s; starting a new one",
            index,
            "stopped" if clean else "died",
            pid,
            "signal=%d" % os.WTERMSIG(status) if os.WIFSIGNALED(status) else "exit=%d" % os.WEXITSTATUS(status),
        )
        if not clean and time.monotonic() - started[index] < QUICK_DEATH:
            quick_deaths[index] = quick_deaths.get(index, 0) + 1
        else:
            quick_deaths[index] = 0
        if quick_deaths[index] >= QUICK_DEATHS_TO_GIVE_UP:
            # It cannot start (its metrics port taken, the ledger unreachable...):
            # restarting it for ever would only fill the log. Stop all, say so.
            log.error(
                "worker %d died %d times within %g s of its start; stopping all workers (see the lines above)",
                index,
                quick_deaths[index],
                QUICK_DEATH,
            )
            stopping = True
            forward(signal.SIGTERM, None)
            exit_code = 1
            continue
        time.sleep(min(5.0, 0.1 * 2 ** quick_deaths[index]))  # one that dies at once must not spin the supervisor
        spawn(index)  # not if a SIGTERM came meanwhile
    return exit_code


if __name__ == "__main__":
    main()
