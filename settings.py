"""All configuration, read once from the environment and validated at startup.

Handlers never read ``os.environ``: ``make_app`` puts one frozen ``Settings``
into the Tornado application settings (as JupyterHub does with its config).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from collections.abc import Mapping
from types import MappingProxyType

DEFAULT_ACCESS_TOKEN = "123456"  # noqa: S105 (the old service's documented default)


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
                value = [_mask(t) for t in value]
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = [str(v) for v in value]
            out[field.name] = value
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _Env(os.environ if environ is None else environ)
        tokens_raw = env.raw("ACCESS_TOKEN")
        if tokens_raw is None:
            # The old service called it ACCESS_KEY (issue 2: stay compatible).
            tokens_raw = env.raw("ACCESS_KEY")
        if tokens_raw is None:
            tokens = (DEFAULT_ACCESS_TOKEN,)
        else:
            tokens = tuple(t.strip() for t in tokens_raw.split(",") if t.strip())
            if not tokens:
                raise SettingsError("ACCESS_TOKEN: must hold at least one non-empty token")
        base_url = env.str("OPENAI_BASE_URL", cls.openai_base_url).rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise SettingsError(f"OPENAI_BASE_URL: must start with http:// or https://, got {base_url!r}")
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
        return cls(
            port=env.int("PORT", cls.port, 1, 65535),
            host=env.str("HOST", cls.host),
            access_tokens=tokens,
            openai_base_url=base_url,
            default_model=env.str("DEFAULT_MODEL", cls.default_model),
            default_generate_params=env.json_object("DEFAULT_GENERATE_PARAMS"),
            max_body_bytes=env.int("MAX_BODY_BYTES", cls.max_body_bytes, 1024, 1 << 31),
            connect_timeout=env.float("CONNECT_TIMEOUT", cls.connect_timeout),
            request_timeout=env.float("REQUEST_TIMEOUT", cls.request_timeout),
            stream_idle_timeout=env.float("STREAM_IDLE_TIMEOUT", cls.stream_idle_timeout),
            stream_keepalive=env.float("STREAM_KEEPALIVE", cls.stream_keepalive),
            client_stall_timeout=env.float("CLIENT_STALL_TIMEOUT", cls.client_stall_timeout),
            body_timeout=env.float("BODY_TIMEOUT", cls.body_timeout),
            client_idle_timeout=env.float("CLIENT_IDLE_TIMEOUT", cls.client_idle_timeout),
            rate_limit_per_token=env.int("RATE_LIMIT_PER_TOKEN", 0, 0, 1_000_000),
            max_concurrent_upstream=env.int("MAX_CONCURRENT_UPSTREAM", cls.max_concurrent_upstream, 1, 100_000),
            shutdown_grace=env.float("SHUTDOWN_GRACE", cls.shutdown_grace, minimum=0),
            shutdown_delay=env.float("SHUTDOWN_DELAY", cls.shutdown_delay, minimum=0),
            log_format=log_format,
            log_level=log_level,
            metrics_enabled=env.bool("METRICS_ENABLED", cls.metrics_enabled),
            trusted_proxies=env.networks("TRUSTED_PROXIES"),
            allowed_models=env.csv("ALLOWED_MODELS"),
            tls_certfile=certfile,
            tls_keyfile=keyfile,
            demo_upstream=env.bool("DEMO_UPSTREAM", cls.demo_upstream),
        )


def _mask(secret: str) -> str:
    return secret[:2] + "***" if len(secret) > 8 else "***"


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

    def json_object(self, name: str) -> Mapping:
        value = self.raw(name)
        if value is None:
            return MappingProxyType({})
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise SettingsError(f"{name}: not valid JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise SettingsError(f"{name}: must be a JSON object, got {type(parsed).__name__}")
        return MappingProxyType(parsed)

    def networks(self, name: str) -> tuple:
        nets = []
        for item in self.csv(name):
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise SettingsError(f"{name}: {item!r} is not an IP address or network") from None
        return tuple(nets)
