"""Hostile input: random and malicious requests never get a 500 or a traceback, and cannot steer the upstream."""

import http.client
import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.threaded import BackgroundStack

TOKEN = "hostile-access-token-77"
KEY = "sk-hostile-key-12345"
GOOD = {"access-token": TOKEN, "openai-token": KEY, "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def stack():
    background = BackgroundStack(access_tokens=(TOKEN,), max_body_bytes=256 * 1024).start()
    yield background
    background.stop()


def send(stack, path, body: bytes, headers: dict, method="POST"):
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def check(status, headers, body):
    """Every answer is a valid proxy answer or a 4xx JSON error; never a 500, never a traceback."""
    assert status < 500, (status, body[:300])
    assert b"Traceback" not in body and KEY.encode() not in body and TOKEN.encode() not in body
    content_type = headers.get("Content-Type", "")
    if status >= 400:
        assert content_type.startswith("application/json"), headers
        error = json.loads(body)["error"]
        assert isinstance(error["message"], str) and error["message"]
    else:
        # JSON, a stream, or a text page (usage, metrics) for GETs.
        assert content_type.startswith(("application/json", "text/event-stream", "text/plain")), headers


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
field_values = json_values | st.just("") | st.just([]) | st.just({}) | st.just(True)
bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "prompt": field_values,
            "messages": field_values | st.lists(json_values, max_size=3),
            "generate_params": field_values
            | st.dictionaries(
                st.sampled_from(["model_name", "model", "messages", "stream", "max_tokens", "x"]),
                field_values,
                max_size=4,
            ),
        },
    ).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 200_000).map(lambda n: b'{"prompt": "' + b"\xd0\x9f" * n + b'"}'),
    st.sampled_from(
        [
            b'{"prompt": "a", "prompt": 5}',
            b'{"prompt": "x", "generate_params": {"temperature": NaN}}',
            b'{"prompt": "x", "generate_params": {"max_tokens": Infinity}}',
            b'{"prompt": "x", "generate_params": {"max_tokens": 1e999}}',
            b'{"prompt": "x", "generate_params": {"max_tokens": ' + b"9" * 5000 + b"}}",
            b'{"prompt": "\\ud800 lone surrogate"}',
            b'{"prompt": "\xff\xfe invalid utf-8"}',
            b'{"prompt": "x"' + b" " * 1000,
            b"\x00" * 100,
        ]
    ),
)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(body=bodies)
def test_random_bodies_on_chat_complete(stack, body):
    check(*send(stack, "/chat_complete", body, GOOD))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(body=bodies)
def test_random_bodies_on_v1(stack, body):
    headers = {"access-token": TOKEN, "Authorization": "Bearer " + KEY, "Content-Type": "application/json"}
    check(*send(stack, "/v1/chat/completions", body, headers))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    access=header_values | st.just(TOKEN),
    key=header_values,
    content_type=header_values,
    path=st.sampled_from(["/chat_complete", "/v1/chat/completions", "/v1/models", "/healthz", "/x"]),
    method=st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
)
def test_random_headers_methods_and_paths(stack, access, key, content_type, path, method):
    headers = {"access-token": access, "openai-token": key, "Content-Type": content_type}
    status, response_headers, body = send(stack, path, b'{"prompt": "x"}', headers, method=method)
    if method == "HEAD":
        assert status < 500
    else:
        check(status, response_headers, body)


def test_server_is_up_after_the_storm(stack):
    status, _, body = send(stack, "/chat_complete", b'{"prompt": "still here"}', GOOD)
    assert status == 200 and json.loads(body)["text"] == "Echo: still here"


def raw_request(stack, head: bytes, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(head + body)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


@pytest.mark.parametrize(
    "injected",
    [
        b"openai-token: sk-abc\rX-Injected: 1\r\n",
        b"openai-token: sk-abc\nX-Injected: 1\r\n",
        b"openai-token: sk-abc\r\n X-Injected: 1\r\n",
        b"openai-token: sk-abc%0d%0aX-Injected: 1\r\n",
    ],
)
def test_header_injection_cannot_add_upstream_headers(stack, injected):
    before = len(stack.fake.received)
    body = b'{"prompt": "x"}'
    head = (
        b"POST /chat_complete HTTP/1.1\r\nHost: x\r\nConnection: close\r\naccess-token: "
        + TOKEN.encode()
        + b"\r\n"
        + injected
        + b"Content-Length: %d\r\n\r\n" % len(body)
    )
    raw_request(stack, head, body)
    for seen in stack.fake.received[before:]:
        assert "X-Injected" not in seen.headers and "x-injected" not in {k.lower() for k in seen.headers}
        assert "\r" not in seen.headers.get("Authorization", "") and "\n" not in seen.headers.get("Authorization", "")


def test_model_name_with_crlf_stays_in_the_body(stack):
    before = len(stack.fake.received)
    body = json.dumps({"prompt": "x", "generate_params": {"model_name": "gpt-4o\r\nX-Injected: 1"}}).encode()
    status, headers, answer = send(stack, "/chat_complete", body, GOOD)
    assert status == 200
    [seen] = stack.fake.received[before:]
    assert seen.json["model"] == "gpt-4o\r\nX-Injected: 1"
    assert "X-Injected" not in seen.headers


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../../etc/passwd",
        "/v1/%2e%2e/%2e%2e/admin",
        "/v1/models%2F..%2F..%2Fx",
        "/v1/http://127.0.0.1:1/",
        "/v1//evil.example/x",
        "/v1/models/%5c..%5cx",
    ],
)
def test_paths_cannot_reach_other_hosts(stack, path):
    before = len(stack.fake.received)
    status, headers, body = send(
        stack, path, b"", {"access-token": TOKEN, "Authorization": "Bearer " + KEY}, method="GET"
    )
    assert status in (400, 404)
    assert len(stack.fake.received) == before


def test_absolute_uri_request_target_goes_nowhere_else(stack):
    before = len(stack.fake.received)
    head = (
        b"GET http://169.254.169.254/v1/models HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n"
        b"access-token: " + TOKEN.encode() + b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
    )
    answer = raw_request(stack, head)
    # Either refused, or served as /v1/models by OPENAI_BASE_URL (the fake): never another host.
    assert answer.startswith(b"HTTP/1.1 ")
    for seen in stack.fake.received[before:]:
        assert seen.path == "/v1/models"
