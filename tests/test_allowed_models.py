"""ALLOWED_MODELS on /v1/*: a request whose model cannot be determined with certainty never reaches the upstream.

The body goes upstream byte for byte, so every way our reading of it could
differ from the upstream's is a way around the allow-list.
"""

import asyncio
import gzip
import io
import json
import pathlib
import re

import openai
import pytest
import tornado.httputil

from chat_gpt_proxy.request.model import MODEL_FREE_PATHS, inspect_request
from tests.conftest import ACCESS_TOKEN, OPENAI_KEY
from tests.procs import ROOT

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
    # Form parsers match field names exactly: the upstream would not read "Model".
    "multipart model field name in other letter case": (
        "/v1/audio/transcriptions",
        multipart(('name="file"; filename="a.wav"', "RIFF"), ('NAME="Model"', "gpt-4o-mini")),
        {"Content-Type": MULTIPART},
    ),
    "multipart model field name with a space": (
        "/v1/images/edits",
        multipart(('name="prompt"', "x"), ('name=" model"', "gpt-4o-mini")),
        {"Content-Type": MULTIPART},
    ),
    "two multipart session fields": (
        "/v1/realtime/calls",
        multipart(
            ('name="sdp"', "v=0"),
            ('name="session"', '{"type": "realtime"}'),
            ('name="session"', '{"type": "realtime", "model": "gpt-4o-mini"}'),
        ),
        {"Content-Type": MULTIPART},
    ),
    "a multipart session field in other letter case": (
        "/v1/realtime/calls",
        multipart(
            ('name="sdp"', "v=0"),
            ('name="session"', '{"type": "realtime"}'),
            ('name="Session"', '{"type": "realtime", "model": "gpt-4o-mini"}'),
        ),
        {"Content-Type": MULTIPART},
    ),
    "two JSON session keys": (
        "/v1/realtime/client_secrets",
        b'{"session": {"type": "realtime"}, "session": {"type": "realtime", "model": "gpt-4o-mini"}}',
        {},
    ),
    "JSON session keys in two letter cases": (
        "/v1/realtime/client_secrets",
        b'{"session": {"type": "realtime", "model": "gpt-4o-mini"}, "Session": null}',
        {},
    ),
    "model[] beside model in the query": (
        "/v1/chat/completions?model%5B%5D=gpt-4o",
        chat_json(model="gpt-4o-mini"),
        {},
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


# The allow-list check and the upstream must see one path. The fake,
# like OpenAI, routes on the percent-decoded path, so each of these would have
# reached a model-choosing endpoint without naming a model.
ENCODED_PATHS = {
    "an image generation, encoded": ("/v1/images/%67enerations", b'{"prompt": "a cat"}', "application/json"),
    "Responses, encoded": ("/v1/re%73ponses", b'{"input": "x", "prompt": {"id": "pmpt_1"}}', "application/json"),
    "a chat completion, encoded": ("/v1/chat/%63ompletions", json.dumps(CHAT).encode(), "application/json"),
    "a transcription, encoded, multipart": (
        "/v1/audio/%74ranscriptions",
        multipart(('name="file"; filename="a.wav"', "RIFF")),
        MULTIPART,
    ),
    "two escapes, upper and lower case hex": ("/v1/re%73%70onses", b'{"input": "x"}', "application/json"),
    "a case variant": ("/v1/IMAGES/generations", b'{"prompt": "a cat"}', "application/json"),
    "a ';' parameter": ("/v1/images/generations;x=1", b'{"prompt": "a cat"}', "application/json"),
    "a trailing %20": ("/v1/images/generations%20", b'{"prompt": "a cat"}', "application/json"),
}

# A model named where the endpoint does not read it:
# OpenAI ignores a POST's query string and a nested metadata.model.
NAMED_WHERE_IGNORED = {
    "an image generation with ?model=": ("/v1/images/generations?model=gpt-4o-mini", b'{"prompt": "a cat"}', {}),
    "a client secret with ?model=": ("/v1/realtime/client_secrets?model=gpt-4o-mini", b"{}", {}),
    "a stored prompt with ?mod%65l=": ("/v1/responses?mod%65l=gpt-4o-mini", b'{"prompt": {"id": "pmpt_1"}}', {}),
    "a batch with metadata.model": (
        "/v1/batches",
        b'{"input_file_id": "file-abc", "endpoint": "/v1/chat/completions", "metadata": {"model": "gpt-4o-mini"}}',
        {},
    ),
    "a stored prompt with metadata.model": (
        "/v1/responses",
        b'{"prompt": {"id": "pmpt_1"}, "metadata": {"model": "gpt-4o-mini"}}',
        {},
    ),
    "a run with metadata.model": (
        "/v1/threads/thread_abc/runs",
        b'{"assistant_id": "asst_1", "metadata": {"model": "gpt-4o-mini"}}',
        {},
    ),
    "an image edit with a JSON field naming a model": (
        "/v1/images/edits",
        multipart(('name="prompt"', "a cat"), ('name="x"', '{"model": "gpt-4o-mini"}')),
        {"Content-Type": MULTIPART},
    ),
    "a client secret whose session names none, with metadata.model": (
        "/v1/realtime/client_secrets",
        b'{"session": {"type": "realtime"}, "metadata": {"model": "gpt-4o-mini"}}',
        {},
    ),
    "a client secret naming a top-level model but none in its session": (
        "/v1/realtime/client_secrets",
        b'{"model": "gpt-4o-mini", "session": {"type": "realtime", "instructions": "x"}}',
        {},
    ),
    "a call naming a model field but none in its session": (
        "/v1/realtime/calls",
        multipart(('name="sdp"', "v=0"), ('name="model"', "gpt-4o-mini"), ('name="session"', '{"type": "realtime"}')),
        {"Content-Type": MULTIPART},
    ),
    "the model key in another letter case": ("/v1/chat/completions", b'{"Model": "gpt-4o-mini", "messages": []}', {}),
    "model and Model in one object": (
        "/v1/chat/completions",
        b'{"model": "gpt-4o-mini", "MODEL": "gpt-4o-mini", "messages": []}',
        {},
    ),
}


@pytest.mark.settings(allowed_models=ALLOWED)
@pytest.mark.parametrize("case", list(NAMED_WHERE_IGNORED))
@pytest.mark.gen_test
async def test_a_model_named_where_the_endpoint_does_not_read_it_does_not_count(proxy, fake_openai, case):
    response = await send(proxy, *NAMED_WHERE_IGNORED[case])
    assert response.code == 400, response.body
    assert json.loads(response.body)["error"]["code"] == "model_undetermined"
    assert fake_openai.received == []


@pytest.mark.settings(allowed_models=("gpt-4o-mini", "gpt-realtime"))
@pytest.mark.gen_test
async def test_a_session_model_names_the_model_of_realtime_secrets_and_calls(proxy, fake_openai):
    secret = await send(
        proxy, "/v1/realtime/client_secrets", b'{"session": {"type": "realtime", "model": "gpt-realtime"}}', {}
    )
    assert secret.code == 200, secret.body
    call = await send(
        proxy,
        "/v1/realtime/calls",
        multipart(('name="sdp"', "v=0"), ('name="session"', '{"type": "realtime", "model": "gpt-realtime"}')),
        {"Content-Type": MULTIPART},
    )
    assert call.code == 201, call.body
    assert [r.path for r in fake_openai.received] == ["/v1/realtime/client_secrets", "/v1/realtime/calls"]


@pytest.mark.settings(allowed_models=("gpt-4o-mini", "whisper-1"))
@pytest.mark.parametrize(
    "path, body",
    [
        # The caller's own labels: OpenAI never reads metadata as a model.
        ("/v1/chat/completions", chat_json(model="gpt-4o-mini", metadata={"model": "tesla"})),
        ("/v1/responses", json.dumps({"model": "gpt-4o-mini", "input": "x", "metadata": {"Model": "car"}})),
        # A transcription session names its model in audio.input.transcription.
        (
            "/v1/realtime/client_secrets",
            json.dumps(
                {"session": {"type": "transcription", "audio": {"input": {"transcription": {"model": "whisper-1"}}}}}
            ),
        ),
        # Call control runs no model.
        ("/v1/realtime/calls/rtc_abc/hangup", b""),
    ],
)
@pytest.mark.gen_test
async def test_legitimate_requests_under_an_allow_list_pass(proxy, fake_openai, path, body):
    """False refusals a second review found: each of these reaches the upstream."""
    await send(proxy, path, body, {})
    assert [r.path for r in fake_openai.received] == [path]


# Endpoints that run a model the proxy cannot see named: the rule fails closed.
UNLISTED_PATHS = {
    "videos": "/v1/videos",
    "responses/compact": "/v1/responses/compact",
    "chatkit sessions": "/v1/chatkit/sessions",
    "realtime translations": "/v1/realtime/translations",
    "a batch (its models are in a file)": "/v1/batches",
    "a run of a new thread (the assistant's model)": "/v1/threads/runs",
    "a run (the assistant's model)": "/v1/threads/thread_abc/runs",
    "an endpoint OpenAI adds tomorrow": "/v1/something/new",
}


async def raw_request(base_url: str, head: str, body: bytes) -> tuple[int, dict]:
    """Send ``head`` (request line and headers, no Content-Length) and ``body`` byte for byte on a socket."""
    host, port = base_url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode("latin-1") + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2] or b"null")


@pytest.mark.settings(allowed_models=ALLOWED)
@pytest.mark.parametrize("case", list(ENCODED_PATHS))
@pytest.mark.gen_test
async def test_an_encoded_or_variant_path_naming_no_model_is_refused(proxy, fake_openai, base_url, case):
    path, body, content_type = ENCODED_PATHS[case]
    head = (
        "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\naccess-token: %s\r\nAuthorization: Bearer %s\r\nContent-Type: %s\r\n"
        % (path, ACCESS_TOKEN, OPENAI_KEY, content_type)
    )
    status, answer = await raw_request(base_url, head, body)
    assert status == 400, answer
    assert answer["error"]["code"] == "model_undetermined"
    assert fake_openai.received == []


@pytest.mark.settings(allowed_models=ALLOWED)
@pytest.mark.parametrize("case", list(UNLISTED_PATHS))
@pytest.mark.gen_test
async def test_a_path_not_known_to_run_no_model_must_name_one(proxy, fake_openai, case):
    response = await send(proxy, UNLISTED_PATHS[case], b'{"prompt": "x"}', {})
    assert response.code == 400, response.body
    error = json.loads(response.body)["error"]
    assert error["code"] == "model_undetermined" and "names no model" in error["message"]
    assert fake_openai.received == []
    # Naming an allowed model lets the same request through; a disallowed one is 403.
    named = await send(proxy, UNLISTED_PATHS[case], b'{"model": "gpt-4o", "prompt": "x"}', {})
    assert named.code == 403 and json.loads(named.body)["error"]["code"] == "model_not_allowed"
    await send(proxy, UNLISTED_PATHS[case], b'{"model": "gpt-4o-mini", "prompt": "x"}', {})
    assert [r.path for r in fake_openai.received] == [UNLISTED_PATHS[case]]


@pytest.mark.settings(allowed_models=ALLOWED)
@pytest.mark.parametrize(
    "path",
    [
        "/v1/vector_stores",
        "/v1/threads/thread_abc/messages",
        "/v1/uploads/upload_1/complete",
        "/v1/batches/batch_1/cancel",
    ],
)
@pytest.mark.gen_test
async def test_endpoints_that_run_no_model_pass_without_one(proxy, fake_openai, path):
    await send(proxy, path, b'{"name": "x"}', {})
    assert [r.path for r in fake_openai.received] == [path]


@pytest.mark.gen_test
async def test_the_upstream_receives_the_normalised_path(proxy, fake_openai, base_url):
    """Without an allow-list too: what goes upstream is the path the checks read, escapes of
    unreserved characters decoded (RFC 3986 6.2.2.2), other escapes in upper case."""
    head = (
        "POST /v1/chat/%%63ompletions HTTP/1.1\r\nHost: 127.0.0.1\r\naccess-token: %s\r\n"
        "Authorization: Bearer %s\r\nContent-Type: application/json\r\n" % (ACCESS_TOKEN, OPENAI_KEY)
    )
    status, answer = await raw_request(base_url, head, chat_json(model="gpt-4o-mini"))
    assert status == 200 and answer["choices"][0]["message"]["content"] == "Echo: x"
    await send(proxy, "/v1/raw/a%7eb%3bc", b"{}", {})
    assert [r.path for r in fake_openai.received] == ["/v1/chat/completions", "/v1/raw/a~b%3Bc"]


@pytest.mark.parametrize("path", ["/v1/raw/%2e%2E/x", "/v1/raw/a%zz", "/v1/raw/%2F", "/v1/raw//x"])
@pytest.mark.gen_test
async def test_paths_that_could_leave_the_api_are_refused(proxy, fake_openai, path):
    response = await send(proxy, path, b"{}", {})
    assert response.code == 400 and json.loads(response.body)["error"]["code"] == "invalid_path"
    assert fake_openai.received == []


def test_the_docs_list_exactly_the_paths_that_may_name_no_model():
    readme = (pathlib.Path(ROOT) / "docs" / "api.md").read_text()
    start = readme.index("A body that names no model is forwarded only on these paths")
    listed = re.findall(r"`([^`]+)`", readme[readme.index(":", start) : readme.index("Every other path", start)])
    assert tuple(listed) == MODEL_FREE_PATHS
