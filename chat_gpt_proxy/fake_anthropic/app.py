"""``FakeAnthropic``: the fake OpenAI's server, script and records, speaking Anthropic's Messages API instead."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from chat_gpt_proxy import tornado_internals as internals
from chat_gpt_proxy.fake_openai.app import FakeOpenAI
from chat_gpt_proxy.fake_openai.behaviours import Behaviour as OpenAIBehaviour
from chat_gpt_proxy.fake_openai.http import FakeHandler, Script, Stats
from chat_gpt_proxy.fake_openai.wire import completion, to_json

from .wire import (
    ALIASES,
    ERROR_STATUS,
    KNOWN_VERSIONS,
    MODELS,
    PING,
    count_input_tokens,
    echo_text,
    error_body,
    message,
    model_object,
    model_page,
    new_id,
    sse,
    usage,
)


@dataclasses.dataclass
class Behaviour(OpenAIBehaviour):
    """What the fake does with one request: the fake OpenAI's kinds and fields, and these.

    kind: ``echo`` (the default: ``Echo: <last user text>``), ``error``
    (``error_type`` with its status, or ``status`` if set, in Anthropic's
    shape), ``stream_error`` (a stream that sends ``after`` deltas, then an
    ``error`` event of ``error_type``, as Anthropic does when it is overloaded
    mid-stream), ``openai`` (a chat completion in OpenAI's shape, or its
    chunks: an upstream that is not Anthropic's), and ``hang``, ``garbage``,
    ``drop``, ``stall``, ``raw`` as for the fake OpenAI.
    ``tool``: ``{"name", "input"}`` answers a ``tool_use`` block (streamed as
    ``input_json_delta`` pieces) after the text, with ``stop_reason``
    ``tool_use``; ``thinking``: a thinking block first (``thinking_delta``
    pieces, then its ``signature_delta``); ``pings``: ``ping`` events after the
    first block starts; ``cache_creation`` / ``cache_read``: the prompt-cache
    tokens the usage reports; ``input_tokens``: the uncached input (default:
    counted from the body).
    """

    status: int = 0
    tool: dict | None = None
    thinking: str | None = None
    pings: int = 1
    cache_creation: int = 0
    cache_read: int = 0
    input_tokens: int | None = None
    # SSE text an ``openai`` stream writes (and flushes) first, alone: a comment or a ping.
    opening: str = ""


class AnthropicHandler(FakeHandler):
    """Anthropic's rules for every route: the key, ``anthropic-version``, errors in its shape."""

    def initialize(self) -> None:
        super().initialize()
        self.request_id = new_id("req_")
        self.set_header("request-id", self.request_id)

    def refuse(self, error_type: str, message: str, status: int = 0) -> None:
        self.write_json(error_body(error_type, message, self.request_id), status or ERROR_STATUS[error_type])

    def write_error(self, status_code: int, **kwargs) -> None:
        self.refuse("api_error" if status_code >= 500 else "invalid_request_error", internals.reason(self), status_code)

    def key(self) -> str:
        """The key sent, in ``x-api-key`` or (as the SDKs send an auth token) ``Authorization: Bearer``."""
        key = self.request.headers.get("x-api-key", "")
        auth = self.request.headers.get("Authorization", "")
        if not key and auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
        return key

    def admitted(self) -> bool:
        """Answers a request without a known key or a valid ``anthropic-version``; True if it passed."""
        key = self.key()
        if not key:
            self.refuse("authentication_error", "x-api-key header is required")
            return False
        if self.fake.api_keys is not None and key not in self.fake.api_keys:
            self.refuse("authentication_error", "invalid x-api-key")
            return False
        version = self.request.headers.get("anthropic-version")
        if version is None:
            self.refuse("invalid_request_error", "anthropic-version: header is required")
            return False
        if version not in KNOWN_VERSIONS:
            self.refuse("invalid_request_error", "anthropic-version: %r is not a valid version" % version[:40])
            return False
        return True

    def body_or_refuse(self, *required: str) -> dict | None:
        """The JSON body with its ``required`` fields, or None once a 400 is answered."""
        body = self.json_body()
        if body is None:
            self.refuse("invalid_request_error", "There was an error parsing the body of your request: not valid JSON")
            return None
        for field in required:
            if field not in body:
                self.refuse("invalid_request_error", "%s: Field required" % field)
                return None
        if not isinstance(body.get("model"), str):
            self.refuse("invalid_request_error", "model: Input should be a valid string")
            return None
        if not isinstance(body.get("messages"), list):
            self.refuse("invalid_request_error", "messages: Input should be a valid list")
            return None
        return body


class Messages(AnthropicHandler):
    async def post(self) -> None:
        """POST /v1/messages: a ``message``, or its stream of events with ``"stream": true``."""
        if not self.admitted():
            return
        body = self.body_or_refuse("model", "max_tokens", "messages")
        if body is None:
            return
        model = body["model"]
        behaviour = self.fake.by_key.get(self.key()) or self.fake.next_behaviour(model)
        # The answer names the model that ran: an alias's snapshot.
        model = ALIASES.get(model, model)
        for name, value in behaviour.headers.items():
            self.set_header(name, value)
        self.set_header("anthropic-organization-id", "fake-org")
        self.set_header("anthropic-ratelimit-requests-remaining", "3999")
        if not await self.pause(behaviour.first_delay):
            return
        if behaviour.kind == "hang":
            await self.closed.wait()
            return
        if behaviour.kind == "error":
            self.refuse(behaviour.error_type, behaviour.message, behaviour.status)
            return
        if behaviour.kind == "garbage":
            self.set_status(behaviour.status or 200)
            self.set_header("Content-Type", behaviour.content_type)
            self.finish(behaviour.body)
            return
        if behaviour.kind == "raw":
            await self.send_raw(behaviour)
            return
        if behaviour.kind == "drop" and behaviour.after == 0:
            self.kill_connection(behaviour.reset)
            return
        text = echo_text(body)
        pieces = behaviour.chunks if behaviour.chunks is not None else [w + " " for w in text.split(" ")]
        if behaviour.kind == "openai":
            await self.answer_as_openai(body, model, "".join(pieces), pieces, behaviour.opening)
            return
        blocks = self.blocks(behaviour, "".join(pieces))
        input_tokens = behaviour.input_tokens if behaviour.input_tokens is not None else count_input_tokens(body)
        output_tokens = max(1, len(pieces) + sum(len(b.get("thinking", "").split()) for b in blocks))
        if behaviour.tool is not None:
            output_tokens += len(json.dumps(behaviour.tool.get("input", {})).split())
        final_usage = usage(input_tokens, output_tokens, behaviour.cache_creation, behaviour.cache_read)
        stop_reason = "tool_use" if behaviour.tool is not None else "end_turn"
        mid = new_id("msg_")
        if not body.get("stream"):
            self.write_json(message(mid, model, blocks, stop_reason, final_usage))
            return
        await self.stream(behaviour, mid, model, blocks, pieces, stop_reason, final_usage)

    def blocks(self, behaviour: Behaviour, text: str) -> list[dict]:
        """The answer's content blocks: thinking, text, tool_use, as the behaviour asks."""
        blocks = []
        if behaviour.thinking is not None:
            blocks.append({"type": "thinking", "thinking": behaviour.thinking, "signature": "sig_" + "A" * 40})
        blocks.append({"type": "text", "text": text})
        if behaviour.tool is not None:
            tool_input = behaviour.tool.get("input", {})
            blocks.append(
                {"type": "tool_use", "id": new_id("toolu_"), "name": behaviour.tool["name"], "input": tool_input}
            )
        return blocks

    async def stream(self, behaviour, mid, model, blocks, pieces, stop_reason, final_usage) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        opening = dict(final_usage, output_tokens=1)
        start = message(mid, model, [], None, opening)
        if not await self.send(sse("message_start", {"type": "message_start", "message": start})):
            return
        deltas = 0
        for index, block in enumerate(blocks):
            kind = block["type"]
            empty = {"type": "text", "text": ""}
            if kind == "thinking":
                empty = {"type": "thinking", "thinking": "", "signature": ""}
            elif kind == "tool_use":
                empty = {**block, "input": {}}
            head = sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": empty})
            if index == 0:
                head += PING * behaviour.pings
            if not await self.send(head):
                return
            for delta in self.deltas(block, pieces):
                if behaviour.kind in ("drop", "stall", "stream_error") and deltas == behaviour.after:
                    await self.cut(behaviour)
                    return
                if deltas and not await self.pause(behaviour.delay):
                    return
                event = {"type": "content_block_delta", "index": index, "delta": delta}
                if not await self.send(sse("content_block_delta", event)):
                    return
                deltas += 1
            if not await self.send(sse("content_block_stop", {"type": "content_block_stop", "index": index})):
                return
        final = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {k: v for k, v in final_usage.items() if k not in ("cache_creation", "service_tier")},
        }
        await self.send(sse("message_delta", final))
        self.finish(sse("message_stop", {"type": "message_stop"}))

    @staticmethod
    def deltas(block: dict, pieces: list[str]) -> list[dict]:
        kind = block["type"]
        if kind == "thinking":
            words = [w + " " for w in block["thinking"].split(" ")]
            return [{"type": "thinking_delta", "thinking": w} for w in words] + [
                {"type": "signature_delta", "signature": block["signature"]}
            ]
        if kind == "tool_use":
            encoded = json.dumps(block["input"])
            parts = [encoded[i : i + 8] for i in range(0, len(encoded), 8)]
            return [{"type": "input_json_delta", "partial_json": p} for p in ["", *parts]]
        return [{"type": "text_delta", "text": p} for p in pieces]

    async def cut(self, behaviour: Behaviour) -> None:
        """Where a ``drop``, ``stall`` or ``stream_error`` behaviour ends the stream."""
        if behaviour.kind == "drop":
            self.kill_connection(behaviour.reset)
        elif behaviour.kind == "stall":
            await self.closed.wait()
        else:
            error = error_body(behaviour.error_type, behaviour.message, self.request_id)
            del error["request_id"]
            self.finish(sse("error", error))

    async def answer_as_openai(self, body: dict, model: str, text: str, pieces: list[str], opening: str) -> None:
        """An OpenAI-compatible server answering a Messages request in its own shape."""
        if not body.get("stream"):
            self.write_json(completion(text, model))
            return
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        if opening:
            if not await self.send(opening.encode()):
                return
            # Apart from what follows, as a server's keep-alive would be.
            await asyncio.sleep(0.05)
        for piece in pieces:
            chunk = {"object": "chat.completion.chunk", "model": model, "choices": [{"delta": {"content": piece}}]}
            if not await self.send(b"data: " + to_json(chunk) + b"\n\n"):
                return
        self.finish(b"data: [DONE]\n\n")


class CountTokens(AnthropicHandler):
    def post(self) -> None:
        """POST /v1/messages/count_tokens: the input tokens the same request would read."""
        if not self.admitted():
            return
        body = self.body_or_refuse("model", "messages")
        if body is not None:
            self.write_json({"input_tokens": count_input_tokens(body)})


class Models(AnthropicHandler):
    def get(self, model_id: str | None = None) -> None:
        """GET /v1/models (``limit``, ``after_id``, ``before_id``) and GET /v1/models/{id}."""
        if not self.admitted():
            return
        if model_id is not None:
            found = [model_object(*m) for m in MODELS if m[0] == model_id]
            if not found:
                self.refuse("not_found_error", "model: %s" % model_id[:100])
            else:
                self.write_json(found[0])
            return
        try:
            limit = int(self.get_query_argument("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            self.refuse("invalid_request_error", "limit: Input should be between 1 and 1000")
            return
        after, before = self.get_query_argument("after_id", None), self.get_query_argument("before_id", None)
        self.write_json(model_page(limit, after, before))


class NotFound(AnthropicHandler):
    """Any other path: Anthropic's 404 (recorded like every other request)."""

    def any_method(self, *args) -> None:
        self.refuse("not_found_error", "Not found")

    get = head = post = put = patch = delete = options = any_method


class FakeAnthropic(FakeOpenAI):
    """A fake Anthropic API on loopback: ``POST /v1/messages`` (JSON or SSE), ``/v1/messages/count_tokens``,
    ``GET /v1/models[/{id}]``; scripted, recorded and counted as the fake OpenAI is.

    ``api_keys``: the keys it takes (None: any non-empty one), in ``x-api-key``
    or ``Authorization: Bearer``; ``by_key``: a behaviour for every request
    made with that key (a key out of quota beside a good one).
    """

    not_found = NotFound
    behaviour_class = Behaviour

    def __init__(self, *args, api_keys: set[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.api_keys = api_keys
        self.by_key: dict[str, Behaviour] = {}

    @property
    def url(self) -> str:
        """The base URL, as ``ANTHROPIC_BASE_URL`` takes it: without ``/v1``."""
        scheme = "https" if self.ssl_context is not None else "http"
        return "%s://%s:%d" % (scheme, self.host_name, self.port)

    def next_behaviour(self, model=None) -> Behaviour:
        if model in self.by_model:
            return self.by_model[model]
        return self.script.popleft() if self.script else Behaviour(delay=self.default_delay)

    def routes(self) -> list:
        return [
            (r"/v1/messages", Messages),
            (r"/v1/messages/count_tokens", CountTokens),
            (r"/v1/models", Models),
            (r"/v1/models/([^/]+)", Models),
            (r"/_fake/script", Script),
            (r"/_fake/stats", Stats),
        ]
