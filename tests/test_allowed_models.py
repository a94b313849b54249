"""ALLOWED_MODELS on /v1/*: a request whose model cannot be determined with certainty never reaches the upstream.

The body goes upstream byte for byte, so every way our reading of it could
differ from the upstream's is a way around the allow-list (issue 10, point 3).
"""

import gzip
import io
import json

import openai
import pytest
import tornado.httputil

from chat_gpt_proxy.requested_model import inspect_request
from tests.conftest import ACCESS_TOKEN, OPENAI_KEY

ALLOWED = ("gpt-4o-mini",)
V1_AUTH = {"access-token": ACCESS_TOKEN, "Authorization": "Bearer " + OPENAI_KEY}
BOUNDARY = "b0undary"


def multipart(*parts: tuple[str, str], boundary: str = BOUNDARY, newline: str = "\r\n") -> bytes:
    """A multipart body from (Content-Disposition parameters, value) pairs."""
    out = ""
    for disposition, value in parts:
        out += "--%s%sContent-Disposition: form-data; %s%s%s%s%s" % (
            boundary,
            newline,
            disposition,
            newline,
            newline,
            value,
            newline,
        )
    return (out + "--%s--%s" % (boundary, newline)).encode()


MULTIPART = "multipart/form-data; boundary=" + BOUNDARY
CHAT = {"messages": [{"role": "user", "content": "x"}]}


def chat_json(**fields) -> bytes:
    return json.dumps({**fields, **CHAT}).encode()


# Each is a request the upstream could read with a model other than the one
# the proxy checked (or with none checked): (path, body, headers).
UNDETERMINED = {
    # Endpoints that would choose a model themselves when the body names none.
    "an image generation without a model": ("/v1/images/generations", b'{"prompt": "a cat"}', {}),
    "a realtime client secret without a model": (
        "/v1/realtime/client_secrets",
        b'{"session": {"type": "realtime"}}',
        {},
    ),
    "a moderation without a model": ("/v1/moderations", b'{"input": "x"}', {}),
    "a realtime call's session part that is not JSON": (
        "/v1/realtime/calls",
        multipart(('name="sdp"', "v=0"), ('name="session"', "type=realtime model=gpt-realtime")),
        {"Content-Type": MULTIPART},
    ),
    "multipart with two model fields": (
        "/v1/audio/transcriptions",
        multipart(('name="model"', "gpt-4o-mini"), ('name="model"', "gpt-4o")),
        {"Content-Type": MULTIPART},
    ),
    "multipart model field sent as a file": (
        "/v1/audio/transcriptions",
        multipart(('name="model"; filename="m.txt"', "gpt-4o")),
        {"Content-Type": MULTIPART},
    ),
    "multipart with bare LF line endings": (
        "/v1/audio/transcriptions",
        multipart(('name="model"', "gpt-4o"), newline="\n"),
        {"Content-Type": MULTIPART},
    ),
    "multipart name* parameter": (
        "/v1/audio/transcriptions",
        multipart(("name=\"x\"; name*=UTF-8''model", "gpt-4o")),
        {"Content-Type": MULTIPART},
    ),
    "multipart with a preamble": (
        "/v1/audio/transcriptions",
        b"preamble\r\n" + multipart(('name="model"', "gpt-4o")),
        {"Content-Type": MULTIPART},
    ),
    "multipart with the boundary given twice": (
        "/v1/audio/transcriptions",
        multipart(('name="model"', "gpt-4o")),
        {"Content-Type": MULTIPART + "; boundary=other"},
    ),
    "multipart without a boundary": (
        "/v1/audio/transcriptions",
        multipart(('name="model"', "gpt-4o")),
        {"Content-Type": "multipart/form-data"},
    ),
    "invalid UTF-8 JSON": ("/v1/chat/completions", b'{"model": "gpt-4o", "x": "\xff"}', {}),
    "JSON with a byte-order mark": ("/v1/chat/completions", b"\xef\xbb\xbf" + chat_json(model="gpt-4o-mini"), {}),
    "UTF-16 JSON": ("/v1/chat/completions", chat_json(model="gpt-4o").decode().encode("utf-16"), {}),
    "JSON in another charset": (
        "/v1/chat/completions",
        chat_json(model="gpt-4o-mini"),
        {"Content-Type": "application/json; charset=latin-1"},
    ),
    "duplicate model keys, allowed one last": (
        "/v1/chat/completions",
        b'{"model": "gpt-4o", "model": "gpt-4o-mini", "messages": []}',
        {},
    ),
    "duplicate model keys, allowed one first": (
        "/v1/chat/completions",
        b'{"model": "gpt-4o-mini", "model": "gpt-4o", "messages": []}',
        {},
    ),
    "model that is not a string": ("/v1/chat/completions", chat_json(model=["gpt-4o"]), {}),
    "model null": ("/v1/chat/completions", chat_json(model=None), {}),
    "JSON array": ("/v1/chat/completions", b'[{"model": "gpt-4o-mini"}]', {}),
    "NaN in JSON": ("/v1/chat/completions", b'{"model": "gpt-4o-mini", "temperature": NaN}', {}),
    "form-urlencoded body": (
        "/v1/chat/completions",
        b"model=gpt-4o&messages=x",
        {"Content-Type": "application/x-www-form-urlencoded"},
    ),
    "JSON labelled text/plain": ("/v1/chat/completions", chat_json(model="gpt-4o"), {"Content-Type": "text/plain"}),
    "JSON without Content-Type": ("/v1/chat/completions", chat_json(model="gpt-4o-mini"), {"Content-Type": None}),
    "two Content-Type headers": (
        "/v1/chat/completions",
        chat_json(model="gpt-4o-mini"),
        {"Content-Type": ["application/json", "text/plain"]},
    ),
    "malformed Content-Type parameters": (
        "/v1/chat/completions",
        chat_json(model="gpt-4o-mini"),
        {"Content-Type": 'application/json; charset="utf-8'},
    ),
    "model in the query string and the body": ("/v1/chat/completions?model=gpt-4o", chat_json(model="gpt-4o-mini"), {}),
    "model twice in the query string": ("/v1/chat/completions?model=gpt-4o-mini;model=gpt-4o", chat_json(), {}),
}

# Requests whose model is certain, and not allowed.
NOT_ALLOWED = {
    "model in the session part of a realtime call": (
        "/v1/realtime/calls",
        multipart(('name="sdp"', "v=0"), ('name="session"', '{"type": "realtime", "model": "gpt-realtime"}')),
        {"Content-Type": MULTIPART},
    ),
    "Multipart/Form-Data in other letter case": (
        "/v1/audio/transcriptions",
        multipart(('name="model"', "gpt-4o")),
        {"Content-Type": "Multipart/Form-Data; Boundary=" + BOUNDARY},
    ),
    "multipart with a quoted boundary and whitespace": (
        "/v1/audio/transcriptions",
        multipart(('name="model"', "gpt-4o")),
        {"Content-Type": ' multipart/form-data ;  boundary="%s" ' % BOUNDARY},
    ),
    "multipart field name in other letter case": (
        "/v1/audio/transcriptions",
        multipart(('name="file"; filename="a.wav"', "RIFF"), ('NAME="Model"', "gpt-4o")),
        {"Content-Type": MULTIPART},
    ),
    "Application/JSON in other letter case": (
        "/v1/chat/completions",
        chat_json(model="gpt-4o"),
        {"Content-Type": "Application/JSON ; Charset=UTF-8"},
    ),
    "a nested model (the image_generation tool's)": (
        "/v1/responses",
        json.dumps({"model": "gpt-4o-mini", "input": "x", "tools": [{"type": "image_generation", "model": "gpt-4o"}]}),
        {},
    ),
    "model only in the query string of a POST": ("/v1/chat/completions?model=gpt-4o", chat_json(), {}),
    "escaped key": ("/v1/chat/completions", b'{"mod\\u0065l": "gpt-4o", "messages": []}', {}),
}


async def send(proxy, path, body, headers):
    all_headers = {"Content-Type": "application/json", **V1_AUTH}
    extra = {}
    for name, value in headers.items():
        if value is None:
            all_headers.pop(name, None)
        elif isinstance(value, list):
            all_headers.pop(name, None)
            extra[name] = value
        else:
            all_headers[name] = value
    if extra:
        merged = tornado.httputil.HTTPHeaders(all_headers)
        for name, values in extra.items():
            for value in values:
                merged.add(name, value)
        all_headers = merged
    body = body.encode() if isinstance(body, str) else body
    return await proxy.request(path, body=body, headers=all_headers, auth=False)


@pytest.mark.settings(allowed_models=ALLOWED)
@pytest.mark.parametrize("case", list(UNDETERMINED))
@pytest.mark.gen_test
async def test_undetermined_model_is_refused_with_400(proxy, fake_openai, case):
    response = await send(proxy, *UNDETERMINED[case])
    assert response.code == 400, response.body
    error = json.loads(response.body)["error"]
    assert error["code"] == "model_undetermined" and error["type"] == "invalid_request_error"
    assert "ALLOWED_MODELS" in error["message"]
    assert fake_openai.received == []


@pytest.mark.settings(allowed_models=ALLOWED)
@pytest.mark.parametrize("case", list(NOT_ALLOWED))
@pytest.mark.gen_test
async def test_model_not_allowed_is_refused_with_403(proxy, fake_openai, case):
    response = await send(proxy, *NOT_ALLOWED[case])
    assert response.code == 403, response.body
    assert json.loads(response.body)["error"]["code"] == "model_not_allowed"
    assert fake_openai.received == []


@pytest.mark.settings(allowed_models=ALLOWED)
@pytest.mark.gen_test
async def test_sdk_requests_with_allowed_models_still_pass(proxy, fake_openai, base_url):
    def run():
        with openai.OpenAI(
            base_url=base_url + "/v1", api_key=OPENAI_KEY, default_headers={"access-token": ACCESS_TOKEN}, max_retries=0
        ) as client:
            reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
            uploaded = client.files.create(file=("d.jsonl", io.BytesIO(b'{"a": 1}\n')), purpose="batch")
            return reply, uploaded

    reply, uploaded = await proxy.in_thread(run)
    assert reply.choices[0].message.content == "Echo: x" and uploaded.bytes == 9
    # A multipart body with one allowed model field, with parameters and whitespace, goes through.
    body = multipart(('name="model"', "gpt-4o-mini"), ('name="purpose"', "batch"), ('name="file"; filename="a"', "z"))
    response = await send(proxy, "/v1/files", body, {"Content-Type": 'multipart/form-data; boundary="%s"' % BOUNDARY})
    assert response.code == 200, response.body
    assert [r.path for r in fake_openai.received] == ["/v1/chat/completions", "/v1/files", "/v1/files"]
    assert fake_openai.received[-1].body == body


@pytest.mark.parametrize("case", ["duplicate model keys, allowed one last", "UTF-16 JSON"])
@pytest.mark.gen_test
async def test_without_allow_list_bodies_are_forwarded_byte_for_byte(proxy, fake_openai, case):
    path, body, headers = UNDETERMINED[case]
    await send(proxy, path, body, headers)
    [seen] = fake_openai.received
    assert seen.body == body


def test_json_model_and_stream_are_read_from_the_top_level():
    found = inspect_request(["application/json"], None, b'{"model": "m", "stream": true, "x": {"model": {}}}', "")
    assert (found.model, found.models, found.stream, found.problem) == ("m", ("m",), True, None)
    found = inspect_request(["multipart/form-data; boundary=" + BOUNDARY], None, multipart(('name="a"', "b")), "")
    assert (found.model, found.models, found.problem) == (None, (), None)


@pytest.mark.settings(allowed_models=ALLOWED)
@pytest.mark.gen_test
async def test_a_compressed_body_is_checked_on_what_it_decodes_to(proxy, fake_openai):
    """The base handler decodes gzip bodies before the check, and the decoded body is what goes upstream."""
    refused = await send(
        proxy, "/v1/chat/completions", gzip.compress(chat_json(model="gpt-4o")), {"Content-Encoding": "gzip"}
    )
    assert refused.code == 403 and json.loads(refused.body)["error"]["code"] == "model_not_allowed"
    assert fake_openai.received == []
    allowed = chat_json(model="gpt-4o-mini")
    response = await send(proxy, "/v1/chat/completions", gzip.compress(allowed), {"Content-Encoding": "gzip"})
    assert response.code == 200, response.body
    [seen] = fake_openai.received
    assert seen.body == allowed and "Content-Encoding" not in seen.headers
