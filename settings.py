"""All configuration, read once from the environment and validated at startup.

Handlers never read ``os.environ``: ``make_app`` puts one frozen ``Settings``
into the Tornado application settings (as JupyterHub does with its config).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
import secrets
import urllib.parse
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from chat_gpt_proxy.request import strict_json
from chat_gpt_proxy.request.cors import parse_origins
from chat_gpt_proxy.request.generate_params import ParamsError, normalize_generate_params
from chat_gpt_proxy.upstream import egress
from chat_gpt_proxy.upstream.urls import check_base_url, mask_webhook
from chat_gpt_proxy.usage.prices import PricesFileError, parse_prices

DEFAULT_ACCESS_TOKEN = "123456"  # noqa: S105 (the old service's documented default)
# The server key goes into a header line, like a caller's key.
SERVER_KEY_RE = re.compile(r"^[\x21-\x7e]{1,512}$")
# Goes into every Redis key, inside the {hash tag}: no braces.
REDIS_PREFIX_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class SettingsError(ValueError):
    """A bad environment variable; the message is one line naming it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    port: int = 9081
    host: str = "0.0.0.0"
    access_tokens: tuple[str, ...] = (DEFAULT_ACCESS_TOKEN,)
    openai_base_url: str = "https://api.openai.com/v1"
    default_model: str = "gpt-4o-mini"
    default_generate_params: Mapping = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    max_body_bytes: int = 32 * 1024 * 1024
    # Answers /chat_complete must hold whole (to add "text"); a separate,
    # generous bound: a request limit must not fail paid answers.
    max_answer_bytes: int = 256 * 1024 * 1024
    connect_timeout: float = 10.0
    request_timeout: float = 600.0
    stream_idle_timeout: float = 300.0
    stream_keepalive: float = 15.0
    client_stall_timeout: float = 120.0
    body_timeout: float = 60.0
    client_idle_timeout: float = 300.0
    rate_limit_per_token: int = 0
    max_concurrent_upstream: int = 1000
    shutdown_grace: float = 25.0
    shutdown_delay: float = 0.0
    log_format: str = "text"
    log_level: str = "INFO"
    metrics_enabled: bool = True
    trusted_proxies: tuple = ()
    allowed_models: tuple[str, ...] = ()
    tls_certfile: str = ""
    tls_keyfile: str = ""
    demo_upstream: bool = False
    cors_allow_origins: tuple[str, ...] = ()
    # Realtime WebSocket relay.
    ws_max_message_bytes: int = 16 * 1024 * 1024
    ws_ping_interval: float = 20.0
    # Egress: the proxy as configured (UPSTREAM_PROXY or the
    # environment), hosts reached directly, a private CA, retries.
    upstream_proxy: egress.EgressProxy | None = None
    no_proxy: tuple[str, ...] = ()
    upstream_ca_file: str = ""
    upstream_retries: int = 2
    retry_on_status: tuple[int, ...] = ()
    retry_max_wait: float = 10.0

    @functools.cached_property
    def upstream_egress(self) -> egress.EgressProxy | None:
        """The proxy the calls to OPENAI_BASE_URL go through (None: direct), decided once."""
        return egress.proxy_for(self.openai_base_url, self.upstream_proxy, self.no_proxy)

    access_tokens_file: str = ""
    # Several upstreams (chat_gpt_proxy/upstream/routing.py); unset: OPENAI_BASE_URL alone.
    upstreams_file: str = ""
    # Shared limits: the per-token counters in Redis when REDIS_URL
    # is set. The URL may hold a password: out of repr(), masked in masked().
    redis_url: str = dataclasses.field(default="", repr=False)
    redis_prefix: str = "chat_gpt_proxy"
    redis_failure_mode: str = "open"
    redis_timeout: float = 0.25
    redis_inflight_ttl: float = 30.0
    # The server-held OpenAI key: kept out of repr() and masked()
    # so that no log line can show it.
    openai_api_key: str = dataclasses.field(default="", repr=False)
    # Spend (chat_gpt_proxy/usage/): prices over the shipped table, the
    # ledger (a SQLite path or a postgresql:// URL, which may hold a
    # password: masked like REDIS_URL), its write queue and retention, and
    # the token of the admin routes (unset: /admin is a 404).
    prices_file: str = ""
    usage_database: str = dataclasses.field(default="", repr=False)
    usage_queue_rows: int = 100_000
    usage_retention_days: int = 0
    admin_token: str = dataclasses.field(default="", repr=False)
    # ADMIN_TOKEN_FILE: where the admin token is read from, and whether this
    # start wrote it there (a first start: the log says where to read it).
    admin_token_file: str = ""
    admin_token_generated: bool = False
    # Where the server writes its PID (the supervisor's with WORKERS), for `make reload`.
    pid_file: str = ""
    # The opt-in response cache (chat_gpt_proxy/cache.py): 0 = off unless a
    # token or a request asks for it.
    cache_ttl: int = 0
    # Processes serving the one port (server.py supervises them); each serves
    # its own /metrics on worker_metrics_port + its index when there are several.
    workers: int = 1
    worker_metrics_port: int = 9190
    cache_max_bytes: int = 256 * 1024 * 1024
    cache_max_entry_bytes: int = 4 * 1024 * 1024
    # Budget alerts (chat_gpt_proxy/console/alerts.py): where to POST, at which percentages of a
    # budget. The URL's path may be a secret (Slack's, a Telegram bot token): masked like REDIS_URL.
    alert_webhook_url: str = dataclasses.field(default="", repr=False)
    alert_thresholds: tuple[int, ...] = (80, 100)

    @property
    def default_token_in_use(self) -> bool:
        return DEFAULT_ACCESS_TOKEN in self.access_tokens

    @property
    def chat_completions_url(self) -> str:
        return self.openai_base_url + "/chat/completions"

    def masked(self) -> dict:
        """The configuration for the startup log, with every secret masked."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "access_tokens":
                # Not one character of a token: a prefix narrows a guess.
                value = ["***" for _ in value]
            elif field.name == "upstream_proxy":
                value = egress.describe(self.openai_base_url, value, self.no_proxy)
            elif field.name in ("openai_api_key", "admin_token"):
                value = "***" if value else ""
            elif field.name in ("redis_url", "usage_database"):
                value = mask_url(value)
            elif field.name == "alert_webhook_url":
                value = mask_webhook(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = [str(v) for v in value]
            out[field.name] = value
        return out

    def masked_parts(self) -> list[tuple[str, dict]]:
        """``masked()`` in the parts the startup log shows one line each, in CONFIGURATION_PARTS' order."""
        values = self.masked()
        return [(part, {name: values[name] for name in names}) for part, names in CONFIGURATION_PARTS]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _Env(os.environ if environ is None else environ)
        tokens_file = env.str("ACCESS_TOKENS_FILE", "")
        tokens = _access_tokens(env, tokens_file)
        base_url = _base_url(env.str("OPENAI_BASE_URL", cls.openai_base_url).rstrip("/"))
        allowed_models = env.csv("ALLOWED_MODELS")
        if env.raw("ALLOWED_MODELS") is not None and not allowed_models:
            raise SettingsError("ALLOWED_MODELS: lists no model; name models separated by commas, or unset it")
        default_model = env.str("DEFAULT_MODEL", cls.default_model)
        if allowed_models and default_model not in allowed_models:
            raise SettingsError(f"DEFAULT_MODEL: {default_model!r} is not in ALLOWED_MODELS")
        try:
            # The rules a request's generate_params must follow: else every request would fail.
            default_params = normalize_generate_params(
                dict(env.json_object("DEFAULT_GENERATE_PARAMS")), allowed_models, where="DEFAULT_GENERATE_PARAMS"
            )
        except ParamsError as exc:
            raise SettingsError("DEFAULT_GENERATE_PARAMS: " + exc.message) from None
        log_format = env.str("LOG_FORMAT", cls.log_format).lower()
        if log_format not in ("text", "json"):
            raise SettingsError(f"LOG_FORMAT: must be 'text' or 'json', got {log_format!r}")
        log_level = env.str("LOG_LEVEL", cls.log_level).upper()
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError(f"LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
        certfile, keyfile = env.str("TLS_CERTFILE", ""), env.str("TLS_KEYFILE", "")
        if bool(certfile) != bool(keyfile):
            raise SettingsError("TLS_CERTFILE: TLS_CERTFILE and TLS_KEYFILE must be set together")
        for name, path in (("TLS_CERTFILE", certfile), ("TLS_KEYFILE", keyfile)):
            if path and not os.path.isfile(path):
                raise SettingsError(f"{name}: no such file {path!r}")
        demo = env.bool("DEMO_UPSTREAM", cls.demo_upstream)
        try:
            proxy = egress.proxy_from_env(env.environ, base_url)
            ca_file = env.raw("UPSTREAM_CA_FILE")
            if ca_file is not None:
                egress.check_ca_file(ca_file)
        except egress.EgressConfigError as exc:
            raise SettingsError(str(exc)) from None
        redis_mode = env.str("REDIS_FAILURE_MODE", cls.redis_failure_mode).lower()
        if redis_mode not in ("open", "closed"):
            raise SettingsError(f"REDIS_FAILURE_MODE: must be 'open' or 'closed', got {redis_mode!r}")
        redis_prefix = env.str("REDIS_PREFIX", cls.redis_prefix)
        if not REDIS_PREFIX_RE.match(redis_prefix):
            raise SettingsError(
                f"REDIS_PREFIX: 1-64 letters, digits, '.', '_', ':' or '-' (no braces), got {redis_prefix[:80]!r}"
            )
        workers = env.workers("WORKERS")
        metrics_port = env.int("WORKER_METRICS_PORT", cls.worker_metrics_port, 1, 65535)
        if workers > 1:
            last = metrics_port + workers - 1
            port = env.int("PORT", cls.port, 1, 65535)
            if last > 65535:
                raise SettingsError(f"WORKER_METRICS_PORT: {metrics_port} + {workers} workers goes past port 65535")
            if metrics_port <= port <= last:
                raise SettingsError(f"WORKER_METRICS_PORT: the workers' ports {metrics_port}-{last} hold PORT {port}")
        prices_file = env.str("PRICES_FILE", "")
        if prices_file:
            try:
                parse_prices(prices_file)
            except PricesFileError as exc:
                raise SettingsError("PRICES_FILE: %s" % exc) from None
        return cls(
            # The variables read straight into one field each, as VARIABLES declares them.
            **{v.field: v.read(env, v.name, getattr(cls, v.field)) for v in VARIABLES},
            # A demo (default access token, fake answers) is for this machine:
            # it listens on all interfaces only when HOST says so.
            host=env.str("HOST", "127.0.0.1" if demo else cls.host),
            access_tokens=tokens,
            openai_base_url=base_url,
            default_model=default_model,
            default_generate_params=MappingProxyType(default_params),
            log_format=log_format,
            log_level=log_level,
            allowed_models=allowed_models,
            tls_certfile=certfile,
            tls_keyfile=keyfile,
            demo_upstream=demo,
            upstream_proxy=proxy,
            no_proxy=egress.no_proxy_from_env(env.environ),
            upstream_ca_file=ca_file or "",
            access_tokens_file=tokens_file,
            upstreams_file=env.str("UPSTREAMS_FILE", ""),
            openai_api_key=env.server_key(),
            redis_prefix=redis_prefix,
            redis_failure_mode=redis_mode,
            prices_file=prices_file,
            **env.admin_token(),
            workers=workers,
        )


# The startup log's configuration, a line per part; every field is in exactly one
# (tests/test_settings.py checks it).
CONFIGURATION_PARTS = (
    ("listen", ("host", "port", "workers", "worker_metrics_port", "tls_certfile", "tls_keyfile", "pid_file")),
    (
        "access",
        ("access_tokens", "access_tokens_file", "rate_limit_per_token", "allowed_models", "cors_allow_origins"),
    ),
    (
        "upstream",
        (
            "openai_base_url", "upstreams_file", "upstream_proxy", "no_proxy", "upstream_ca_file", "openai_api_key",
            "default_model", "default_generate_params", "upstream_retries", "retry_on_status", "retry_max_wait",
            "max_concurrent_upstream", "demo_upstream",
        ),
    ),
    ("sizes", ("max_body_bytes", "max_answer_bytes", "ws_max_message_bytes")),
    (
        "timeouts",
        (
            "connect_timeout", "request_timeout", "stream_idle_timeout", "stream_keepalive", "client_stall_timeout",
            "body_timeout", "client_idle_timeout", "ws_ping_interval", "shutdown_grace", "shutdown_delay",
        ),
    ),
    (
        "usage",
        (
            "usage_database", "usage_queue_rows", "usage_retention_days", "prices_file", "admin_token",
            "admin_token_file", "admin_token_generated", "alert_webhook_url", "alert_thresholds",
        ),
    ),
    ("redis", ("redis_url", "redis_prefix", "redis_failure_mode", "redis_timeout", "redis_inflight_ttl")),
    ("cache", ("cache_ttl", "cache_max_bytes", "cache_max_entry_bytes")),
    ("observability", ("log_format", "log_level", "metrics_enabled", "trusted_proxies")),
)  # fmt: skip


def _base_url(url: str) -> str:
    """OPENAI_BASE_URL: ``http(s)://host[:port][/path]``, to which the API's paths are appended."""
    try:
        return check_base_url(url, mask_url(url))
    except ValueError as exc:
        raise SettingsError("OPENAI_BASE_URL: %s" % exc) from None


def _access_tokens(env: _Env, tokens_file: str) -> tuple[str, ...]:
    # The old service called it ACCESS_KEY (stay compatible).
    for name in ("ACCESS_TOKEN", "ACCESS_KEY"):
        value = env.environ.get(name)
        if value is None:
            continue
        # Set but empty (e.g. "ACCESS_TOKEN=${ACCESS_TOKEN}" with nothing to
        # expand) must not quietly mean the public default token.
        tokens = tuple(t.strip() for t in value.split(",") if t.strip())
        if not tokens:
            raise SettingsError(f"{name}: is set but holds no token; set at least one (comma-separated)")
        return tokens
    # With a tokens file, only the tokens it names: no default token.
    return () if tokens_file else (DEFAULT_ACCESS_TOKEN,)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, and a cgroup v2 CPU quota (a container's --cpus) if lower."""
    count = len(os.sched_getaffinity(0))
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def mask_url(url: str) -> str:
    """``url`` with the password of its user part replaced by ``***``, for logs and errors.

    The user part ends at the last "@" (a password may hold "/", "?" or "#"),
    and redis-py also reads ``?password=`` from the query, with or without a
    path before it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, after = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = userinfo.split(":", 1)[0] + ":***@" + after
    return scheme + sep + re.sub(r"(?i)(password=)[^&#]*", r"\1***", rest)


class _Env:
    """Typed getters over an environment mapping; each error names its variable."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ

    def raw(self, name: str) -> str | None:
        value = self.environ.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def str(self, name: str, default: str) -> str:
        value = self.raw(name)
        return default if value is None else value

    def int(self, name: str, default: int, low: int, high: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise SettingsError(f"{name}: must be an integer, got {value!r}") from None
        if not low <= number <= high:
            raise SettingsError(f"{name}: must be between {low} and {high}, got {number}")
        return number

    def float(self, name: str, default: float, minimum: float = 0.001) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(f"{name}: must be a number of seconds, got {value!r}") from None
        if not (number >= minimum and number < float("inf")):
            raise SettingsError(f"{name}: must be a number >= {minimum}, got {value!r}")
        return number

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}: must be true or false, got {value!r}")

    def csv(self, name: str) -> tuple[str, ...]:
        value = self.raw(name) or ""
        return tuple(item.strip() for item in value.split(",") if item.strip())

    def statuses(self, name: str) -> tuple[int, ...]:
        out = []
        for item in self.csv(name):
            if not (item.isascii() and item.isdigit()) or not 400 <= int(item) <= 599:
                raise SettingsError(f"{name}: must list HTTP error statuses (400-599), e.g. 429,503; got {item!r}")
            out.append(int(item))
        return tuple(out)

    def json_object(self, name: str) -> Mapping:
        value = self.raw(name)
        if value is None:
            return MappingProxyType({})
        try:
            # As strict as a request body (handlers/base.py): NaN, Infinity and
            # numbers that overflow a double would fail every request later.
            parsed = strict_json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise SettingsError(f"{name}: not valid JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise SettingsError(f"{name}: must be a JSON object, got {type(parsed).__name__}")
        return MappingProxyType(parsed)

    def origins(self, name: str) -> tuple[str, ...]:
        try:
            return parse_origins(self.raw(name) or "")
        except ValueError as exc:
            raise SettingsError(f"{name}: {exc}") from None

    def server_key(self) -> str:
        """OPENAI_API_KEY, or the first line of OPENAI_API_KEY_FILE; never quoted in an error."""
        key, path = self.raw("OPENAI_API_KEY"), self.raw("OPENAI_API_KEY_FILE")
        name = "OPENAI_API_KEY"
        if path is not None:
            if key is not None:
                raise SettingsError("OPENAI_API_KEY_FILE: set OPENAI_API_KEY or OPENAI_API_KEY_FILE, not both")
            name = "OPENAI_API_KEY_FILE"
            try:
                with open(path, encoding="utf-8") as f:
                    # The first line, as docs/team.md says: a trailing comment or newline is fine.
                    key = f.readline().strip()
            except OSError as exc:
                raise SettingsError(f"{name}: cannot read {path!r}: {exc.strerror or exc}") from None
            except UnicodeDecodeError:
                raise SettingsError(f"{name}: {path!r} is not UTF-8 text") from None
            if not key:
                raise SettingsError(f"{name}: {path!r} is empty")
        if key is not None and not SERVER_KEY_RE.match(key):
            raise SettingsError(f"{name}: must be one line of visible ASCII characters (the value is not shown)")
        return key or ""

    def workers(self, name: str) -> int:
        """WORKERS: a number of processes, or ``auto``: the CPUs this process may use (affinity and cgroup quota)."""
        value = self.raw(name)
        if value is None:
            return 1
        if value.lower() == "auto":
            return usable_cpus()
        return self.int(name, 1, 1, 256)

    def secret(self, name: str) -> str:
        """A token that guards something: set but empty is a mistake, not "no token"."""
        value = self.environ.get(name)
        if value is None:
            return ""
        value = value.strip()
        if not value:
            raise SettingsError(f"{name}: is set but empty; set a long random value, or unset it")
        if len(value) < 16 or not SERVER_KEY_RE.match(value):
            raise SettingsError(f"{name}: must be 16 or more visible ASCII characters (the value is not shown)")
        return value

    def admin_token(self) -> dict:
        """ADMIN_TOKEN, or the first line of ADMIN_TOKEN_FILE, which a first start creates with a new
        random token (mode 0600): the operator reads it there, since no log line ever shows it."""
        path = self.raw("ADMIN_TOKEN_FILE")
        if path is None:
            return {"admin_token": self.secret("ADMIN_TOKEN")}
        name = "ADMIN_TOKEN_FILE"
        if self.environ.get("ADMIN_TOKEN") is not None:
            raise SettingsError(f"{name}: set ADMIN_TOKEN or ADMIN_TOKEN_FILE, not both")
        generated = False
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except FileNotFoundError:
            token = secrets.token_urlsafe(24)
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                raise SettingsError(f"{name}: cannot create {path!r}: {exc.strerror or exc}") from None
            with os.fdopen(descriptor, "w", encoding="utf-8") as f:
                f.write(token + "\n")
            generated = True
        except OSError as exc:
            raise SettingsError(f"{name}: cannot read {path!r}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise SettingsError(f"{name}: {path!r} is not UTF-8 text") from None
        if len(token) < 16 or not SERVER_KEY_RE.match(token):
            raise SettingsError(
                f"{name}: the first line of {path!r} must be 16 or more visible ASCII characters (not shown)"
            )
        return {"admin_token": token, "admin_token_file": path, "admin_token_generated": generated}

    def file_in_a_folder(self, name: str) -> str:
        """A file the server writes (PID_FILE): its folder must exist."""
        path = self.raw(name)
        if path is None:
            return ""
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise SettingsError(f"{name}: the folder {folder!r} does not exist")
        return path

    def database_url(self, name: str) -> str:
        """USAGE_DATABASE: a SQLite file path (whose folder must exist) or a postgresql:// URL."""
        url = self.raw(name)
        if url is None:
            return ""
        if url.startswith(("postgresql://", "postgres://")):
            try:
                parts = urllib.parse.urlsplit(url)
                parts.port  # noqa: B018 (raises ValueError for a port out of range)
            except ValueError:
                raise SettingsError(f"{name}: not a valid URL: {mask_url(url)!r}") from None
            if not parts.hostname and "host=" not in parts.query:
                raise SettingsError(f"{name}: no host in {mask_url(url)!r}")
            return url
        if "://" in url and not url.startswith("sqlite:///"):
            raise SettingsError(f"{name}: a SQLite file path or a postgresql:// URL, got {mask_url(url)!r}")
        path = url.removeprefix("sqlite://")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise SettingsError(
                f"{name}: the folder {folder!r} does not exist; create it, or name a file in an existing one "
                "(usage.sqlite3: in the folder the proxy starts in)"
            )
        return url

    def webhook_url(self, name: str) -> str:
        """ALERT_WEBHOOK_URL: an http:// or https:// URL with a host; never quoted whole (its path may be a secret)."""
        url = self.raw(name)
        if url is None:
            return ""
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 (raises ValueError for a port out of range)
        except ValueError:
            raise SettingsError(f"{name}: not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(f"{name}: must be an http:// or https:// URL with a host")
        if any(c.isspace() or ord(c) < 0x20 for c in url):
            raise SettingsError(f"{name}: must not hold spaces or control characters")
        return url

    def thresholds(self, name: str) -> tuple[int, ...]:
        """ALERT_THRESHOLDS: percentages of a budget, e.g. 50,80,100."""
        items = self.csv(name)
        if self.raw(name) is None:
            return (80, 100)
        out = set()
        for item in items:
            if not (item.isascii() and item.isdigit()) or not 1 <= int(item) <= 1000:
                raise SettingsError(f"{name}: must list percentages from 1 to 1000, e.g. 80,100; got {item!r}")
            out.add(int(item))
        if not out:
            raise SettingsError(f"{name}: lists no percentage; e.g. 80,100, or unset it")
        return tuple(sorted(out))

    def redis_url(self, name: str) -> str:
        """REDIS_URL: redis:// or rediss://, a host, optional port and database; never quoted with its password."""
        url = self.raw(name)
        if url is None:
            return ""
        shown = mask_url(url)
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 (raises ValueError for a port out of range)
        except ValueError:
            raise SettingsError(f"{name}: not a valid URL: {shown!r}") from None
        if parts.scheme not in ("redis", "rediss"):
            raise SettingsError(f"{name}: must start with redis:// or rediss:// (TLS), got {shown!r}")
        if not parts.hostname:
            raise SettingsError(f"{name}: no host in {shown!r}")
        database = parts.path.lstrip("/")
        if database and not (database.isascii() and database.isdigit()):
            raise SettingsError(f"{name}: the path must be a database number (e.g. /0), got {shown!r}")
        return url

    def networks(self, name: str) -> tuple:
        nets = []
        for item in self.csv(name):
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise SettingsError(f"{name}: {item!r} is not an IP address or network") from None
        return tuple(nets)


@dataclasses.dataclass(frozen=True)
class Variable:
    """An environment variable read straight into one ``Settings`` field: its name, the field
    (whose default is the variable's), and how its value is read and checked. docs/settings.md
    describes each; tests/test_settings.py checks that its table names exactly the variables read."""

    name: str
    field: str
    read: Callable[[_Env, str, Any], Any]


def _int(low: int, high: int):
    return lambda env, name, default: env.int(name, default, low, high)


def _seconds(minimum: float = 0.001):
    return lambda env, name, default: env.float(name, default, minimum)


def _without_default(read: Callable[[_Env, str], Any]):
    """For a reader whose "unset" is its own empty value (an empty tuple or string)."""
    return lambda env, name, _default: read(env, name)


# The rest (access tokens, the upstream and its proxy, models, logging, TLS,
# the server key, Redis's prefix and mode) depend on each other and are read
# in Settings.from_env.
VARIABLES = (
    Variable("PORT", "port", _int(1, 65535)),
    Variable("MAX_BODY_BYTES", "max_body_bytes", _int(1024, 1 << 31)),
    Variable("MAX_ANSWER_BYTES", "max_answer_bytes", _int(1024, 1 << 34)),
    Variable("CONNECT_TIMEOUT", "connect_timeout", _seconds()),
    Variable("REQUEST_TIMEOUT", "request_timeout", _seconds()),
    Variable("STREAM_IDLE_TIMEOUT", "stream_idle_timeout", _seconds()),
    Variable("STREAM_KEEPALIVE", "stream_keepalive", _seconds()),
    Variable("CLIENT_STALL_TIMEOUT", "client_stall_timeout", _seconds()),
    Variable("BODY_TIMEOUT", "body_timeout", _seconds()),
    Variable("CLIENT_IDLE_TIMEOUT", "client_idle_timeout", _seconds()),
    Variable("RATE_LIMIT_PER_TOKEN", "rate_limit_per_token", _int(0, 1_000_000)),
    Variable("MAX_CONCURRENT_UPSTREAM", "max_concurrent_upstream", _int(1, 100_000)),
    Variable("SHUTDOWN_GRACE", "shutdown_grace", _seconds(0)),
    Variable("SHUTDOWN_DELAY", "shutdown_delay", _seconds(0)),
    Variable("METRICS_ENABLED", "metrics_enabled", _Env.bool),
    Variable("TRUSTED_PROXIES", "trusted_proxies", _without_default(_Env.networks)),
    Variable("CORS_ALLOW_ORIGINS", "cors_allow_origins", _without_default(_Env.origins)),
    Variable("WS_MAX_MESSAGE_BYTES", "ws_max_message_bytes", _int(1024, 1 << 30)),
    Variable("WS_PING_INTERVAL", "ws_ping_interval", _seconds(0)),
    Variable("UPSTREAM_RETRIES", "upstream_retries", _int(0, 10)),
    Variable("RETRY_ON_STATUS", "retry_on_status", _without_default(_Env.statuses)),
    Variable("RETRY_MAX_WAIT", "retry_max_wait", _seconds(0)),
    Variable("REDIS_URL", "redis_url", _without_default(_Env.redis_url)),
    Variable("REDIS_TIMEOUT", "redis_timeout", _seconds()),
    Variable("REDIS_INFLIGHT_TTL", "redis_inflight_ttl", _seconds(0.5)),
    Variable("USAGE_DATABASE", "usage_database", _without_default(_Env.database_url)),
    Variable("USAGE_QUEUE_ROWS", "usage_queue_rows", _int(100, 100_000_000)),
    Variable("USAGE_RETENTION_DAYS", "usage_retention_days", _int(0, 100_000)),
    Variable("CACHE_TTL", "cache_ttl", _int(0, 365 * 86400)),
    Variable("WORKER_METRICS_PORT", "worker_metrics_port", _int(1, 65535)),
    Variable("CACHE_MAX_BYTES", "cache_max_bytes", _int(0, 1 << 40)),
    Variable("CACHE_MAX_ENTRY_BYTES", "cache_max_entry_bytes", _int(1024, 512 * 1024 * 1024)),
    Variable("PID_FILE", "pid_file", _without_default(_Env.file_in_a_folder)),
    Variable("ALERT_WEBHOOK_URL", "alert_webhook_url", _without_default(_Env.webhook_url)),
    Variable("ALERT_THRESHOLDS", "alert_thresholds", _without_default(_Env.thresholds)),
)
