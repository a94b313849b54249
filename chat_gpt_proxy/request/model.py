"""Which model a /v1/* request asks for, for ALLOWED_MODELS.

The body goes upstream byte for byte, so the allow-list is only as good as
our reading of it agrees with the upstream's. Every place where two parsers
may disagree (duplicate fields or keys, letter case of the media type,
encodings, malformed multipart) is reported as a ``problem``: with an
allow-list in force such a request is refused rather than guessed at.
"""

from __future__ import annotations

import dataclasses
import json
import re
from urllib.parse import parse_qsl

from chat_gpt_proxy import human
from chat_gpt_proxy.request import strict_json

# RFC 9110 5.6.2 token, and a parameter: token "=" ( token / quoted-string ).
# Quoted strings with backslash escapes are refused: parsers unescape them differently.
_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM_RE = re.compile(r"\s*;\s*(%s)=(%s|\"[^\"\\\r\n]*\")\s*" % (_TCHARS, _TCHARS))
_MEDIA_TYPE_RE = re.compile(r"\s*(%s/%s)\s*" % (_TCHARS, _TCHARS))
# RFC 2046 5.1.1: boundary characters, 1-70 of them, not ending in a space.
_BOUNDARY_RE = re.compile(r"^[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]$")
_HEADER_LINE_RE = re.compile(rb"^(%s):[ \t]*([^\r\n\x00]*?)[ \t]*$" % _TCHARS.encode())


@dataclasses.dataclass
class RequestedModel:
    """``model``: the model the request names (for logs and the allow-list), or None.

    ``models``: every model name found, nested ones and the query's included,
    all of which must be allowed. ``named``: the model the body names where
    the endpoint reads it (a top-level JSON ``model``, a multipart ``model``
    field); ``session_model``: the ``model`` of its top-level ``session``
    (realtime client secrets and calls). Only these two say which model will
    run: a nested ``metadata.model`` or a query parameter on a POST is ignored
    by OpenAI. ``problem``: why the model cannot be determined with
    certainty (None if it can). ``stream``: whether the body asks for a stream;
    ``background``: whether it asks to run in the background (the Responses API's ``background``).
    """

    model: str | None = None
    models: tuple[str, ...] = ()
    stream: bool = False
    problem: str | None = None
    named: str | None = None
    session_model: str | None = None
    background: bool = False


class Undetermined(ValueError):
    pass


# A realtime event that mentions a model is parsed only up to this size.
MAX_INSPECTED_EVENT = 1024 * 1024
# One JSON string, and the colon after it if it is a key; possessive, so that
# scanning a message is linear whatever its strings hold.
_STRING_RE = re.compile(r'"((?:[^"\\]|\\.)*+)"(\s*:)?')


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """``(media type in lower case, {parameter name in lower case: value})``; Undetermined if malformed."""
    match = _MEDIA_TYPE_RE.match(value)
    if not match:
        raise Undetermined("malformed Content-Type")
    params: dict[str, str] = {}
    pos = match.end()
    while pos < len(value):
        param = _PARAM_RE.match(value, pos)
        if not param:
            raise Undetermined("malformed Content-Type parameters")
        name, raw = param.group(1).lower(), param.group(2)
        if name in params:
            raise Undetermined("Content-Type parameter %r given twice" % name)
        params[name] = raw[1:-1] if raw.startswith('"') else raw
        pos = param.end()
    return match.group(1).lower(), params


def query_pairs(query: str) -> list[tuple[str, str]]:
    """The query's ``(name, value)`` pairs, split on ";" as well as "&" (some servers still do)."""
    return parse_qsl(query.replace(";", "&"), keep_blank_values=True)


def models_in_query(pairs: list[tuple[str, str]]) -> list[str]:
    """Every value a server could read as the query's ``model``: any letter case, surrounding spaces,
    ``model[]`` and ``model[x]`` (Rails, PHP and Node's qs make those an array or an override)."""
    return [value for key, value in pairs if key.split("[", 1)[0].strip().lower() == "model"]


def inspect_request(content_types: list[str], content_encoding: str | None, body: bytes, query: str) -> RequestedModel:
    """What a /v1 request with a body (POST, PUT, PATCH) asks for."""
    try:
        found = _inspect(content_types, content_encoding, body)
        query_models = models_in_query(query_pairs(query))
        if query_models:
            # Some OpenAI-compatible servers merge query and body parameters:
            # the allow-list checks the query's model too. OpenAI ignores it on
            # a POST, so it never names the model that is logged and priced.
            if len(query_models) > 1 or found.model is not None:
                raise Undetermined("the model is given more than once (query string and body)")
            found.models += (query_models[0],)
        return found
    except Undetermined as exc:
        return _lenient(body, str(exc))


def _inspect(content_types: list[str], content_encoding: str | None, body: bytes) -> RequestedModel:
    if not body:
        return RequestedModel()
    if content_encoding is not None and content_encoding.strip().lower() not in ("", "identity"):
        raise Undetermined("the body has a Content-Encoding")
    if len(content_types) != 1:
        raise Undetermined("the body has %s Content-Type header" % ("no" if not content_types else "more than one"))
    media_type, params = parse_content_type(content_types[0])
    if media_type == "application/json":
        if params.get("charset", "utf-8").lower() != "utf-8":
            raise Undetermined("a JSON body must be UTF-8")
        return _from_json(body)
    if media_type == "multipart/form-data":
        return _from_multipart(body, params.get("boundary"))
    raise Undetermined("the Content-Type %s is neither application/json nor multipart/form-data" % media_type[:100])


def _session_model(session) -> str | None:
    """The model a realtime session object names: its ``model``, or for a transcription session
    the model of ``audio.input.transcription``."""
    if not isinstance(session, dict):
        return None
    model = session.get("model")
    if model is None and session.get("type") == "transcription":
        node = session
        for key in ("audio", "input", "transcription"):
            node = node.get(key) if isinstance(node, dict) else None
        model = node.get("model") if isinstance(node, dict) else None
    return model if isinstance(model, str) else None


def _models_outside_metadata(value, found: list[str]) -> list[str]:
    """Every "model" string (any key letter case) in ``value``, except under a ``metadata`` key:
    metadata is the caller's own free-form labels, which OpenAI never reads as a model."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "metadata":
                continue
            if key.lower() == "model" and isinstance(item, str):
                found.append(item)
            else:
                _models_outside_metadata(item, found)
    elif isinstance(value, list):
        for item in value:
            _models_outside_metadata(item, found)
    return found


def _from_json(body: bytes | str, *, is_session: bool = False) -> RequestedModel:
    """What a JSON body names; ``is_session``: the body is itself a realtime session object
    (the ``session`` part of a multipart call), whose model is its ``session_model``."""
    nested: list[str] = []

    def pairs_hook(pairs: list) -> dict:
        # In any letter case: some parsers (Go's encoding/json) match keys so.
        values = [value for key, value in pairs if key.lower() == "model"]
        if len(values) > 1:
            raise Undetermined('the JSON body has the key "model" twice in one object (in some letter case)')
        if sum(1 for key, _ in pairs if key.lower() == "session") > 1:
            raise Undetermined('the JSON body has the key "session" twice in one object (in some letter case)')
        # A "model" string anywhere (e.g. the image_generation tool's model)
        # is a model the request may use; other values (a JSON schema
        # property named "model") are not model names.
        nested.extend(v for v in values if isinstance(v, str))
        return dict(pairs)

    try:
        # Strict UTF-8 without a BOM, no NaN/Infinity, no overflowing
        # numbers: only what every JSON parser reads the same way.
        text = body if isinstance(body, str) else body.decode("utf-8")
        parsed = strict_json.loads(text, object_pairs_hook=pairs_hook)
    except Undetermined:
        raise
    except (ValueError, RecursionError):
        raise Undetermined("the body is not valid UTF-8 JSON") from None
    if not isinstance(parsed, dict):
        raise Undetermined("the JSON body is not an object")
    model = parsed.get("model")
    if "model" in parsed and not isinstance(model, str):
        raise Undetermined('"model" is not a string')
    if any(key.lower() == "model" and key != "model" for key in parsed):
        raise Undetermined('the JSON body names its model with a key other than "model"')
    if nested and '"metadata"' in text:
        nested = _models_outside_metadata(parsed, [])
    return RequestedModel(
        model,
        tuple(nested),
        parsed.get("stream") is True,
        named=model,
        session_model=_session_model(parsed if is_session else parsed.get("session")),
        background=parsed.get("background") is True,
    )


def _from_multipart(body: bytes, boundary: str | None) -> RequestedModel:
    if boundary is None or not _BOUNDARY_RE.match(boundary):
        raise Undetermined("the multipart body has no valid boundary")
    delimiter = b"--" + boundary.encode("ascii")
    # Every occurrence of the delimiter must be an unambiguous one: at the
    # start or after CRLF, followed by CRLF (a part) or "--" (the end).
    # Lenient parsers also split on bare LF or accept a preamble; such a
    # body could hold parts only they see.
    starts = []
    pos = body.find(delimiter)
    while pos >= 0:
        starts.append(pos)
        pos = body.find(delimiter, pos + 1)
    if not starts or starts[0] != 0:
        raise Undetermined("the multipart body does not start with its boundary")
    model_values: list[bytes] = []
    nested_models: tuple[str, ...] = ()
    session_model = None
    sessions = 0
    for index, start in enumerate(starts):
        after = start + len(delimiter)
        if start and body[start - 2 : start] != b"\r\n":
            raise Undetermined("the multipart body has a boundary not preceded by CRLF")
        if index == len(starts) - 1:
            if body[after : after + 2] != b"--" or body[after + 2 :] not in (b"", b"\r\n"):
                raise Undetermined("the multipart body does not end with its closing boundary")
            break
        if body[after : after + 2] != b"\r\n":
            raise Undetermined("the multipart body has a malformed boundary line")
        part = body[after + 2 : starts[index + 1] - 2]
        field, value, plain = _part(part)
        if field.strip().lower() in ("model", "session") and field != field.strip().lower():
            # Form parsers match field names exactly: "Model" is not the model
            # for the upstream, and which one a lenient parser takes is unknown.
            raise Undetermined("the multipart body has a field named %r" % field[:40])
        if field == "session":
            sessions += 1
            if sessions > 1:
                raise Undetermined("the multipart body has more than one session field")
        if field == "model":
            if not plain:
                raise Undetermined("the multipart model field is a file or encoded")
            model_values.append(value)
        elif field == "session" or (plain and value.lstrip()[:1] == b"{"):
            # A JSON field can name a model too: POST /v1/realtime/calls sends
            # the session, {"type": "realtime", "model": ...}, as a part.
            if not plain:
                raise Undetermined("the multipart session field is a file or encoded")
            try:
                found = _from_json(value, is_session=field == "session")
                nested_models += found.models
                if field == "session":
                    session_model = found.session_model
            except Undetermined:
                if field == "session":
                    raise Undetermined("the multipart session field is not a JSON object") from None
    if len(model_values) > 1:
        raise Undetermined("the multipart body has more than one model field")
    if not model_values:
        return RequestedModel(nested_models[0] if nested_models else None, nested_models, session_model=session_model)
    try:
        model = model_values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise Undetermined("the multipart model field is not UTF-8") from None
    return RequestedModel(model, (model, *nested_models), named=model, session_model=session_model)


def _part(part: bytes) -> tuple[str, bytes, bool]:
    """``(field name, value, whether it is a plain field)`` of one part."""
    head, sep, value = part.partition(b"\r\n\r\n")
    if not sep:
        raise Undetermined("a multipart part has no header block")
    disposition = None
    plain = True
    for line in head.split(b"\r\n"):
        match = _HEADER_LINE_RE.match(line)
        if not match:
            raise Undetermined("a multipart part has a malformed header line")
        header = match.group(1).lower()
        if header == b"content-disposition":
            if disposition is not None:
                raise Undetermined("a multipart part has two Content-Disposition headers")
            disposition = match.group(2).decode("latin-1")
        elif header in (b"content-transfer-encoding", b"content-encoding"):
            plain = False
    if disposition is None:
        raise Undetermined("a multipart part has no Content-Disposition")
    kind, _, rest = disposition.partition(";")
    if kind.strip().lower() != "form-data":
        raise Undetermined("a multipart part is not form-data")
    try:
        _, params = parse_content_type("x/x;" + rest if rest else "x/x")
    except Undetermined:
        raise Undetermined("a multipart part has a malformed Content-Disposition") from None
    # Only name and filename: an RFC 8187 "name*" would name the field for some parsers only.
    if "name" not in params or set(params) - {"name", "filename"}:
        raise Undetermined("a multipart part has a Content-Disposition other than name and filename")
    return params["name"], value, plain and "filename" not in params


def inspect_event(message: str | bytes) -> RequestedModel:
    """The models a realtime client event names, anywhere in it: ``session.update``'s
    ``session.model``, ``session.audio.input.transcription.model``, a ``response.create``'s...

    Read as strictly as a /v1 JSON body, and failing closed: an event that
    mentions "model" (in any letter case) or holds a ``\\u`` escape, which
    could spell it, must be one strict JSON object; a binary message is
    refused (the API's events are text; a lenient parser could read bytes
    that are not UTF-8). An event over MAX_INSPECTED_EVENT is not parsed
    (that would hold the event loop for seconds): it is refused only if one
    of its keys is, or may spell, "model".
    """
    if isinstance(message, bytes):
        return RequestedModel(problem="a binary message cannot be checked; send events as text")
    # Audio appends (megabytes of base64) hold neither and are not parsed.
    # (lower() then "in" is several times faster than a case-insensitive search.)
    if "\\u" not in message and "model" not in message.lower():
        return RequestedModel()
    if len(message) > MAX_INSPECTED_EVENT:
        for match in _STRING_RE.finditer(message):
            key = match.group(1)
            if match.group(2) is not None and ("\\u" in key or key.lower() == "model"):
                return RequestedModel(
                    problem="the event names a model and is larger than %s" % human.size(MAX_INSPECTED_EVENT)
                )
        return RequestedModel()
    try:
        # A text frame that is not valid UTF-8 never gets here: Tornado drops its connection.
        return _from_json(message)
    except Undetermined as exc:
        return RequestedModel(problem=str(exc).replace("body", "event"))


def _lenient(body: bytes, problem: str) -> RequestedModel:
    """Best effort for logs, the stream and background flags when the body cannot be read with
    certainty (``problem``) and there is no allow-list: JSON whatever the label."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return RequestedModel(problem=problem)
    if not isinstance(parsed, dict):
        return RequestedModel(problem=problem)
    model = parsed.get("model")
    return RequestedModel(
        model if isinstance(model, str) else None,
        stream=parsed.get("stream") is True,
        problem=problem,
        background=parsed.get("background") is True,
    )


# With an allow-list in force, a request with a body must name its model,
# except on these endpoints, which run no model (the rule fails
# closed, so an endpoint added upstream later, a case variant or a path with
# ";" parameters is refused rather than forwarded unchecked). "{id}" is one
# path segment. docs/api.md (ALLOWED_MODELS on /v1/*) lists the same paths.
MODEL_FREE_PATHS = (
    "files",
    "uploads",
    "uploads/{id}/parts",
    "uploads/{id}/complete",
    "uploads/{id}/cancel",
    "batches/{id}/cancel",
    "vector_stores",
    "vector_stores/{id}",
    "vector_stores/{id}/files",
    "vector_stores/{id}/files/{id}",
    "vector_stores/{id}/file_batches",
    "vector_stores/{id}/file_batches/{id}/cancel",
    "conversations",
    "conversations/{id}",
    "conversations/{id}/items",
    "threads",
    "threads/{id}",
    "threads/{id}/messages",
    "threads/{id}/messages/{id}",
    "threads/{id}/runs/{id}/cancel",
    "assistants/{id}",
    "chat/completions/{id}",
    "responses/{id}/cancel",
    "fine_tuning/jobs/{id}/cancel",
    "fine_tuning/jobs/{id}/pause",
    "fine_tuning/jobs/{id}/resume",
    "containers",
    "containers/{id}/files",
    "realtime/calls/{id}/hangup",
    "realtime/calls/{id}/refer",
    "realtime/calls/{id}/reject",
)


# An id as OpenAI writes them, a prefix and "_" or "-" (thread_..., vs_...,
# file-...): so that a word such as "runs" in POST /v1/threads/runs (which
# runs the assistant's model) is never read as the id of "threads/{id}".
_ID = "[A-Za-z0-9]+[_-][A-Za-z0-9_-]*"

MODEL_FREE_PATH_RE = re.compile(
    "^(?:%s)$" % "|".join(re.escape(path).replace(re.escape("{id}"), _ID) for path in MODEL_FREE_PATHS)
)
# Endpoints whose model is the session's: {"session": {"model": ...}} (JSON,
# or the multipart "session" part of a WebRTC call).
SESSION_MODEL_PATH_RE = re.compile(r"^realtime/(?:client_secrets|calls)$")
