"""POST /chat_complete: the API the existing users already call (issue 2)."""

from __future__ import annotations

from .base import ApiError, check_model_allowed, dumps
from .info import UsagePageMixin
from .proxy import ProxyHandler

# Keys of generate_params that the proxy itself fills in.
OWNED_KEYS = ("messages",)

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
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise bad_request('"generate_params" must be an object, e.g. {"model_name": "gpt-4o-mini"}.')
    for key in OWNED_KEYS:
        if key in params:
            raise bad_request('"generate_params" must not contain "%s": send it at the top level.' % key)
    params = dict(params)
    model_name = params.pop("model_name", None)
    if model_name is not None and "model" in params and params["model"] != model_name:
        raise bad_request('"generate_params" has "model_name" and "model" with different values: send one.')
    if model_name is not None:
        params["model"] = model_name

    payload = {"model": config.default_model, **config.default_generate_params, **params, "messages": messages}
    model = payload["model"]
    if not isinstance(model, str) or not model:
        raise bad_request('"model_name" must be a non-empty string.')
    check_model_allowed(config.allowed_models if allowed_models is None else allowed_models, model)
    if "stream" in payload and not isinstance(payload["stream"], bool):
        raise bad_request('"generate_params.stream" must be true or false.')
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

    async def post(self) -> None:
        """POST /chat_complete: a chat completion as JSON, or as an SSE stream with stream=true."""
        key = self.openai_key()
        payload = build_chat_request(self.json_body(), self.config, self.allowed_models())
        stream = payload.get("stream") is True
        self.model = payload["model"]
        headers = {
            "Authorization": "Bearer " + key,
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
        }
        call = await self.open_upstream(
            "POST", self.config.chat_completions_url, headers, dumps(payload), stream=stream
        )
        # Some OpenAI-compatible servers ignore "stream": relay SSE only when
        # the upstream sends SSE, and answer JSON as JSON.
        if 200 <= call.status < 300 and call.headers.get("Content-Type", "").startswith("text/event-stream"):
            await self.relay_stream(call)
            return
        answer = await self.read_json_answer(call)
        if not 200 <= call.status < 300:
            self.raise_upstream_error(call, answer)
        if not isinstance(answer, dict):
            raise ApiError(
                502, "The upstream answered with JSON that is not an object.", "upstream_error", "upstream_invalid_json"
            )
        self.usage = answer.get("usage")
        answer["text"] = answer_text(answer)
        answer["status"] = "ok"
        self.relay_headers(call)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps(answer))


routes = [(r"/chat_complete", ChatCompleteHandler)]
