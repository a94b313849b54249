"""POST /chat_complete: the API the existing users already call."""

from __future__ import annotations

from chat_gpt_proxy.cache import Entry, cacheable
from chat_gpt_proxy.formats.openai import OPENAI_CHAT
from chat_gpt_proxy.request.generate_params import ParamsError, normalize_generate_params
from chat_gpt_proxy.request.strict_json import dumps
from chat_gpt_proxy.upstream.headers import is_sse
from chat_gpt_proxy.usage.meter import output_cap

from .errors import ApiError
from .relay import ProxyHandler, without_content
from .usage_page import UsagePageMixin

WHAT_TO_SEND = (
    'Send a JSON object with either "prompt" (a non-empty string) or "messages" '
    '(a non-empty list of message objects), and optionally "generate_params" (an object).'
)


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code=code)


def build_chat_request(body: dict, config, allowed_models: tuple[str, ...] | None = None) -> dict:
    """The upstream ``/chat/completions`` payload for a ``/chat_complete`` body.

    ``model_name`` (or ``model``) becomes ``model``; every other key of
    ``generate_params`` passes through verbatim, over ``DEFAULT_GENERATE_PARAMS``.
    ``allowed_models``: the caller's token's list, if not ALLOWED_MODELS.
    """
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt == has_messages:
        raise bad_request(('Both "prompt" and "messages" were sent. ' if has_prompt else "") + WHAT_TO_SEND)
    if has_prompt:
        prompt = body["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise bad_request('"prompt" must be a non-empty string. ' + WHAT_TO_SEND)
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise bad_request('"messages" must be a non-empty list of objects. ' + WHAT_TO_SEND)

    params = body.get("generate_params")
    allowed = config.allowed_models if allowed_models is None else allowed_models
    try:
        params = normalize_generate_params({} if params is None else params, allowed)
        # Settings built in code skip the startup check of the defaults: check what is sent.
        payload = normalize_generate_params(
            {"model": config.default_model, **config.default_generate_params, **params}, allowed
        )
    except ParamsError as exc:
        type_ = "permission_denied" if exc.status == 403 else "invalid_request_error"
        raise ApiError(exc.status, exc.message, type_, exc.code) from None
    payload["messages"] = messages
    return payload


def answer_text(answer: dict):
    """``choices[0].message.content``, or None when absent (e.g. tool calls)."""
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


class ChatCompleteHandler(UsagePageMixin, ProxyHandler):
    route_name = "chat_complete"
    api_format = OPENAI_CHAT
    payload: dict | None = None

    def request_output_cap(self) -> int | None:
        return output_cap(self.payload)

    async def post(self) -> None:
        """POST /chat_complete: a chat completion as JSON, or as an SSE stream with stream=true."""
        key = self.openai_key()
        payload = self.payload = build_chat_request(self.json_body(), self.config, self.allowed_models())
        stream = payload.get("stream") is True
        self.access.model = payload["model"]
        pending = self.check_budget(payload["model"])
        if pending is not None:
            await pending  # budget counters in Redis
        # The cache's key is the request as the caller made it, before the proxy asks for usage.
        ttl = self.cache_ttl() if cacheable(payload) else 0
        if ttl and await self.use_cache("chat_complete", payload, key, stream, ttl):
            return
        if stream and self.metered:
            self.ask_stream_usage(payload)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json"}
        model = payload["model"]

        def body_for(upstream) -> bytes:
            # An upstream may call the model by another name (an alias, Azure's deployment).
            alias = upstream.upstream_model(model)
            return dumps(payload if alias == model else {**payload, "model": alias})

        call = await self.open_upstream(
            "POST", "chat/completions", "", headers, body_for, stream=stream, model=model, key=key
        )
        # Some OpenAI-compatible servers ignore "stream": relay SSE only when
        # the upstream sends SSE, and answer JSON as JSON.
        if 200 <= call.status < 300 and not without_content(call.status, "POST") and is_sse(call.headers):
            await self.relay_stream(call)
            return
        answer = await self.read_json_answer(call)
        if not 200 <= call.status < 300:
            self.raise_upstream_error(call, answer)
        if not isinstance(answer, dict):
            raise ApiError(
                502, "The upstream answered with JSON that is not an object.", "upstream_error", "upstream_invalid_json"
            )
        self.access.usage = self.api_format.usage_from_answer(answer)
        self.access.ran_model = self.api_format.model_from_answer(answer)
        answer["text"] = answer_text(answer)
        answer["status"] = "ok"
        self.relay_headers(call)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        body = dumps(answer)
        if call.status == 200:
            self.keep_in_cache(Entry("json", "application/json; charset=utf-8", body=body))
        self.finish(body)


routes = [(r"/chat_complete", ChatCompleteHandler)]
