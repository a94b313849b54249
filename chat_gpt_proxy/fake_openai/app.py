"""``FakeOpenAI``: the fake's server, its routes (OpenAI's under ``/v1``, Azure OpenAI's under ``/openai``),
its script and its counters."""

from __future__ import annotations

import asyncio
import collections
import time
from urllib.parse import unquote

import tornado.httpserver
import tornado.web
import tornado.websocket
from tornado.testing import bind_unused_port

from chat_gpt_proxy.fake_openai.azure import AzureChatCompletions, AzureEmbeddings, AzureNotFound, AzureResponses
from chat_gpt_proxy.fake_openai.behaviours import (
    KEPT_REQUESTS,
    MAX_KEPT_BODY,
    Behaviour,
    RealtimeBehaviour,
    RealtimeRecord,
    RecentRequests,
)
from chat_gpt_proxy.fake_openai.http import (
    Batches,
    ChatCompletions,
    Embeddings,
    FileContent,
    Files,
    Models,
    NotFound,
    RawAnswer,
    RealtimeCalls,
    RealtimeClientSecrets,
    Responses,
    Retrieve,
    Script,
    Stats,
)
from chat_gpt_proxy.fake_openai.realtime import RealtimeSocket


class DecodingApplication(tornado.web.Application):
    """Routes on the percent-decoded path, as OpenAI's servers do (``/v1/re%73ponses`` is
    ``/v1/responses``), while handlers and ``received`` still see the path as it arrived."""

    def find_handler(self, request, **kwargs):
        raw = request.path
        request.path = unquote(raw)
        try:
            return super().find_handler(request, **kwargs)
        finally:
            request.path = raw


class FakeOpenAI:
    def __init__(
        self,
        default_delay: float = 0.0,
        ssl_context=None,
        host_name: str = "127.0.0.1",
        keep: int = KEPT_REQUESTS,
        max_body: int = MAX_KEPT_BODY,
        azure_deployments: set[str] | None = None,
        azure_key: str | None = None,
        spaced: bool = False,
        obfuscation: bool = False,
    ):
        self.default_delay = default_delay
        # How it writes JSON: compact as OpenAI does, or ``spaced`` as servers on
        # Python's json.dumps do; ``obfuscation``: chat chunks end with OpenAI's
        # random ``obfuscation`` field. Both may change at any time.
        self.spaced = spaced
        self.obfuscation = obfuscation
        # With an ``ssl.SSLContext`` it serves HTTPS (an upstream with a
        # private CA); ``host_name`` is the host its ``url`` names.
        self.ssl_context = ssl_context
        self.host_name = host_name
        self.script: collections.deque[Behaviour] = collections.deque()
        # Requests for these models always get this behaviour, whatever the
        # order: for faults injected while other traffic runs.
        self.by_model: dict[str, Behaviour] = {}
        self.received = RecentRequests(keep, max_body)
        self.connections = 0
        self.aborts: list[float] = []
        self.completed = 0
        self.bytes_sent = 0
        self.port = 0
        self._abort_waiters: list[asyncio.Future] = []
        self._server = None
        # The realtime WebSocket: scripted sessions and what each saw.
        self.realtime_script: collections.deque[RealtimeBehaviour] = collections.deque()
        self.realtime_sessions: list[RealtimeRecord] = []
        # Background responses and batches: the states each retrieval shows, in turn (the last one stays).
        self.deferred: dict[str, list[dict]] = {}
        # The Azure OpenAI routes (azure.py): the deployments it has (None: any name is one)
        # and the ``api-key`` it takes (None: any non-empty one). Both may change at any time.
        self.azure_deployments = azure_deployments
        self.azure_key = azure_key

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return "%s://%s:%d/v1" % (scheme, self.host_name, self.port)

    @property
    def azure_endpoint(self) -> str:
        """The Azure OpenAI resource's endpoint (``https://<resource>.openai.azure.com`` on Azure):
        the routes are ``{azure_endpoint}/openai/deployments/{deployment}/chat/completions?api-version=...``."""
        scheme = "https" if self.ssl_context is not None else "http"
        return "%s://%s:%d" % (scheme, self.host_name, self.port)

    def push(self, *behaviours: Behaviour) -> None:
        self.script.extend(behaviours)

    def push_realtime(self, *behaviours: RealtimeBehaviour) -> None:
        self.realtime_script.extend(behaviours)

    async def wait_realtime_session(self, timeout: float = 5.0) -> RealtimeRecord:
        """The latest realtime session, waiting up to ``timeout`` for one to open."""
        deadline = time.monotonic() + timeout
        while not self.realtime_sessions:
            if time.monotonic() > deadline:
                raise TimeoutError("no realtime session opened")
            await asyncio.sleep(0.01)
        return self.realtime_sessions[-1]

    def next_behaviour(self, model=None) -> Behaviour:
        if model in self.by_model:
            return self.by_model[model]
        return self.script.popleft() if self.script else Behaviour(delay=self.default_delay)

    async def wait_abort(self, timeout: float) -> float:
        """Wait until a request is aborted by its client; returns the time (monotonic)."""
        if not self.aborts:
            waiter = asyncio.get_running_loop().create_future()
            self._abort_waiters.append(waiter)
            await asyncio.wait_for(waiter, timeout)
        return self.aborts[-1]

    def note_abort(self) -> None:
        self.aborts.append(time.monotonic())
        waiters, self._abort_waiters = self._abort_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def stats(self) -> dict:
        return {
            "connections": self.connections,
            "requests": len(self.received),
            "aborts": len(self.aborts),
            "completed": self.completed,
        }

    # Any path no route takes, and what POST /_fake/script queues (a subclass speaking another API gives its own).
    not_found = NotFound
    behaviour_class = Behaviour

    def routes(self) -> list:
        """The fake's routes: OpenAI's, Azure OpenAI's and its own scripting ones."""
        return [
            (r"/v1/chat/completions", ChatCompletions),
            (r"/v1/responses", Responses),
            (r"/v1/(?:responses|batches)/([A-Za-z0-9_-]+)", Retrieve),
            (r"/v1/batches", Batches),
            (r"/v1/models", Models),
            (r"/v1/embeddings", Embeddings),
            (r"/v1/files", Files),
            (r"/v1/files/([A-Za-z0-9_-]+)/content", FileContent),
            (r"/v1/raw/.*", RawAnswer),
            (r"/v1/realtime", RealtimeSocket),
            (r"/v1/realtime/client_secrets", RealtimeClientSecrets),
            (r"/v1/realtime/calls", RealtimeCalls),
            (r"/openai/deployments/([^/]+)/chat/completions", AzureChatCompletions),
            (r"/openai/deployments/([^/]+)/embeddings", AzureEmbeddings),
            (r"/openai/responses", AzureResponses),
            (r"/openai/.*", AzureNotFound),
            (r"/_fake/script", Script),
            (r"/_fake/stats", Stats),
        ]

    def start(
        self, port: int = 0, address: str = "127.0.0.1", sockets=None, idle_connection_timeout: float = 3600
    ) -> int:
        """Listen on ``port`` (0: an unused one), or on ``sockets``, listening sockets on one port.

        ``idle_connection_timeout``: how long a kept-alive connection may stay
        idle before the fake closes it (uvicorn, behind many self-hosted
        servers, closes them after 5 s)."""
        fake = self

        class CountingServer(tornado.httpserver.HTTPServer):
            def handle_stream(self, stream, address):
                fake.connections += 1
                return super().handle_stream(stream, address)

        app = DecodingApplication(
            self.routes(),
            default_handler_class=self.not_found,
            fake=self,
            log_function=lambda handler: None,
        )
        self._server = CountingServer(
            app, ssl_options=self.ssl_context, idle_connection_timeout=idle_connection_timeout
        )
        if sockets:
            self._server.add_sockets(sockets)
            self.port = sockets[0].getsockname()[1]
        elif port:
            self._server.listen(port, address)
            self.port = port
        else:
            sock, self.port = bind_unused_port()
            self._server.add_sockets([sock])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
