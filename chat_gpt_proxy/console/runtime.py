"""Tokens managed at run time (the admin API), kept in step in every worker and instance.

The database (``ConsoleStore``) is the truth. A change is one transaction
(the row, the version, the audit row); the process that made it loads the
table again at once, then tells the others:

- with REDIS_URL, by a message on the ``<REDIS_PREFIX>:tokens`` channel, which
  every process subscribes to: it checks at once;
- and in any case each process compares the table's version with its own
  every POLL seconds, one single-row read by primary key, which is all it
  takes without Redis or while Redis is away (or paused: a message then never
  comes, and no timeout says so).

A reload replaces the registry's runtime entries in one assignment (access/tokens.py),
so a revoked or rotated token is refused by every request, stream and
realtime session that starts after it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time

from chat_gpt_proxy.access.tokens import (
    FROM_PAGE,
    NAME_RE,
    POLICY_FIELDS,
    TokenEntry,
    TokenRegistry,
    TokensFileError,
    iso_time,
    parse_policy,
    token_digest,
)

from .store import Conflict, ConsoleStore, NotFound, make_console_store

log = logging.getLogger("chat_gpt_proxy")

# Seconds between version checks (with Redis too: a paused or lost Redis must not hold a revocation
# back), and how long a pub/sub read waits before it looks again.
POLL = 0.25
SAFETY_POLL = 5.0
# Bytes of randomness in a new token (secrets.token_urlsafe: 4 characters per 3 bytes).
TOKEN_BYTES = 30
# Refusals waiting for the database, and how often they are written (as the ledger's rows are).
MAX_REFUSALS_QUEUED = 10_000
REFUSALS_EVERY = 0.5
TOKEN_PREFIX = "cgp_"  # noqa: S105 (a prefix that secret scanners can look for)


class ApiRefusal(Exception):
    """A change refused: ``status`` (400, 404, 409), a message, the field at fault if one is."""

    def __init__(self, status: int, message: str, code: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.field = status, message, code, field


def storable(text: str, limit: int = 256) -> str:
    """``text`` as any database stores it: valid UTF-8 (surrogates replaced), no NUL, at most ``limit`` characters."""
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")[:limit]


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def entry_of(row: dict, settings) -> TokenEntry:
    """The registry entry of a table row (``TokensFileError`` if the settings no longer allow its fields)."""
    policy = parse_policy(row["fields"], settings)
    return TokenEntry(row["name"], row["name"], bytes.fromhex(row["token_sha256"]), policy, FROM_PAGE)


def normalised(fields: dict, settings) -> dict:
    """``fields`` checked as the tokens file's are, without the nulls (unset), ``expires`` as ISO 8601 UTC."""
    out = {k: v for k, v in fields.items() if v is not None}
    try:
        policy = parse_policy(out, settings)
    except TokensFileError as exc:
        raise ApiRefusal(400, str(exc), "invalid_field", exc.field) from None
    if policy.expires is not None:
        out["expires"] = iso_time(policy.expires)
    return out


class RuntimeTokens:
    """The admin API's tokens in one process: the store, the sync task, the changes."""

    def __init__(self, settings, registry: TokenRegistry, spend=None, check=None):
        """``spend``: its counters start from the ledger for a name new to this process;
        ``check(entries)``: why a set of entries cannot be served (server.py's WORKERS rule), or ""."""
        self.settings = settings
        self.registry = registry
        self.spend = spend
        self.check = check
        self.store: ConsoleStore = make_console_store(settings.usage_database)
        self.version = -1
        self.rows: dict[str, dict] = {}
        self.task: asyncio.Task | None = None
        self.listen_task: asyncio.Task | None = None
        self.publishing: set[asyncio.Task] = set()
        self.redis = None
        self.channel = "%s:tokens" % settings.redis_prefix
        self.closing = False
        self.reloads = 0
        self.reload_lock = asyncio.Lock()
        self.wake = asyncio.Event()
        self.broken: set[tuple[str, float]] = set()
        self.problem = ""
        self.refusals: collections.deque[tuple] = collections.deque()
        self.refusals_dropped = 0
        self.refusal_task: asyncio.Task | None = None
        self.refusals_lock = asyncio.Lock()

    async def start(self) -> None:
        await self.store.open()
        await self.reload()
        days = self.settings.usage_retention_days
        if days:
            deleted = await self.store.delete_refusals_before(time.time() - days * 86400)
            if deleted:
                log.info("admin console: %d refusal rows older than %d days deleted", deleted, days)
        if self.settings.redis_url:
            from redis.asyncio import Redis

            # A connection of its own: a subscribed connection cannot serve other commands.
            self.redis = Redis.from_url(self.settings.redis_url, socket_connect_timeout=2, socket_timeout=None)
        self.task = asyncio.ensure_future(self._poll())
        if self.redis is not None:
            self.listen_task = asyncio.ensure_future(self._listen())
        self.refusal_task = asyncio.ensure_future(self._write_refusals())

    async def close(self) -> None:
        self.closing = True
        self.wake.set()
        for task in (self.task, self.listen_task, self.refusal_task, *self.publishing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        with contextlib.suppress(Exception):
            await self.flush_refusals()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
        await self.store.close()

    # -- keeping in step

    async def reload(self) -> None:
        """Load the table and put its tokens in force here, if its version moved."""
        async with self.reload_lock:
            version, rows = await self.store.tokens()
            if version == self.version:
                return
            entries = []
            for row in rows:
                try:
                    entries.append(entry_of(row, self.settings))
                except TokensFileError as exc:
                    key = (row["name"], row["updated_at"])
                    if key not in self.broken:
                        self.broken.add(key)
                        log.warning("admin tokens: %r is refused: %s", row["name"], exc)
            problem = self.check(entries) if self.check is not None else ""
            if problem and problem != self.problem:
                # Made when this process's settings allowed it (WORKERS=1, or with REDIS_URL).
                log.error("admin tokens: %s", problem)
            self.problem = problem
            self.registry.set_runtime(entries)
            self.rows = {r["name"]: r for r in rows}
            self.version = version
            self.reloads += 1
        if self.spend is not None:
            await self.spend.rebuild(entries)

    async def _poll(self) -> None:
        """Compare the table's version with this process's every POLL seconds, or at once when woken."""
        failing = False
        while not self.closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), POLL)
            self.wake.clear()
            try:
                await self._check()
            except Exception as exc:  # the database away: the tokens in force stay; try again
                if not failing:
                    log.warning("admin tokens: cannot check for changes (%s); retrying", type(exc).__name__)
                    failing = True
                await asyncio.sleep(1.0)
                continue
            if failing:
                log.info("admin tokens: checking for changes again")
                failing = False

    async def _check(self) -> None:
        if await self.store.version() != self.version:
            await self.reload()

    async def _listen(self) -> None:
        """With REDIS_URL: a change announced on the channel wakes the poll at once."""
        failing = False
        while not self.closing:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                if failing:
                    log.info("admin tokens: Redis announces changes again")
                    failing = False
                while not self.closing:
                    if await pubsub.get_message(ignore_subscribe_messages=True, timeout=SAFETY_POLL) is not None:
                        self.wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning(
                        "admin tokens: Redis cannot announce changes (%s); the version check goes on",
                        type(exc).__name__,
                    )
                    failing = True
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _publish(self) -> None:
        if self.redis is None:
            return
        try:
            await asyncio.wait_for(self.redis.publish(self.channel, str(self.version)), 2.0)
        except Exception as exc:  # the others find the change at their next version check
            log.warning("admin tokens: could not announce a change in Redis (%s)", type(exc).__name__)

    # -- refusals (the Requests tab, each person's refusals by kind)

    def refused(self, row: tuple) -> None:
        """Queue (at, token, route, model, status, code, latency_ms, request_id); never blocks, never raises."""
        row = tuple(storable(v) if isinstance(v, str) else v for v in row)
        if len(self.refusals) >= MAX_REFUSALS_QUEUED:
            self.refusals_dropped += 1
            if self.refusals_dropped == 1 or self.refusals_dropped % 1000 == 0:
                log.warning(
                    "admin console: %d refusal rows dropped (the database is down or slow)", self.refusals_dropped
                )
            return
        self.refusals.append(row)

    async def flush_refusals(self) -> None:
        # One flush at a time: the writer's and a request's would take (and write) the same first rows.
        async with self.refusals_lock:
            await self._flush_refusals()

    async def _flush_refusals(self) -> None:
        while self.refusals:
            batch = [self.refusals[i] for i in range(min(500, len(self.refusals)))]
            try:
                await self.store.insert_refusals(batch)
            except Exception:
                # One row the database refuses must not hold back the others for ever: each alone.
                kept = await self._insert_each(batch)
                if not kept:
                    raise
            for _ in batch:
                self.refusals.popleft()

    async def _insert_each(self, batch: list[tuple]) -> bool:
        """Write ``batch`` row by row; False if none went in (the database is away: keep them all),
        else the rows it refused are dropped, counted and logged."""
        refused = []
        for row in batch:
            try:
                await self.store.insert_refusals([row])
            except Exception as exc:
                refused.append((row, exc))
        if len(refused) == len(batch):
            return False
        for row, exc in refused:
            self.refusals_dropped += 1
            log.warning("admin console: a refusal row was refused (%s) request_id=%s", type(exc).__name__, row[-1])
        return True

    async def _write_refusals(self) -> None:
        while not self.closing:
            await asyncio.sleep(REFUSALS_EVERY)
            try:
                await self.flush_refusals()
            except Exception as exc:  # kept queued; tried again
                log.warning("admin console: cannot write refusals (%s); retrying", type(exc).__name__)
                await asyncio.sleep(2.0)

    # -- changes (the admin API)

    def file_defined(self, name: str) -> bool:
        return name in self.registry.file_names()

    def _refuse_file_name(self, name: str) -> None:
        if self.file_defined(name):
            raise ApiRefusal(
                409,
                "%r is defined in the tokens file (ACCESS_TOKENS_FILE): change it there and reload (SIGHUP)." % name,
                "defined_in_file",
            )

    def _check_serving(self, name: str, fields: dict) -> None:
        if self.check is None:
            return
        entry = TokenEntry(name, name, b"", parse_policy(fields, self.settings), FROM_PAGE)
        problem = self.check([entry])
        if problem:
            raise ApiRefusal(409, problem, "needs_shared_limits")

    async def _apply(self, name: str, change, actor: str, request_id: str) -> dict | None:
        audit = {"at": time.time(), "actor": actor, "request_id": request_id}
        try:
            after = await self.store.change(name, change, audit)
        except Conflict:
            raise ApiRefusal(409, "A token named %r already exists." % name, "name_taken") from None
        except NotFound:
            raise ApiRefusal(404, "No token named %r was made on the admin page." % name, "not_found") from None
        await self.reload()
        # Not awaited: a slow or paused Redis must not hold the admin's answer (the version check tells anyway).
        task = asyncio.ensure_future(self._publish())
        self.publishing.add(task)
        task.add_done_callback(self.publishing.discard)
        return after

    async def create(self, body: dict, actor: str, request_id: str) -> tuple[dict, str]:
        """A new token from ``body`` (its name and fields); the row and the token's value, shown this once."""
        name = body.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ApiRefusal(
                400,
                "name must be 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit",
                "invalid_field",
                "name",
            )
        self._refuse_file_name(name)
        fields = normalised(self._fields_of(body, exclude=("name",)), self.settings)
        self._check_serving(name, fields)
        value = new_token()
        now = time.time()
        row = {
            "name": name,
            "token_sha256": token_digest(value).hex(),
            "fields": fields,
            "created_at": now,
            "created_by": actor,
            "updated_at": now,
            "updated_by": actor,
        }

        def change(before):
            if before is not None:
                raise Conflict
            return "create", row

        return await self._apply(name, change, actor, request_id), value

    async def update(self, name: str, body: dict, actor: str, request_id: str) -> dict:
        """Change some fields of ``name`` (null: back to the default); ``{"disabled": true}`` revokes it."""
        self._refuse_file_name(name)
        given = self._fields_of(body)
        if not given:
            raise ApiRefusal(400, "Nothing to change: send one or more fields.", "invalid_field")

        def change(before):
            if before is None:
                raise NotFound
            fields = normalised({**before["fields"], **given}, self.settings)
            self._check_serving(name, fields)
            action = "update"
            if given.get("disabled") is True and not before["fields"].get("disabled"):
                action = "disable"
            elif given.get("disabled") in (False, None) and "disabled" in given and before["fields"].get("disabled"):
                action = "enable"
            return action, {**before, "fields": fields, "updated_at": time.time(), "updated_by": actor}

        return await self._apply(name, change, actor, request_id)

    async def rotate(self, name: str, actor: str, request_id: str) -> tuple[dict, str]:
        """A new value for ``name``; the old one is refused from the reload on."""
        self._refuse_file_name(name)
        value = new_token()

        def change(before):
            if before is None:
                raise NotFound
            digest = token_digest(value).hex()
            return "rotate", {**before, "token_sha256": digest, "updated_at": time.time(), "updated_by": actor}

        return await self._apply(name, change, actor, request_id), value

    async def delete(self, name: str, actor: str, request_id: str) -> None:
        self._refuse_file_name(name)

        def change(before):
            if before is None:
                raise NotFound
            return "delete", None

        await self._apply(name, change, actor, request_id)

    @staticmethod
    def _fields_of(body: dict, exclude=()) -> dict:
        fields = {k: v for k, v in body.items() if k not in exclude}
        for key in fields:
            if key not in POLICY_FIELDS:
                if key in ("token", "token_sha256"):
                    message = "%s cannot be given: the proxy makes the token (rotate for a new one)" % key
                elif key == "admin":
                    message = "admin can only be set in the tokens file (ACCESS_TOKENS_FILE)"
                elif key == "name":
                    message = "name cannot be changed: make a new token and delete this one"
                else:
                    message = "unknown field %r (known: name, %s)" % (key[:64], ", ".join(POLICY_FIELDS))
                raise ApiRefusal(400, message, "invalid_field", key[:64])
        return fields
