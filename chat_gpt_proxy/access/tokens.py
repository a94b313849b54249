"""Access tokens: the unnamed ones of ACCESS_TOKEN and the named ones of ACCESS_TOKENS_FILE.

The file is TOML, one table per token name::

    [alice]
    token = "a-long-random-token-of-16-or-more-characters"
    rate_limit_per_minute = 60        # unset: RATE_LIMIT_PER_TOKEN; 0: none
    max_concurrent = 4                # requests and streams in flight; unset or 0: no limit
    allowed_models = ["gpt-4o-mini"]  # unset: ALLOWED_MODELS
    use_server_key = true             # may use OPENAI_API_KEY when sending no key of its own
    budget_usd = 20.0                 # spend per budget_period (chat_gpt_proxy/usage/); unset: none
    budget_tokens = 2000000           # input + output tokens per budget_period; unset: none
    budget_period = "month"           # "day", "week" or "month" (UTC calendar periods)
    upstreams = ["openai-a"]          # only these upstreams of UPSTREAMS_FILE; unset: any
    cache = true                      # the response cache (chat_gpt_proxy/cache.py); unset: CACHE_TTL decides
    cache_ttl = 86400                 # seconds an answer is kept; unset: CACHE_TTL, else an hour
    deferred = true                   # with a budget: may start background responses, batches, client secrets
    expires = 2027-01-01T00:00:00Z    # refused from then on (a TOML date or date-time; UTC if no offset)
    admin = true                      # this token also opens /admin and /admin/api (the audit names it)
    disabled = false

    [bob]
    token_sha256 = "<hex SHA-256 of bob's token>"   # a leaked file then leaks no token

``TokenRegistry`` (one per application, in its settings as ``"tokens"``)
finds the entry a presented token belongs to, admits requests under each
entry's limits, and reloads the file on SIGHUP: a new snapshot of entries
replaces the old one in one assignment, so new requests see it at once while
requests in flight keep the entry (and policy) they were admitted with.
Tokens managed from the admin page (chat_gpt_proxy/console/) join the file's
the same way (``set_runtime``); they are checked by the same ``parse_policy``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import logging
import math
import re

from chat_gpt_proxy import human
from chat_gpt_proxy.access.limits import InFlight, RateLimiter
from chat_gpt_proxy.toml_file import read_toml
from chat_gpt_proxy.usage.budgets import NO_BUDGET, PERIODS, Budget

log = logging.getLogger("chat_gpt_proxy")

# Names end up in log lines, metric labels and Location headers: keep them short and plain.
# \Z, not $: $ also matches before a final newline, which no header may carry.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
# A token travels in a header: visible ASCII only.
TOKEN_RE = re.compile(r"^[\x21-\x7e]+\Z")
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}\Z")
MIN_TOKEN_LENGTH = 16
FIELDS = (
    "token",
    "token_sha256",
    "rate_limit_per_minute",
    "max_concurrent",
    "allowed_models",
    "use_server_key",
    "budget_usd",
    "budget_tokens",
    "budget_period",
    "upstreams",
    "cache",
    "cache_ttl",
    "deferred",
    "expires",
    "admin",
    "disabled",
)
# What a token's policy holds (everything but its value and the admin flag): the fields the admin API takes.
POLICY_FIELDS = tuple(f for f in FIELDS if f not in ("token", "token_sha256", "admin"))
UNNAMED = "-"
# Where a named token is defined.
FROM_FILE = "file"
FROM_PAGE = "page"


class TokensFileError(ValueError):
    """A tokens file that cannot be used; the message is one line naming the file and the token.

    ``field``: the field at fault, when one is (the admin API's 400 names it).
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class TokenPolicy:
    """What a token may do, with the global settings already filled in where the file says nothing."""

    rate_limit_per_minute: int = 0  # 0: no limit
    max_concurrent: int = 0  # 0: no limit
    allowed_models: tuple[str, ...] = ()  # (): any model
    use_server_key: bool = False
    budget: Budget = NO_BUDGET
    upstreams: tuple[str, ...] = ()  # (): any upstream
    cache: bool | None = None  # None: CACHE_TTL decides
    cache_ttl: int = 0  # 0: CACHE_TTL, else an hour
    # Work that runs after the request (chat_gpt_proxy/usage/deferred.py): refused to a budgeted token unless true.
    deferred: bool = False
    disabled: bool = False
    expires: float | None = None  # Unix seconds from which the token is refused; None: never

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires


@dataclasses.dataclass(frozen=True)
class TokenEntry:
    name: str  # "-" for the unnamed tokens of ACCESS_TOKEN
    key: str  # what the limits count under: the name, or "-<n>" for the n-th unnamed token
    digest: bytes = dataclasses.field(repr=False)
    policy: TokenPolicy = TokenPolicy()
    # FROM_FILE (ACCESS_TOKEN's too) or FROM_PAGE (the admin API's, in the database).
    source: str = FROM_FILE
    # admin = true in the tokens file: this token opens the admin page and API too.
    admin: bool = False


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A request refused by one of its token's limits (answered 429)."""

    limit: str  # the policy field: "rate_limit_per_minute" or "max_concurrent"
    retry_after: int
    message: str


class Unavailable:
    """The shared limits (Redis, access/shared_limits.py) could not be asked: REDIS_FAILURE_MODE decides."""


UNAVAILABLE = Unavailable()


def concurrency_refusal(policy: TokenPolicy) -> Refusal:
    return Refusal(
        "max_concurrent",
        1,
        "This access token already has %s in flight, its max_concurrent limit; "
        "retry when one has finished." % human.count(policy.max_concurrent, "request"),
    )


def rate_refusal(policy: TokenPolicy, wait: int) -> Refusal:
    return Refusal(
        "rate_limit_per_minute",
        wait,
        "Rate limit of this access token (%s per minute) reached; retry in %s."
        % (human.count(policy.rate_limit_per_minute, "request"), human.duration(wait)),
    )


def token_digest(token: str) -> bytes:
    """SHA-256 of a token as it arrives in a header: what ``token_sha256`` holds, in hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def unnamed_entries(settings) -> list[TokenEntry]:
    """ACCESS_TOKEN / ACCESS_KEY: unnamed, with the global settings, as before named tokens."""
    policy = TokenPolicy(rate_limit_per_minute=settings.rate_limit_per_token, allowed_models=settings.allowed_models)
    return [TokenEntry(UNNAMED, "-%d" % i, token_digest(t), policy) for i, t in enumerate(settings.access_tokens)]


def parse_tokens_file(path: str, settings) -> list[TokenEntry]:
    """The named tokens of ``path``; ``TokensFileError`` (one line) for anything wrong with it."""
    data = read_toml(path, TokensFileError)
    entries = []
    for name, table in data.items():
        if not isinstance(table, dict):
            raise TokensFileError(
                "%s: %r is not a table: write each token as [name] followed by its fields" % (path, name[:64])
            )
        if not NAME_RE.match(name):
            raise TokensFileError(
                "%s: token %r: a name is 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
                % (path, name[:64])
            )
        entries.append(_parse_entry(table, settings, "%s: token %r: " % (path, name), name))
    return entries


def _parse_entry(table: dict, settings, where: str, name: str) -> TokenEntry:
    unknown = sorted(set(table) - set(FIELDS))
    if unknown:
        raise TokensFileError(where + "unknown field %r (known: %s)" % (unknown[0][:64], ", ".join(FIELDS)))
    plain, hashed = table.get("token"), table.get("token_sha256")
    if (plain is None) == (hashed is None):
        raise TokensFileError(where + "give exactly one of token and token_sha256")
    if plain is not None:
        # Never quote the token itself in an error: errors go to logs.
        if not isinstance(plain, str) or not TOKEN_RE.match(plain):
            raise TokensFileError(where + "token must be a string of visible ASCII characters, without spaces")
        if len(plain) < MIN_TOKEN_LENGTH:
            raise TokensFileError(
                where
                + "token is shorter than %d characters: use a longer one, or give its token_sha256 instead"
                % MIN_TOKEN_LENGTH
            )
        digest = token_digest(plain)
    else:
        if not isinstance(hashed, str) or not SHA256_RE.match(hashed):
            raise TokensFileError(where + "token_sha256 must be 64 hexadecimal digits (sha256sum's output)")
        digest = bytes.fromhex(hashed)
    admin = _bool(table, "admin", where)
    policy = parse_policy({k: v for k, v in table.items() if k in POLICY_FIELDS}, settings, where)
    return TokenEntry(name, name, digest, policy, FROM_FILE, admin)


def parse_policy(table: dict, settings, where: str = "") -> TokenPolicy:
    """The policy of one token from its fields (POLICY_FIELDS), checked as the tokens file is:
    ``TokensFileError`` naming the field (``where`` before the message) for anything wrong."""
    unknown = sorted(set(table) - set(POLICY_FIELDS))
    if unknown:
        raise TokensFileError(
            where + "unknown field %r (known: %s)" % (unknown[0][:64], ", ".join(POLICY_FIELDS)), unknown[0][:64]
        )
    models = table.get("allowed_models")
    if models is not None and (
        not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models)
    ):
        raise TokensFileError(where + "allowed_models must be a non-empty list of model names", "allowed_models")
    use_server_key = _bool(table, "use_server_key", where)
    if use_server_key and not settings.openai_api_key and not settings.upstreams_file:
        raise TokensFileError(
            where + "use_server_key = true, but neither OPENAI_API_KEY nor OPENAI_API_KEY_FILE is set"
            " (nor UPSTREAMS_FILE, whose upstreams may hold keys)",
            "use_server_key",
        )
    upstreams = table.get("upstreams")
    if upstreams is not None and (
        not isinstance(upstreams, list) or not upstreams or not all(isinstance(u, str) and u for u in upstreams)
    ):
        raise TokensFileError(where + "upstreams must be a non-empty list of upstream names", "upstreams")
    return TokenPolicy(
        rate_limit_per_minute=_int(table, "rate_limit_per_minute", where, settings.rate_limit_per_token, 1_000_000),
        max_concurrent=_int(table, "max_concurrent", where, 0, 100_000),
        allowed_models=tuple(models) if models is not None else settings.allowed_models,
        use_server_key=use_server_key,
        budget=_budget(table, where),
        upstreams=tuple(upstreams or ()),
        cache=_bool(table, "cache", where) if "cache" in table else None,
        cache_ttl=_int(table, "cache_ttl", where, 0, 365 * 86400),
        deferred=_bool(table, "deferred", where),
        disabled=_bool(table, "disabled", where),
        expires=parse_expires(table.get("expires"), where),
    )


def parse_expires(value, where: str = "") -> float | None:
    """``expires``: a TOML date or date-time, or the same as ISO 8601 text (JSON); UTC when no offset is given."""
    if value is None:
        return None
    moment = None
    if isinstance(value, str) and len(value) <= 40:
        text = value.strip()
        text = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
        try:
            moment = datetime.datetime.fromisoformat(text) if ("T" in text or " " in text) else None
            if moment is None:
                moment = datetime.date.fromisoformat(text)
        except ValueError:
            moment = None
    elif isinstance(value, datetime.datetime | datetime.date):
        moment = value
    at = None
    if isinstance(moment, datetime.datetime):
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        at = moment.timestamp()
    elif isinstance(moment, datetime.date):
        at = datetime.datetime.combine(moment, datetime.time(), datetime.UTC).timestamp()
    if at is None:
        raise TokensFileError(
            where + "expires must be a date (2027-01-31) or a date and time (2027-01-31T18:00:00Z)", "expires"
        )
    try:
        # An offset can carry 9999-12-31 or 0001-01-01 outside the years a UTC date can write.
        iso_time(at)
    except (ValueError, OverflowError, OSError):
        raise TokensFileError(where + "expires must be in UTC between years 1 and 9999", "expires") from None
    return at


def iso_time(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _budget(table: dict, where: str) -> Budget:
    usd, tokens = table.get("budget_usd"), table.get("budget_tokens")
    period = table.get("budget_period", "month")
    if usd is not None and (
        isinstance(usd, bool) or not isinstance(usd, int | float) or not math.isfinite(usd) or not 0 <= usd <= 1e9
    ):
        raise TokensFileError(where + "budget_usd must be a number of US dollars, 0 or more", "budget_usd")
    if tokens is not None:
        tokens = _int(table, "budget_tokens", where, 0, 10**15)
    if period not in PERIODS:
        raise TokensFileError(
            where + "budget_period must be one of %s" % ", ".join('"%s"' % p for p in PERIODS), "budget_period"
        )
    if usd is None and tokens is None:
        if "budget_period" in table:
            raise TokensFileError(
                where + "budget_period is set but neither budget_usd nor budget_tokens", "budget_period"
            )
        return NO_BUDGET
    return Budget(None if usd is None else float(usd), tokens, period)


def _int(table: dict, field: str, where: str, default: int, high: int) -> int:
    value = table.get(field)
    if value is None:
        return default
    # bool is an int in Python; TOML's true is not a number.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise TokensFileError(where + "%s must be an integer from 0 to %d" % (field, high), field)
    return value


def _bool(table: dict, field: str, where: str) -> bool:
    value = table.get(field, False)
    if not isinstance(value, bool):
        raise TokensFileError(where + "%s must be true or false" % field, field)
    return value


def load_entries(settings) -> tuple[TokenEntry, ...]:
    """Every token the proxy accepts: ACCESS_TOKEN's, then ACCESS_TOKENS_FILE's."""
    entries = unnamed_entries(settings)
    if settings.access_tokens_file:
        path = settings.access_tokens_file
        seen = {e.digest: "one in ACCESS_TOKEN" for e in entries}
        for entry in parse_tokens_file(path, settings):
            if entry.digest in seen:
                # Which entry a request belongs to must never be ambiguous.
                raise TokensFileError("%s: token %r: the same token as %s" % (path, entry.name, seen[entry.digest]))
            seen[entry.digest] = "token %r" % entry.name
            entries.append(entry)
    return tuple(entries)


class TokenRegistry:
    """The tokens in force, and the per-token limit counters, which outlive reloads.

    ``entries``: the file's (and ACCESS_TOKEN's), then those managed from the
    admin page; each set is replaced on its own (SIGHUP, ``set_runtime``) and
    ``entries`` rebuilt from both in one assignment.
    """

    def __init__(self, settings):
        self.settings = settings
        self.rate = RateLimiter()
        self.in_flight = InFlight()
        self.file_entries = load_entries(settings)
        self.runtime_entries: tuple[TokenEntry, ...] = ()
        self.entries = self.file_entries
        # Page names the file hides (warned about once each, and again at each reload of the file).
        self.hidden: set[str] = set()

    @property
    def named(self) -> int:
        return sum(1 for e in self.file_entries if e.name != UNNAMED)

    @property
    def has_admins(self) -> bool:
        return any(e.admin for e in self.file_entries)

    def file_names(self) -> set[str]:
        return {e.name for e in self.file_entries if e.name != UNNAMED}

    def reload(self, check=None) -> None:
        """Read ACCESS_TOKENS_FILE again; on ``TokensFileError`` the tokens in force stay.

        ``check(entries)``: a reason to refuse the new set (one line), or "".
        """
        entries = load_entries(self.settings)
        problem = check(entries) if check is not None else ""
        if problem:
            raise TokensFileError(problem)
        self.file_entries = entries
        self._combine(warn_all=True)

    def set_runtime(self, entries) -> None:
        """The tokens managed from the admin page, as the database now holds them."""
        self.runtime_entries = tuple(entries)
        self._combine()

    def _combine(self, warn_all: bool = False) -> None:
        # A name or a token the file defines wins: the page cannot shadow it.
        names = self.file_names()
        digests = {e.digest for e in self.file_entries}
        extra = tuple(e for e in self.runtime_entries if e.name not in names and e.digest not in digests)
        self.entries = self.file_entries + extra  # one assignment: the old set or the new one, never a mix
        kept = {e.name for e in extra}
        hidden = {e.name for e in self.runtime_entries if e.name not in kept}
        for name in sorted(hidden if warn_all else hidden - self.hidden):
            # Its holder is refused (or served as the file's name) with no other sign of why.
            log.warning(
                "tokens: the page's token %r is not in force: the tokens file defines the same %s; "
                "rename or delete one of them",
                name,
                "name" if name in names else "token",
            )
        self.hidden = hidden

    def find(self, name: str) -> TokenEntry | None:
        """The entry of ``name`` in force, if any."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        return None

    def lookup(self, presented: str) -> TokenEntry | None:
        """The entry ``presented`` belongs to, if any.

        Digests of equal length are compared with every entry, plain and hashed
        alike, whichever matches, so timing reveals neither which token matched
        nor how much of one.
        """
        digest = token_digest(presented)
        found = None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found

    def admit(self, entry: TokenEntry) -> Refusal | None:
        """Count a new request under ``entry``'s limits; a ``Refusal`` if one is reached.

        An admitted request must be ``release``d once it has finished.
        """
        policy = entry.policy
        if not self.in_flight.acquire(entry.key, policy.max_concurrent):
            return concurrency_refusal(policy)
        if policy.rate_limit_per_minute:
            wait = self.rate.take(entry.key, policy.rate_limit_per_minute)
            if wait:
                self.in_flight.release(entry.key)
                return rate_refusal(policy, wait)
        return None

    def release(self, entry: TokenEntry) -> None:
        self.in_flight.release(entry.key)
