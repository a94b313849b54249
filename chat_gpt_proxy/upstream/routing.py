"""Several upstreams: which one serves a request, in which order to try them, and their health.

``UPSTREAMS_FILE`` (TOML, reloaded on SIGHUP) names the upstreams, one table each::

    [openai-a]
    base_url = "https://api.openai.com/v1"
    api_key_file = "/run/secrets/openai-a"   # or api_key; neither: the caller's key
    proxy = "socks5h://127.0.0.1:1080"        # its own egress proxy (default: UPSTREAM_PROXY)
    models = ["gpt-4o*", "o3"]                # names or * patterns; default: every model
    weight = 2                                # share within its tier
    priority = 0                              # 0 first; 1 only when every upstream of 0 is down

    [azure]
    kind = "azure"
    base_url = "https://my-resource.openai.azure.com"
    api_key = "..."
    api_version = "2024-10-21"
    aliases = { "gpt-4o" = "my-gpt4o-deployment" }
    priority = 1

    [claude]
    kind = "anthropic"                        # the Anthropic Messages API: serves /v1/messages only
    base_url = "https://api.anthropic.com"    # without /v1, as ANTHROPIC_BASE_URL
    api_key_file = "/run/secrets/anthropic"

Without the file there is one upstream, ``default``: OPENAI_BASE_URL with the
egress settings, exactly as before.

Credentials decide who may use an upstream: one with its own key serves the
requests that would use the server's key (a named token with
``use_server_key`` that sends no key); one without serves the requests that
bring the caller's key (and, if OPENAI_API_KEY is set, the server-key
requests too, as before).

Health is a circuit breaker per upstream name (kept across reloads), fed
only by what the route did (``route_fault``): after ``FAILURES_TO_OPEN``
route failures in a row, not all of them answers to one tenant's requests,
it is out for ``COOL_DOWN``; then one request may try it (half-open). What
proves the route works closes the circuit: a new connection to it (TCP, TLS,
the egress proxy's tunnel) or any answer; a connection failure of that
probe opens it again for twice the cool-down (up to ``MAX_COOL_DOWN``), and
a probe that has done neither within CONNECT_TIMEOUT stops holding the
others back. Tries that began before the circuit last opened or closed say
nothing about it. A 429 or 503 with Retry-After to the upstream's own key
sets that model aside on that upstream alone (``back_off``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import random
import re
import time
from collections.abc import Mapping
from types import MappingProxyType

from chat_gpt_proxy.toml_file import read_toml

from .egress import EgressConfigError, EgressProxy, check_ca_file, parse_proxy_url, proxy_for
from .retry import retry_after_seconds
from .urls import check_base_url, join_url

log = logging.getLogger("chat_gpt_proxy")

KINDS = ("openai", "azure", "anthropic")
# The kinds that serve OpenAI's API; "anthropic" serves Anthropic's Messages API alone.
OPENAI_KINDS = ("openai", "azure")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
FIELDS = (
    "base_url",
    "kind",
    "api_key",
    "api_key_file",
    "api_version",
    "proxy",
    "ca_file",
    "models",
    "aliases",
    "weight",
    "priority",
    "forward_caller_key",
)
KEY_RE = re.compile(r"^[\x21-\x7e]{1,512}\Z")
# What may stand in a URL path as a model (Azure's deployment) or an alias: a
# caller's model goes there verbatim, so "/", "..", "?" or "#" would change the
# path or the query that the upstream's own key is sent to.
PATH_NAME_RE = re.compile(r"^(?!\.{1,2}\Z)[A-Za-z0-9._:-]{1,200}\Z")
DEFAULT_AZURE_API_VERSION = "2024-10-21"
# Azure names the model in the path (its "deployment") for these endpoints.
AZURE_DEPLOYMENT_PATHS = ("chat/completions", "completions", "embeddings", "audio/transcriptions", "audio/speech")

FAILURES_TO_OPEN = 3
COOL_DOWN = 5.0
MAX_COOL_DOWN = 300.0

# The answers that say a request was refused without being processed:
# another upstream may serve it (docs/deploy.md, Several upstreams); 529 is
# Anthropic's overloaded_error.
FAILOVER_STATUSES = frozenset((429, 500, 502, 503, 504, 529))
KEY_REFUSED_STATUSES = frozenset((401, 403))


def failover_error(exc) -> bool:
    """Whether an ``UpstreamError`` proves the request reached no model: nothing was sent
    (the retry policy's own test), or the route refused the connection before it (TLS, the proxy's login)."""
    return exc.retry_reason is not None or exc.kind in ("tls", "proxy_auth", "proxy_tls")


class UpstreamsFileError(ValueError):
    """An upstreams file that cannot be used; one line naming the file and the entry."""


@dataclasses.dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str
    kind: str = "openai"
    api_key: str = dataclasses.field(default="", repr=False)
    api_version: str = ""
    egress: EgressProxy | None = None
    ca_file: str = ""
    models: tuple[str, ...] = ("*",)
    aliases: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    weight: int = 1
    priority: int = 0
    # A keyless upstream that takes callers' requests: whether their OpenAI key
    # goes with them (false: a local server that needs none never sees it).
    forward_caller_key: bool = True

    def serves(self, model: str | None) -> bool:
        if self.models == ("*",):
            return True
        if model is None:
            # A request that names no model (files, batches, a stored
            # prompt) may go to any upstream; a token's upstreams pin it.
            return True
        return model in self.aliases or any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def upstream_model(self, model: str | None) -> str | None:
        """What this upstream calls ``model`` (its alias, or Azure's deployment name)."""
        return self.aliases.get(model, model) if model is not None else None

    def url(self, path: str, query: str, model: str | None) -> str | None:
        """The URL of the API ``path`` (after ``/v1/``) on this upstream, or None if the query is refused."""
        if self.kind == "openai":
            return join_url(self.base_url, path, query)
        if self.kind == "anthropic":
            # Anthropic's base URL has no /v1: its SDKs and Claude Code append /v1/messages.
            return join_url(self.base_url, "v1/" + path, query)
        version = "api-version=" + self.api_version
        query = version + ("&" + query if query else "")
        if path in AZURE_DEPLOYMENT_PATHS and model is not None:
            deployment = self.upstream_model(model)
            if not PATH_NAME_RE.match(deployment):
                raise ValueError("a model name that cannot be an Azure deployment: letters, digits, '.', '_', ':', '-'")
            return join_url(self.base_url, "openai/deployments/%s/%s" % (deployment, path), query)
        return join_url(self.base_url, "openai/" + path, query)

    def auth_headers(self, key: str) -> dict[str, str]:
        if not key:
            return {}
        if self.kind == "azure":
            return {"api-key": key}
        if self.kind == "anthropic":
            return {"x-api-key": key}
        return {"Authorization": "Bearer " + key}

    def describe(self) -> str:
        via = self.egress.masked() if self.egress is not None else "direct"
        return "%s (%s, %s, via %s)" % (self.name, self.kind, self.base_url, via)


def default_upstream(settings) -> Upstream:
    """Today's single upstream: OPENAI_BASE_URL and the egress settings."""
    return Upstream(
        "default",
        settings.openai_base_url,
        egress=settings.upstream_egress,
        ca_file=settings.upstream_ca_file,
    )


def parse_upstreams(path: str, settings) -> tuple[Upstream, ...]:
    data = read_toml(path, UpstreamsFileError)
    if not data:
        raise UpstreamsFileError("%s: names no upstream" % path)
    upstreams = []
    for name, table in data.items():
        where = "%s: upstream %r: " % (path, name[:64])
        if not isinstance(table, dict):
            raise UpstreamsFileError(where + "write each upstream as [name] followed by its fields")
        if not NAME_RE.match(name):
            raise UpstreamsFileError(where + "a name is 1-64 letters, digits, '.', '_' or '-'")
        upstreams.append(_parse_upstream(name, table, settings, where))
    return tuple(upstreams)


def _parse_upstream(name: str, table: dict, settings, where: str) -> Upstream:
    unknown = sorted(set(table) - set(FIELDS))
    if unknown:
        raise UpstreamsFileError(where + "unknown field %r (known: %s)" % (unknown[0][:64], ", ".join(FIELDS)))
    base_url = table.get("base_url")
    if not isinstance(base_url, str) or not base_url:
        raise UpstreamsFileError(where + "base_url is missing")
    try:
        base_url = check_base_url(base_url.rstrip("/"), _masked(base_url))
    except ValueError as exc:
        raise UpstreamsFileError(where + "base_url: %s" % exc) from None
    kind = table.get("kind", "openai")
    if kind not in KINDS:
        raise UpstreamsFileError(where + "kind must be one of %s" % ", ".join('"%s"' % k for k in KINDS))
    key = _key(table, where)
    if kind == "azure" and not key:
        raise UpstreamsFileError(where + "an azure upstream needs its api_key or api_key_file")
    version = table.get("api_version", DEFAULT_AZURE_API_VERSION if kind == "azure" else "")
    if kind == "azure" and (not isinstance(version, str) or not re.match(r"^[0-9A-Za-z.-]{1,40}$", version)):
        raise UpstreamsFileError(where + "api_version must be a version such as %s" % DEFAULT_AZURE_API_VERSION)
    if kind != "azure" and "api_version" in table:
        raise UpstreamsFileError(where + 'api_version is for kind = "azure"')
    if kind == "anthropic" and base_url.endswith("/v1"):
        raise UpstreamsFileError(where + "base_url of an anthropic upstream ends before /v1 (as ANTHROPIC_BASE_URL)")
    try:
        proxy = table.get("proxy")
        if proxy is not None and not isinstance(proxy, str):
            raise EgressConfigError('proxy must be a proxy URL string, or "" for direct')
        if proxy is None:
            egress = proxy_for(base_url, settings.upstream_proxy, settings.no_proxy)
        else:
            egress = parse_proxy_url(proxy, where + "proxy") if proxy else None
        ca_file = table.get("ca_file", settings.upstream_ca_file)
        if not isinstance(ca_file, str):
            raise EgressConfigError("ca_file must be a path")
        if ca_file:
            check_ca_file(ca_file, where + "ca_file")
    except EgressConfigError as exc:
        message = str(exc)
        raise UpstreamsFileError(message if message.startswith(where) else where + message) from None
    models = table.get("models", ["*"])
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise UpstreamsFileError(where + "models must be a non-empty list of model names or * patterns")
    aliases = table.get("aliases", {})
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) and PATH_NAME_RE.match(v) for k, v in aliases.items()
    ):
        raise UpstreamsFileError(where + "aliases must map model names to the upstream's names (letters, digits, ._:-)")
    forward = table.get("forward_caller_key", True)
    if not isinstance(forward, bool):
        raise UpstreamsFileError(where + "forward_caller_key must be true or false")
    if forward is False and key:
        raise UpstreamsFileError(where + "forward_caller_key is for upstreams without a key of their own")
    weight, priority = table.get("weight", 1), table.get("priority", 0)
    for field, value, low in (("weight", weight, 1), ("priority", priority, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 1000:
            raise UpstreamsFileError(where + "%s must be an integer from %d to 1000" % (field, low))
    return Upstream(
        name,
        base_url,
        kind,
        key,
        version if kind == "azure" else "",
        egress,
        ca_file,
        tuple(models),
        MappingProxyType(dict(aliases)),
        weight,
        priority,
        forward,
    )


def _masked(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, after = rest.rpartition("@")
    return scheme + sep + ("***@" + after if at else rest)


def _key(table: dict, where: str) -> str:
    key, key_file = table.get("api_key"), table.get("api_key_file")
    if key is not None and key_file is not None:
        raise UpstreamsFileError(where + "give api_key or api_key_file, not both")
    if key_file is not None:
        if not isinstance(key_file, str) or not os.path.isfile(key_file):
            raise UpstreamsFileError(where + "api_key_file: no such file")
        try:
            with open(key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except (OSError, UnicodeDecodeError):
            raise UpstreamsFileError(where + "api_key_file: cannot read it as text") from None
        if not key:
            raise UpstreamsFileError(where + "api_key_file: the file is empty")
    if key is None:
        return ""
    if not isinstance(key, str) or not KEY_RE.match(key):
        # Never quote the key: errors go to logs.
        raise UpstreamsFileError(where + "the key must be one line of visible ASCII characters (not shown)")
    return key


@dataclasses.dataclass
class Fault:
    """A failure counted against a route: its kind (a metric label), the upstream's Retry-After,
    and whether it is an answer (an error status), which a request's content can provoke."""

    kind: str
    retry_after: float | None = None
    answer: bool = False


# Failures before the request was sent that no request or caller can cause:
# the TLS handshake or the egress proxy (the others carry a ``retry_reason``).
PRE_SEND_ERRORS = frozenset(("tls", "proxy_auth", "proxy_tls", "proxy_failed", "proxy_unreachable"))


def route_fault(own_key: bool, *, error=None, status: int = 0, headers=None) -> Fault | None:
    """The route's share of a failed try, given whose key the request carried.

    ``error``: the ``UpstreamError`` raised before the answer's headers;
    ``status``: the error status the upstream answered instead. A ``Fault``
    is what the route did: the connection, TLS or egress proxy failed before
    the request was sent (as failover reads it), or it answered 5xx, 429 or
    refused its own key (``own_key``: the request carried the upstream's key,
    or OPENAI_API_KEY). None is the request's or its caller's own failure:
    anything after the request was sent (a timeout, a reset: a caller can
    make a request slow, or one the upstream drops), any answer to a
    caller's own key (its quota, its 5xx), a kept-alive connection the
    upstream had closed as idle.
    """
    if error is not None:
        if error.retry_reason == "reused_connection_closed":
            return None
        if error.retry_reason is not None or error.kind in PRE_SEND_ERRORS:
            return Fault(error.kind)
        return None
    if not own_key or status not in FAILOVER_STATUSES | KEY_REFUSED_STATUSES:
        return None
    wait = retry_after_seconds(headers) if status in (429, 503, 529) and headers is not None else None
    return Fault("status_%d" % status, wait, answer=True)


@dataclasses.dataclass
class Health:
    """One upstream's circuit breaker (docs/deploy.md, "Health"): closed, open for a cool-down, then half-open."""

    failures: int = 0  # route failures in a row while closed
    # Whose requests the answers among them were (tenants), and whether any was a connection
    # failure (which no tenant can cause): one tenant's answers alone never open the circuit.
    tenants: set = dataclasses.field(default_factory=set)
    unattributed: bool = False
    open_until: float = 0.0  # monotonic; 0: closed
    cool_down: float = dataclasses.field(default_factory=lambda: COOL_DOWN)
    # Whether a good answer came since the circuit last closed; one that opens again before
    # is as a failed probe: twice the cool-down.
    proven: bool = True
    probe_until: float = 0.0  # half-open: the probe holds the others back until then
    down_since: float | None = None
    # When the circuit last opened or closed: a try that began before says nothing about the route since.
    changed_at: float = 0.0

    @property
    def probing(self) -> bool:
        return time.monotonic() < self.probe_until

    @property
    def state(self) -> str:
        if not self.open_until:
            return "up"
        return "half_open" if time.monotonic() >= self.open_until else "down"


class Attempt:
    """One request's try of one upstream (``Router.started``), and what it says about the route:
    ``connected`` (a new connection is up), ``error``/``answered`` judge it (``route_fault``),
    ``fault``/``ok`` say it outright, ``end`` closes a try that said nothing (a half-open
    probe gives its turn to the next request)."""

    def __init__(self, router: Router, upstream: Upstream, own_key: bool, probe: bool, tenant: str, model):
        self.router = router
        self.upstream = upstream
        self.own_key = own_key
        self.probe = probe
        self.tenant = tenant
        self.model = model
        self.started_at = time.monotonic()
        self.probe_until = 0.0
        self.reached = False
        self.judged = False

    def connected(self) -> None:
        """A new connection to the upstream is up (TCP, TLS, the egress proxy's tunnel) and the request
        is being sent: the route works, whatever the request then takes."""
        if not self.judged:
            self.router.reachable(self)

    def error(self, exc) -> None:
        """An ``UpstreamError`` before the answer's headers (never our own abort)."""
        fault = route_fault(self.own_key, error=exc)
        if fault is not None:
            self.fault(fault.kind, fault.retry_after)

    def answered(self, status: int, headers) -> None:
        """The upstream's status line and headers arrived: it is reachable, whatever it said."""
        if self.judged:
            return
        self.router.reachable(self)
        fault = route_fault(self.own_key, status=status, headers=headers)
        if fault is not None:
            self.fault(fault.kind, fault.retry_after, answer=True)
        elif status not in FAILOVER_STATUSES:
            self.ok()

    def fault(self, kind: str, retry_after: float | None = None, answer: bool = False) -> None:
        if not self.judged:
            self.judged = True
            self.router.failed(self, kind, retry_after, answer)

    def ok(self) -> None:
        if not self.judged:
            self.judged = True
            self.router.succeeded(self)

    def end(self) -> None:
        if not self.judged:
            self.judged = True
            self.router.released(self)


# At most this many (upstream, model) pairs set aside at once (model names are the callers').
MAX_BACK_OFFS = 1024


class Router:
    """The upstreams in force (replaced whole on reload) and their health (kept by name)."""

    def __init__(self, settings, upstreams: tuple[Upstream, ...] | None = None, metrics=None):
        self.settings = settings
        self.metrics = None
        self.from_file = bool(settings.upstreams_file)
        if upstreams is None:
            upstreams = parse_upstreams(settings.upstreams_file, settings) if self.from_file else None
        self.upstreams: tuple[Upstream, ...] = upstreams or (default_upstream(settings),)
        self.health: dict[str, Health] = {}
        # (upstream name, model) -> until when (monotonic) that model is set aside there.
        self.back_offs: dict[tuple[str, str | None], float] = {}
        self.random = random.Random()  # noqa: S311 (spreading load, not a secret)
        if metrics is not None:
            self.use_metrics(metrics)

    def use_metrics(self, metrics) -> None:
        """Report to ``metrics`` (each process its own): every upstream's ``proxy_upstream_up`` from now on."""
        self.metrics = metrics
        self._publish()

    def reload(self) -> None:
        """Read UPSTREAMS_FILE again; ``UpstreamsFileError`` keeps the upstreams in force."""
        self.upstreams = parse_upstreams(self.settings.upstreams_file, self.settings)
        self._publish()

    def _publish(self) -> None:
        """``proxy_upstream_up`` for each upstream in force, none for those a reload removed."""
        if self.metrics is None:
            return
        names = {u.name for u in self.upstreams}
        gauge = self.metrics.upstream_up
        for labels in [s.labels for m in gauge.collect() for s in m.samples]:
            if labels.get("upstream") not in names:
                gauge.remove(labels["upstream"])
        for upstream in self.upstreams:
            self._gauge(upstream, 0 if self.health_of(upstream).open_until else 1)

    def health_of(self, upstream: Upstream) -> Health:
        found = self.health.get(upstream.name)
        if found is None:
            found = self.health[upstream.name] = Health()
        return found

    def candidates(
        self,
        model: str | None,
        allowed: tuple[str, ...] = (),
        server_key: bool = False,
        kinds: tuple[str, ...] = OPENAI_KINDS,
    ) -> list[Upstream]:
        """The upstreams to try for ``model``, in order: the best tier's healthy ones, weighted at
        random, then the next tier's; if every one is down or has set ``model`` aside, the one
        whose wait ends first.

        ``allowed``: a token's ``upstreams`` (empty: any); ``server_key``: the
        request has no caller key and would use the server's; ``kinds``: the
        upstream kinds that speak the request's API.
        """
        if not self.from_file:
            # OPENAI_BASE_URL alone serves every model, with the caller's key or the server's.
            return [self.upstreams[0]] if self.upstreams[0].kind in kinds else []
        usable = [
            u
            for u in self.upstreams
            if u.kind in kinds
            and u.serves(model)
            and (not allowed or u.name in allowed)
            and bool(u.api_key) == server_key
        ]
        if model is None:
            # Files, batches, the model list: to the upstreams that serve every
            # model if there are any, not to a server kept for a few models.
            usable = [u for u in usable if u.models == ("*",)] or usable
        now = time.monotonic()
        order: list[Upstream] = []
        waiting: list[tuple[float, Upstream]] = []
        for priority in sorted({u.priority for u in usable}):
            members = [u for u in usable if u.priority == priority]
            if model is not None and any(u.models != ("*",) for u in members):
                # Within a tier, a model some upstreams name goes to those, not to the catch-alls beside them.
                members = [u for u in members if u.models != ("*",)]
            tier = []
            for u in members:
                health = self.health_of(u)
                aside = self.back_offs.get((u.name, model), 0.0)
                if (not health.open_until or (now >= health.open_until and not health.probing)) and aside <= now:
                    tier.append(u)
                else:
                    waiting.append((max(health.open_until, aside), u))
            order.extend(self._weighted_order(tier))
        if not order and waiting:
            order.append(min(waiting, key=lambda w: w[0])[1])
        return order

    def _weighted_order(self, tier: list[Upstream]) -> list[Upstream]:
        """``tier`` in a random order where each one comes first in proportion to its weight."""
        # Efraimidis-Spirakis: sort by u ** (1 / weight) descending.
        return sorted(tier, key=lambda u: self.random.random() ** (1.0 / u.weight), reverse=True)

    def started(self, upstream: Upstream, own_key: bool = False, tenant: str = "", model: str | None = None) -> Attempt:
        """A request is about to try ``upstream`` (``own_key``: with the upstream's key or
        OPENAI_API_KEY; ``tenant``: who sends it, a token's name or a client address; ``model``:
        the model it names); the first once its cool-down is over is the half-open probe."""
        health = self.health_of(upstream)
        now = time.monotonic()
        probe = bool(health.open_until) and now >= health.open_until and now >= health.probe_until
        attempt = Attempt(self, upstream, own_key, probe, tenant, model)
        if probe:
            # A probe that has neither connected nor failed by then (queued, on a kept-alive
            # connection that hangs) holds the others back no longer.
            health.probe_until = attempt.probe_until = now + self.settings.connect_timeout
        return attempt

    def released(self, attempt: Attempt) -> None:
        """The try ended with no verdict on the route (the client left, the request's own error):
        a half-open probe gives its turn back, so that the next request probes instead."""
        health = self.health_of(attempt.upstream)
        if attempt.probe and health.probe_until == attempt.probe_until:
            health.probe_until = 0.0

    def reachable(self, attempt: Attempt) -> None:
        """The route took a new connection or answered. Its probe, or any try that began while it
        was open (every upstream down, or the only one), closes the circuit."""
        if attempt.reached:
            return
        attempt.reached = True
        upstream = attempt.upstream
        health = self.health_of(upstream)
        if not health.open_until or not (attempt.probe or attempt.started_at >= health.changed_at):
            return
        now = time.monotonic()
        down_for = now - (health.down_since or now)
        log.warning("upstream %r is back after_s=%.1f", upstream.name, down_for)
        health.failures, health.open_until, health.probe_until = 0, 0.0, 0.0
        health.tenants, health.unattributed, health.proven = set(), False, False
        health.down_since, health.changed_at = None, now
        # What this try says next (its answer) is about the circuit it closed.
        attempt.started_at = now
        self._gauge(upstream, 1)

    def succeeded(self, attempt: Attempt) -> None:
        """A good answer: the circuit closes if this try may close it, and the failures in a row end."""
        self.reachable(attempt)
        health = self.health_of(attempt.upstream)
        if health.open_until or attempt.started_at < health.changed_at:
            return  # began before the circuit last opened or closed
        health.failures, health.tenants, health.unattributed = 0, set(), False
        if not health.proven:
            health.proven, health.cool_down = True, COOL_DOWN

    def failed(self, attempt: Attempt, kind: str, retry_after: float | None = None, answer: bool = False) -> None:
        """A failure that was the route's (``route_fault``); ``answer``: an error status.

        A 429 or 503 with Retry-After to the upstream's own key sets the
        request's model aside on this upstream (``back_off``) and counts no
        further. Closed, FAILURES_TO_OPEN failures in a row open the circuit
        for the cool-down, unless all of them are answers to one tenant's
        requests (a request can provoke an error answer; nobody's request
        can make a connection fail). Open, only its half-open probe's
        connection failure opens it again, for twice the cool-down (up to
        MAX_COOL_DOWN): the requests that were in flight when the route broke
        fail one after the other, and must not keep it out for minutes.
        """
        upstream = attempt.upstream
        if self.metrics is not None:
            self.metrics.upstream_failures.labels(upstream.name, kind).inc()
        if answer and retry_after:
            self.back_off(upstream, attempt.model, retry_after)
            return
        health = self.health_of(upstream)
        now = time.monotonic()
        if health.open_until:
            if attempt.probe and not attempt.reached:
                health.probe_until = 0.0
                health.cool_down = min(MAX_COOL_DOWN, health.cool_down * 2)
                health.open_until, health.changed_at = now + health.cool_down, now
                log.warning(
                    "upstream still down upstream=%s kind=%s cool_down_s=%.0f", upstream.name, kind, health.cool_down
                )
            return
        if attempt.started_at < health.changed_at:
            return  # began before the circuit last opened or closed
        health.failures += 1
        if answer:
            health.tenants.add(attempt.tenant)
        else:
            health.unattributed = True
        if health.failures < FAILURES_TO_OPEN or (not health.unattributed and len(health.tenants) < 2):
            return
        if not health.proven:
            # Closed by a connection, it never answered well before failing again: as a failed probe.
            health.cool_down = min(MAX_COOL_DOWN, health.cool_down * 2)
        health.open_until, health.changed_at, health.down_since = now + health.cool_down, now, now
        log.warning(
            "upstream down upstream=%s kind=%s failures=%d cool_down_s=%.0f",
            upstream.name,
            kind,
            health.failures,
            health.cool_down,
        )
        self._gauge(upstream, 0)

    def back_off(self, upstream: Upstream, model: str | None, seconds: float) -> None:
        """The upstream's own key is refused ``model`` for ``seconds`` (its Retry-After, at most
        MAX_COOL_DOWN): requests for that model try its other upstreams first meanwhile; other
        models, and the circuit, are not affected."""
        now = time.monotonic()
        key = (upstream.name, model)
        previous = self.back_offs.pop(key, 0.0)
        until = max(previous, now + min(seconds, MAX_COOL_DOWN))
        if previous <= now:
            log.warning(
                "upstream sets a model aside upstream=%s model=%s seconds=%.0f",
                upstream.name,
                (model or "-")[:100],
                until - now,
            )
        if len(self.back_offs) >= MAX_BACK_OFFS:
            # The expired ones, or else the oldest (dicts keep insertion order).
            for old in [k for k, t in self.back_offs.items() if t <= now] or [next(iter(self.back_offs))]:
                del self.back_offs[old]
        self.back_offs[key] = until

    def _gauge(self, upstream: Upstream, up: int) -> None:
        if self.metrics is not None:
            self.metrics.upstream_up.labels(upstream.name).set(up)

    def states(self) -> list[dict]:
        """For /healthz: each upstream's name, kind and state, never its key or URL credentials."""
        return [
            {
                "name": u.name,
                "kind": u.kind,
                "state": self.health_of(u).state,
                "priority": u.priority,
                "weight": u.weight,
            }
            for u in self.upstreams
        ]
