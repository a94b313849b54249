"""The fake's realtime WebSocket (``/v1/realtime``): sessions scripted by ``RealtimeBehaviour``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from typing import TYPE_CHECKING

import tornado.httpserver
import tornado.web
import tornado.websocket

from chat_gpt_proxy import tornado_internals as internals
from chat_gpt_proxy.fake_openai.behaviours import Behaviour, Headers, RealtimeBehaviour, RealtimeRecord
from chat_gpt_proxy.fake_openai.wire import error_object, realtime_event, to_json

if TYPE_CHECKING:
    from chat_gpt_proxy.fake_openai.app import FakeOpenAI


class RealtimeSocket(tornado.websocket.WebSocketHandler):
    """/v1/realtime: OpenAI's Realtime API over a WebSocket, as far as the tests need it."""

    @property
    def fake(self) -> FakeOpenAI:
        return self.settings["fake"]

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        behaviour = getattr(exc, "behaviour", None) or Behaviour(message=internals.reason(self))
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
            Headers(self.request.headers),
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
        if isinstance(message, str) and self.fake.spaced:
            message = json.dumps(json.loads(message))  # as servers on Python's json.dumps write it
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
