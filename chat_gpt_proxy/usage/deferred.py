"""Work that runs after its request has been answered, and how it is charged.

- ``POST /v1/responses`` with ``"background": true`` answers at once; the
  model runs later and its usage shows when the response is retrieved
  finished (``GET /v1/responses/{id}``).
- ``POST /v1/batches`` runs a file of requests within 24 hours; the batch
  shows its usage when retrieved finished (``GET /v1/batches/{id}``).
- ``POST /v1/realtime/client_secrets`` (and the older ``realtime/sessions``
  and ``realtime/transcription_sessions``) hands out an ephemeral key with
  which a client talks to OpenAI directly: the proxy never sees that usage.

A token with a budget is refused all three (403 ``deferred_not_allowed``)
unless its entry says ``deferred = true``. Then, and for metered tokens
without a budget, the background responses and batches it starts are
remembered here, and charged the usage the upstream reports the first time a
retrieval through this proxy shows them finished; client secrets are charged
nothing. The ids are remembered by this process, for a week at most: a
restart, or a retrieval through another instance, charges nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time

# How long, and how many, created ids are remembered (a batch runs within 24 hours).
KEEP_SECONDS = 7 * 86400
MAX_KEPT = 100_000
SECRET_PATHS = frozenset(("realtime/client_secrets", "realtime/sessions", "realtime/transcription_sessions"))
RETRIEVAL_RE = re.compile(r"^(responses|batches)/([A-Za-z0-9_-]{1,200})$")
# Statuses after which a response or a batch no longer runs.
FINISHED = frozenset(("completed", "incomplete", "failed", "cancelled", "expired"))


def deferred_kind(method: str, path: str, body) -> str | None:
    """``"background"``, ``"batch"``, ``"client_secret"``, or None for a request whose work ends with its answer."""
    if method != "POST":
        return None
    if path == "responses" and isinstance(body, dict) and body.get("background") is True:
        # Streamed, it is charged as any stream: its usage, or what may have run if the caller left.
        return None if body.get("stream") is True else "background"
    if path == "batches":
        return "batch"
    if path in SECRET_PATHS:
        return "client_secret"
    return None


@dataclasses.dataclass
class Pending:
    token: str
    model: str | None
    created: float


class DeferredWork:
    """The background responses and batches started through this process, until charged."""

    def __init__(self):
        self.pending: collections.OrderedDict[str, Pending] = collections.OrderedDict()

    def started(self, object_id: str, token: str, model: str | None) -> None:
        self._expire()
        self.pending[object_id] = Pending(token, model, time.time())
        while len(self.pending) > MAX_KEPT:
            self.pending.popitem(last=False)

    def finished(self, path: str, answer) -> tuple[Pending, str] | None:
        """The entry of a retrieval ``path`` whose ``answer`` shows it finished, taken out (charged once)."""
        found = RETRIEVAL_RE.match(path)
        if found is None or not isinstance(answer, dict) or answer.get("status") not in FINISHED:
            return None
        entry = self.pending.pop(found.group(2), None)
        return None if entry is None else (entry, found.group(1))

    def _expire(self) -> None:
        cutoff = time.time() - KEEP_SECONDS
        while self.pending:
            first = next(iter(self.pending.values()))
            if first.created >= cutoff:
                break
            self.pending.popitem(last=False)
