"""POST /chat_complete, JSON answers: the exact upstream request, answers, auth and errors."""

import asyncio
import json
import time

import pytest
import requests
from tornado.simple_httpclient import HTTPTimeoutError

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.conftest import ACCESS_TOKEN, AUTH, DEFAULT_UPSTREAM, OPENAI_KEY


@pytest.mark.gen_test
async def test_exact_upstream_request(proxy, fake_openai):
    params = {"model_name": "gpt-4o", "max_tokens": 12, "temperature": 0.3, "some_new_param": {"a": [1]}}
    response, body = await proxy.chat({"prompt": "Hello", "generate_params": params})
    assert response.code == 200
    [seen] = fake_openai.received
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.json == {
        "model": "gpt-4o",
        "max_tokens": 12,
        "temperature": 0.3,
        "some_new_param": {"a": [1]},
        "messages": [{"role": "user", "content": "Hello"}],
    }
    assert seen.headers["Authorization"] == "Bearer " + OPENAI_KEY
    assert seen.headers["Content-Type"] == "application/json"
    lowered = {k.lower(): v for k, v in seen.headers.items()}
    assert "access-token" not in lowered and "openai-token" not in lowered
    assert ACCESS_TOKEN not in json.dumps(seen.headers)


@pytest.mark.gen_test
async def test_answer_is_upstream_json_plus_text_and_status(proxy, fake_openai):
    response, body = await proxy.chat({"messages": [{"role": "user", "content": "Hi there"}]})
    assert response.code == 200
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert body["status"] == "ok" and body["text"] == "Echo: Hi there"
    for key in ("id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier"):
        assert key in body
    assert body["choices"][0]["message"]["content"] == "Echo: Hi there"
    assert response.headers["x-request-id"].startswith("req_fake_")


@pytest.mark.gen_test
async def test_russian_round_trip_is_raw_utf8(proxy, fake_openai):
    response, body = await proxy.chat({"prompt": "Привет, какая ты версия модели?"})
    assert body["text"] == "Echo: Привет, какая ты версия модели?"
    assert "Привет".encode() in response.body and b"\\u" not in response.body
    assert fake_openai.received[0].json["messages"][0]["content"] == "Привет, какая ты версия модели?"


@pytest.mark.gen_test
async def test_text_is_null_for_tool_calls(proxy, fake_openai):
    answer = {
        "id": "x",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
            }
        ],
    }
    fake_openai.push(Behaviour(kind="garbage", body=json.dumps(answer), content_type="application/json"))
    response, body = await proxy.chat({"prompt": "call a tool"})
    assert response.code == 200 and body["text"] is None and body["status"] == "ok"
    assert body["choices"][0]["message"]["tool_calls"][0]["id"] == "c1"


@pytest.mark.gen_test
async def test_seed_client_example_with_requests(proxy, fake_openai, base_url):
    """The users' existing client code, unchanged."""
    response = await proxy.in_thread(
        requests.post,
        base_url + "/chat_complete",
        json={"prompt": "Привет, какая ты версия модели?"},
        headers={"access-token": ACCESS_TOKEN, "openai-token": OPENAI_KEY},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.json()["status"] == "ok" and response.json()["text"].startswith("Echo: Привет")


@pytest.mark.gen_test
async def test_second_configured_token_is_accepted(proxy, fake_openai):
    response, _ = await proxy.chat({"prompt": "x"}, headers={"access-token": "second-token-abc"})
    assert response.code == 200


@pytest.mark.parametrize(
    "headers,status,code",
    [
        ({"openai-token": OPENAI_KEY}, 403, "invalid_access_token"),
        ({"access-token": "wrong", "openai-token": OPENAI_KEY}, 403, "invalid_access_token"),
        ({"access-token": ACCESS_TOKEN[:-1], "openai-token": OPENAI_KEY}, 403, "invalid_access_token"),
        ({"access-token": ACCESS_TOKEN}, 401, "missing_openai_token"),
        ({"access-token": ACCESS_TOKEN, "openai-token": "sk bad key"}, 401, "invalid_openai_token"),
    ],
)
@pytest.mark.gen_test
async def test_auth_errors(proxy, fake_openai, headers, status, code):
    response, body = await proxy.chat({"prompt": "x"}, headers=headers, auth=False)
    assert response.code == status
    assert body["status"] == "error" and body["text"] and body["error"]["code"] == code
    assert fake_openai.received == []


@pytest.mark.parametrize(
    "raw,fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"", "not valid JSON"),
        (b'{"prompt": "a", "messages": [{"role": "user", "content": "a"}]}', '"prompt"'),
        (b"{}", '"messages"'),
        (b'{"prompt": 42}', "non-empty string"),
        (b'{"prompt": "x", "generate_params": {"messages": []}}', "messages"),
        (b"\xff\xfe garbage", "not valid JSON"),
    ],
)
@pytest.mark.gen_test
async def test_bad_bodies_are_400_with_guidance(proxy, fake_openai, raw, fragment):
    response = await proxy.request(body=raw, headers={"Content-Type": "application/json"})
    assert response.code == 400
    body = json.loads(response.body)
    assert body["status"] == "error" and fragment in body["text"]
    assert fake_openai.received == []


@pytest.mark.settings(max_body_bytes=4096)
@pytest.mark.gen_test
async def test_oversized_body_is_413(proxy, fake_openai):
    response, body = await proxy.chat({"prompt": "x" * 5000})
    assert response.code == 413 and body["error"]["code"] == "request_too_large"
    response, body = await proxy.chat({"prompt": "x" * 3000})
    assert response.code == 200


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
@pytest.mark.gen_test
async def test_other_methods_are_405_json(proxy, fake_openai, method):
    response = await proxy.request(method=method, body=b"{}" if method != "DELETE" else None)
    assert response.code == 405
    assert json.loads(response.body)["status"] == "error"


@pytest.mark.gen_test
async def test_usage_pages_health_and_404(proxy):
    for path in ("/", "/chat_complete"):
        response = await proxy.request(path, method="GET", auth=False)
        assert response.code == 200 and b"POST /chat_complete" in response.body
        assert response.headers["Content-Type"].startswith("text/plain")
    response = await proxy.request("/healthz", method="GET", auth=False)
    assert response.code == 200 and json.loads(response.body) == {"status": "ok", "upstreams": DEFAULT_UPSTREAM}
    response = await proxy.request("/nope", method="GET")
    assert response.code == 404 and json.loads(response.body)["status"] == "error"


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
@pytest.mark.gen_test
async def test_upstream_errors_mirror_status_and_error_object(proxy, fake_openai, status):
    headers = {"Retry-After": "7", "x-ratelimit-remaining-requests": "0"} if status == 429 else {}
    fake_openai.push(
        Behaviour(kind="error", status=status, message="Upstream says no", error_code="some_code", headers=headers)
    )
    response, body = await proxy.chat({"prompt": "x"})
    assert response.code == status
    assert body == {
        "status": "error",
        "text": "Upstream says no",
        "error": {"message": "Upstream says no", "type": "invalid_request_error", "param": None, "code": "some_code"},
    }
    if status == 429:
        assert response.headers["Retry-After"] == "7"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"


@pytest.mark.gen_test
async def test_stream_request_with_upstream_error_gets_json_not_sse(proxy, fake_openai):
    fake_openai.push(Behaviour(kind="error", status=429, message="slow down", headers={"Retry-After": "3"}))
    streamed = await proxy.stream({"prompt": "x", "generate_params": {"stream": True}})
    assert streamed.response.code == 429
    assert streamed.response.headers["Content-Type"].startswith("application/json")
    assert json.loads(streamed.body)["text"] == "slow down"


@pytest.mark.parametrize(
    "behaviour",
    [
        Behaviour(kind="garbage", status=200),
        Behaviour(kind="garbage", status=502, body="<html>bad gateway</html>"),
        Behaviour(kind="drop", reset=True),
        Behaviour(kind="drop", reset=False),
    ],
)
@pytest.mark.gen_test
async def test_broken_upstream_answers_are_502(proxy, fake_openai, behaviour):
    fake_openai.push(behaviour)
    response, body = await proxy.chat({"prompt": "x"})
    assert response.code == 502 and body["status"] == "error"
    response, body = await proxy.chat({"prompt": "next one works"})
    assert response.code == 200


@pytest.mark.gen_test
async def test_unreachable_upstream_is_502(proxy, fake_openai, config, io_loop, caplog):
    await fake_openai.stop()
    response, body = await proxy.chat({"prompt": "x"})
    assert response.code == 502 and body["error"]["code"] == "upstream_connect"
    # Which upstream, and what to try: a server on this machine that is down is to be started.
    assert body["text"] == (
        "could not connect to the upstream 127.0.0.1:%d: the server on this machine is not answering: "
        "check that it is running and listens on that port" % fake_openai.port
    )
    faults = [r.getMessage() for r in caplog.records if "upstream fault" in r.getMessage()]
    assert len(faults) == 1 and "kind=connect upstream=127.0.0.1:%d" % fake_openai.port in faults[0], faults


@pytest.mark.settings(request_timeout=0.5)
@pytest.mark.gen_test
async def test_slow_upstream_is_504_and_aborted(proxy, fake_openai):
    fake_openai.push(Behaviour(kind="hang"))
    response, body = await proxy.chat({"prompt": "x"})
    assert response.code == 504 and body["error"]["code"] == "upstream_timeout"
    await fake_openai.wait_abort(timeout=2)


@pytest.mark.gen_test
async def test_client_leaving_before_the_answer_aborts_the_upstream(proxy, fake_openai):
    fake_openai.push(Behaviour(kind="hang"))
    started = time.monotonic()
    with pytest.raises(HTTPTimeoutError):  # our client gives up and closes its connection
        await proxy.client.fetch(
            proxy.base_url + "/chat_complete", method="POST", headers=AUTH, body=b'{"prompt": "x"}', request_timeout=0.5
        )
    aborted_at = await fake_openai.wait_abort(timeout=3)
    assert aborted_at - (started + 0.5) < 1.0


@pytest.mark.settings(max_concurrent_upstream=1)
@pytest.mark.gen_test
async def test_beyond_max_concurrent_upstream_is_503_with_retry_after(proxy, fake_openai):
    fake_openai.push(Behaviour(kind="hang"))
    first = asyncio.ensure_future(
        proxy.client.fetch(
            proxy.base_url + "/chat_complete", method="POST", headers=AUTH, body=b'{"prompt": "x"}', request_timeout=1
        )
    )
    for _ in range(100):
        if fake_openai.received:
            break
        await asyncio.sleep(0.01)
    response, body = await proxy.chat({"prompt": "y"})
    assert response.code == 503 and response.headers["Retry-After"] == "1"
    assert len(fake_openai.received) == 1
    with pytest.raises(HTTPTimeoutError):
        await first
    await fake_openai.wait_abort(timeout=3)
    response, _ = await proxy.chat({"prompt": "z"})
    assert response.code == 200


@pytest.mark.gen_test
async def test_upstream_connections_are_reused(proxy, fake_openai):
    for i in range(5):
        response, _ = await proxy.chat({"prompt": "json %d" % i})
        assert response.code == 200
    for i in range(5):
        streamed = await proxy.stream({"prompt": "stream %d" % i, "generate_params": {"stream": True}})
        assert streamed.events()[-1] == "[DONE]"
    assert len(fake_openai.received) == 10
    assert fake_openai.connections == 1


@pytest.mark.gen_test
async def test_no_secret_in_logs(proxy, fake_openai, caplog):
    fake_openai.push(Behaviour(kind="error", status=401, message="Incorrect API key provided"))
    fake_openai.push(Behaviour(kind="garbage"))
    fake_openai.push(Behaviour(kind="drop", after=1))
    await proxy.chat({"prompt": "a"})
    await proxy.chat({"prompt": "b"})
    await proxy.stream({"prompt": "c d e", "generate_params": {"stream": True}})
    await proxy.chat({"prompt": "d"}, headers={"access-token": "wrong"})
    await proxy.chat({"prompt": "ok"})
    assert caplog.records, "logging must be captured for this test to mean anything"
    text = "\n".join(r.getMessage() + str(r.args) + str(r.exc_info) for r in caplog.records)
    for secret in (ACCESS_TOKEN, OPENAI_KEY):
        assert secret not in text
