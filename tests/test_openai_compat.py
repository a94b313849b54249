"""/v1/*: the proxy used by real OpenAI clients (the openai SDK, httpx-sse, curl)."""

import asyncio
import io
import json
import subprocess
import time

import httpx
import httpx_sse
import openai
import pytest

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from chat_gpt_proxy.upstream.urls import upstream_url
from tests.conftest import ACCESS_TOKEN, OPENAI_KEY, file_upload


def sdk(base_url, cls=openai.OpenAI, access_token=ACCESS_TOKEN, **kwargs):
    return cls(
        base_url=base_url + "/v1",
        api_key=OPENAI_KEY,
        default_headers={"access-token": access_token},
        max_retries=0,
        timeout=20,
        **kwargs,
    )


@pytest.mark.gen_test
async def test_sync_sdk_chat_models_embeddings(proxy, fake_openai, base_url):
    def run():
        with sdk(base_url) as client:
            completion = client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "Привет"}], temperature=0.5
            )
            models = [m.id for m in client.models.list()]
            embedding = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
            return completion, models, embedding

    completion, models, embedding = await proxy.in_thread(run)
    assert completion.choices[0].message.content == "Echo: Привет"
    assert "gpt-4o-mini" in models
    assert len(embedding.data) == 2
    chat_request = fake_openai.received[0]
    assert chat_request.json == {
        "messages": [{"role": "user", "content": "Привет"}],
        "model": "gpt-4o",
        "temperature": 0.5,
    }
    for seen in fake_openai.received:
        assert seen.headers["Authorization"] == "Bearer " + OPENAI_KEY
        assert "access-token" not in {k.lower() for k in seen.headers}
    assert [r.path for r in fake_openai.received] == ["/v1/chat/completions", "/v1/models", "/v1/embeddings"]


@pytest.mark.gen_test
async def test_sync_sdk_streaming(proxy, fake_openai, base_url):
    def run():
        with sdk(base_url) as client:
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "раз два три"}], stream=True
            )
            return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    assert await proxy.in_thread(run) == "Echo: раз два три "


@pytest.mark.gen_test
async def test_async_sdk_streaming_and_plain(proxy, fake_openai, base_url):
    client = sdk(base_url, cls=openai.AsyncOpenAI)
    try:
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.choices[0].message.content == "Echo: hi"
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "a b c"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage
        assert text == "Echo: a b c " and usage.total_tokens > 0
    finally:
        await client.close()


@pytest.mark.parametrize(
    "behaviour,exception",
    [
        (
            Behaviour(kind="error", status=429, message="Rate limit", headers={"Retry-After": "2"}),
            openai.RateLimitError,
        ),
        (
            Behaviour(kind="error", status=401, message="Incorrect API key", error_type="invalid_request_error"),
            openai.AuthenticationError,
        ),
        (Behaviour(kind="error", status=400, message="Bad param"), openai.BadRequestError),
        (Behaviour(kind="error", status=503, message="Overloaded"), openai.InternalServerError),
    ],
)
@pytest.mark.gen_test
async def test_sdk_error_mapping(proxy, fake_openai, base_url, behaviour, exception):
    fake_openai.push(behaviour)

    def run():
        with sdk(base_url) as client:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])

    with pytest.raises(exception) as info:
        await proxy.in_thread(run)
    assert info.value.status_code == behaviour.status
    assert behaviour.message in str(info.value)


@pytest.mark.gen_test
async def test_sdk_wrong_access_token_is_permission_denied(proxy, fake_openai, base_url):
    def run():
        with sdk(base_url, access_token="wrong") as client:
            client.models.list()

    with pytest.raises(openai.PermissionDeniedError) as info:
        await proxy.in_thread(run)
    assert info.value.body["code"] == "invalid_access_token"
    assert fake_openai.received == []


@pytest.mark.gen_test
async def test_sdk_mid_stream_failure_raises_api_error(proxy, fake_openai, base_url):
    fake_openai.push(Behaviour(kind="drop", chunks=["a ", "b ", "c "], after=2))

    def run():
        seen = []
        with sdk(base_url) as client:
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
            )
            try:
                for chunk in stream:
                    if chunk.choices:
                        seen.append(chunk.choices[0].delta.content or "")
            except openai.APIError as exc:
                return "".join(seen), exc
        return "".join(seen), None

    text, error = await proxy.in_thread(run)
    assert text == "a b "
    assert isinstance(error, openai.APIError) and "upstream" in str(error)


@pytest.mark.gen_test
async def test_openai_token_header_works_without_authorization(proxy, fake_openai):
    response = await proxy.request("/v1/models", method="GET")  # AUTH carries openai-token, no Authorization
    assert response.code == 200
    assert fake_openai.received[0].headers["Authorization"] == "Bearer " + OPENAI_KEY


@pytest.mark.gen_test
async def test_proxy_errors_use_openai_shape(proxy, fake_openai):
    response = await proxy.request("/v1/models", method="GET", headers={"access-token": ACCESS_TOKEN}, auth=False)
    assert response.code == 401
    body = json.loads(response.body)
    assert set(body) == {"error"} and body["error"]["code"] == "missing_api_key"
    assert set(body["error"]) >= {"message", "type", "code", "param"}


@pytest.mark.gen_test
async def test_the_access_token_sent_again_as_the_bearer_key_never_goes_upstream(proxy, fake_openai):
    headers = {"access-token": ACCESS_TOKEN, "Authorization": "Bearer " + ACCESS_TOKEN}
    response = await proxy.request("/v1/models", method="GET", headers=headers, auth=False)
    assert response.code == 401 and json.loads(response.body)["error"]["code"] == "missing_api_key"
    assert fake_openai.received == []


@pytest.mark.gen_test
async def test_upstream_errors_are_relayed_unchanged(proxy, fake_openai):
    fake_openai.push(Behaviour(kind="error", status=429, message="slow", headers={"Retry-After": "5"}))
    response = await proxy.request("/v1/chat/completions", json_body={"model": "m", "messages": []})
    assert response.code == 429 and response.headers["Retry-After"] == "5"
    assert json.loads(response.body) == {
        "error": {"message": "slow", "type": "invalid_request_error", "param": None, "code": None}
    }


@pytest.mark.gen_test
async def test_upstream_cookies_never_reach_the_client(proxy, fake_openai):
    """Cookies the upstream sets are for its own domain, in either header (RFC 6265, and RFC 2965's
    obsolete Set-Cookie2 that old clients still honour)."""
    fake_openai.push(Behaviour(headers={"Set-Cookie": "a=b; Path=/", "Set-Cookie2": "c=d; Version=1"}))
    response = await proxy.request("/v1/chat/completions", json_body={"model": "m", "messages": []})
    assert response.code == 200
    assert "Set-Cookie" not in response.headers and "Set-Cookie2" not in response.headers


@pytest.mark.gen_test
async def test_body_and_query_forwarded_unchanged(proxy, fake_openai):
    raw = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}],  "odd_spacing": true}'
    response = await proxy.request(
        "/v1/chat/completions?foo=bar&x=1",
        body=raw,
        headers={
            "Content-Type": "application/json",
            "OpenAI-Organization": "org-1",
            "OpenAI-Beta": "assistants=v2",
            "Cookie": "a=b",
        },
    )
    assert response.code == 200
    assert "text" not in json.loads(response.body) and "status" not in json.loads(response.body)
    seen = fake_openai.received[0]
    assert seen.body == raw
    assert seen.headers["Openai-Organization"] == "org-1" and seen.headers["Openai-Beta"] == "assistants=v2"
    assert "Cookie" not in seen.headers


@pytest.mark.parametrize(
    "method, body",
    [
        ("POST", b'{"a": 1}'),
        ("PUT", b'{"b": 2}'),
        ("PATCH", b'{"c": 3}'),
        ("DELETE", None),
        ("GET", None),
        ("HEAD", None),
    ],
)
@pytest.mark.gen_test
async def test_every_method_reaches_the_upstream_as_sent(proxy, fake_openai, method, body):
    """POST, GET and HEAD take the lean libcurl set-up, the others Tornado's own: both send
    the method, the body and the headers as they came."""
    headers = {"Content-Type": "application/json", "OpenAI-Beta": "assistants=v2"} if body else {}
    response = await proxy.request("/v1/raw/x?q=1", method=method, body=body, headers=headers)
    assert response.code == 200
    seen = fake_openai.received[0]
    assert (seen.method, seen.path, seen.body) == (method, "/v1/raw/x", body or b"")
    assert seen.headers["Authorization"] == "Bearer " + OPENAI_KEY
    assert "Expect" not in seen.headers and "Pragma" not in seen.headers
    if body:
        assert seen.headers["Content-Type"] == "application/json" and seen.headers["OpenAI-Beta"] == "assistants=v2"


@pytest.mark.gen_test
async def test_a_binary_body_goes_upstream_byte_for_byte(proxy, fake_openai):
    """Every byte value, NUL included, in a body over libcurl's 1 MB 100-continue threshold:
    the body is handed to libcurl from memory (POSTFIELDS) with its length, never as a C string."""
    payload = bytes(range(256)) * (5 * 1024) + b"\x00end"
    boundary = "b0undary"
    raw = file_upload(boundary, "x.bin", "application/octet-stream", payload)
    response = await proxy.request(
        "/v1/files", body=raw, headers={"Content-Type": "multipart/form-data; boundary=" + boundary}
    )
    assert response.code == 200, response.body
    seen = fake_openai.received[0]
    # The fake keeps the first 64 KiB of a body and its real length.
    assert seen.size == len(raw) > 1024 * 1024 and seen.body == raw[: len(seen.body)] and len(seen.body) >= 60_000
    assert "Expect" not in seen.headers and "Pragma" not in seen.headers


@pytest.mark.gen_test
async def test_multipart_upload_and_large_download(proxy, fake_openai, base_url):
    def run():
        with sdk(base_url) as client:
            uploaded = client.files.create(file=("data.jsonl", io.BytesIO(b'{"a": 1}\n' * 1000)), purpose="batch")
            return uploaded

    uploaded = await proxy.in_thread(run)
    assert uploaded.bytes == 9000 and uploaded.filename == "data.jsonl" and uploaded.purpose == "batch"
    size = 12 * 1024 * 1024 + 7
    response = await proxy.request("/v1/files/file-abc/content?size=%d" % size, method="GET")
    assert response.code == 200 and len(response.body) == size
    assert response.body[:256] == bytes(range(256))


@pytest.mark.settings(allowed_models=("gpt-4o-mini",))
@pytest.mark.gen_test
async def test_allowed_models_on_both_surfaces(proxy, fake_openai, base_url):
    def run():
        with sdk(base_url) as client:
            ok = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
            try:
                client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
            except openai.PermissionDeniedError as exc:
                return ok, exc
            return ok, None

    ok, denied = await proxy.in_thread(run)
    assert ok.choices[0].message.content == "Echo: x"
    assert denied is not None and denied.body["code"] == "model_not_allowed"
    response, body = await proxy.chat({"prompt": "x", "generate_params": {"model_name": "gpt-4o"}})
    assert response.code == 403 and body["error"]["code"] == "model_not_allowed"
    # A mislabelled body does not slip through (tests/test_allowed_models.py has every other way).
    response = await proxy.request(
        "/v1/chat/completions", body=b'{"model": "gpt-4o", "messages": []}', headers={"Content-Type": "text/plain"}
    )
    assert response.code == 400 and json.loads(response.body)["error"]["code"] == "model_undetermined"
    assert len(fake_openai.received) == 1


@pytest.mark.gen_test(timeout=20)
async def test_httpx_sse_reads_events_one_by_one(proxy, fake_openai, base_url):
    fake_openai.push(Behaviour(chunks=["x ", "y ", "z "], delay=0.3))
    arrivals = []
    async with (
        httpx.AsyncClient(timeout=20) as client,
        httpx_sse.aconnect_sse(
            client,
            "POST",
            base_url + "/v1/chat/completions",
            headers={"access-token": ACCESS_TOKEN, "Authorization": "Bearer " + OPENAI_KEY},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "q"}], "stream": True},
        ) as source,
    ):
        assert source.response.headers["content-type"] == "text/event-stream; charset=utf-8"
        async for event in source.aiter_sse():
            arrivals.append((time.monotonic(), event.data))
    datas = [d for _, d in arrivals]
    assert datas[-1] == "[DONE]"
    tokens = [(t, json.loads(d)["choices"][0]["delta"].get("content")) for t, d in arrivals[:-1]]
    timed = [(t, c) for t, c in tokens if c in ("x ", "y ", "z ")]
    assert [c for _, c in timed] == ["x ", "y ", "z "]
    assert timed[1][0] - timed[0][0] > 0.15 and timed[2][0] - timed[1][0] > 0.15


@pytest.mark.gen_test(timeout=20)
async def test_curl_no_buffer_shows_time_gaps(proxy, fake_openai, base_url):
    fake_openai.push(Behaviour(chunks=["one ", "two ", "three "], delay=0.4))
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sN",
        base_url + "/v1/chat/completions",
        "-H",
        "access-token: " + ACCESS_TOKEN,
        "-H",
        "Authorization: Bearer " + OPENAI_KEY,
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "q"}], "stream": True}),
        stdout=subprocess.PIPE,
    )
    arrivals = []
    try:
        while line := await asyncio.wait_for(proc.stdout.readline(), 10):
            if b'"content":"' in line and b'"content":""' not in line:
                arrivals.append(time.monotonic())
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert len(arrivals) == 3
    assert arrivals[1] - arrivals[0] > 0.2 and arrivals[2] - arrivals[1] > 0.2


@pytest.mark.parametrize(
    "path,query",
    [
        ("../admin", ""),
        ("models/../../etc", ""),
        ("%2e%2e/secret", ""),
        ("models%2F..%2Fx", ""),
        ("a//b", ""),
        ("http://evil.example/x", ""),
        ("models\\..\\x", ""),
        ("models", "a=1\r\nHost: evil"),
    ],
)
def test_upstream_url_refuses_paths_that_could_leave_the_api(path, query):
    assert upstream_url("https://api.openai.com/v1", path, query) is None


def test_upstream_url_keeps_normal_paths():
    assert upstream_url("https://api.openai.com/v1", "files/file-1/content", "a=1&b=%20") == (
        "https://api.openai.com/v1/files/file-1/content?a=1&b=%20"
    )


@pytest.mark.parametrize("path", ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/models%2f..%2fx", "/v1//x"])
@pytest.mark.gen_test
async def test_traversal_paths_never_reach_upstream(proxy, fake_openai, path):
    response = await proxy.request(path, method="GET")
    assert response.code in (400, 404)
    assert fake_openai.received == []
