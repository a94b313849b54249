"""The rules for the ``generate_params`` of ``POST /chat_complete``.

One place for them, because two parts apply them: the request validation
(handlers/chat.py) and the startup check of ``DEFAULT_GENERATE_PARAMS``
(settings.py), so that the operator's defaults can never make every request
fail.
"""

from __future__ import annotations

# Keys of generate_params that the proxy itself fills in.
OWNED_KEYS = ("messages",)


class ParamsError(ValueError):
    """What is wrong, in one sentence; ``status`` 403 for a model the allow-list refuses."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


def check_model(model, allowed_models: tuple[str, ...], where: str = "generate_params") -> None:
    if not isinstance(model, str) or not model:
        raise ParamsError('"%s.model_name" must be a non-empty string.' % where)
    if allowed_models and model not in allowed_models:
        # ALLOWED_MODELS: an operator can keep a shared proxy on cheap models.
        raise ParamsError("Model %r is not allowed on this proxy." % model[:100], 403, "model_not_allowed")


def normalize_generate_params(params, allowed_models: tuple[str, ...], where: str = "generate_params") -> dict:
    """``params`` as upstream fields: ``model_name`` becomes ``model``; the rest passes verbatim.

    Raises ``ParamsError`` for what the upstream call cannot be made with:
    not an object, a key the proxy fills in, ``model_name`` and ``model``
    disagreeing, a model that is not a non-empty string or not allowed, a
    ``stream`` that is not a boolean.
    """
    if not isinstance(params, dict):
        raise ParamsError('"%s" must be an object, e.g. {"model_name": "gpt-4o-mini"}.' % where)
    for key in OWNED_KEYS:
        if key in params:
            raise ParamsError('"%s" must not contain "%s": send it at the top level.' % (where, key))
    params = dict(params)
    model_name = params.pop("model_name", None)
    if model_name is not None and "model" in params and params["model"] != model_name:
        raise ParamsError('"%s" has "model_name" and "model" with different values: send one.' % where)
    if model_name is not None:
        params["model"] = model_name
    if "model" in params:
        check_model(params["model"], allowed_models, where)
    if "stream" in params and not isinstance(params["stream"], bool):
        raise ParamsError('"%s.stream" must be true or false.' % where)
    return params
