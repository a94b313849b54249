"""The fake's HTTP routes: chat completions, Responses, models, embeddings, files, raw answers, scripting.

Azure OpenAI's routes (azure.py) reuse the chat completions, Responses and embeddings handlers here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import struct
import time
import uuid
from typing import TYPE_CHECKING

import tornado.httpserver
import tornado.web
import tornado.websocket
from tornado.iostream import StreamClosedError

from chat_gpt_proxy import tornado_internals as internals
from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from chat_gpt_proxy.fake_openai.wire import (
    chunk as wire_chunk,
)
from chat_gpt_proxy.fake_openai.wire import (
    completion,
    echo_text,
    error_object,
    output_message,
    output_text_part,
    response_object,
    responses_input_text,
    responses_usage,
    to_json,
    usage_for,
)

if TYPE_CHECKING:
    from chat_gpt_proxy.fake_openai.app import FakeOpenAI


class FakeHandler(tornado.web.RequestHandler):
    @property
    def fake(self) -> FakeOpenAI:
        return self.settings["fake"]

    def initialize(self) -> None:
        self.closed = asyncio.Event()
        self.done = False
        self.aborted = False

    def prepare(self) -> None:
        if not self.request.path.startswith("/_fake/"):
            request = self.request
            self.fake.received.add(request.method, request.path, dict(request.headers), request.body, request.query)

    def write_error(self, status_code: int, **kwargs) -> None:
        """Errors as OpenAI writes them: JSON, never Tornado's HTML page."""
        self.write_json(error_object(Behaviour(message=internals.reason(self))), status_code)

    def on_connection_close(self) -> None:
        self.closed.set()
        if not self.done:
            self.note_abort()

    def note_abort(self) -> None:
        """The client went away before the answer was complete: noted once, whichever way it is seen."""
        if not self.aborted:
            self.aborted = True
            self.fake.note_abort()

    def on_finish(self) -> None:
        self.done = True
        if not self.aborted:
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
            # A failed write can come before on_connection_close, and the
            # handler then ends (Tornado finishes it), which would hide the abort.
            self.note_abort()
            return False
        return True

    def json_body(self) -> dict | None:
        """The request's body if it is a JSON object, else None."""
        try:
            body = json.loads(self.request.body)
        except (ValueError, RecursionError):
            return None
        return body if isinstance(body, dict) else None

    async def begin(self, body: dict, model: str | None = None) -> tuple[str, Behaviour | None]:
        """The model asked for (the body's, unless ``model`` names it: an Azure deployment) and the
        behaviour scripted for it, with its headers and a request id set, after its ``first_delay``;
        the behaviour is None if the client left meanwhile."""
        if model is None:
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
        self.finish(to_json(obj, self.fake.spaced))

    def answer(self, behaviour: Behaviour, model: str, usage: dict) -> tuple[str, dict]:
        """The model the answer names and its usage, as ``behaviour`` may have scripted them."""
        return behaviour.answer_model or model, {**usage, **(behaviour.usage or {})}

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
        await self.complete()

    async def complete(self, deployment: str | None = None) -> None:
        """A chat completion, as JSON or SSE; ``deployment`` (Azure's, from the path) is the model."""
        body = self.json_body()
        if body is None:
            self.write_json(error_object(Behaviour(message="We could not parse the JSON body of your request.")), 400)
            return
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            self.write_json(error_object(Behaviour(message="Invalid type for 'messages': expected an array.")), 400)
            return
        model, behaviour = await self.begin(body, deployment)
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
            answer = completion(text, model)
            answer["model"], answer["usage"] = self.answer(behaviour, model, answer["usage"])
            self.write_json(answer)
            return
        pieces = behaviour.chunks if behaviour.chunks is not None else [w + " " for w in text.split(" ")]
        await self.stream(behaviour, body, model, pieces)

    async def stream(self, behaviour: Behaviour, body: dict, model: str, pieces: list[str]) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        model, counts = self.answer(behaviour, model, usage_for("".join(pieces)))
        chunk = functools.partial(wire_chunk, spaced=self.fake.spaced, obfuscation=self.fake.obfuscation)
        if not await self.send(chunk(cid, model, {"role": "assistant", "content": ""}, with_usage=usage)):
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
            if not await self.send(chunk(cid, model, {"content": piece}, with_usage=usage)):
                return
        await self.send(chunk(cid, model, {}, finish_reason="stop", with_usage=usage))
        if usage:
            await self.send(chunk(cid, model, {}, usage=counts, choices=False))
        self.finish(b"data: [DONE]\n\n")


class Responses(FakeHandler):
    async def post(self) -> None:
        """POST /v1/responses: the Responses API, as JSON or as its typed SSE events (``event:`` + ``data:``)."""
        await self.respond(self.json_body())

    async def respond(self, body: dict | None) -> None:
        if body is None or "input" not in body:
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
        model, usage = self.answer(behaviour, model, responses_usage(text))
        if body.get("background") is True and not body.get("stream"):
            # Queued now; retrieved later, in progress once, then finished with its usage.
            finished = response_object(rid, body, model, created_at, "completed", [done_item], usage)
            self.fake.deferred[rid] = [{**finished, "status": "in_progress", "usage": None}, finished]
            self.write_json({**finished, "status": "queued", "background": True, "output": [], "usage": None})
            return
        if not body.get("stream"):
            self.write_json(response_object(rid, body, model, created_at, "completed", [done_item], usage))
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
            return b"event: " + kind.encode() + b"\ndata: " + to_json(data, self.fake.spaced) + b"\n\n"

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
        usage = self.answer(behaviour, model, responses_usage(text))[1]
        completed = response_object(rid, body, model, created_at, "completed", [done_item], usage)
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
        self.embed(body, body.get("model"))

    def embed(self, body: dict, model) -> None:
        """One small vector per input; ``model`` is the answer's (the body's, or Azure's deployment)."""
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2, 0.3]} for i in range(len(inputs))]
        self.write_json(
            {
                "object": "list",
                "data": data,
                "model": model,
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


class Retrieve(FakeHandler):
    def get(self, object_id: str) -> None:
        """GET /v1/responses/{id}, /v1/batches/{id}: a background response or batch, each of its
        states once, the last for good."""
        states = self.fake.deferred.get(object_id)
        if states is None:
            self.write_json(error_object(Behaviour(message="No such object: %r" % object_id)), 404)
            return
        self.write_json(states.pop(0) if len(states) > 1 else states[0])


class Batches(FakeHandler):
    def post(self) -> None:
        """POST /v1/batches: a batch validating now, in progress, then completed with its usage
        (as OpenAI reports it)."""
        body = json.loads(self.request.body or b"{}")
        batch = {
            "id": "batch_" + uuid.uuid4().hex[:24],
            "object": "batch",
            "endpoint": body.get("endpoint"),
            "model": "gpt-4o-mini",
            "input_file_id": body.get("input_file_id"),
            "completion_window": "24h",
            "status": "validating",
            "created_at": int(time.time()),
            "request_counts": {"total": 2, "completed": 0, "failed": 0},
            "usage": None,
        }
        usage = {
            "input_tokens": 1000,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 500,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 1500,
        }
        finished = {**batch, "status": "completed", "request_counts": {"total": 2, "completed": 2, "failed": 0}}
        self.fake.deferred[batch["id"]] = [{**batch, "status": "in_progress"}, {**finished, "usage": usage}]
        self.write_json(batch)


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
        behaviour = self.fake.behaviour_class(**json.loads(self.request.body))
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
