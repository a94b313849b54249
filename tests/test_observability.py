"""Access log, request ids and Prometheus metrics."""

import asyncio
import contextlib
import dataclasses
import io
import ipaddress
import json
import logging
import re
import time

import pytest

from chat_gpt_proxy import observability
from chat_gpt_proxy.access.tokens import TokenRegistry
from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from chat_gpt_proxy.formats.openai import openai_usage
from chat_gpt_proxy.observability import JsonFormatter, TextFormatter, token_counts
from chat_gpt_proxy.upstream.routing import Router
from server import drain, setup_logging
from settings import Settings
from tests.conftest import ACCESS_TOKEN, OPENAI_KEY, open_raw

ACCESS = "chat_gpt_proxy.access"


def access_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == ACCESS]


def fields(line):
    return dict(part.split("=", 1) for part in line.split(" "))


@pytest.mark.gen_test
async def test_one_access_line_per_request_without_content_or_secrets(proxy, fake_openai, caplog):
    await proxy.chat({"prompt": "секретный вопрос"})
    await proxy.stream(
        {"prompt": "streamed question", "generate_params": {"stream": True, "stream_options": {"include_usage": True}}}
    )
    await proxy.chat({"prompt": "x"}, headers={"access-token": "nope"})
    lines = access_lines(caplog)
    assert len(lines) == 3
    plain, streamed, denied = (fields(line) for line in lines)
    assert plain["method"] == "POST" and plain["path"] == "/chat_complete" and plain["status"] == "200"
    assert plain["model"] == "gpt-4o-mini" and plain["prompt_tokens"] == "9" and int(plain["completion_tokens"]) > 0
    assert float(plain["ms"]) > 0 and float(plain["upstream_ms"]) > 0 and int(plain["bytes"]) > 100
    assert plain["upstream_request_id"].startswith("req_fake_") and plain["client"] == "127.0.0.1"
    assert float(streamed["ttfb_ms"]) > 0 and streamed["completion_tokens"] != "-"
    assert denied["status"] == "403" and denied["upstream_ms"] == "-"
    text = "\n".join(lines)
    for forbidden in ("секретный", "streamed question", "Echo", ACCESS_TOKEN, OPENAI_KEY, "nope"):
        assert forbidden not in text


@pytest.mark.settings(log_format="json")
@pytest.mark.gen_test
async def test_json_access_log(proxy, fake_openai, caplog):
    await proxy.chat({"prompt": "x"})
    [line] = access_lines(caplog)
    record = json.loads(line)
    assert record["status"] == 200 and record["model"] == "gpt-4o-mini" and record["request_id"]


@pytest.mark.gen_test
async def test_forwarded_for_ignored_from_untrusted_peers(proxy, fake_openai, caplog):
    await proxy.request("/healthz", method="GET", headers={"X-Forwarded-For": "203.0.113.9"})
    assert fields(access_lines(caplog)[0])["client"] == "127.0.0.1"


@pytest.mark.settings(trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
@pytest.mark.gen_test
async def test_forwarded_for_honoured_from_trusted_proxies(proxy, fake_openai, caplog):
    await proxy.request("/healthz", method="GET", headers={"X-Forwarded-For": "198.51.100.7, 203.0.113.9"})
    await proxy.request("/healthz", method="GET", headers={"X-Forwarded-For": "not an ip"})
    first, second = (fields(line)["client"] for line in access_lines(caplog))
    assert first == "203.0.113.9" and second == "127.0.0.1"


@pytest.mark.gen_test
async def test_request_ids(proxy, fake_openai, caplog):
    """The proxy's id is its own; a caller's well-formed x-request-id is logged beside it."""
    response = await proxy.request("/healthz", method="GET", headers={"x-request-id": "my-trace.42"})
    own = response.headers["x-request-id"]
    assert own == response.headers["x-proxy-request-id"] != "my-trace.42" and len(own) == 32
    response = await proxy.request("/healthz", method="GET", headers={"x-request-id": "bad id\twith space"})
    assert response.headers["x-request-id"] != "bad id\twith space" and len(response.headers["x-request-id"]) == 32
    response, _ = await proxy.chat({"prompt": "x"}, headers={"access-token": "wrong", "x-request-id": "abc"})
    assert response.headers["x-request-id"] != "abc"
    records = [fields(line) for line in access_lines(caplog)]
    assert [r["client_request_id"] for r in records] == ["my-trace.42", "-", "abc"]
    assert records[0]["request_id"] == own


@pytest.mark.gen_test
async def test_metrics(proxy, fake_openai):
    await proxy.chat({"prompt": "one two"})
    await proxy.chat({"prompt": "x"}, headers={"access-token": "wrong"})
    await proxy.stream({"prompt": "a", "generate_params": {"stream": True, "stream_options": {"include_usage": True}}})
    fake_openai.push(Behaviour(kind="garbage"))
    await proxy.chat({"prompt": "x"})
    response = await proxy.request("/metrics", method="GET", auth=False)
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/plain")
    text = response.body.decode()
    assert 'proxy_requests_total{route="chat_complete",status="200",token="-"} 2.0' in text
    assert 'proxy_requests_total{route="chat_complete",status="403",token="-"} 1.0' in text
    assert 'proxy_requests_total{route="chat_complete",status="502",token="-"} 1.0' in text
    assert 'proxy_tokens_total{kind="prompt",model="gpt-4o-mini",token="-"} 18.0' in text
    assert 'proxy_stream_first_byte_seconds_count{route="chat_complete"} 1.0' in text
    assert 'proxy_added_seconds_count{route="chat_complete"} 2.0' in text
    assert 'proxy_upstream_errors_total{kind="invalid_json"} 1.0' in text
    assert "proxy_in_flight_requests 0.0" in text and "proxy_open_streams 0.0" in text
    assert OPENAI_KEY not in text


@pytest.mark.settings(metrics_enabled=False)
@pytest.mark.gen_test
async def test_metrics_can_be_disabled(proxy):
    response = await proxy.request("/metrics", method="GET", auth=False)
    assert response.code == 404


# -- log injection: caller text never forges a line or a field

# Every character Python's str.splitlines() treats as a line end, and more
# that terminals or log viewers act on: C0, DEL, C1 (NEL), U+2028/U+2029, a
# bidi override, a lone surrogate; and text that imitates a whole log line.
HOSTILE = "m\r\n2026-01-01 00:00:00,000 INFO chat_gpt_proxy.access status=200\x0b\x0c\x1c\x1d\x1e\x85\x1b[31m\x7f\x9f"
HOSTILE += '\u2028\u2029\u202e\ud800 x=y "q" back\\slash'
# A request target may hold any visible byte and obs-text (RFC 9110 5.5):
# Latin-1 C1 controls (NEL) and U+2028's UTF-8 bytes pass Tornado's parser.
HOSTILE_PATH = b'/v1/models/a\x85b\x9fc\xe2\x80\xa8d=e"f\\g'
EXPECTED_KEYS = [
    "request_id",
    "upstream_request_id",
    "client_request_id",
    "client",
    "token",
    "method",
    "path",
    "status",
    "ms",
    "upstream_ms",
    "ttfb_ms",
    "model",
    "upstream",
    "cache",
    "prompt_tokens",
    "completion_tokens",
    "bytes",
    "end",
]


@pytest.fixture
def formatted_log():
    """What the proxy's own formatter writes (LOG_FORMAT of the test's settings), as one string."""

    def attach(log_format):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
        logging.getLogger().addHandler(handler)
        handlers.append(handler)

    stream = io.StringIO()
    handlers = []
    yield attach, stream
    for handler in handlers:
        logging.getLogger().removeHandler(handler)


async def raw_exchange(base_url, head: bytes, body: bytes = b"") -> bytes:
    """One request written byte for byte (what no HTTP client library would send); the whole answer."""
    host, port = base_url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def canned_upstream(app, response: bytes):
    """Point the proxy at a loopback server that answers every request with ``response``, byte for byte."""

    async def answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = "http://127.0.0.1:%d/v1" % server.sockets[0].getsockname()[1]
    app.config = dataclasses.replace(app.config, openai_base_url=url)
    app.router = Router(app.config)  # the upstreams are read from the settings when the app is made
    try:
        yield
    finally:
        server.close()


def unescape(value: str) -> str:
    """The inverse of the log's escaping: \\xNN, \\uNNNN and \\UNNNNNNNN back to their characters."""
    return re.sub(
        r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8}))", lambda m: chr(int(m.group(m.lastindex), 16)), value
    )


async def send_hostile_requests(proxy, app, base_url, fake_openai):
    """Three requests carrying HOSTILE text in every field the access log shows; two of them refused."""
    # 1. A model name the proxy relays (and so logs), through /chat_complete.
    body = json.dumps({"prompt": "x", "generate_params": {"model_name": HOSTILE}}).encode()
    response = await proxy.request(body=body)
    assert response.code == 200
    # 2. Refused with 403 (wrong token), the hostile path on the raw request line.
    answer = await raw_exchange(
        base_url, b"GET " + HOSTILE_PATH + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\naccess-token: no\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 403 ")
    # 3. Refused with 403 by ALLOWED_MODELS on /v1, after the model was read.
    app.config = dataclasses.replace(app.config, allowed_models=("gpt-4o-mini",))
    # The access tokens' policies are taken from the settings when the registry is built.
    app.tokens = TokenRegistry(app.config)
    body = json.dumps({"model": HOSTILE, "messages": []}).encode()
    response = await proxy.request(
        "/v1/chat/completions", body=body, headers={"Authorization": "Bearer sk-x", "Content-Type": "application/json"}
    )
    assert response.code == 403


@pytest.mark.settings(trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
@pytest.mark.gen_test
async def test_text_access_log_escapes_caller_text(proxy, app, base_url, fake_openai, caplog, formatted_log):
    attach, stream = formatted_log
    attach("text")
    await send_hostile_requests(proxy, app, base_url, fake_openai)
    # A trusted proxy's X-Forwarded-For with an IPv6 zone id, which Python's
    # ipaddress accepts whatever it holds (spaces, '=', Latin-1 C1 bytes).
    await raw_exchange(
        base_url,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"X-Forwarded-For: fe80::1%eth0 status=200\x85forged\r\n\r\n",
    )
    lines = access_lines(caplog)
    assert len(lines) == 4
    relayed, refused, not_allowed, forwarded = (dict(part.split("=", 1) for part in line.split(" ")) for line in lines)
    for record in (relayed, refused, not_allowed, forwarded):
        assert list(record) == EXPECTED_KEYS  # no forged field, none lost
        assert all(value.isprintable() for value in record.values())
    assert unescape(relayed["model"]) == HOSTILE and relayed["status"] == "200"
    assert unescape(refused["path"]) == HOSTILE_PATH.decode("latin-1") and refused["status"] == "403"
    assert unescape(not_allowed["model"]) == HOSTILE and not_allowed["status"] == "403"
    assert unescape(forwarded["client"]) == "fe80::1%eth0 status=200\x85forged"
    # What reaches stderr: one line per record, wherever a reader splits lines.
    written = stream.getvalue()
    assert written.count("\n") == len(written.splitlines())
    access = [line for line in written.splitlines() if " chat_gpt_proxy.access " in line]
    assert [line.split(" chat_gpt_proxy.access ", 1)[1] for line in access] == lines


@pytest.mark.settings(log_format="json", trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
@pytest.mark.gen_test
async def test_json_access_log_escapes_caller_text(proxy, app, base_url, fake_openai, caplog, formatted_log):
    attach, stream = formatted_log
    attach("json")
    await send_hostile_requests(proxy, app, base_url, fake_openai)
    written = stream.getvalue()
    assert written.count("\n") == len(written.splitlines())
    for char in "\x85\x9f\x7f\u2028\u2029\u202e\ud800":
        assert char not in written
    records = [json.loads(line) for line in written.splitlines()]
    relayed, refused, not_allowed = (r for r in records if r["logger"] == ACCESS)
    assert relayed["model"] == HOSTILE and not_allowed["model"] == HOSTILE
    assert refused["path"] == HOSTILE_PATH.decode("latin-1") and refused["status"] == 403
    assert [k for k in relayed if k not in ("time", "level", "logger")] == EXPECTED_KEYS


@pytest.mark.parametrize(
    "sent,logged",
    [
        # Valid in a header (RFC 9110 5.5: obs-text, spaces, tabs): kept, and escaped in the log.
        (b"req forged status=1\x85\tx", "req forged status=1\x85\tx"),
        # Not a valid field value: dropped, and the answer is relayed (it was a 500).
        (b"req\x0bforged", None),
    ],
)
@pytest.mark.gen_test
async def test_upstream_request_id_is_caller_text_too(proxy, app, caplog, sent, logged):
    answer = b'{"choices": [{"message": {"content": "hi"}}]}'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-request-id: %s\r\nContent-Length: %d\r\n\r\n"
    async with canned_upstream(app, head % (sent, len(answer)) + answer):
        response, body = await proxy.chat({"prompt": "x"})
    assert response.code == 200 and body["text"] == "hi"
    [line] = access_lines(caplog)
    record = fields(line)
    assert list(record) == EXPECTED_KEYS
    assert record["upstream_request_id"] == "-" if logged is None else unescape(record["upstream_request_id"]) == logged


def test_formatters_keep_every_record_on_one_line():
    """Any logger's message (Tornado's included) is escaped; our own traceback frames stay readable."""
    record = logging.LogRecord("tornado.general", logging.INFO, __file__, 1, "bad %s", (HOSTILE,), None)
    text = TextFormatter().format(record)
    assert len(text.splitlines()) == 1 and unescape(text.split(" bad ", 1)[1]) == HOSTILE
    line = JsonFormatter().format(record)
    assert len(line.splitlines()) == 1 and json.loads(line)["message"] == "bad " + HOSTILE
    bug = logging.LogRecord("chat_gpt_proxy", logging.ERROR, __file__, 1, "unexpected error", (), None)
    bug.traceback_text = '  File "x.py", line 1, in f\n    g()\n'
    assert TextFormatter().format(bug).splitlines()[1:] == ['  File "x.py", line 1, in f', "    g()"]
    assert json.loads(JsonFormatter().format(bug))["traceback"] == bug.traceback_text


# -- how a request ended: 499 when nobody got the status, end=... on every line


async def metrics_text(proxy) -> str:
    response = await proxy.request("/metrics", method="GET", auth=False)
    return response.body.decode()


async def wait_for_access_lines(caplog, count, timeout=5.0):
    deadline = time.monotonic() + timeout
    while len(access_lines(caplog)) < count:
        assert time.monotonic() < deadline, access_lines(caplog)
        await asyncio.sleep(0.02)
    return access_lines(caplog)


@pytest.mark.gen_test(timeout=20)
async def test_client_leaving_before_the_answer_is_499_not_503(proxy, fake_openai, caplog):
    fake_openai.push(Behaviour(kind="hang"))
    reader, writer = await asyncio.open_connection(*proxy.base_url.rsplit("//", 1)[1].split(":"))
    body = b'{"prompt": "x"}'
    head = (
        "POST /chat_complete HTTP/1.1\r\nHost: x\r\naccess-token: %s\r\nopenai-token: %s\r\nContent-Length: %d\r\n\r\n"
    )
    writer.write((head % (ACCESS_TOKEN, OPENAI_KEY, len(body))).encode() + body)
    while not fake_openai.received:
        await asyncio.sleep(0.01)
    writer.close()  # before any answer
    await fake_openai.wait_abort(timeout=3)
    [line] = await wait_for_access_lines(caplog, 1)
    record = fields(line)
    assert record["status"] == "499" and record["end"] == "client_closed"
    text = await metrics_text(proxy)
    assert 'proxy_requests_total{route="chat_complete",status="499",token="-"} 1.0' in text
    assert 'status="503"' not in text


@pytest.mark.gen_test(timeout=20)
async def test_stream_the_client_abandoned_says_so(proxy, fake_openai, caplog):
    fake_openai.push(Behaviour(chunks=["tok "] * 50, delay=0.1))
    head, reader, writer = await open_raw(proxy.base_url, {"prompt": "x", "generate_params": {"stream": True}})
    await reader.readuntil(b'"content":"tok "')
    writer.close()
    await fake_openai.wait_abort(timeout=3)
    [line] = await wait_for_access_lines(caplog, 1)
    record = fields(line)
    # The client did get the status line: it stays 200; the end says what happened.
    assert record["status"] == "200" and record["end"] == "client_closed"
    assert 'proxy_requests_total{route="chat_complete",status="200",token="-"} 1.0' in await metrics_text(proxy)


@pytest.mark.settings(client_stall_timeout=1.0)
@pytest.mark.gen_test(timeout=30)
async def test_end_of_a_stream_whose_client_stalled(proxy, fake_openai, caplog):
    fake_openai.push(Behaviour(chunks=["z" * 4000] * 15_000))
    head, reader, writer = await open_raw(proxy.base_url, {"prompt": "x", "generate_params": {"stream": True}})
    try:
        await fake_openai.wait_abort(timeout=10)
        [line] = await wait_for_access_lines(caplog, 1)
    finally:
        writer.close()
    assert fields(line)["status"] == "200" and fields(line)["end"] == "client_stall"
    assert "proxy_in_flight_requests 0.0" in await metrics_text(proxy)


@pytest.mark.gen_test(timeout=20)
async def test_end_ok_and_upstream_error(proxy, fake_openai, caplog):
    await proxy.chat({"prompt": "x"})
    await proxy.stream({"prompt": "x", "generate_params": {"stream": True}})
    await proxy.chat({"prompt": "x"}, headers={"access-token": "nope"})
    fake_openai.push(Behaviour(kind="garbage"))
    await proxy.chat({"prompt": "x"})
    fake_openai.push(Behaviour(kind="drop", chunks=["a ", "b "], after=1))
    await proxy.stream({"prompt": "x", "generate_params": {"stream": True}})
    ends = [(fields(line)["status"], fields(line)["end"]) for line in access_lines(caplog)]
    assert ends == [
        ("200", "ok"),
        ("200", "ok"),
        ("403", "ok"),
        ("502", "upstream_error"),
        ("200", "upstream_error"),
    ]


@pytest.mark.settings(log_format="json")
@pytest.mark.gen_test(timeout=20)
async def test_end_of_a_stream_cut_by_shutdown_in_json(proxy, app, fake_openai, caplog):
    fake_openai.push(Behaviour(chunks=["tok "] * 100, delay=0.1))
    streamed = asyncio.ensure_future(proxy.stream({"prompt": "x", "generate_params": {"stream": True}}))
    while not fake_openai.received:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    await drain(app, 0)
    await streamed
    [line] = await wait_for_access_lines(caplog, 1)
    record = json.loads(line)
    assert record["status"] == 200 and record["end"] == "shutdown"


@pytest.mark.gen_test
async def test_v1_json_answers_record_token_usage(proxy, fake_openai, caplog):
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one two"}]}
    response = await proxy.request("/v1/chat/completions", json_body=chat)
    assert response.code == 200
    embeddings = {"model": "text-embedding-3-small", "input": ["a"]}
    response = await proxy.request("/v1/embeddings", json_body=embeddings)
    assert response.code == 200
    response = await proxy.request("/v1/models", method="GET")
    assert response.code == 200
    chat_line, embeddings_line, models_line = (fields(line) for line in access_lines(caplog))
    usage = json.loads((await proxy.request("/v1/chat/completions", json_body=chat)).body)["usage"]
    assert chat_line["prompt_tokens"] == str(usage["prompt_tokens"]) and chat_line["end"] == "ok"
    assert chat_line["completion_tokens"] == str(usage["completion_tokens"])
    assert embeddings_line["prompt_tokens"] == "3" and embeddings_line["completion_tokens"] == "0"
    assert models_line["prompt_tokens"] == "-"
    text = await metrics_text(proxy)
    assert 'proxy_tokens_total{kind="prompt",model="gpt-4o-mini",token="-"} %.1f' % (2 * usage["prompt_tokens"]) in text
    assert 'proxy_tokens_total{kind="prompt",model="text-embedding-3-small",token="-"} 3.0' in text


@pytest.mark.gen_test
async def test_v1_chunked_json_answers_record_token_usage(proxy, app, caplog):
    """OpenAI sends its JSON answers with Transfer-Encoding: chunked, not Content-Length."""
    answer = b'{"object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7}}'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (answer[:40], answer[40:])) + b"0\r\n\r\n"
    async with canned_upstream(app, head + chunked):
        response = await proxy.request("/v1/chat/completions", json_body={"model": "gpt-4o-mini", "messages": []})
    assert response.code == 200 and response.body == answer
    [line] = access_lines(caplog)
    assert (fields(line)["prompt_tokens"], fields(line)["completion_tokens"]) == ("11", "7")


@pytest.mark.gen_test
async def test_v1_responses_api_usage_is_recorded(proxy, app, caplog):
    """The Responses API names its counts input_tokens and output_tokens."""
    answer = b'{"object": "response", "output": [], "usage": {"input_tokens": 5, "output_tokens": 7}}'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    async with canned_upstream(app, head % len(answer) + answer):
        response = await proxy.request("/v1/responses", json_body={"model": "gpt-4o-mini", "input": "hi"})
    assert response.code == 200 and response.body == answer
    [line] = access_lines(caplog)
    assert (fields(line)["prompt_tokens"], fields(line)["completion_tokens"]) == ("5", "7")


def test_token_counts_of_every_usage_shape():
    assert token_counts(openai_usage({"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11})) == (9, 2)
    assert token_counts(openai_usage({"prompt_tokens": 3, "total_tokens": 3})) == (3, 0)  # embeddings
    assert token_counts(openai_usage({"input_tokens": 5, "output_tokens": 7})) == (5, 7)  # Responses API
    for junk in (None, [], "9", {"prompt_tokens": "9\r\nx", "completion_tokens": True}, {"prompt_tokens": -1}):
        assert token_counts(openai_usage(junk)) == (None, None)


@pytest.mark.gen_test
async def test_the_model_label_is_escaped_and_bounded(proxy, fake_openai):
    """The caller names the model: on /metrics it stays one escaped line of at most 100 characters."""
    model = "m\r\n\u2028" + "x" * 300
    response = await proxy.request(
        "/v1/chat/completions", json_body={"model": model, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.code == 200
    lines = [line for line in (await metrics_text(proxy)).splitlines() if line.startswith("proxy_tokens_total{")]
    [label] = {re.search(r'model="([^"]*)"', line).group(1) for line in lines}
    # The escaped value; the text format doubles each backslash.
    assert label.startswith(r"m\\x0d\\x0a\\u2028x") and len(label) < 130 and "\r" not in label


@pytest.mark.gen_test
async def test_model_labels_stay_bounded_without_an_allow_list(proxy, fake_openai, monkeypatch):
    """An upstream that accepts any model name would let callers add series at will."""
    monkeypatch.setattr(observability, "MAX_MODEL_LABELS", 2)
    for model in ("m-1", "m-2", "m-3", "m-4", "m-1"):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        assert (await proxy.request("/v1/chat/completions", json_body=body)).code == 200
    lines = [line for line in (await metrics_text(proxy)).splitlines() if line.startswith("proxy_tokens_total{")]
    assert {re.search(r'model="([^"]*)"', line).group(1) for line in lines} == {"m-1", "m-2", "(other)"}


def test_the_default_cap_on_model_labels():
    metrics = observability.Metrics()
    labels = [metrics.model_label("model-%d" % i) for i in range(observability.MAX_MODEL_LABELS + 50)]
    assert len(set(labels)) == observability.MAX_MODEL_LABELS + 1 and labels[-1] == "(other)"
    assert metrics.model_label("model-0") == "model-0"


@pytest.mark.gen_test
async def test_a_client_that_leaves_while_sending_its_body_gets_its_access_line(proxy, base_url, caplog):
    """One line per request: also when the body never arrived in full (status 499, end=client_closed)."""
    host, port = base_url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = "POST /chat_complete HTTP/1.1\r\nHost: x\r\naccess-token: %s\r\nopenai-token: %s\r\n" % (
        ACCESS_TOKEN,
        OPENAI_KEY,
    )
    writer.write(head.encode() + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"prompt": ')
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    for _ in range(50):
        if access_lines(caplog):
            break
        await asyncio.sleep(0.05)
    [line] = access_lines(caplog)
    assert fields(line)["status"] == "499" and fields(line)["end"] == "client_closed"
    assert 'proxy_requests_total{route="chat_complete",status="499",token="-"} 1.0' in await metrics_text(proxy)


def test_log_records_skip_what_no_format_prints(monkeypatch):
    """The access line is a log record per request: where it was made from, the thread and the process
    are never printed, so setup_logging stops collecting them (the logging HOWTO's Optimization)."""
    for name in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, name, getattr(logging, name))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    setup_logging(Settings())
    record = []
    probe = logging.Handler()
    probe.emit = record.append
    logging.getLogger("chat_gpt_proxy.access").addHandler(probe)
    try:
        logging.getLogger("chat_gpt_proxy.access").info("x")
    finally:
        logging.getLogger("chat_gpt_proxy.access").removeHandler(probe)
    (line,) = record
    assert (line.funcName, line.thread, line.process) == ("(unknown function)", None, None)
    for formatter in (TextFormatter(), JsonFormatter()):
        assert "None" not in formatter.format(line)
