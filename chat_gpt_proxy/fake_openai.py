"""A fake OpenAI API: a real HTTP server on loopback that speaks OpenAI's wire format.

Used by the tests (in-process, on the test's IOLoop), by the benchmarks and by
the demo mode (``python -m chat_gpt_proxy.fake_openai --port 8081``).

By default it echoes: the answer to a chat request is ``Echo: <last user
message>``, streamed word by word when ``stream`` is true. Tests script other
answers with ``FakeOpenAI.push(Behaviour(...))`` (or ``POST /_fake/script``
from another process); each request takes the next scripted behaviour.
It records what it received, counts TCP connections, and notes every request
whose client went away before the answer was complete (an abort).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import socket
import ssl
import struct
import time
import uuid

import tornado.httpserver
import tornado.web
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
    half of it, then RST).
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


@dataclasses.dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self):
        return json.loads(self.body)


class FakeOpenAI:
    def __init__(self, default_delay: float = 0.0, ssl_context=None, host_name: str = "127.0.0.1"):
        self.default_delay = default_delay
        # With an ``ssl.SSLContext`` it serves HTTPS (an upstream with a
        # private CA, issue 11); ``host_name`` is the host its ``url`` names.
        self.ssl_context = ssl_context
        self.host_name = host_name
        self.script: collections.deque[Behaviour] = collections.deque()
        # Requests for these models always get this behaviour, whatever the
        # order: for faults injected while other traffic runs.
        self.by_model: dict[str, Behaviour] = {}
        self.received: list[Received] = []
        self.connections = 0
        self.aborts: list[float] = []
        self.completed = 0
        self.bytes_sent = 0
        self.port = 0
        self._abort_waiters: list[asyncio.Future] = []
        self._server = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return "%s://%s:%d/v1" % (scheme, self.host_name, self.port)

    def push(self, *behaviours: Behaviour) -> None:
        self.script.extend(behaviours)

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

    def start(self, port: int = 0, address: str = "127.0.0.1", sockets=None) -> int:
        """Listen on ``port`` (0: an unused one), or on ``sockets``, listening sockets on one port."""
        fake = self

        class CountingServer(tornado.httpserver.HTTPServer):
            def handle_stream(self, stream, address):
                fake.connections += 1
                return super().handle_stream(stream, address)

        app = tornado.web.Application(
            [
                (r"/v1/chat/completions", ChatCompletions),
                (r"/v1/models", Models),
                (r"/v1/embeddings", Embeddings),
                (r"/v1/files", Files),
                (r"/v1/files/([A-Za-z0-9_-]+)/content", FileContent),
                (r"/_fake/script", Script),
                (r"/_fake/stats", Stats),
            ],
            fake=self,
            log_function=lambda handler: None,
        )
        self._server = CountingServer(app, ssl_options=self.ssl_context)
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
            self.fake.received.append(
                Received(self.request.method, self.request.path, dict(self.request.headers), self.request.body)
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

    def write_json(self, obj, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(to_json(obj))

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
        model = body.get("model", "gpt-4o-mini")
        if not isinstance(model, str):
            model = json.dumps(model)
        behaviour = self.fake.next_behaviour(model)
        for name, value in behaviour.headers.items():
            self.set_header(name, value)
        self.set_header("x-request-id", "req_fake_" + uuid.uuid4().hex[:12])
        if not await self.pause(behaviour.first_delay):
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
