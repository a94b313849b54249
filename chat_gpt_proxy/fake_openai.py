"""A fake OpenAI API: a real HTTP server on loopback that speaks OpenAI's wire format.

Used by the tests (in-process, on the test's IOLoop), by the benchmarks and by
the demo mode (``python -m chat_gpt_proxy.fake_openai --port 8081``).

By default it echoes: the answer to a chat request is ``Echo: <last user
message>``, streamed word by word when ``stream`` is true. Tests script other
answers with ``FakeOpenAI.push(Behaviour(...))`` (or ``POST /_fake/script``
from another process); each request takes the next scripted behaviour.
``POST /v1/responses`` answers in the Responses API's shapes (JSON, or its
typed ``event:``/``data:`` stream). It records what it received (the last
requests only, bodies cut: see ``RecentRequests``), counts TCP connections,
and notes every request whose client went away before the answer was
complete (an abort).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import socket
import ssl
import struct
import time
import uuid
from urllib.parse import unquote

import tornado.httpserver
import tornado.web
import tornado.websocket
from tornado.iostream import StreamClosedError
from tornado.testing import bind_unused_port


@dataclasses.dataclass
class Behaviour:
    """What the fake does with one request.

    kind: ``echo`` (the default answer), ``error`` (``status`` + OpenAI error
    object), ``hang`` (never answers), ``garbage`` (``status`` with ``body``
    as ``content_type``), ``drop`` (after ``after`` chunks, close the
    connection; ``reset`` sends a TCP RST instead of a FIN), ``stall``
    (after ``after`` chunks, go silent forever), ``reset_headers`` (half a
    header block, then RST), ``reset_body`` (headers promising a JSON body,
    half of it, then RST), ``raw`` (the bytes of ``raw``, Latin-1 text so
    that any byte fits in JSON, written as they are, then the connection
    closed: any status line, 1xx answers before the final one, headers
    and framing, even invalid ones; also answers ``ANY /v1/raw/<anything>``).
    ``chunks`` replaces the streamed pieces of text, ``delay`` is the pause
    before each chunk after the first, ``first_delay`` the pause before the
    headers.
    """

    kind: str = "echo"
    status: int = 200
    chunks: list[str] | None = None
    delay: float = 0.0
    first_delay: float = 0.0
    after: int = 0
    reset: bool = False
    message: str = "Fake error"
    error_type: str = "invalid_request_error"
    error_code: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: str = "<html><body>Bad gateway</body></html>"
    content_type: str = "text/html"
    raw: str = ""


@dataclasses.dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    # The first MAX_KEPT_BODY bytes of the body; ``size`` is its real length.
    body: bytes
    size: int = 0

    @property
    def json(self):
        return json.loads(self.body)


class RecentRequests:
    """What the fake received, bounded (issue 10, point 13: the demo ran for days on it).

    Only the last ``keep`` requests are kept, each body cut at ``max_body``
    bytes. It reads like the list of every request received so far: ``len``
    is the total count and indexes count from the first request, so a test
    can note ``len()`` and slice from there; an index of a request no longer
    kept raises IndexError rather than answering with another one.
    """

    def __init__(self, keep: int, max_body: int):
        self.keep = keep
        self.max_body = max_body
        self._kept: collections.deque[Received] = collections.deque(maxlen=keep)
        self._total = 0

    def add(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self._kept.append(Received(method, path, headers, body[: self.max_body], len(body)))
        self._total += 1

    @property
    def dropped(self) -> int:
        return self._total - len(self._kept)

    def __len__(self) -> int:
        return self._total

    def __iter__(self):
        return iter(list(self._kept))

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self._total)
            return [self[i] for i in range(start, stop, step)]
        if index < 0:
            index += self._total
        if not 0 <= index < self._total:
            raise IndexError("no request %d" % index)
        if index < self.dropped:
            raise IndexError("request %d is no longer kept (only the last %d are)" % (index, self.keep))
        return self._kept[index - self.dropped]

    def __eq__(self, other) -> bool:
        if isinstance(other, RecentRequests):
            other = list(other) if other.dropped == 0 else None
        return self.dropped == 0 and isinstance(other, list) and list(self._kept) == other

    def __repr__(self) -> str:
        return "RecentRequests(total=%d, kept=%r)" % (self._total, list(self._kept))


# How much of what it received the fake keeps: enough for any test, a few
# MiB at most in a demo that runs for days.
KEPT_REQUESTS = 200
MAX_KEPT_BODY = 64 * 1024


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
    ):
        self.default_delay = default_delay
        # With an ``ssl.SSLContext`` it serves HTTPS (an upstream with a
        # private CA, issue 11); ``host_name`` is the host its ``url`` names.
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
        # The realtime WebSocket (issue 12): scripted sessions and what each saw.
        self.realtime_script: collections.deque[RealtimeBehaviour] = collections.deque()
        self.realtime_sessions: list[RealtimeRecord] = []

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return "%s://%s:%d/v1" % (scheme, self.host_name, self.port)

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
            [
                (r"/v1/chat/completions", ChatCompletions),
                (r"/v1/responses", Responses),
                (r"/v1/models", Models),
                (r"/v1/embeddings", Embeddings),
                (r"/v1/files", Files),
                (r"/v1/files/([A-Za-z0-9_-]+)/content", FileContent),
                (r"/v1/raw/.*", RawAnswer),
                (r"/v1/realtime", RealtimeSocket),
                (r"/v1/realtime/client_secrets", RealtimeClientSecrets),
                (r"/v1/realtime/calls", RealtimeCalls),
                (r"/_fake/script", Script),
                (r"/_fake/stats", Stats),
            ],
            default_handler_class=NotFound,
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


def to_json(obj) -> bytes:
    """Compact JSON in UTF-8, as OpenAI writes it (escaped only where UTF-8 cannot hold a lone surrogate)."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def completion(content: str, model: str) -> dict:
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
        "service_tier": "default",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage_for(content),
    }


def usage_for(content: str) -> dict:
    completion_tokens = max(1, len(content.split()))
    return {"prompt_tokens": 9, "completion_tokens": completion_tokens, "total_tokens": 9 + completion_tokens}


def chunk(cid: str, model: str, delta: dict, finish_reason=None, usage=None, choices=True) -> bytes:
    obj = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
        "service_tier": "default",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}] if choices else [],
        "usage": usage,
    }
    return b"data: " + to_json(obj) + b"\n\n"


def error_object(behaviour: Behaviour) -> dict:
    return {
        "error": {
            "message": behaviour.message,
            "type": behaviour.error_type,
            "param": None,
            "code": behaviour.error_code,
        }
    }


def echo_text(body: dict) -> str:
    messages = body.get("messages") or []
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return "Echo: " + (content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))
    return "Echo: (no user message)"


class FakeHandler(tornado.web.RequestHandler):
    @property
    def fake(self) -> FakeOpenAI:
        return self.settings["fake"]

    def initialize(self) -> None:
        self.closed = asyncio.Event()
        self.done = False

    def prepare(self) -> None:
        if not self.request.path.startswith("/_fake/"):
            self.fake.received.add(
                self.request.method, self.request.path, dict(self.request.headers), self.request.body
            )

    def write_error(self, status_code: int, **kwargs) -> None:
        """Errors as OpenAI writes them: JSON, never Tornado's HTML page."""
        self.write_json(error_object(Behaviour(message=self._reason)), status_code)

    def on_connection_close(self) -> None:
        self.closed.set()
        if not self.done:
            self.fake.note_abort()

    def on_finish(self) -> None:
        self.done = True
        self.fake.completed += 1

    async def pause(self, seconds: float) -> bool:
        """Sleep; False if the client went away meanwhile."""
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.closed.wait(), seconds)
        return not self.closed.is_set()

    async def send(self, data: bytes) -> bool:
        self.fake.bytes_sent += len(data)
        self.write(data)
        try:
            await self.flush()
        except StreamClosedError:
            return False
        return True

    async def begin(self, body: dict) -> tuple[str, Behaviour | None]:
        """The model asked for and the behaviour scripted for it, with its headers and a request id
        set, after its ``first_delay``; the behaviour is None if the client left meanwhile."""
        model = body.get("model", "gpt-4o-mini")
        model = model if isinstance(model, str) else json.dumps(model)
        behaviour = self.fake.next_behaviour(model)
        for name, value in behaviour.headers.items():
            self.set_header(name, value)
        self.set_header("x-request-id", "req_fake_" + uuid.uuid4().hex[:12])
        if not await self.pause(behaviour.first_delay):
            return model, None
        return model, behaviour

    def write_json(self, obj, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(to_json(obj))

    async def send_raw(self, behaviour: Behaviour) -> None:
        """Write ``behaviour.raw`` as the whole answer, bypassing Tornado's HTTP layer, then close."""
        data = behaviour.raw.encode("latin-1")
        self.fake.bytes_sent += len(data)
        self.done = True
        stream = self.request.connection.stream
        with contextlib.suppress(StreamClosedError):
            await stream.write(data)
        stream.close()

    def kill_connection(self, reset: bool) -> None:
        stream = self.request.connection.stream
        if reset and stream.socket is not None:
            # SO_LINGER with a zero timeout turns close() into a TCP RST.
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.done = True
        stream.close()


class ChatCompletions(FakeHandler):
    async def post(self) -> None:
        try:
            body = json.loads(self.request.body)
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict):
            self.write_json(error_object(Behaviour(message="We could not parse the JSON body of your request.")), 400)
            return
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            self.write_json(error_object(Behaviour(message="Invalid type for 'messages': expected an array.")), 400)
            return
        model, behaviour = await self.begin(body)
        if behaviour is None:
            return
        if behaviour.kind == "hang":
            await self.closed.wait()
            return
        if behaviour.kind == "error":
            self.write_json(error_object(behaviour), behaviour.status)
            return
        if behaviour.kind == "garbage":
            self.set_status(behaviour.status)
            self.set_header("Content-Type", behaviour.content_type)
            self.finish(behaviour.body)
            return
        if behaviour.kind == "drop" and behaviour.after == 0:
            self.kill_connection(behaviour.reset)
            return
        if behaviour.kind == "raw":
            await self.send_raw(behaviour)
            return
        if behaviour.kind in ("reset_headers", "reset_body"):
            payload = json.dumps(completion(echo_text(body), model)).encode()
            raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(payload)
            raw = raw[:30] if behaviour.kind == "reset_headers" else raw + b"\r\n" + payload[: len(payload) // 2]
            self.fake.bytes_sent += len(raw)
            self.done = True
            stream = self.request.connection.stream
            await stream.write(raw)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            stream.close()
            return
        text = echo_text(body)
        if not body.get("stream"):
            self.write_json(completion(text, model))
            return
        pieces = behaviour.chunks if behaviour.chunks is not None else [w + " " for w in text.split(" ")]
        await self.stream(behaviour, body, model, pieces)

    async def stream(self, behaviour: Behaviour, body: dict, model: str, pieces: list[str]) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        if not await self.send(chunk(cid, model, {"role": "assistant", "content": ""})):
            return
        for index, piece in enumerate(pieces):
            if behaviour.kind in ("drop", "stall") and index == behaviour.after:
                if behaviour.kind == "drop":
                    self.kill_connection(behaviour.reset)
                else:
                    await self.closed.wait()
                return
            if index and not await self.pause(behaviour.delay):
                return
            if not await self.send(chunk(cid, model, {"content": piece})):
                return
        await self.send(chunk(cid, model, {}, finish_reason="stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await self.send(chunk(cid, model, {}, usage=usage_for("".join(pieces)), choices=False))
        self.finish(b"data: [DONE]\n\n")


def responses_input_text(body: dict) -> str:
    """The text of the last user input of a Responses API request (a string or input items)."""
    given = body.get("input")
    if isinstance(given, str):
        return given
    for item in reversed(given if isinstance(given, list) else []):
        if isinstance(item, dict) and item.get("role", "user") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "(no user input)"


def responses_usage(text: str) -> dict:
    output = max(1, len(text.split()))
    return {
        "input_tokens": 9,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 9 + output,
    }


def response_object(rid: str, body: dict, model: str, created_at: int, status: str, output: list, usage) -> dict:
    """A Responses API ``response`` object (openai/types/responses/response.py)."""
    return {
        "id": rid,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": {},
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": True,
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
    }


def output_message(item_id: str, text: str, status: str) -> dict:
    parts = [output_text_part(text)] if status == "completed" else []
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": parts}


def output_text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class Responses(FakeHandler):
    async def post(self) -> None:
        """POST /v1/responses: the Responses API, as JSON or as its typed SSE events (``event:`` + ``data:``)."""
        try:
            body = json.loads(self.request.body)
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict) or "input" not in body:
            self.write_json(error_object(Behaviour(message="Missing required parameter: 'input'.")), 400)
            return
        model, behaviour = await self.begin(body)
        if behaviour is None:
            return
        if behaviour.kind == "error":
            self.write_json(error_object(behaviour), behaviour.status)
            return
        text = "Echo: " + responses_input_text(body)
        rid, item_id, created_at = "resp_" + uuid.uuid4().hex, "msg_" + uuid.uuid4().hex, int(time.time())
        done_item = output_message(item_id, text, "completed")
        if not body.get("stream"):
            self.write_json(
                response_object(rid, body, model, created_at, "completed", [done_item], responses_usage(text))
            )
            return
        pieces = behaviour.chunks if behaviour.chunks is not None else [w + " " for w in text.split(" ")]
        text = "".join(pieces)
        done_item = output_message(item_id, text, "completed")
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        sequence = iter(range(1 << 30))
        at = {"item_id": item_id, "output_index": 0, "content_index": 0}

        def event(kind: str, **fields) -> bytes:
            data = {"type": kind, "sequence_number": next(sequence), **fields}
            return b"event: " + kind.encode() + b"\ndata: " + to_json(data) + b"\n\n"

        in_progress = response_object(rid, body, model, created_at, "in_progress", [], None)
        opening = [
            event("response.created", response=in_progress),
            event("response.in_progress", response=in_progress),
            event("response.output_item.added", output_index=0, item=output_message(item_id, "", "in_progress")),
            event("response.content_part.added", **at, part=output_text_part("")),
        ]
        if not await self.send(b"".join(opening)):
            return
        for index, piece in enumerate(pieces):
            if index and not await self.pause(behaviour.delay):
                return
            if not await self.send(event("response.output_text.delta", **at, delta=piece, logprobs=[])):
                return
        completed = response_object(rid, body, model, created_at, "completed", [done_item], responses_usage(text))
        closing = [
            event("response.output_text.done", **at, text=text, logprobs=[]),
            event("response.content_part.done", **at, part=output_text_part(text)),
            event("response.output_item.done", output_index=0, item=done_item),
            event("response.completed", response=completed),
        ]
        self.finish(b"".join(closing))


class Models(FakeHandler):
    def get(self) -> None:
        models = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
        self.write_json(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"} for m in models],
            }
        )


class Embeddings(FakeHandler):
    def post(self) -> None:
        body = json.loads(self.request.body)
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2, 0.3]} for i in range(len(inputs))]
        self.write_json(
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            }
        )


class Files(FakeHandler):
    def post(self) -> None:
        """POST /v1/files: a multipart upload; answers a file object describing what arrived."""
        upload = self.request.files["file"][0]
        self.write_json(
            {
                "id": "file-" + uuid.uuid4().hex[:12],
                "object": "file",
                "bytes": len(upload.body),
                "created_at": int(time.time()),
                "filename": upload.filename,
                "purpose": self.get_body_argument("purpose"),
                "status": "processed",
            }
        )


class FileContent(FakeHandler):
    async def get(self, file_id: str) -> None:
        """GET /v1/files/<id>/content: ``?size=N`` bytes of a repeating pattern, sent in 64 KiB pieces."""
        size = int(self.get_query_argument("size", "1000"))
        self.set_header("Content-Type", "application/octet-stream")
        pattern = bytes(range(256)) * 256
        sent = 0
        while sent < size:
            piece = pattern[: min(len(pattern), size - sent)]
            if not await self.send(piece):
                return
            sent += len(piece)
        self.finish()


class NotFound(FakeHandler):
    """Any other path: OpenAI's 404, as JSON (the request is recorded like every other)."""

    def any_method(self, *args) -> None:
        message = "Invalid URL (%s %s)" % (self.request.method, self.request.path)
        self.write_json(
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}, 404
        )

    get = head = post = put = patch = delete = options = any_method


class RawAnswer(FakeHandler):
    """ANY /v1/raw/<anything>: the next scripted behaviour's ``raw`` bytes (a small JSON object otherwise)."""

    async def any_method(self) -> None:
        behaviour = self.fake.next_behaviour()
        if behaviour.kind == "raw":
            await self.send_raw(behaviour)
        else:
            self.write_json({"object": "raw", "bytes": len(self.request.body)})

    get = head = post = put = patch = delete = options = any_method


@dataclasses.dataclass
class RealtimeBehaviour:
    """What the fake's realtime WebSocket does with one session.

    kind: ``normal`` (``session.created``, then answers each ``response.create``
    with ``response.created``, ``response.output_text.delta`` per piece of
    ``chunks``, ``audio_deltas`` ``response.output_audio.delta`` events and
    ``response.done`` with usage; echoes binary messages), ``refuse`` (answers
    the handshake with ``status`` and an OpenAI error object), ``close`` (after
    ``after`` received messages, closes with ``code`` and ``reason``), ``drop``
    (after ``after`` received messages, closes TCP without a close frame),
    ``stall`` (after ``after`` received messages, stops reading, and so
    answers no ping), ``flood`` (sends ``size``-byte text messages as fast as
    the connection takes them), ``hang`` (answers the handshake only after
    ``delay`` seconds).
    ``delay`` is the pause before each delta.
    """

    kind: str = "normal"
    status: int = 401
    message: str = "Fake refusal"
    error_code: str | None = None
    code: int = 1000
    reason: str = ""
    after: int = 0
    delay: float = 0.0
    chunks: list[str] | None = None
    audio_deltas: int = 2
    size: int = 64 * 1024


@dataclasses.dataclass
class RealtimeRecord:
    """One realtime session as the fake saw it."""

    path: str
    query: str
    headers: dict[str, str]
    subprotocols: list[str]
    received: list[tuple[float, str | bytes]] = dataclasses.field(default_factory=list)
    sent_messages: int = 0
    sent_bytes: int = 0
    close_code: int | None = None
    close_reason: str | None = None
    closed_at: float | None = None
    closed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def wait_closed(self, timeout: float) -> float:
        """Wait until the session's connection closed; returns when (monotonic)."""
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.closed_at


def realtime_event(type_: str, **fields) -> str:
    return json.dumps({"type": type_, "event_id": "event_" + uuid.uuid4().hex[:16], **fields}, separators=(",", ":"))


class RealtimeSocket(tornado.websocket.WebSocketHandler):
    """/v1/realtime: OpenAI's Realtime API over a WebSocket, as far as the tests need it."""

    @property
    def fake(self) -> FakeOpenAI:
        return self.settings["fake"]

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        behaviour = getattr(exc, "behaviour", None) or Behaviour(message=self._reason)
        self.set_status(status_code)
        self.set_header("Content-Type", "application/json")
        self.set_header("x-request-id", "req_fake_" + uuid.uuid4().hex[:12])
        self.finish(to_json(error_object(behaviour)))

    async def prepare(self) -> None:
        self.behaviour = self.fake.realtime_script.popleft() if self.fake.realtime_script else RealtimeBehaviour()
        self.record = None
        self.closing = asyncio.Event()
        if self.behaviour.kind == "hang":
            await asyncio.sleep(self.behaviour.delay)
            if self.closing.is_set():
                raise tornado.web.Finish()  # the client left meanwhile: no session
        self.last_text = "Hello from the fake realtime API"
        auth = self.request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            error = tornado.web.HTTPError(401)
            error.behaviour = Behaviour(
                message="You didn't provide an API key.", error_type="invalid_request_error", error_code=None
            )
            raise error
        if self.behaviour.kind == "refuse":
            error = tornado.web.HTTPError(self.behaviour.status)
            error.behaviour = Behaviour(message=self.behaviour.message, error_code=self.behaviour.error_code)
            raise error

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return "realtime" if "realtime" in subprotocols else None

    def open(self) -> None:
        protocols = self.request.headers.get("Sec-WebSocket-Protocol", "")
        self.record = RealtimeRecord(
            self.request.path,
            self.request.query,
            dict(self.request.headers),
            [p.strip() for p in protocols.split(",") if p.strip()],
        )
        self.fake.realtime_sessions.append(self.record)
        session = {"id": "sess_" + uuid.uuid4().hex[:12], "object": "realtime.session", "type": "realtime"}
        session["model"] = self.get_query_argument("model", "gpt-realtime")
        self.send(realtime_event("session.created", session=session))
        if self.behaviour.kind == "flood":
            asyncio.ensure_future(self.flood())
        self.react()

    def send(self, message: str | bytes) -> asyncio.Future | None:
        if self.ws_connection is None or self.ws_connection.is_closing():
            return None
        self.record.sent_messages += 1
        self.record.sent_bytes += len(message)
        return self.write_message(message, binary=isinstance(message, bytes))

    def react(self) -> bool:
        """Apply the scripted close/drop once ``after`` messages arrived; True if it did."""
        kind = self.behaviour.kind
        if kind not in ("close", "drop") or len(self.record.received) < self.behaviour.after:
            return False
        if kind == "close":
            self.close(self.behaviour.code, self.behaviour.reason)
        elif self.ws_connection is not None:
            self.ws_connection.stream.close()
        return True

    async def on_message(self, message: str | bytes) -> None:
        self.record.received.append((time.monotonic(), message))
        if self.react():
            return
        if self.behaviour.kind == "stall" and len(self.record.received) > self.behaviour.after:
            await self.closing.wait()  # Tornado reads no further frame meanwhile
            return
        if isinstance(message, bytes):
            self.send(message)
            return
        try:
            event = json.loads(message)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if event.get("type") == "conversation.item.create":
            content = ((event.get("item") or {}).get("content") or [{}])[0]
            if isinstance(content, dict) and isinstance(content.get("text"), str):
                self.last_text = "Echo: " + content["text"]
        elif event.get("type") == "session.update":
            self.send(realtime_event("session.updated", session=event.get("session")))
        elif event.get("type") == "response.create":
            asyncio.ensure_future(self.respond())

    async def respond(self) -> None:
        behaviour = self.behaviour
        rid = "resp_" + uuid.uuid4().hex[:12]
        item = "item_" + uuid.uuid4().hex[:12]
        self.send(realtime_event("response.created", response={"id": rid, "object": "realtime.response"}))
        pieces = behaviour.chunks if behaviour.chunks is not None else [w + " " for w in self.last_text.split(" ")]
        where = {"response_id": rid, "item_id": item, "output_index": 0, "content_index": 0}
        for piece in pieces:
            if not await self.pause(behaviour.delay):
                return
            self.send(realtime_event("response.output_text.delta", delta=piece, **where))
        for index in range(behaviour.audio_deltas):
            if not await self.pause(behaviour.delay):
                return
            audio = base64.b64encode(bytes([index]) * 4800).decode()
            self.send(realtime_event("response.output_audio.delta", delta=audio, **where))
        output_tokens = len(pieces) + behaviour.audio_deltas
        usage = {"total_tokens": 7 + output_tokens, "input_tokens": 7, "output_tokens": output_tokens}
        response = {"id": rid, "object": "realtime.response", "status": "completed", "usage": usage}
        self.send(realtime_event("response.done", response=response))

    async def pause(self, seconds: float) -> bool:
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.closing.wait(), seconds)
        return not self.closing.is_set()

    async def flood(self) -> None:
        padding = "A" * max(0, self.behaviour.size - 60)
        message = realtime_event("response.output_audio.delta", delta=padding)
        while not self.closing.is_set():
            future = self.send(message)
            if future is None:
                return
            try:
                await future
            except tornado.websocket.WebSocketClosedError:
                return
            await asyncio.sleep(0)  # a write that completed at once must not starve the loop

    def on_close(self) -> None:
        self.closing.set()
        if self.record is not None:
            self.record.close_code = self.close_code
            self.record.close_reason = self.close_reason
            self.record.closed_at = time.monotonic()
            self.record.closed.set()


class RealtimeClientSecrets(FakeHandler):
    def post(self) -> None:
        """POST /v1/realtime/client_secrets: an ephemeral key for a browser session."""
        body = json.loads(self.request.body or b"{}")
        session = body.get("session") or {"type": "realtime"}
        self.write_json(
            {"value": "ek_fake_" + uuid.uuid4().hex[:16], "expires_at": int(time.time()) + 600, "session": session}
        )


class RealtimeCalls(FakeHandler):
    def post(self) -> None:
        """POST /v1/realtime/calls: a WebRTC SDP offer (raw application/sdp, or multipart with a session); answers
        201 with an SDP answer that quotes the offer's first line."""
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            offer = self.request.body_arguments.get("sdp", [b""])[0] or self.request.files["sdp"][0].body
        elif content_type.startswith("application/sdp"):
            offer = self.request.body
        else:
            self.write_json(error_object(Behaviour(message="Expected an application/sdp body.")), 400)
            return
        call_id = "rtc_" + uuid.uuid4().hex[:12]
        self.set_status(201)
        self.set_header("Content-Type", "application/sdp")
        self.set_header("Location", "/v1/realtime/calls/" + call_id)
        first = offer.split(b"\n", 1)[0].strip()
        self.finish(b"v=0\r\no=- fake-answer " + call_id.encode() + b"\r\na=offer:" + first + b"\r\n")


class Script(FakeHandler):
    def post(self) -> None:
        """POST /_fake/script: queue a behaviour (JSON fields of ``Behaviour``); with ``?model=M``,
        every request for model M gets it."""
        behaviour = Behaviour(**json.loads(self.request.body))
        model = self.get_query_argument("model", None)
        if model:
            self.fake.by_model[model] = behaviour
        else:
            self.fake.push(behaviour)
        self.write_json({"queued": len(self.fake.script), "models": sorted(self.fake.by_model)})


class Stats(FakeHandler):
    def get(self) -> None:
        """GET /_fake/stats: connections, requests, aborts."""
        self.write_json(self.fake.stats())


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI API for tests, benchmarks and demos.")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between streamed chunks")
    parser.add_argument("--certfile", help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM)")
    args = parser.parse_args()
    context = None
    if args.certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.certfile, args.keyfile)

    async def serve() -> None:
        fake = FakeOpenAI(default_delay=args.delay, ssl_context=context, host_name=args.host)
        fake.start(args.port, args.host)
        print("fake OpenAI listening on %s" % fake.url, flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
