"""The Anthropic Messages API through the proxy: /v1/messages (also ?beta=true), count_tokens and the
model list, relayed to upstreams of kind = "anthropic" with every guarantee of the OpenAI surface.

Against the fake Anthropic (chat_gpt_proxy/fake_anthropic/, a real HTTP server on loopback) with the
real SQLite ledger; the official clients (the Python and Node SDKs, Claude Code) are in
tests/test_anthropic_clients.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time

import httpx
import pytest

from chat_gpt_proxy.fake_anthropic import Behaviour, FakeAnthropic
from chat_gpt_proxy.fake_anthropic.wire import count_input_tokens
from tests.conftest import ACCESS_TOKEN, proxy_settings
from tests.egress_servers import TinyProxy

TEAM = "team-ANTHROPIC-TOKEN-4d2b7e"  # use_server_key: the upstreams' own keys
ANN = "ann-ANTHROPIC-TOKEN-8c1f3a"  # no use_server_key: brings her own key
BUDGETED = "budgeted-ANTHROPIC-TOKEN-2e9d5c"  # use_server_key, a budget of one request
HAIKU_ONLY = "haiku-ANTHROPIC-TOKEN-6a0b1d"  # use_server_key, allowed_models: one model
CACHED = "cached-ANTHROPIC-TOKEN-9f3e0a"  # use_server_key, cache = true
LIMITED = "limited-ANTHROPIC-TOKEN-1b7c4d"  # use_server_key, one request a minute
KEY_A = "sk-ant-SERVERKEY-A-3f8e1c"
KEY_B = "sk-ant-SERVERKEY-B-7b2d9a"
OWN = "sk-ant-OWNKEY-5c4e2a"
MODEL = "claude-sonnet-4-5-20250929"
HELLO = [{"role": "user", "content": "hello there"}]
CLAUDE_CODE_BETA = (
    "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,"
    "per-turn-control-2026-07-01,advanced-tool-use-2025-11-20,effort-2025-11-24"
)

TOKENS_TOML = f"""
[team]
token = "{TEAM}"
use_server_key = true

[ann]
token = "{ANN}"

[budgeted]
token = "{BUDGETED}"
use_server_key = true
budget_usd = 0.000001

[haiku-only]
token = "{HAIKU_ONLY}"
use_server_key = true
allowed_models = ["claude-haiku-4-5"]

[cached]
token = "{CACHED}"
use_server_key = true
cache = true

[limited]
token = "{LIMITED}"
use_server_key = true
rate_limit_per_minute = 1
"""


@pytest.fixture
def claude(io_loop):
    fake = FakeAnthropic(api_keys={KEY_A, KEY_B, OWN})
    fake.start()
    yield fake
    io_loop.run_sync(fake.stop)


def upstreams_toml(fake_openai, claude) -> str:
    return f"""
[openai]
base_url = "{fake_openai.url}"

[claude-a]
kind = "anthropic"
base_url = "{claude.url}"
api_key = "{KEY_A}"

[claude-b]
kind = "anthropic"
base_url = "{claude.url}"
api_key = "{KEY_B}"
priority = 1

[claude-callers]
kind = "anthropic"
base_url = "{claude.url}"
"""


@pytest.fixture
def config(request, fake_openai, claude, tmp_path):
    upstreams = tmp_path / "upstreams.toml"
    upstreams.write_text(upstreams_toml(fake_openai, claude))
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS_TOML)
    return proxy_settings(
        request,
        fake_openai,
        access_tokens_file=str(tokens),
        upstreams_file=str(upstreams),
        usage_database=str(tmp_path / "usage.sqlite3"),
    )


def as_team(**headers) -> dict:
    """Headers as Claude Code sends them with ANTHROPIC_AUTH_TOKEN set to a named proxy token."""
    return {"Authorization": "Bearer " + TEAM, "anthropic-version": "2023-06-01", **headers}


async def post(proxy, body, headers=None, path="/v1/messages", **kwargs):
    """POST ``body`` (JSON, or bytes as they are) with ``headers`` alone (no default credentials)."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(as_team() if headers is None else headers)}
    return await proxy.request(path, body=payload, headers=all_headers, auth=False, **kwargs)


def message(**fields) -> dict:
    return {"model": MODEL, "max_tokens": 64, "messages": HELLO, **fields}


def ledger_rows(config) -> list[dict]:
    with sqlite3.connect(config.usage_database) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM usage ORDER BY id")]


def anthropic_error(response) -> dict:
    """The error of an answer in Anthropic's shape, checked to be that shape."""
    body = json.loads(response.body)
    assert body["type"] == "error" and set(body["error"]) >= {"type", "message"}, body
    assert response.headers["Content-Type"].startswith("application/json")
    return body["error"]


IDS = re.compile(rb"(msg|toolu|req)_[0-9a-f]{24}")


def normalised(body: bytes) -> bytes:
    """An answer with the ids the fake makes up per request blanked, to compare two answers."""
    return IDS.sub(rb"\1_X", body)


async def direct(claude, body: dict, headers: dict | None = None) -> httpx.Response:
    """The same request straight to the fake, with a server key."""
    async with httpx.AsyncClient() as client:
        return await client.post(
            claude.url + "/v1/messages",
            content=json.dumps(body).encode(),
            headers={"x-api-key": KEY_A, "anthropic-version": "2023-06-01", "content-type": "application/json"}
            | (headers or {}),
        )


@pytest.mark.gen_test
async def test_claude_codes_request_reaches_anthropic_unchanged_with_the_server_key(proxy, claude):
    """Headers, query and body byte for byte; the upstream's own key; the proxy's token nowhere."""
    body = (
        '{"model": "%s", "max_tokens": 128000, "stream": true, "thinking": {"type": "adaptive"},\n'
        ' "metadata": {"user_id": "{\\"session\\":\\"ü\\"}"}, "messages": [{"role": "user", "content": "hi"},'
        ' {"role": "system", "content": "a reminder"}]}' % MODEL
    ).encode()
    headers = as_team(**{"anthropic-beta": CLAUDE_CODE_BETA, "x-app": "cli", "anthropic-version": "2023-06-01"})
    response = await post(proxy, body, headers, path="/v1/messages?beta=true")
    assert response.code == 200 and b"event: message_stop" in response.body
    sent = claude.received[-1]
    assert sent.path == "/v1/messages" and sent.query == "beta=true"
    assert sent.body == body
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"] == CLAUDE_CODE_BETA
    assert sent.headers["x-api-key"] == KEY_A
    assert "Authorization" not in sent.headers and "access-token" not in sent.headers
    assert not any(TEAM in value for value in sent.headers.values())


@pytest.mark.gen_test
async def test_a_message_and_a_stream_are_byte_identical_to_direct(proxy, claude):
    scripted = Behaviour(thinking="Let me see.", tool={"name": "Read", "input": {"file_path": "/x"}}, pings=2)
    for stream in (False, True):
        body = message(stream=stream)
        claude.push(scripted, scripted)
        there = await direct(claude, body)
        through = await post(proxy, body)
        assert through.code == there.status_code == 200
        assert normalised(through.body) == normalised(there.content)
        assert through.headers["Content-Type"] == there.headers["content-type"]
        # Anthropic's request id and rate-limit headers come back, as its SDKs and Claude Code read them.
        assert through.headers["request-id"].startswith("req_")
        assert through.headers["anthropic-ratelimit-requests-remaining"] == "3999"
        assert through.headers["x-proxy-request-id"]
    assert through.body.count(b"event: ping\n") == 2


@pytest.mark.gen_test(timeout=30)
async def test_usage_is_charged_exactly_with_cache_writes_and_reads_priced(proxy, app, claude, config):
    claude.push(*[Behaviour(input_tokens=300, cache_creation=1000, cache_read=20000)] * 2)
    json_answer = await post(proxy, message(model="claude-sonnet-4-5"))
    streamed = await post(proxy, message(model="claude-sonnet-4-5", stream=True))
    assert json_answer.code == streamed.code == 200
    output = json.loads(json_answer.body)["usage"]["output_tokens"]
    await app.spend.ledger.flush()
    rows = ledger_rows(config)
    assert len(rows) == 2
    for row in rows:
        # The model that ran (the alias's snapshot), every input token, the cached ones among them.
        assert row["model"] == MODEL and row["token"] == "team" and row["route"] == "messages"
        assert (row["input_tokens"], row["cached_tokens"], row["output_tokens"]) == (21300, 20000, output)
        assert not row["estimated"] and row["status"] == 200
        # Sonnet 4.5: $3 input, $6 a cache write (1-hour), $0.30 a cache read, $15 output per 1M tokens.
        assert row["usd"] == pytest.approx((300 * 3 + 1000 * 6 + 20000 * 0.30 + output * 15) / 1e6)


def raw_sse(*events: bytes, content_type: bytes = b"text/event-stream") -> Behaviour:
    """An upstream that writes exactly these SSE bytes (then closes): usage the fake would not write."""
    body = b"".join(events)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (content_type, len(body))
    return Behaviour(kind="raw", raw=(head + body).decode("latin-1"))


def sse(kind: str, data: dict) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps({"type": kind, **data}).encode())


def careless_stream(start_usage: dict, delta_usage: dict | None) -> Behaviour:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "content": []}
    message["usage"] = start_usage
    delta = {"delta": {"stop_reason": "end_turn"}} | ({"usage": delta_usage} if delta_usage is not None else {})
    return raw_sse(
        sse("message_start", {"message": message}),
        sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        sse("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
        sse("content_block_stop", {"index": 0}),
        sse("message_delta", delta),
        sse("message_stop", {}),
    )


@pytest.mark.parametrize(
    "start_usage, delta_usage, charged, estimated",
    [
        # A delta that writes the input as 0 takes back nothing message_start reported.
        ({"input_tokens": 1000, "output_tokens": 1}, {"input_tokens": 0, "output_tokens": 500}, (1000, 500), False),
        # A message_start usage without output_tokens keeps its input.
        ({"input_tokens": 1000}, {"output_tokens": 500}, (1000, 500), False),
        # No final count: the input reported, the output by the caller's cap (max_tokens 64) on what was reported.
        ({"input_tokens": 1000, "output_tokens": 3}, None, (1000, 67), True),
    ],
)
@pytest.mark.gen_test(timeout=30)
async def test_careless_stream_usage_is_charged_at_least_what_was_reported(
    proxy, app, claude, config, start_usage, delta_usage, charged, estimated
):
    claude.push(careless_stream(start_usage, delta_usage))
    response = await post(proxy, message(stream=True))
    assert response.code == 200 and b"message_stop" in response.body
    await app.spend.ledger.flush()
    (row,) = ledger_rows(config)
    assert (row["input_tokens"], row["output_tokens"]) == charged and bool(row["estimated"]) is estimated


async def open_stream(proxy, body: dict, headers: dict):
    """POST a streamed request by hand; (reader, writer) after the response's headers."""
    host, port = proxy.base_url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    lines = {**headers, "Content-Type": "application/json", "Content-Length": str(len(payload))}
    head = "POST /v1/messages HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (host, "".join("%s: %s\r\n" % i for i in lines.items()))
    writer.write(head.encode() + payload)
    await writer.drain()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    return reader, writer


@pytest.mark.gen_test(timeout=30)
async def test_a_client_that_leaves_mid_stream_stops_the_upstream_within_100_ms_and_is_charged(
    proxy, app, claude, config
):
    claude.push(Behaviour(chunks=["tok "] * 50, delay=0.2))
    reader, writer = await open_stream(proxy, message(stream=True, max_tokens=50), as_team())
    await reader.readuntil(b'"text":"tok "')
    closed_at = time.monotonic()
    writer.close()
    aborted_at = await claude.wait_abort(timeout=5)
    assert aborted_at - closed_at < 0.1
    assert claude.completed == 0
    deadline = time.monotonic() + 5
    while not app.spend.book.spent_now("team", "month", time.time())[0].tokens and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await app.spend.ledger.flush()
    (row,) = ledger_rows(config)
    assert row["token"] == "team" and row["estimated"] and row["usd"] > 0
    # The input as message_start reported it; the output it reported (1) and what the upstream may
    # still have run up: the caller's max_tokens.
    assert row["input_tokens"] == count_input_tokens(claude.received[-1].json) and row["output_tokens"] == 1 + 50


@pytest.mark.parametrize("refusal", ["overloaded_error", "rate_limit_error", "api_error"])
@pytest.mark.gen_test
async def test_a_refused_key_fails_over_to_the_next_anthropic_key(proxy, claude, refusal):
    claude.by_key[KEY_A] = Behaviour(kind="error", error_type=refusal, message="not now")
    response = await post(proxy, message())
    assert response.code == 200 and json.loads(response.body)["type"] == "message"
    assert [r.headers["x-api-key"] for r in claude.received] == [KEY_A, KEY_B]


@pytest.mark.gen_test
async def test_an_overloaded_key_with_retry_after_sets_the_model_aside_at_once(proxy, claude):
    """529 with Retry-After moves that model off the key for the time it says (docs/deploy.md, Health):
    the next request goes straight to the other key; the route itself stays up for other models."""
    claude.by_key[KEY_A] = Behaviour(kind="error", error_type="overloaded_error", headers={"retry-after": "30"})
    assert (await post(proxy, message())).code == 200
    health = json.loads((await proxy.request("/healthz", method="GET", auth=False)).body)
    assert {u["name"]: u["state"] for u in health["upstreams"]}["claude-a"] == "up"
    assert (await post(proxy, message())).code == 200
    assert [r.headers["x-api-key"] for r in claude.received] == [KEY_A, KEY_B, KEY_B]


@pytest.mark.gen_test
async def test_the_last_keys_overloaded_answer_reaches_the_client_as_anthropic_wrote_it(proxy, claude):
    for key in (KEY_A, KEY_B):
        claude.by_key[key] = Behaviour(kind="error", error_type="overloaded_error", message="Overloaded")
    response = await post(proxy, message())
    assert response.code == 529
    assert anthropic_error(response) == {"type": "overloaded_error", "message": "Overloaded"}


@pytest.mark.gen_test(timeout=30)
async def test_the_budget_refusal_is_in_anthropics_shape(proxy, claude):
    first = await post(proxy, message(), as_team(Authorization="Bearer " + BUDGETED))
    assert first.code == 200
    refused = await post(proxy, message(), as_team(Authorization="Bearer " + BUDGETED))
    assert refused.code == 429 and int(refused.headers["Retry-After"]) > 0
    error = anthropic_error(refused)
    assert error["type"] == "rate_limit_error" and "budget" in error["message"]
    assert len(claude.received) == 1


@pytest.mark.gen_test
async def test_a_tokens_rate_limit_is_refused_in_anthropics_shape(proxy, claude):
    assert (await post(proxy, message(), as_team(Authorization="Bearer " + LIMITED))).code == 200
    refused = await post(proxy, message(), as_team(Authorization="Bearer " + LIMITED))
    assert refused.code == 429 and int(refused.headers["Retry-After"]) > 0
    assert anthropic_error(refused)["type"] == "rate_limit_error"
    assert len(claude.received) == 1


@pytest.mark.settings(admin_token="admin-ANTHROPIC-7e2f9c")
@pytest.mark.gen_test(timeout=30)
async def test_the_admin_page_shows_claudes_spend(proxy, app, claude):
    claude.push(Behaviour(input_tokens=1000, cache_read=5000))
    assert (await post(proxy, message())).code == 200
    await app.spend.ledger.flush()
    response = await proxy.request(
        "/admin/usage", method="GET", headers={"admin-token": "admin-ANTHROPIC-7e2f9c"}, auth=False
    )
    rows = [r for r in json.loads(response.body)["rows"] if r["model"] == MODEL]
    assert len(rows) == 1 and rows[0]["token"] == "team" and rows[0]["usd"] > 0


@pytest.mark.parametrize(
    "body, status, kind, words",
    [
        (b"{not json", 400, "invalid_request_error", "not valid JSON"),
        (b"[1, 2]", 400, "invalid_request_error", "JSON object"),
        (json.dumps({"max_tokens": 9, "messages": HELLO}).encode(), 400, "invalid_request_error", "model"),
        (json.dumps({"model": 7, "max_tokens": 9, "messages": HELLO}).encode(), 400, "invalid_request_error", "model"),
    ],
)
@pytest.mark.gen_test
async def test_a_body_without_a_model_is_refused_in_anthropics_shape(proxy, claude, body, status, kind, words):
    response = await post(proxy, body)
    assert response.code == status
    error = anthropic_error(response)
    assert error["type"] == kind and words in error["message"]
    assert len(claude.received) == 0


@pytest.mark.gen_test
async def test_an_unknown_anthropic_version_is_the_upstreams_to_refuse(proxy, claude):
    """The proxy pins no version (the Python SDK sends 2026-10-21): the upstream answers, and that is relayed."""
    response = await post(proxy, message(), as_team(**{"anthropic-version": "1999-01-01"}))
    assert response.code == 400
    assert "anthropic-version" in anthropic_error(response)["message"]
    assert claude.received[-1].headers["anthropic-version"] == "1999-01-01"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.gen_test
async def test_an_upstream_answering_in_openais_shape_is_a_502_in_anthropics(proxy, claude, stream):
    claude.push(Behaviour(kind="openai"))
    response = await post(proxy, message(stream=stream))
    assert response.code == 502
    error = anthropic_error(response)
    assert error["type"] == "api_error" and "Anthropic" in error["message"]


@pytest.mark.parametrize("opening", [b": keep-alive\n\n", b'event: ping\ndata: {"type": "ping"}\n\n'])
@pytest.mark.gen_test
async def test_a_comment_or_ping_before_an_openai_shaped_stream_still_gives_a_502(proxy, claude, opening):
    claude.push(Behaviour(kind="openai", opening=opening.decode()))
    response = await post(proxy, message(stream=True))
    assert response.code == 502 and anthropic_error(response)["type"] == "api_error"
    # Anthropic's own stream that opens so is relayed as it came.
    started = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "content": []}
    own = sse("message_start", {"message": {**started, "usage": {"input_tokens": 5, "output_tokens": 1}}})
    ended = sse("message_delta", {"delta": {}, "usage": {"output_tokens": 2}}) + sse("message_stop", {})
    stream = opening + own + ended
    claude.push(raw_sse(stream))
    response = await post(proxy, message(stream=True))
    assert response.code == 200 and response.body == stream


@pytest.mark.gen_test
async def test_a_stream_whose_media_type_is_in_capitals_is_relayed_as_a_stream(proxy, app, claude, config):
    """Media types are case-insensitive (RFC 9110 8.3.1)."""
    started = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "content": []}
    stream = (
        sse("message_start", {"message": {**started, "usage": {"input_tokens": 5, "output_tokens": 1}}})
        + sse("message_delta", {"delta": {}, "usage": {"output_tokens": 2}})
        + sse("message_stop", {})
    )
    claude.push(raw_sse(stream, content_type=b"Text/Event-Stream"))
    response = await post(proxy, message(stream=True))
    assert response.code == 200 and response.body == stream
    await app.spend.ledger.flush()
    (row,) = ledger_rows(config)
    assert (row["input_tokens"], row["output_tokens"], row["estimated"]) == (5, 2, 0)


@pytest.mark.gen_test
async def test_an_upstream_error_page_is_relayed_in_anthropics_shape(proxy, claude):
    claude.by_key[KEY_B] = claude.by_key[KEY_A] = Behaviour(kind="garbage", status=502)
    response = await post(proxy, message())
    assert response.code == 502 and anthropic_error(response)["type"] == "api_error"


@pytest.mark.gen_test
async def test_an_upstream_error_in_openais_shape_is_told_in_anthropics(proxy, claude):
    openai_error = {"error": {"message": "Unknown model", "type": "invalid_request_error", "code": None}}
    claude.push(Behaviour(kind="garbage", status=404, body=json.dumps(openai_error), content_type="application/json"))
    response = await post(proxy, message())
    assert response.code == 404
    error = anthropic_error(response)
    assert error["type"] == "not_found_error" and "Unknown model" in error["message"]


@pytest.mark.gen_test
async def test_an_upstream_dying_mid_stream_ends_it_with_an_anthropic_error_event(proxy, claude):
    claude.push(Behaviour(kind="drop", after=2, chunks=["a ", "b ", "c "]))
    response = await post(proxy, message(stream=True))
    assert response.code == 200
    last = response.body.rstrip(b"\n").split(b"\n\n")[-1]
    name, data = last.split(b"\n")
    assert name == b"event: error"
    error = json.loads(data[len(b"data: ") :])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert b'"text":"b "' in response.body


@pytest.mark.parametrize(
    "headers, status, kind",
    [
        ({"anthropic-version": "2023-06-01"}, 403, "permission_error"),
        ({"anthropic-version": "2023-06-01", "x-api-key": "not-a-proxy-token"}, 403, "permission_error"),
        ({"anthropic-version": "2023-06-01", "Authorization": "Bearer " + ANN}, 401, "authentication_error"),
        ({"anthropic-version": "2023-06-01", "access-token": ANN}, 401, "authentication_error"),
    ],
)
@pytest.mark.gen_test
async def test_refused_credentials_in_anthropics_shape(proxy, claude, headers, status, kind):
    response = await post(proxy, message(), headers)
    assert response.code == status and anthropic_error(response)["type"] == kind
    assert len(claude.received) == 0


@pytest.mark.parametrize("where", ["x-api-key", "Authorization"])
@pytest.mark.gen_test
async def test_a_caller_brings_their_own_anthropic_key_with_the_proxys_token(proxy, claude, where):
    key_header = {"x-api-key": OWN} if where == "x-api-key" else {"Authorization": "Bearer " + OWN}
    response = await post(proxy, message(), {"anthropic-version": "2023-06-01", "access-token": ANN, **key_header})
    assert response.code == 200
    sent = claude.received[-1]
    assert sent.headers["x-api-key"] == OWN and "Authorization" not in sent.headers
    assert not any(ANN in value for value in sent.headers.values())


@pytest.mark.parametrize("where", ["x-api-key", "Authorization"])
@pytest.mark.gen_test
async def test_the_proxys_token_sent_again_as_the_key_never_goes_upstream(proxy, claude, where):
    def again(token):
        key = {"x-api-key": token} if where == "x-api-key" else {"Authorization": "Bearer " + token}
        return {"anthropic-version": "2023-06-01", "access-token": token, **key}

    # Without use_server_key: no key of the caller's, so nothing goes upstream.
    response = await post(proxy, message(), again(ANN))
    assert response.code == 401 and anthropic_error(response)["type"] == "authentication_error"
    assert len(claude.received) == 0
    # With it: the upstream's own key, never the token.
    response = await post(proxy, message(), again(TEAM))
    assert response.code == 200 and claude.received[-1].headers["x-api-key"] == KEY_A
    assert not any(TEAM in value for value in claude.received[-1].headers.values())


@pytest.mark.gen_test
async def test_a_named_token_as_x_api_key_uses_the_server_key(proxy, claude):
    """ANTHROPIC_API_KEY=<a named proxy token>: Claude Code sends it as x-api-key."""
    response = await post(proxy, message(), {"anthropic-version": "2023-06-01", "x-api-key": TEAM})
    assert response.code == 200 and claude.received[-1].headers["x-api-key"] == KEY_A


@pytest.mark.parametrize(
    "method, path",
    [("POST", "/v1/messages/batches"), ("POST", "/v1/messages/"), ("GET", "/v1/messages/batches/msgbatch_1")],
)
@pytest.mark.gen_test
async def test_other_paths_under_messages_are_anthropics_404_never_an_openai_upstreams(
    proxy, claude, fake_openai, method, path
):
    body = json.dumps({"requests": []}).encode() if method == "POST" else None
    headers = {"Content-Type": "application/json", **as_team()}
    response = await proxy.request(path, method=method, body=body, headers=headers, auth=False)
    assert response.code == 404 and anthropic_error(response)["type"] == "not_found_error"
    assert fake_openai.received == [] and claude.received == []


@pytest.mark.parametrize("method, path", [("POST", "/v1/messages"), ("GET", "/v1/models")])
@pytest.mark.gen_test
async def test_two_anthropic_version_lines_are_refused_not_joined(proxy, claude, method, path):
    headers = [("Authorization", "Bearer " + TEAM), ("anthropic-version", "2023-06-01")] * 2
    async with httpx.AsyncClient() as client:
        body = json.dumps(message()).encode() if method == "POST" else None
        response = await client.request(method, proxy.base_url + path, content=body, headers=headers[1:])
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "anthropic-version" in error["message"]
    assert claude.received == []


@pytest.mark.gen_test
async def test_count_tokens_is_relayed_and_not_charged(proxy, app, claude, config):
    response = await post(proxy, {"model": MODEL, "messages": HELLO}, path="/v1/messages/count_tokens")
    assert response.code == 200 and json.loads(response.body)["input_tokens"] > 0
    assert claude.received[-1].path == "/v1/messages/count_tokens"
    await app.spend.ledger.flush()
    assert ledger_rows(config) == []


@pytest.mark.gen_test
async def test_an_x_api_key_makes_an_anthropic_client_too(proxy, claude):
    response = await proxy.request("/v1/models", method="GET", headers={"x-api-key": TEAM}, auth=False)
    # Anthropic's own answer: it wants an anthropic-version, which every Anthropic SDK sends.
    assert response.code == 400 and "anthropic-version" in anthropic_error(response)["message"]
    assert claude.received[-1].path == "/v1/models" and claude.received[-1].headers["x-api-key"] == KEY_A


@pytest.mark.gen_test
async def test_the_model_list_in_anthropics_shape_for_an_anthropic_client_and_openais_for_others(
    proxy, claude, fake_openai
):
    response = await proxy.request("/v1/models?limit=1000", method="GET", headers=as_team(), auth=False)
    assert response.code == 200
    listed = json.loads(response.body)
    assert listed["has_more"] is False and listed["data"][0]["type"] == "model"
    assert claude.received[-1].path == "/v1/models" and claude.received[-1].query == "limit=1000"
    one = await proxy.request("/v1/models/" + MODEL, method="GET", headers=as_team(), auth=False)
    assert json.loads(one.body)["display_name"] == "Claude Sonnet 4.5"
    openai_list = await proxy.request("/v1/models", method="GET")
    assert json.loads(openai_list.body)["object"] == "list" and len(fake_openai.received) == 1


@pytest.mark.gen_test
async def test_a_tokens_allowed_models_hold_on_this_surface(proxy, claude):
    response = await post(proxy, message(), as_team(Authorization="Bearer " + HAIKU_ONLY))
    assert response.code == 403 and anthropic_error(response)["type"] == "permission_error"
    response = await post(proxy, message(model="claude-haiku-4-5"), as_team(Authorization="Bearer " + HAIKU_ONLY))
    assert response.code == 200 and len(claude.received) == 1


@pytest.mark.parametrize(
    "models",
    [
        b'"model": "claude-opus-4-1", "model": "claude-haiku-4-5"',
        b'"model": "claude-haiku-4-5", "MODEL": "claude-opus-4-1"',
        b'"Model": "claude-opus-4-1"',
    ],
)
@pytest.mark.gen_test
async def test_a_body_that_names_its_model_twice_does_not_pass_the_allow_list(proxy, claude, models):
    body = b'{%s, "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]}' % models
    response = await post(proxy, body, as_team(Authorization="Bearer " + HAIKU_ONLY))
    assert response.code == 400
    error = anthropic_error(response)
    assert error["type"] == "invalid_request_error" and "cannot be determined" in error["message"]
    assert len(claude.received) == 0
    # Without an allow-list the body goes upstream as it came, the upstream's to read.
    response = await post(proxy, body)
    if b'"model"' in models:
        assert response.code == 200 and claude.received[-1].body == body
    else:
        assert response.code == 400 and "model" in anthropic_error(response)["message"]


@pytest.mark.gen_test
async def test_a_model_inside_a_message_is_not_the_model_that_runs(proxy, claude):
    tool_input = {"role": "assistant", "content": [{"type": "text", "text": "x", "model": "claude-opus-4-1"}]}
    body = message(model="claude-haiku-4-5", messages=[*HELLO, tool_input, *HELLO])
    response = await post(proxy, body, as_team(Authorization="Bearer " + HAIKU_ONLY))
    assert response.code == 200


@pytest.mark.gen_test
async def test_the_cache_answers_a_repeated_message_and_stream(proxy, claude):
    for stream in (False, True):
        first = await post(proxy, message(stream=stream), as_team(Authorization="Bearer " + CACHED))
        again = await post(proxy, message(stream=stream), as_team(Authorization="Bearer " + CACHED))
        assert first.headers["x-proxy-cache"] == "miss" and again.headers["x-proxy-cache"] == "hit"
        assert again.body == first.body
    assert len(claude.received) == 2


@pytest.mark.gen_test(timeout=30)
async def test_a_stream_arrives_live_event_by_event(proxy, claude):
    claude.push(Behaviour(chunks=["one ", "two ", "three ", "four "], delay=0.25))
    chunks = []
    response = await post(
        proxy, message(stream=True), streaming_callback=lambda c: chunks.append((time.monotonic(), c)), check=False
    )
    assert response.code == 200
    times = [at for at, chunk in chunks if b"text_delta" in chunk]
    assert len(times) >= 4 and times[-1] - times[0] > 0.5


@pytest.mark.gen_test
async def test_health_metrics_and_the_access_line_name_the_anthropic_surface(proxy, claude, caplog):
    response = await post(proxy, message())
    assert response.code == 200
    health = json.loads((await proxy.request("/healthz", method="GET", auth=False)).body)
    kinds = {u["name"]: u["kind"] for u in health["upstreams"]}
    assert kinds["claude-a"] == "anthropic" and kinds["openai"] == "openai"
    lines = [r.getMessage() for r in caplog.records if r.name == "chat_gpt_proxy.access"]
    line = next(line for line in lines if "path=/v1/messages " in line)
    assert "upstream=claude-a" in line and "model=claude-sonnet-4-5-20250929" in line
    # Anthropic's request id, what its support asks for; the usage, counted as input and output.
    assert "upstream_request_id=" + response.headers["request-id"] in line
    usage = json.loads(response.body)["usage"]
    assert "prompt_tokens=%d completion_tokens=%d" % (usage["input_tokens"], usage["output_tokens"]) in line


@pytest.mark.settings(metrics_enabled=True)
@pytest.mark.gen_test
async def test_metrics_count_the_messages_route(proxy, claude):
    assert (await post(proxy, message())).code == 200
    text = (await proxy.request("/metrics", method="GET", auth=False)).body.decode()
    assert 'proxy_requests_total{route="messages",status="200",token="team"} 1.0' in text


@pytest.mark.gen_test(timeout=30)
async def test_an_anthropic_upstream_has_its_own_egress_proxy(proxy, app, claude, fake_openai, tmp_path):
    from tests.test_upstreams import use_upstreams

    tiny = TinyProxy(str(tmp_path))
    try:
        toml = upstreams_toml(fake_openai, claude).replace(
            '[claude-a]\nkind = "anthropic"', '[claude-a]\nkind = "anthropic"\nproxy = "%s"' % tiny.proxy().address
        )
        use_upstreams(app, toml)
        assert (await post(proxy, message(stream=True))).code == 200
        assert tiny.connections() == 1 and len(claude.received) == 1
    finally:
        tiny.stop()


@pytest.mark.gen_test
async def test_without_an_anthropic_upstream_the_answer_says_so(proxy, app, claude, fake_openai):
    from tests.test_upstreams import use_upstreams

    use_upstreams(app, '[openai]\nbase_url = "%s"\n' % fake_openai.url)
    response = await post(proxy, message())
    assert response.code == 404 and anthropic_error(response)["type"] == "not_found_error"
    assert len(claude.received) == 0


@pytest.mark.gen_test
async def test_the_unnamed_access_token_with_a_callers_key(proxy, claude):
    response = await post(proxy, message(), {"access-token": ACCESS_TOKEN, "x-api-key": OWN, "anthropic-version": "x"})
    assert response.code == 400 and "anthropic-version" in anthropic_error(response)["message"]
    assert claude.received[-1].headers["x-api-key"] == OWN
