"""Work that runs after its request has been answered, and how it is charged.

- ``POST /v1/responses`` with ``"background": true`` answers at once; the
  model runs later and its usage shows when the response is retrieved
  finished (``GET /v1/responses/{id}``).
- ``POST /v1/batches`` runs a file of requests within 24 hours; the batch
  shows its usage when retrieved finished (``GET /v1/batches/{id}``).
- ``POST /v1/realtime/client_secrets`` (and the older ``realtime/sessions``
  and ``realtime/transcription_sessions``) hands out an ephemeral key with
  which a client talks to OpenAI directly, and ``POST /v1/realtime/calls``
  starts a WebRTC session that does: the proxy never sees that usage.
- Jobs (fine-tuning, assistant runs, evals, videos) run upstream for minutes
  or hours; the proxy does not follow them.

A token with a budget is refused all of these (403 ``deferred_not_allowed``)
unless its entry says ``deferred = true``. Then, and for metered tokens
without a budget, the background responses and batches it starts are
remembered here, and charged the usage the upstream reports the first time a
retrieval through this proxy shows them finished (a streamed background
response is charged as a stream, or remembered so if its client left before
its usage came); sessions and jobs are charged nothing. The ids are
remembered by this process, for a week at most and 10,000 per name: a
restart, or a retrieval through another instance, charges nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time

# How long, and how many per name, created ids are remembered (a batch runs within 24 hours).
KEEP_SECONDS = 7 * 86400
MAX_KEPT = 10_000
# Sessions that then run between the client and OpenAI, out of the proxy's sight.
SECRET_PATHS = frozenset(
    ("realtime/client_secrets", "realtime/sessions", "realtime/transcription_sessions", "realtime/calls")
)
# Jobs that run upstream after the request, whose usage the proxy does not follow.
JOB_RE = re.compile(r"^(?:fine_tuning/jobs|threads/runs|threads/[^/]+/runs|evals/[^/]+/runs|videos(?:/[^/]+/remix)?)$")
# What the refusal calls each kind.
KINDS = {
    "background": "Background responses",
    "batch": "Batches",
    "client_secret": "Realtime sessions that bypass this proxy (client secrets, WebRTC calls)",
    "job": "Jobs that run after the request (fine-tuning, assistant runs, evals, videos)",
}
RETRIEVAL_RE = re.compile(r"^(responses|batches)/([A-Za-z0-9_-]{1,200})$")
# Statuses after which a response or a batch no longer runs.
FINISHED = frozenset(("completed", "incomplete", "failed", "cancelled", "expired"))


def deferred_kind(method: str, path: str, background: bool) -> str | None:
    """What kind of work that runs after the request this is (a key of ``KINDS``), or None;
    ``background``: the body asks to run in the background."""
    if method != "POST":
        return None
    if path == "responses" and background:
        return "background"
    if path == "batches":
        return "batch"
    if path in SECRET_PATHS:
        return "client_secret"
    if JOB_RE.match(path):
        return "job"
    return None


@dataclasses.dataclass
class Pending:
    token: str
    model: str | None
    created: float


class DeferredWork:
    """The background responses and batches started through this process, until charged; each name's
    own, so that one name starting many cannot push out another's."""

    def __init__(self):
        self.pending: dict[str, collections.OrderedDict[str, Pending]] = {}

    def started(self, object_id: str, token: str, model: str | None) -> None:
        mine = self.pending.setdefault(token, collections.OrderedDict())
        cutoff = time.time() - KEEP_SECONDS
        while mine and (len(mine) >= MAX_KEPT or next(iter(mine.values())).created < cutoff):
            mine.popitem(last=False)
        mine[object_id] = Pending(token, model, time.time())

    def finished(self, path: str, answer) -> tuple[Pending, str] | None:
        """The entry of a retrieval ``path`` whose ``answer`` shows it finished, taken out (charged once)."""
        found = RETRIEVAL_RE.match(path)
        if found is None or not isinstance(answer, dict) or answer.get("status") not in FINISHED:
            return None
        for mine in self.pending.values():
            entry = mine.pop(found.group(2), None)
            if entry is not None:
                return entry, found.group(1)
        return None
