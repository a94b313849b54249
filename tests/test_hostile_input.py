"""Hostile input: random and malicious requests never get a 500 or a traceback, and cannot steer the upstream."""

import contextlib
import http.client
import ipaddress
import json
import logging
import re
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.threaded import BackgroundStack

TOKEN = "hostile-access-token-77"
KEY = "sk-hostile-key-12345"
GOOD = {"access-token": TOKEN, "openai-token": KEY, "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def stack():
    background = BackgroundStack(
        access_tokens=(TOKEN,),
        max_body_bytes=256 * 1024,
        # The test client counts as a trusted proxy, so that X-Forwarded-For values are parsed too.
        trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
    ).start()
    yield background
    background.stop()


class _ErrorRecords(logging.Handler):
    """Log records that mean a bug: ERROR and above, or anything carrying a traceback."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@pytest.fixture
def no_errors_logged():
    """Fails the test if the proxy (which runs in this process) logs an error or a traceback."""
    handler = _ErrorRecords()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)
    assert not handler.records, ["%s %s" % (r.name, r.getMessage()[:300]) for r in handler.records]


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
    if status == 204:
        assert body == b""  # OPTIONS
    elif status >= 400:
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


# -- header values as arbitrary bytes on a raw socket

ROUTES = ["/", "/usage", "/healthz", "/metrics", "/chat_complete", "/v1/chat/completions", "/v1/models", "/nope"]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
# Values str.isdigit() accepts that int() refuses, in Latin-1 (what Tornado decodes header bytes as) and UTF-8.
NON_ASCII_DIGITS = [b"\xb2", b"\xb3", b"\xb9", b"1\xb2", "١٢".encode(), "１２".encode(), "߁".encode(), b"\xb2\xb3"]
HEADER_NAMES = [
    "Content-Length",
    "Content-Type",
    "Content-Encoding",
    "access-token",
    "openai-token",
    "Authorization",
    "Accept",
    "Origin",
    "Access-Control-Request-Method",
    "Access-Control-Request-Headers",
    "X-Request-Id",
    "X-Forwarded-For",
    "Expect",
    "If-None-Match",
    "If-Modified-Since",
    "Range",
    "Cookie",
]
raw_header_values = st.one_of(
    # Any byte but LF, which would end the field (the injection tests above cover CR/LF).
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from(NON_ASCII_DIGITS),
    st.sampled_from([b"12\x00", b" 12 ", b"-1", b"1e3", b"0x10", b"9" * 30, b"14, 14", b"14,15", b"gzip", b"br"]),
    st.sampled_from([b"100-continue", b"*", b"null", b"application/json", b"text/html", b"multipart/form-data"]),
)
# The real credentials go only where they belong (a caller who puts them into x-request-id gets them logged).
credentials = st.sampled_from(
    [("access-token", TOKEN.encode()), ("openai-token", KEY.encode()), ("Authorization", b"Bearer " + KEY.encode())]
)
raw_headers = st.lists(
    credentials
    | st.tuples(st.sampled_from(HEADER_NAMES) | st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z"), raw_header_values),
    max_size=6,
)
BARE_400 = b"HTTP/1.1 400 Bad Request\r\n\r\n"  # Tornado refusing malformed HTTP framing, before any handler


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def parse_answer(answer: bytes) -> tuple[int, dict, bytes]:
    """Status, headers (lower-case names) and body of the final answer (1xx answers skipped)."""
    while True:
        head, _, rest = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status >= 200:
            break
        answer = rest
    lines = head.decode("latin-1").split("\r\n")[1:]
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status, headers, rest


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(path=st.sampled_from(ROUTES), method=st.sampled_from(METHODS), headers=raw_headers)
def test_arbitrary_header_bytes_on_a_raw_socket(stack, no_errors_logged, path, method, headers):
    """Any bytes in any header, on every route and method: never a 500, never a traceback."""
    body = b'{"prompt": "x"}'
    declared = [value for name, value in headers if name.lower() == "content-length"]
    if declared and re.fullmatch(rb"[0-9]{1,6}", declared[0]):
        # Send as many bytes as the first declared length asks, so that the answer is not a wait for more.
        body = body[: int(declared[0])].ljust(int(declared[0]), b" ")
    elif not declared:
        headers = [*headers, ("Content-Length", str(len(body)).encode())]
    head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" % (method.encode(), path.encode())
    head += b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers)
    answer = raw_exchange(stack.port, head + b"\r\n" + body)
    assert answer, "no answer at all"
    if answer == BARE_400:
        return
    status, response_headers, response_body = parse_answer(answer)
    assert status < 500, answer[:500]
    assert b"Traceback" not in answer
    if method == "HEAD" or status in (204, 304):
        assert response_body == b""
    elif status >= 400:
        assert response_headers["content-type"].startswith("application/json"), answer[:500]
        assert json.loads(response_body)["error"]["message"]


@pytest.mark.parametrize("value", NON_ASCII_DIGITS)
@pytest.mark.parametrize("path", ["/", "/usage", "/healthz", "/metrics", "/chat_complete", "/v1/models"])
def test_content_length_with_non_ascii_digits_is_a_400(stack, no_errors_logged, path, value):
    """str.isdigit() accepts these and int() refuses them: that was a 500 with a traceback, before auth."""
    answer = raw_exchange(
        stack.port,
        b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\naccess-token: %s\r\nContent-Length: %s\r\n\r\n"
        % (path.encode(), TOKEN.encode(), value),
    )
    status, headers, body = parse_answer(answer)
    assert status == 400, answer[:300]
    assert json.loads(body)["error"]["code"] == "invalid_content_length"


# -- upstream answers of every status class, raw

CONTENT_TYPES = ["application/json", "text/event-stream", "text/plain", "text/event-stream; charset=utf-8", None]
upstream_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"",
            b'{"id": "x", "choices": [{"message": {"content": "hi"}}]}',
            b'{"error": {"message": "nope", "type": "x"}}',
            b'data: {"choices": []}\n\ndata: [DONE]\n\n',
            b"[1, 2]",
        ]
    ),
)
informational = st.sampled_from(
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 102 Processing\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n",
    ]
)
FINAL_STATUSES = [200, 201, 202, 204, 205, 206, 301, 304, 400, 401, 404, 418, 429, 500, 502, 503, 504, 599, 600, 999]


@st.composite
def upstream_answers(draw) -> tuple[int, bytes]:
    status = draw(st.sampled_from(FINAL_STATUSES))
    body = draw(upstream_bodies)
    headers = []
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type:
        headers.append(b"Content-Type: " + content_type.encode())
    framing = draw(st.sampled_from(["length", "none", "chunked", "wrong-length", "non-ascii-length", "two-lengths"]))
    if framing == "length":
        headers.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    elif framing == "wrong-length":
        headers.append(b"Content-Length: %d" % draw(st.integers(0, 400)))
    elif framing == "non-ascii-length":
        headers.append(b"Content-Length: " + draw(st.sampled_from(NON_ASCII_DIGITS)))
    elif framing == "two-lengths":
        headers.append(b"Content-Length: %d\r\nContent-Length: %d" % (len(body), len(body) + 1))
    for _ in range(draw(st.integers(0, 2))):
        value = draw(st.binary(max_size=20)).replace(b"\r", b"").replace(b"\n", b"")
        headers.append(
            draw(st.sampled_from([b"X-Ratelimit-Remaining-Requests", b"x-request-id", b"X-Odd"])) + b": " + value
        )
    head = b"".join(draw(st.lists(informational, max_size=2)))
    head += b"HTTP/1.1 %d Whatever\r\n" % status + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    return status, head + body


PROXY_CALLS = [
    ("GET", "/v1/raw/x", None),
    ("HEAD", "/v1/raw/x", None),
    ("POST", "/v1/raw/x", b'{"model": "gpt-4o-mini"}'),
    ("DELETE", "/v1/raw/x", None),
    ("POST", "/chat_complete", b'{"prompt": "x"}'),
    ("POST", "/chat_complete", b'{"prompt": "x", "generate_params": {"stream": true}}'),
]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(answer=upstream_answers(), call=st.sampled_from(PROXY_CALLS))
def test_any_upstream_answer_is_relayed_or_refused_cleanly(stack, no_errors_logged, answer, call):
    """Every status class (1xx before the final one, 204, 205, 304, ...), with and without bodies and
    lengths, valid or not: the client gets a well-formed answer, never the proxy's own 500."""
    upstream_status, raw = answer
    method, path, body = call
    stack.fake.script.clear()
    stack.fake.push(Behaviour(kind="raw", raw=raw.decode("latin-1")))
    headers = {"access-token": TOKEN, "Authorization": "Bearer " + KEY, "openai-token": KEY}
    if body is not None:
        headers["Content-Type"] = "application/json"
    # http.client raises on an answer that is not well-formed HTTP.
    status, response_headers, response_body = send(stack, path, body, headers, method=method)
    assert 200 <= status <= 599
    assert b"Internal error in the proxy" not in response_body and b"Traceback" not in response_body
    if status == 500:
        assert upstream_status == 500
    if method == "HEAD" or status in (204, 304):
        assert response_body == b""
    if status == 205:
        assert response_body == b"" and response_headers.get("Content-Length") == "0"


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "abc"\r\nContent-Length: 120\r\n\r\n',
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nx-request-id: req_up\r\n\r\n",
    ],
)
def test_upstream_answers_without_content_are_relayed_on_v1(stack, no_errors_logged, raw):
    """An upstream 204 with Content-Length: 0 became a 500 (Tornado refuses a body on 204 and 304)."""
    stack.fake.script.clear()
    stack.fake.push(Behaviour(kind="raw", raw=raw.decode("latin-1")))
    status, headers, body = send(
        stack, "/v1/raw/x", None, {"access-token": TOKEN, "Authorization": "Bearer " + KEY}, "GET"
    )
    assert status == int(raw.rsplit(b"HTTP/1.1 ", 1)[1][:3]) and body == b""


@pytest.mark.parametrize("status", [600, 999])
def test_an_invalid_upstream_status_is_a_502(stack, no_errors_logged, status):
    stack.fake.script.clear()
    stack.fake.push(Behaviour(kind="raw", raw="HTTP/1.1 %d Odd\r\nContent-Length: 2\r\n\r\n{}" % status))
    code, headers, body = send(
        stack, "/v1/raw/x", None, {"access-token": TOKEN, "Authorization": "Bearer " + KEY}, "GET"
    )
    assert code == 502 and json.loads(body)["error"]["code"] == "upstream_broken"
    assert "invalid status %d" % status in json.loads(body)["error"]["message"]
